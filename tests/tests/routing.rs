//! Message routing on the ingest path: routes from the configuration file send each device
//! message to the endpoints whose conditions it matches (property, body and system-property
//! conditions), custom `log` endpoints are read like `events`, the fallback route catches the
//! rest, and a disabled route does nothing.

// Test helpers outside `#[test]` functions unwrap too: a failure is a test failure.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::Path;

use ingot_engine::store::{PartitionId, Reader, StartAt};
use ingot_tests::mqtt_client::Received;
use ingot_tests::Hub;

const ROUTING: &str = r#"
[routing]
fallback = true

[[routing.endpoints]]
name = "alerts"
type = "log"

[[routing.endpoints]]
name = "hot"
type = "log"

[[routing.routes]]
name = "critical"
source = "DeviceMessages"
condition = "level = 'critical'"
endpointNames = ["alerts"]

[[routing.routes]]
name = "warm"
condition = "$body.temp > 30"
endpointNames = ["hot"]

[[routing.routes]]
name = "b-critical-also-to-events"
condition = "LOWER(level) = 'critical' AND $connectionDeviceId = 'dev-b'"
endpointNames = ["events"]

[[routing.routes]]
name = "off"
endpointNames = ["hot"]
isEnabled = false
"#;

/// (device, body) of every record in the store at `dir`.
fn records(dir: &Path) -> BTreeSet<(String, String)> {
    let reader = Reader::open(dir).unwrap();
    let mut all = BTreeSet::new();
    for p in 0..reader.partition_count() {
        let mut partition = reader.partition(PartitionId(p), StartAt::Start).unwrap();
        while let Some(record) = partition.next().unwrap() {
            let message = record.message;
            let device = message
                .system_properties()
                .iter()
                .find(|p| p.name() == "iothub-connection-device-id")
                .map(|p| p.value().to_owned())
                .unwrap();
            let body = String::from_utf8_lossy(message.body()).into_owned();
            all.insert((device, body));
        }
    }
    all
}

fn publish_all(hub: &Hub, device: &str, messages: &[(&str, &str)]) {
    let key = hub.create_sas_device(device);
    let (mut client, _) = hub.connect_device(device, &key, false);
    for (i, (bag, body)) in messages.iter().enumerate() {
        let id = i as u16 + 1;
        let topic = format!("devices/{device}/messages/events/{bag}");
        client.publish(&topic, body.as_bytes(), Some(id)).unwrap();
        assert_eq!(client.receive().unwrap(), Some(Received::Puback(id)));
    }
}

fn set(items: &[(&str, &str)]) -> BTreeSet<(String, String)> {
    items
        .iter()
        .map(|(d, b)| (d.to_string(), b.to_string()))
        .collect()
}

#[test]
fn messages_go_to_the_endpoints_their_routes_match() {
    let mut hub = Hub::start_with_config(ROUTING);
    publish_all(
        &hub,
        "dev-a",
        &[
            ("level=critical", "a-critical"),
            ("%24.ct=application%2Fjson&%24.ce=utf-8", r#"{"temp": 50}"#),
            ("%24.ct=application%2Fjson&%24.ce=utf-8", r#"{"temp": 10}"#),
            ("", "a-plain"),
        ],
    );
    publish_all(&hub, "dev-b", &[("level=Critical", "b-critical")]);
    // Every PUBACK followed the appends; stop the hub so the logs are flushed and closed.
    assert_eq!(hub.terminate().code(), Some(0));

    let endpoints = hub.data_dir.join("endpoints");
    assert_eq!(
        records(&endpoints.join("alerts")),
        set(&[("dev-a", "a-critical")]),
        "only the exact property match (properties compare case-sensitively by value)"
    );
    assert_eq!(
        records(&endpoints.join("hot")),
        set(&[("dev-a", r#"{"temp": 50}"#)]),
        "the body condition, and nothing from the disabled route"
    );
    assert_eq!(
        records(&hub.data_dir),
        set(&[
            ("dev-a", r#"{"temp": 10}"#),
            ("dev-a", "a-plain"),
            ("dev-b", "b-critical"),
        ]),
        "events gets what no route matched (the fallback) and what a route sends there, \
         not what went only to custom endpoints"
    );

    // `monitor-events --endpoint` reads a custom endpoint like `events`.
    hub.restart();
    let out = hub.cli(&[
        "monitor-events",
        "--endpoint",
        "alerts",
        "--from",
        "start",
        "--no-follow",
        "--data-dir",
        hub.data_dir.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["body"], "a-critical");
}

#[test]
fn a_bad_route_is_a_clear_configuration_error() {
    let bad = "[[routing.routes]]\nname = \"x\"\ncondition = \"level = \"\nendpointNames = [\"events\"]\n";
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("ingot.toml");
    std::fs::write(&config, bad).unwrap();
    let out = std::process::Command::new(ingot_tests::ingot_bin())
        .args(["serve", "--data-dir"])
        .arg(dir.path().join("data"))
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("routing") && err.contains("at "), "{err}");
    std::fs::write(
        &config,
        "[[routing.routes]]\nname = \"x\"\nendpointNames = [\"nowhere\"]\n",
    )
    .unwrap();
    let out = std::process::Command::new(ingot_tests::ingot_bin())
        .args(["serve", "--data-dir"])
        .arg(dir.path().join("data"))
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown endpoint 'nowhere'"));
}
