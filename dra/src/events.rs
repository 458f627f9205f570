//! Kubernetes Events (events.k8s.io/v1) with the API's limits applied, so that a long message
//! is shortened rather than refused.

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::events::EventType;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// `note` is limited to 1 kB by the API server's validation.
pub const MAX_NOTE_BYTES: usize = 1024;

/// `note` cut to [`MAX_NOTE_BYTES`] on a character boundary, with `...` where it was cut.
pub fn truncate_note(note: &str) -> String {
    if note.len() <= MAX_NOTE_BYTES {
        return note.to_string();
    }
    let mut end = MAX_NOTE_BYTES - 3;
    while !note.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &note[..end])
}

/// The reference an Event about `object` points at, in the API version the cluster serves it
/// (`kubectl describe` shows the Events whose reference matches the object it shows).
pub fn reference<K: kube::Resource<DynamicType = ()>>(
    object: &K,
    api_version: &str,
) -> ObjectReference {
    let meta = object.meta();
    ObjectReference {
        api_version: Some(api_version.to_string()),
        kind: Some(K::kind(&()).into_owned()),
        name: meta.name.clone(),
        namespace: meta.namespace.clone(),
        uid: meta.uid.clone(),
        resource_version: meta.resource_version.clone(),
        field_path: None,
    }
}

/// Events published again within this window update the first one as a series (count and
/// lastObservedTime) instead of creating another: kube-rs' Recorder and client-go use 6
/// minutes. A caller refreshing an Event more often than this keeps one Event alive.
pub const SERIES_WINDOW: Duration = Duration::from_secs(6 * 60);

/// What makes two Events the same series: kube's Recorder leaves the note out, so a changed
/// note would only bump the count of an Event still showing the old one; and it keys on the
/// object's resourceVersion, which a pod's status updates change under a waiting pod.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct SeriesKey {
    kind: String,
    namespace: String,
    name: String,
    uid: String,
    type_: &'static str,
    reason: String,
    action: String,
    note: String,
}

impl SeriesKey {
    /// The key as the sink remembers it: 8 bytes instead of the strings and the note (up to
    /// 1 KiB), as a controller may publish one Event per claim. Two keys would share a series
    /// only on a 64-bit hash collision, which would bump the count of the other Event.
    fn digest(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.hash(&mut h);
        h.finish()
    }
}

#[derive(Clone, Debug)]
struct Series {
    /// The Event's name in its namespace.
    name: String,
    count: i32,
    last: Instant,
}

/// The series published within the window, and when expired ones were last dropped.
#[derive(Debug, Default)]
struct SeriesBook {
    by_key: HashMap<u64, Series>,
    pruned: Option<Instant>,
}

impl SeriesBook {
    /// The live series for `key`; expired series are dropped at most every tenth of the
    /// window (a scan per publish would make a burst of N Events cost N² steps).
    fn get(&mut self, key: u64, now: Instant) -> Option<Series> {
        if self
            .pruned
            .is_none_or(|at| now.duration_since(at) >= SERIES_WINDOW / 10)
        {
            self.by_key
                .retain(|_, s| now.duration_since(s.last) < SERIES_WINDOW);
            self.pruned = Some(now);
        }
        self.by_key
            .get(&key)
            .filter(|s| now.duration_since(s.last) < SERIES_WINDOW)
            .cloned()
    }
}

/// Publishes Events as one component (`reportingController`) and instance.
#[derive(Clone)]
pub struct EventSink {
    client: kube::Client,
    controller: String,
    instance: String,
    series: Arc<Mutex<SeriesBook>>,
}

impl EventSink {
    /// `controller` is the reporting controller (`vgpu.hami.io/kubelet-plugin`), `instance`
    /// the replica or node.
    pub fn new(client: kube::Client, controller: &str, instance: &str) -> Self {
        EventSink {
            client,
            controller: controller.to_string(),
            instance: instance.to_string(),
            series: Arc::default(),
        }
    }

    /// Publish one Event, or, for the same object, type, reason, action and note within
    /// [`SERIES_WINDOW`] of the last, count it in that Event's series. A failure is logged,
    /// never fatal (Events are best effort in Kubernetes too).
    pub async fn publish(
        &self,
        regarding: &ObjectReference,
        type_: EventType,
        reason: &str,
        action: &str,
        note: &str,
    ) {
        if let Err(e) = self
            .try_publish(regarding, type_, reason, action, note)
            .await
        {
            tracing::warn!(
                kind = regarding.kind.as_deref().unwrap_or(""),
                name = regarding.name.as_deref().unwrap_or(""),
                reason,
                error = %e,
                "publishing an Event failed"
            );
        }
    }

    async fn try_publish(
        &self,
        regarding: &ObjectReference,
        type_: EventType,
        reason: &str,
        action: &str,
        note: &str,
    ) -> Result<(), kube::Error> {
        let note = truncate_note(note);
        let namespace = regarding
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let key = SeriesKey {
            kind: regarding.kind.clone().unwrap_or_default(),
            namespace: namespace.clone(),
            name: regarding.name.clone().unwrap_or_default(),
            uid: regarding.uid.clone().unwrap_or_default(),
            type_: match type_ {
                EventType::Normal => "Normal",
                EventType::Warning => "Warning",
            },
            reason: reason.to_string(),
            action: action.to_string(),
            note: note.clone(),
        };
        let now = Instant::now();
        let digest = key.digest();
        let existing = self
            .series
            .lock()
            .ok()
            .and_then(|mut series| series.get(digest, now));
        let api: Api<Event> = Api::namespaced(self.client.clone(), &namespace);
        if let Some(existing) = existing {
            let count = existing.count + 1;
            let patch = serde_json::json!({"series": {
                "count": count,
                "lastObservedTime": MicroTime(Timestamp::now()),
            }});
            match api
                .patch(
                    &existing.name,
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await
            {
                Ok(_) => {
                    self.remember(digest, existing.name, count, now);
                    return Ok(());
                }
                // Expired or deleted meanwhile: start a new one.
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e),
            }
        }
        let stamp = Timestamp::now();
        let event = Event {
            metadata: ObjectMeta {
                name: Some(format!(
                    "{}.{:x}",
                    regarding.name.as_deref().unwrap_or(&self.controller),
                    stamp.as_nanosecond()
                )),
                namespace: Some(namespace),
                ..Default::default()
            },
            event_time: Some(MicroTime(stamp)),
            type_: Some(key.type_.to_string()),
            reason: Some(reason.to_string()),
            action: Some(action.to_string()),
            note: Some(note),
            regarding: Some(regarding.clone()),
            reporting_controller: Some(self.controller.clone()),
            reporting_instance: Some(self.instance.clone()),
            ..Default::default()
        };
        let created = api.create(&PostParams::default(), &event).await?;
        self.remember(digest, created.metadata.name.unwrap_or_default(), 1, now);
        Ok(())
    }

    fn remember(&self, key: u64, name: String, count: i32, now: Instant) {
        if let Ok(mut series) = self.series.lock() {
            series.by_key.insert(
                key,
                Series {
                    name,
                    count,
                    last: now,
                },
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_are_found_within_the_window_and_forgotten_after_it() {
        let mut book = SeriesBook::default();
        let start = Instant::now();
        let series = |last| Series {
            name: "e".into(),
            count: 1,
            last,
        };
        book.by_key.insert(1, series(start));
        assert_eq!(book.get(1, start).map(|s| s.count), Some(1));
        assert!(book.get(2, start).is_none());
        // Expired: not found, even before the next prune drops it.
        let later = start + SERIES_WINDOW;
        book.pruned = Some(later);
        assert!(book.get(1, later).is_none());
        assert_eq!(book.by_key.len(), 1);
        // A prune runs once a tenth of the window has passed since the last.
        assert!(book.get(1, later + SERIES_WINDOW / 10).is_none());
        assert!(book.by_key.is_empty());
    }

    #[test]
    fn notes_are_cut_on_a_character_boundary() {
        assert_eq!(truncate_note("short"), "short");
        let exact = "x".repeat(MAX_NOTE_BYTES);
        assert_eq!(truncate_note(&exact), exact);
        let long = "é".repeat(MAX_NOTE_BYTES);
        let cut = truncate_note(&long);
        assert!(cut.len() <= MAX_NOTE_BYTES, "{}", cut.len());
        assert!(cut.ends_with("..."));
        assert!(cut.trim_end_matches("...").chars().all(|c| c == 'é'));
    }
}
