//! The built-in endpoint as a back end reads it: `ingot monitor-events` (from the start, as a
//! resuming consumer group, following the tail) and `ingot log verify` on damaged files.

// Test helpers outside `#[test]` functions unwrap too: a failure is a test failure.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::Duration;

use ingot_tests::mqtt_client::{Client, ConnectOptions, Received};
use ingot_tests::Hub;

fn device(hub: &Hub, id: &str) -> Client {
    let key = hub.create_sas_device(id);
    let (user, token) = (
        ingot_tests::device_username(id),
        ingot_tests::device_token(id, &key),
    );
    let mut mqtt = Client::plain(hub.mqtt_port).unwrap();
    let ack = mqtt
        .connect(&ConnectOptions::device(id, &user, &token))
        .unwrap();
    assert!(matches!(ack, Some(Received::Connack { code: 0, .. })));
    mqtt
}

fn send(mqtt: &mut Client, id: &str, bodies: &[&str]) {
    for (i, body) in bodies.iter().enumerate() {
        let packet_id = u16::try_from(i + 1).unwrap();
        let topic = format!("devices/{id}/messages/events/%24.ct=application%2Fjson&n={i}");
        mqtt.publish(&topic, body.as_bytes(), Some(packet_id))
            .unwrap();
        assert_eq!(mqtt.receive().unwrap(), Some(Received::Puback(packet_id)));
    }
}

fn monitor(hub: &Hub, args: &[&str]) -> (bool, Vec<serde_json::Value>, String) {
    let out = hub.cli(&[&["monitor-events"], args].concat());
    let events = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    (
        out.status.success(),
        events,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn monitor_events_reads_resumes_and_follows() {
    let hub = Hub::start();
    let mut mqtt = device(&hub, "m1");
    send(
        &mut mqtt,
        "m1",
        &[
            r#"{"n":0}"#,
            r#"{"n":1}"#,
            r#"{"n":2}"#,
            r#"{"n":3}"#,
            r#"{"n":4}"#,
        ],
    );

    let (ok, events, _) = monitor(&hub, &["--from", "start", "--no-follow", "--device", "m1"]);
    assert!(ok);
    assert_eq!(events.len(), 5);
    assert_eq!(
        events[2]["body"],
        serde_json::json!({"n": 2}),
        "JSON bodies are parsed"
    );
    assert_eq!(events[2]["properties"]["n"], "2");
    assert_eq!(events[2]["deviceId"], "m1");
    assert!(events[2]["enqueuedTime"].as_str().unwrap().ends_with('Z'));

    // A consumer group resumes where it stopped.
    let group = [
        "--from",
        "start",
        "--no-follow",
        "--consumer-group",
        "backend",
    ];
    let (_, first, _) = monitor(&hub, &[&group[..], &["--count", "3"]].concat());
    assert_eq!(first.len(), 3);
    let (_, rest, _) = monitor(&hub, &group);
    let bodies: Vec<_> = rest
        .iter()
        .map(|e| e["body"]["n"].as_u64().unwrap())
        .collect();
    assert_eq!(bodies, [3, 4]);
    let (_, none, _) = monitor(&hub, &group);
    assert!(none.is_empty());

    // Following the tail: a new event appears while monitor-events waits.
    let mut follower = hub
        .command("monitor-events")
        .args(["--from", "end", "--count", "1", "--device", "m1"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    send(&mut mqtt, "m1", &[r#"{"late":true}"#]);
    let mut line = String::new();
    BufReader::new(follower.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let event: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(event["body"], serde_json::json!({"late": true}));
    assert!(follower.wait().unwrap().success());
}

#[test]
fn damage_is_detected_by_verify_and_by_readers() {
    let mut hub = Hub::start();
    let mut mqtt = device(&hub, "d1");
    send(&mut mqtt, "d1", &[r#"{"a":1}"#, r#"{"a":2}"#, r#"{"a":3}"#]);
    drop(mqtt);
    let status = hub.terminate();
    assert!(status.success(), "{status}: {}", hub.log());
    let clean = hub.cli(&["log", "verify"]);
    assert!(
        clean.status.success(),
        "{}",
        String::from_utf8_lossy(&clean.stderr)
    );

    // Flip one byte inside the first record's payload.
    let reader = ingot_engine::store::Reader::open(&hub.data_dir).unwrap();
    let partition = ingot_engine::store::partition_of("d1", reader.partition_count());
    let segment = hub.data_dir.join(format!(
        "events/p{:04}/00000000000000000000.log",
        partition.0
    ));
    let mut bytes = std::fs::read(&segment).unwrap();
    let position = ingot_engine::store::format::SEGMENT_HEADER_BYTES
        + ingot_engine::store::format::RECORD_HEADER_BYTES
        + 8;
    bytes[position] ^= 0x40;
    std::fs::write(&segment, &bytes).unwrap();

    let damaged = hub.cli(&["log", "verify"]);
    assert!(!damaged.status.success(), "verify must fail on damage");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&damaged.stdout),
        String::from_utf8_lossy(&damaged.stderr)
    );
    assert!(report.contains(&format!("{}", partition.0)), "{report}");

    // A reader stops at the damage and says where; asked to, it skips to the next record.
    let (ok, events, stderr) = monitor(&hub, &["--from", "start", "--no-follow", "--device", "d1"]);
    assert!(!ok, "stopping at damage is an error");
    assert!(events.is_empty());
    assert!(stderr.contains("offset 0"), "{stderr}");
    let (_, events, _) = monitor(
        &hub,
        &[
            "--from",
            "start",
            "--no-follow",
            "--device",
            "d1",
            "--skip-damaged",
        ],
    );
    let bodies: Vec<_> = events
        .iter()
        .map(|e| e["body"]["a"].as_u64().unwrap())
        .collect();
    assert_eq!(bodies, [2, 3]);
}
