//! Azure's system events, routed like telemetry: device and module lifecycle, twin changes (from
//! the service API and from devices) and connection state, with Azure's properties and bodies,
//! only when a route reads their source, filtered by route conditions on their properties.

// Test helpers outside `#[test]` functions unwrap too: a failure is a test failure.
#![allow(clippy::unwrap_used)]

use std::path::Path;

use hyper::Method;
use ingot_engine::mqtt::QoS;
use ingot_engine::store::{PartitionId, Reader, StartAt};
use ingot_tests::mqtt_client::{Client, Received};
use ingot_tests::Hub;
use serde_json::{json, Value};

/// One stored event: system properties, application properties, body.
#[derive(Debug)]
struct Event {
    system: Vec<(String, String)>,
    app: Vec<(String, String)>,
    body: Value,
}

impl Event {
    fn app(&self, name: &str) -> Option<&str> {
        self.app
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn system(&self, name: &str) -> Option<&str> {
        self.system
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Every event in the store at `dir`, in order per partition (each test uses one device, so one
/// partition holds them all in the order they were appended).
fn events(dir: &Path) -> Vec<Event> {
    let mut all = Vec::new();
    if !dir.exists() {
        return all;
    }
    let reader = Reader::open(dir).unwrap();
    for p in 0..reader.partition_count() {
        let mut partition = reader.partition(PartitionId(p), StartAt::Start).unwrap();
        while let Some(record) = partition.next().unwrap() {
            let message = record.message;
            let pairs = |props: &[ingot_engine::store::format::ArchivedProperty]| {
                props
                    .iter()
                    .map(|p| (p.name().to_owned(), p.value().to_owned()))
                    .collect::<Vec<_>>()
            };
            all.push(Event {
                system: pairs(message.system_properties()),
                app: pairs(message.application_properties()),
                body: serde_json::from_slice(message.body()).unwrap_or(Value::Null),
            });
        }
    }
    all
}

fn op_types(events: &[Event]) -> Vec<String> {
    events
        .iter()
        .map(|e| {
            let module = e
                .app("moduleId")
                .map(|m| format!("/{m}"))
                .unwrap_or_default();
            format!("{}{module}", e.app("opType").unwrap())
        })
        .collect()
}

fn rest(hub: &Hub, method: Method, path: &str, body: Option<Value>) -> Value {
    let reply = hub
        .client("iothubowner")
        .request(method, path, &[("if-match", "\"*\"")], body.as_ref())
        .unwrap();
    reply.success().unwrap()
}

fn next_publish(client: &mut Client) -> (String, Vec<u8>) {
    loop {
        match client.receive().unwrap() {
            Some(Received::Publish { topic, payload, .. }) => return (topic, payload),
            Some(_) => {}
            None => panic!("the hub closed the connection"),
        }
    }
}

const ROUTES: &str = r#"
[[routing.endpoints]]
name = "lifecycle"
type = "log"

[[routing.endpoints]]
name = "twins"
type = "log"

[[routing.endpoints]]
name = "connections"
type = "log"

[[routing.routes]]
name = "lifecycle"
source = "DeviceLifecycleEvents"
endpointNames = ["lifecycle"]

[[routing.routes]]
name = "creations-to-events"
source = "DeviceLifecycleEvents"
condition = "opType = 'createDeviceIdentity' AND IS_DEFINED($body.properties.desired)"
endpointNames = ["events"]

[[routing.routes]]
name = "twins"
source = "TwinChangeEvents"
endpointNames = ["twins"]

[[routing.routes]]
name = "connections"
source = "DeviceConnectionStateEvents"
endpointNames = ["connections"]

[[routing.routes]]
name = "telemetry"
endpointNames = ["events"]
"#;

#[test]
fn lifecycle_twin_and_connection_events_are_routed_with_azures_schemas() {
    let mut hub = Hub::start_with_config(ROUTES);
    let key = hub.create_sas_device("dev-1");
    hub.create_sas_module("dev-1", "m1");
    rest(
        &hub,
        Method::PATCH,
        "/twins/dev-1",
        Some(json!({"tags": {"site": "a"}, "properties": {"desired": {"rate": 5}}})),
    );
    rest(
        &hub,
        Method::PUT,
        "/twins/dev-1",
        Some(json!({"tags": {"site": "b"}, "properties": {"desired": {"rate": 6}}})),
    );

    let (mut client, _) = hub.connect_device("dev-1", &key, true);
    client
        .subscribe(1, &[("$iothub/twin/res/#", QoS::AtMostOnce)])
        .unwrap();
    assert!(matches!(
        client.receive().unwrap(),
        Some(Received::Suback(1, _))
    ));
    client
        .publish(
            "$iothub/twin/PATCH/properties/reported/?$rid=7",
            br#"{"temp": 21}"#,
            Some(2),
        )
        .unwrap();
    let (topic, _) = next_publish(&mut client);
    assert!(topic.starts_with("$iothub/twin/res/204/"), "{topic}");
    client
        .publish("devices/dev-1/messages/events/", b"telemetry", Some(3))
        .unwrap();
    while client.receive().unwrap() != Some(Received::Puback(3)) {}
    drop(client);
    // The disconnection is seen by the control plane asynchronously.
    std::thread::sleep(std::time::Duration::from_millis(500));
    rest(&hub, Method::DELETE, "/devices/dev-1/modules/m1", None);
    rest(&hub, Method::DELETE, "/devices/dev-1", None);
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(hub.terminate().code(), Some(0));

    let endpoints = hub.data_dir.join("endpoints");
    let lifecycle = events(&endpoints.join("lifecycle"));
    assert_eq!(
        op_types(&lifecycle),
        [
            "createDeviceIdentity",
            "createDeviceIdentity/m1",
            "deleteDeviceIdentity/m1",
            "deleteDeviceIdentity"
        ]
    );
    let created = &lifecycle[0];
    assert_eq!(created.app("hubName"), Some("localhost"));
    assert_eq!(created.app("deviceId"), Some("dev-1"));
    assert_eq!(
        created.app("iothub-message-schema"),
        Some("deviceLifecycleNotification")
    );
    let timestamp = created.app("operationTimestamp").unwrap();
    assert_eq!(timestamp.split_once('.').unwrap().1.len(), 8, "{timestamp}");
    assert_eq!(created.system("content-type"), Some("application/json"));
    assert_eq!(created.system("content-encoding"), Some("utf-8"));
    assert_eq!(
        created.system("iothub-message-source"),
        Some("deviceLifecycleEvents")
    );
    assert_eq!(created.system("iothub-connection-device-id"), Some("dev-1"));
    assert_eq!(created.system("user-id"), Some("localhost"));
    assert!(created.system("correlation-id").is_some());
    assert_eq!(created.body["deviceId"], "dev-1");
    assert_eq!(created.body["version"], 1);
    assert_eq!(created.body["properties"]["desired"]["$version"], 1);
    assert!(created.body["etag"].is_string());
    assert_eq!(lifecycle[1].body["moduleId"], "m1");
    assert_eq!(
        lifecycle[1].system("iothub-connection-module-id"),
        Some("m1")
    );
    // The deletion carries the twin as it was.
    assert_eq!(lifecycle[3].body["tags"]["site"], "b");

    let twins = events(&endpoints.join("twins"));
    assert_eq!(
        op_types(&twins),
        ["updateTwin", "replaceTwin", "updateTwin"]
    );
    assert_eq!(
        twins[0].app("iothub-message-schema"),
        Some("twinChangeNotification")
    );
    assert_eq!(twins[0].body["tags"], json!({"site": "a"}));
    assert_eq!(twins[0].body["properties"]["desired"]["rate"], 5);
    assert_eq!(twins[0].body["properties"]["desired"]["$version"], 2);
    assert_eq!(twins[1].body["tags"]["site"], "b");
    assert_eq!(twins[1].body["deviceId"], "dev-1");
    assert_eq!(
        twins[2].body["properties"]["reported"],
        json!({"temp": 21, "$version": 2})
    );
    let versions: Vec<u64> = twins
        .iter()
        .map(|t| t.body["version"].as_u64().unwrap())
        .collect();
    assert!(versions.windows(2).all(|w| w[0] < w[1]), "{versions:?}");

    let connections = events(&endpoints.join("connections"));
    assert_eq!(
        op_types(&connections),
        ["deviceConnected", "deviceDisconnected"]
    );
    assert_eq!(
        connections[0].app("iothub-message-schema"),
        Some("deviceConnectionStateNotification")
    );
    let sequence = |e: &Event| e.body["sequenceNumber"].as_str().unwrap().to_owned();
    assert_eq!(sequence(&connections[0]).len(), 64);
    assert!(sequence(&connections[0]) < sequence(&connections[1]));

    // `events` holds the telemetry and, by its condition, the two creations, in order.
    let builtin = events(&hub.data_dir);
    let kinds: Vec<String> = builtin
        .iter()
        .map(|e| {
            e.app("opType")
                .map(str::to_owned)
                .unwrap_or_else(|| e.body.to_string())
        })
        .collect();
    assert_eq!(
        kinds,
        ["createDeviceIdentity", "createDeviceIdentity", "null"],
        "telemetry bodies are not JSON here, so they read as null"
    );
}

#[test]
fn without_a_route_for_their_source_no_events_are_written() {
    let mut hub = Hub::start_with_config(
        r#"
[[routing.endpoints]]
name = "twins"
type = "log"

[[routing.routes]]
name = "twins"
source = "TwinChangeEvents"
condition = "opType = 'replaceTwin'"
endpointNames = ["twins"]
"#,
    );
    let key = hub.create_sas_device("dev-2");
    rest(
        &hub,
        Method::PATCH,
        "/twins/dev-2",
        Some(json!({"tags": {"x": 1}})),
    );
    let (client, _) = hub.connect_device("dev-2", &key, true);
    drop(client);
    std::thread::sleep(std::time::Duration::from_millis(300));
    rest(&hub, Method::DELETE, "/devices/dev-2", None);
    assert_eq!(hub.terminate().code(), Some(0));
    // No lifecycle or connection route: nothing in `events` (the fallback is for device
    // messages only); the one twin change was an update, which the condition filters out.
    assert!(events(&hub.data_dir).is_empty());
    assert!(events(&hub.data_dir.join("endpoints").join("twins")).is_empty());
}
