//! A quick end-to-end load run: starts a hub (the release `ingot` next to this binary, or
//! `$INGOT_BIN`), registers N devices with one bulk call per 100, connects them over plain MQTT or
//! TLS, and has each publish M QoS 1 messages with a window of W unacknowledged ones. Prints the
//! acknowledged messages per second (every one appended to the segment store before its PUBACK).
//!
//! This is the smoke-level figure for the data-plane issue; the load generator `ingot-load`
//! (perf/) is the tool for real measurements (latency histograms, peers, coordinated omission).
//!
//! `cargo build --release --bins --examples -p ingot-control-plane -p ingot-tests`
//! `target/release/examples/quick_load --connections 100 --messages 2000 [--tls] [--fsync never]
//! [--segment-mb 256]`

#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Barrier};
use std::time::Instant;

use base64::Engine as _;
use hyper::Method;
use ingot_engine::auth::sas;
use ingot_tests::mqtt_client::{Client, ConnectOptions, Received};
use ingot_tests::{arg, Hub};

fn main() {
    let connections: usize = arg("--connections", "100").parse().unwrap();
    let messages: u16 = arg("--messages", "2000").parse().unwrap();
    let window: u16 = arg("--window", "32").parse().unwrap();
    let payload = vec![b'x'; arg("--payload", "100").parse().unwrap()];
    let tls = std::env::args().any(|a| a == "--tls");
    let fsync = arg("--fsync", "always");
    // The tests' harness uses 1 MiB segments; a load run wants the production size.
    let segment_bytes = (arg("--segment-mb", "256").parse::<u64>().unwrap() << 20).to_string();
    let hub = Hub::start_with(&[
        ("INGOT_STORE__FSYNC", &fsync),
        ("INGOT_STORE__SEGMENT_BYTES_MAX", &segment_bytes),
    ]);

    let client = hub.client("iothubowner");
    let ids: Vec<String> = (0..connections).map(|i| format!("load-{i}")).collect();
    for chunk in ids.chunks(100) {
        let body: Vec<_> = chunk
            .iter()
            .map(|id| serde_json::json!({"id": id, "importMode": "create"}))
            .collect();
        let reply = client
            .request(
                Method::POST,
                "/devices",
                &[],
                Some(&serde_json::json!(body)),
            )
            .unwrap();
        assert_eq!(
            reply.status,
            200,
            "{}",
            String::from_utf8_lossy(&reply.body)
        );
    }
    let now = ingot_control_plane::api::now_secs();
    let tokens: Vec<String> = ids
        .iter()
        .map(|id| {
            let doc = client
                .request(Method::GET, &format!("/devices/{id}"), &[], None)
                .unwrap()
                .success()
                .unwrap();
            let key = doc["authentication"]["symmetricKey"]["primaryKey"]
                .as_str()
                .unwrap();
            let key = base64::engine::general_purpose::STANDARD
                .decode(key)
                .unwrap();
            sas::generate(&format!("localhost/devices/{id}"), &key, now + 3600, None)
        })
        .collect();

    let barrier = Arc::new(Barrier::new(connections + 1));
    let ca = hub.ca();
    let (port, tls_port) = (hub.mqtt_port, hub.mqtt_tls_port);
    let connect_started = Instant::now();
    let workers: Vec<_> = ids
        .into_iter()
        .zip(tokens)
        .map(|(id, token)| {
            let barrier = barrier.clone();
            let payload = payload.clone();
            let ca = ca.clone();
            std::thread::spawn(move || {
                let mut client = if tls {
                    let versions = rustls::DEFAULT_VERSIONS;
                    Client::over(Box::new(ingot_tests::tls_connect(
                        &ca, tls_port, versions, None,
                    )))
                } else {
                    Client::plain(port).unwrap()
                };
                let user = format!("localhost/{id}/?api-version=2021-04-12");
                let ack = client
                    .connect(&ConnectOptions::device(&id, &user, &token))
                    .unwrap();
                assert!(
                    matches!(ack, Some(Received::Connack { code: 0, .. })),
                    "{ack:?}"
                );
                let topic = format!("devices/{id}/messages/events/");
                barrier.wait();
                let (mut sent, mut acked) = (0u16, 0u16);
                while acked < messages {
                    while sent < messages && sent - acked < window {
                        sent += 1;
                        client.publish(&topic, &payload, Some(sent)).unwrap();
                    }
                    match client.receive().unwrap() {
                        Some(Received::Puback(_)) => acked += 1,
                        other => panic!("unexpected {other:?}"),
                    }
                }
            })
        })
        .collect();
    barrier.wait();
    let connect_secs = connect_started.elapsed().as_secs_f64();
    let started = Instant::now();
    for worker in workers {
        worker.join().unwrap();
    }
    let secs = started.elapsed().as_secs_f64();
    let total = connections as f64 * f64::from(messages);
    println!(
        "{} connections ({}), {} x {} B QoS 1 messages each, window {window}, fsync {fsync}: \
         {:.0} msg/s acknowledged ({:.1} MB/s of payload) in {secs:.2} s; connected in {connect_secs:.2} s",
        connections,
        if tls { "TLS" } else { "plain" },
        messages,
        payload.len(),
        total / secs,
        total * payload.len() as f64 / secs / 1e6
    );
}
