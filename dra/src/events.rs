//! Kubernetes Events (events.k8s.io/v1) with the API's limits applied, so that a long message
//! is shortened rather than refused.

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};

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

/// Publishes Events as one component (`reportingController`) and instance.
#[derive(Clone)]
pub struct EventSink {
    recorder: Recorder,
}

impl EventSink {
    /// `controller` is the reporting controller (`vgpu.hami.io/kubelet-plugin`), `instance`
    /// the replica or node.
    pub fn new(client: kube::Client, controller: &str, instance: &str) -> Self {
        EventSink {
            recorder: Recorder::new(
                client,
                Reporter {
                    controller: controller.to_string(),
                    instance: Some(instance.to_string()),
                },
            ),
        }
    }

    /// Publish one Event; a failure is logged, never fatal (Events are best effort in
    /// Kubernetes too).
    pub async fn publish(
        &self,
        regarding: &ObjectReference,
        type_: EventType,
        reason: &str,
        action: &str,
        note: &str,
    ) {
        let event = Event {
            type_,
            reason: reason.to_string(),
            note: Some(truncate_note(note)),
            action: action.to_string(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, regarding).await {
            tracing::warn!(
                kind = regarding.kind.as_deref().unwrap_or(""),
                name = regarding.name.as_deref().unwrap_or(""),
                reason,
                error = %e,
                "publishing an Event failed"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
