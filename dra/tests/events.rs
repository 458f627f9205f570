//! Events against the in-memory API server: a repeated Event is one Event counted as a
//! series, and a new note is a new Event rather than a count on one showing the old note.

use dra::events::EventSink;
use fake_apiserver::{DraVersions, FakeApiServer, Gvr};
use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::EventType;
use serde_json::Value;

fn pod(name: &str) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Pod".into()),
        name: Some(name.into()),
        namespace: Some("ml".into()),
        uid: Some(format!("uid-{name}")),
        ..Default::default()
    }
}

fn events(server: &FakeApiServer) -> Vec<Value> {
    let mut all = server.list(Gvr::new("events.k8s.io", "v1", "events"));
    all.sort_by_key(|e| e["metadata"]["name"].as_str().unwrap_or("").to_string());
    all
}

#[tokio::test]
async fn repeats_are_a_series_and_a_new_note_is_a_new_event() {
    let server = FakeApiServer::start_with_builtin(DraVersions::V1Only)
        .await
        .unwrap();
    let sink = EventSink::new(server.client(), "vgpu-controller", "replica-1");
    let warn = |note: &'static str| {
        let sink = sink.clone();
        async move {
            sink.publish(
                &pod("p"),
                EventType::Warning,
                "FailedAllocation",
                "Allocate",
                note,
            )
            .await
        }
    };
    warn("no room").await;
    let first = events(&server);
    assert_eq!(first.len(), 1);
    assert!(first[0]["series"].is_null(), "{}", first[0]);
    assert_eq!(first[0]["reportingController"], "vgpu-controller");
    assert_eq!(first[0]["reportingInstance"], "replica-1");
    assert_eq!(first[0]["regarding"]["kind"], "Pod");
    warn("no room").await;
    warn("no room").await;
    let repeated = events(&server);
    assert_eq!(repeated.len(), 1, "{repeated:?}");
    assert_eq!(repeated[0]["series"]["count"], 3);
    assert_eq!(repeated[0]["note"], "no room");
    assert!(repeated[0]["series"]["lastObservedTime"].is_string());

    // Another reason for the same pod: its own Event, the first left as it was.
    warn("no GPU matches").await;
    let changed = events(&server);
    assert_eq!(changed.len(), 2, "{changed:?}");
    let notes: Vec<&str> = changed.iter().filter_map(|e| e["note"].as_str()).collect();
    assert!(notes.contains(&"no room") && notes.contains(&"no GPU matches"));

    // Another pod with the same note: its own Event too.
    sink.publish(
        &pod("q"),
        EventType::Warning,
        "FailedAllocation",
        "Allocate",
        "no room",
    )
    .await;
    assert_eq!(events(&server).len(), 3);

    // A series whose Event was deleted (expired) starts a new Event.
    let name = repeated[0]["metadata"]["name"]
        .as_str()
        .unwrap()
        .to_string();
    server
        .delete_object(Gvr::new("events.k8s.io", "v1", "events"), "ml", &name)
        .unwrap();
    warn("no room").await;
    let after = events(&server);
    assert_eq!(after.len(), 3, "{after:?}");
    assert!(
        after.iter().any(|e| e["note"] == "no room"
            && e["regarding"]["name"] == "p"
            && e["series"].is_null())
    );
}
