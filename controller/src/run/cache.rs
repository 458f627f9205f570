//! Watch caches that keep views instead of objects. Each object is turned into what a pass
//! reads (a claim, pod, slice or node view) once, when the watch delivers it, and only the
//! view is kept: a pass takes the views as they are (an `Arc` each) instead of building them
//! again from every cached object, and the objects' other fields are never held.
//!
//! The views live in kube-runtime's reflector store: [`Cached`] implements its `Lookup`, so
//! the store's relist (buffer, then swap on `InitDone`) and readiness are kube's.

use kube::runtime::reflector::Lookup;
use kube::runtime::watcher;
use std::borrow::Cow;
use std::marker::PhantomData;
use std::sync::Arc;

/// What identifies a cached object, as its metadata said: its key, and the resourceVersion
/// that keys a kept engine. (No UID: no pass reads it here, and a view that needs it has it.)
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Meta {
    pub name: String,
    pub namespace: Option<String>,
    pub resource_version: Option<String>,
}

impl Meta {
    pub fn of<K: kube::Resource>(object: &K) -> Meta {
        let m = object.meta();
        Meta {
            name: m.name.clone().unwrap_or_default(),
            namespace: m.namespace.clone(),
            resource_version: m.resource_version.clone(),
        }
    }
}

/// The view of one object of kind `K`, with the metadata that keys it in the store.
pub struct Cached<K, V> {
    pub meta: Meta,
    /// `None`: the object could not be read (said in a warning when it arrived); kept so that
    /// it replaces what an earlier, readable version left.
    pub view: Option<Arc<V>>,
    kind: PhantomData<fn() -> K>,
}

impl<K, V> Clone for Cached<K, V> {
    fn clone(&self) -> Self {
        Cached {
            meta: self.meta.clone(),
            view: self.view.clone(),
            kind: PhantomData,
        }
    }
}

impl<K, V> std::fmt::Debug for Cached<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cached")
            .field("meta", &self.meta)
            .field("readable", &self.view.is_some())
            .finish()
    }
}

impl<K: kube::Resource, V> Cached<K, V> {
    /// The view of `object` as `to_view` makes it; an error is logged with the object's name
    /// and leaves an unreadable entry.
    pub fn of<E: std::fmt::Display>(object: &K, to_view: impl Fn(&K) -> Result<V, E>) -> Self {
        let meta = Meta::of(object);
        let view = match to_view(object) {
            Ok(v) => Some(Arc::new(v)),
            Err(e) => {
                tracing::warn!(
                    namespace = meta.namespace.as_deref().unwrap_or(""),
                    name = %meta.name,
                    error = %e,
                    "ignoring an unreadable object"
                );
                None
            }
        };
        Cached {
            meta,
            view,
            kind: PhantomData,
        }
    }
}

impl<K: kube::Resource<DynamicType = ()>, V> Lookup for Cached<K, V> {
    type DynamicType = ();

    fn kind(_: &()) -> Cow<'_, str> {
        K::kind(&())
    }
    fn group(_: &()) -> Cow<'_, str> {
        K::group(&())
    }
    fn version(_: &()) -> Cow<'_, str> {
        K::version(&())
    }
    fn plural(_: &()) -> Cow<'_, str> {
        K::plural(&())
    }
    fn name(&self) -> Option<Cow<'_, str>> {
        Some(Cow::Borrowed(&self.meta.name))
    }
    fn namespace(&self) -> Option<Cow<'_, str>> {
        self.meta.namespace.as_deref().map(Cow::Borrowed)
    }
    // The store copies these into the `extra` of every key, which it never compares or reads:
    // left out, they are not held a second time for each of tens of thousands of objects.
    fn resource_version(&self) -> Option<Cow<'_, str>> {
        None
    }
    fn uid(&self) -> Option<Cow<'_, str>> {
        None
    }
}

/// The same watch event carrying each object's view; the object itself is dropped here.
pub fn to_views<K, V, E>(
    event: watcher::Event<K>,
    to_view: impl Fn(&K) -> Result<V, E>,
) -> watcher::Event<Cached<K, V>>
where
    K: kube::Resource,
    E: std::fmt::Display,
{
    use watcher::Event::*;
    match event {
        Apply(o) => Apply(Cached::of(&o, to_view)),
        // Only the key of a deleted object is read: no view, no warning about its content.
        Delete(o) => Delete(Cached {
            meta: Meta::of(&o),
            view: None,
            kind: PhantomData,
        }),
        InitApply(o) => InitApply(Cached::of(&o, to_view)),
        Init => Init,
        InitDone => InitDone,
    }
}

/// The readable views of a store's objects.
pub fn views<K, V>(entries: &[Arc<Cached<K, V>>]) -> Vec<Arc<V>> {
    entries.iter().filter_map(|e| e.view.clone()).collect()
}

/// (name, resourceVersion) of every entry: what keys a kept engine.
pub fn versions<K, V>(entries: &[Arc<Cached<K, V>>]) -> Vec<(String, String)> {
    entries
        .iter()
        .map(|e| {
            (
                e.meta.name.clone(),
                e.meta.resource_version.clone().unwrap_or_default(),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::api::ObjectMeta;
    use kube::runtime::reflector;

    fn config_map(name: &str, rv: &str, value: &str) -> ConfigMap {
        ConfigMap {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ns".into()),
                uid: Some(format!("uid-{name}")),
                resource_version: Some(rv.into()),
                ..Default::default()
            },
            data: Some([("v".to_string(), value.to_string())].into()),
            ..Default::default()
        }
    }

    /// The value as a number; anything else is unreadable.
    fn number(c: &ConfigMap) -> Result<u32, String> {
        let v = c.data.as_ref().and_then(|d| d.get("v")).cloned();
        v.unwrap_or_default()
            .parse()
            .map_err(|e| format!("data.v: {e}"))
    }

    fn contents(store: &reflector::Store<Cached<ConfigMap, u32>>) -> Vec<(String, Option<u32>)> {
        let mut all: Vec<_> = store
            .state()
            .iter()
            .map(|e| (e.meta.name.clone(), e.view.as_deref().copied()))
            .collect();
        all.sort();
        all
    }

    #[test]
    fn the_store_keeps_views_replaces_them_on_update_and_relist_and_forgets_deleted_objects() {
        let (store, mut writer) = reflector::store::<Cached<ConfigMap, u32>>();
        for event in [
            watcher::Event::Init,
            watcher::Event::InitApply(config_map("a", "1", "10")),
            watcher::Event::InitApply(config_map("b", "2", "20")),
            watcher::Event::InitDone,
        ] {
            writer.apply_watcher_event(&to_views(event, number));
        }
        assert_eq!(
            contents(&store),
            [("a".into(), Some(10)), ("b".into(), Some(20))]
        );

        // An update that cannot be read replaces the readable view it follows.
        writer.apply_watcher_event(&to_views(
            watcher::Event::Apply(config_map("a", "3", "ten")),
            number,
        ));
        writer.apply_watcher_event(&to_views(
            watcher::Event::Delete(config_map("b", "4", "20")),
            number,
        ));
        assert_eq!(contents(&store), [("a".into(), None)]);
        let a = store.state().pop().unwrap();
        assert_eq!(a.meta.resource_version.as_deref(), Some("3"));
        assert!(views(&store.state()).is_empty());

        // A relist replaces everything at its end, not before.
        writer.apply_watcher_event(&to_views(watcher::Event::Init, number));
        writer.apply_watcher_event(&to_views(
            watcher::Event::InitApply(config_map("c", "5", "30")),
            number,
        ));
        assert_eq!(contents(&store), [("a".into(), None)]);
        writer.apply_watcher_event(&to_views(watcher::Event::InitDone, number));
        assert_eq!(contents(&store), [("c".into(), Some(30))]);
        assert_eq!(versions(&store.state()), [("c".into(), "5".into())]);
    }
}
