//! Direct-method round trips and the reported-patch rate through one hub, end to end: real HTTPS
//! calls (one kept-alive connection per caller), real MQTT devices, every patch committed before
//! its `204`. Starts its own hub (the `ingot` next to this binary, or `$INGOT_BIN`).
//!
//! `cargo build --release --bins --examples -p ingot-control-plane -p ingot-tests`
//! `target/release/examples/device_ops [--calls 2000] [--callers 1] [--devices 100]
//! [--window 8] [--seconds 10]`
//!
//! Prints the method round trip (service `POST /twins/{id}/methods` -> device -> answer -> 200)
//! as p50/p99 and calls/s, and the reported-patch rate (patches answered 204 per second) with the
//! patch -> 204 latency.

#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::Method;
use ingot_engine::mqtt::QoS;
use ingot_tests::mqtt_client::{Client, Received};
use ingot_tests::{arg, Hub};
use serde_json::json;

fn connect(hub: &Hub, id: &str, key: &[u8], filters: &[&str]) -> Client {
    let (mut client, _) = hub.connect_device(id, key, true);
    let filters: Vec<(&str, QoS)> = filters.iter().map(|f| (*f, QoS::AtMostOnce)).collect();
    client.subscribe(1, &filters).unwrap();
    while !matches!(client.receive().unwrap(), Some(Received::Suback(..))) {}
    client
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn report(what: &str, mut latencies: Vec<Duration>, elapsed: Duration) {
    latencies.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "{what}: {} in {:.1} s = {:.0}/s; latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        latencies.len(),
        elapsed.as_secs_f64(),
        latencies.len() as f64 / elapsed.as_secs_f64(),
        ms(percentile(&latencies, 0.50)),
        ms(percentile(&latencies, 0.99)),
        ms(percentile(&latencies, 1.0)),
    );
}

fn methods(hub: &Hub, calls: usize, callers: usize) {
    let key = hub.create_sas_device("method-target");
    let mut device = connect(hub, "method-target", &key, &["$iothub/methods/POST/#"]);
    let stop = Arc::new(AtomicBool::new(false));
    let responder = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut packet_id = 0u16;
            while !stop.load(Ordering::Relaxed) {
                let Ok(Some(Received::Publish { topic, payload, .. })) = device.receive() else {
                    continue;
                };
                let Some((_, rid)) = topic.split_once("?$rid=") else {
                    continue;
                };
                packet_id = packet_id.wrapping_add(1).max(1);
                let topic = format!("$iothub/methods/res/200/?$rid={rid}");
                device.publish(&topic, &payload, Some(packet_id)).unwrap();
            }
        })
    };
    let started = Instant::now();
    let workers: Vec<_> = (0..callers)
        .map(|c| {
            let client = hub.client("service");
            std::thread::spawn(move || {
                let mut session = client.session().unwrap();
                let mut latencies = Vec::with_capacity(calls);
                for i in 0..calls {
                    let body = json!({"methodName": "echo", "payload": {"caller": c, "i": i},
                                      "responseTimeoutInSeconds": 30});
                    let sent = Instant::now();
                    let reply = session
                        .request(Method::POST, "/twins/method-target/methods", Some(&body))
                        .unwrap();
                    assert_eq!(reply.status.as_u16(), 200, "{:?}", reply.body);
                    latencies.push(sent.elapsed());
                }
                latencies
            })
        })
        .collect();
    let latencies: Vec<Duration> = workers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    report(
        &format!("direct methods ({callers} callers)"),
        latencies,
        started.elapsed(),
    );
    stop.store(true, Ordering::Relaxed);
    // The responder wakes on its read timeout.
    let _ = responder.join();
}

fn patches(hub: &Hub, devices: usize, window: usize, seconds: u64) {
    let client = hub.client("iothubowner");
    let ids: Vec<String> = (0..devices).map(|i| format!("patcher-{i}")).collect();
    for chunk in ids.chunks(100) {
        let body: Vec<_> = chunk
            .iter()
            .map(|id| {
                json!({"id": id, "importMode": "create", "status": "enabled",
                             "authentication": {"type": "sas", "symmetricKey": {}}})
            })
            .collect();
        let reply = client
            .request(Method::POST, "/devices", &[], Some(&json!(body)))
            .unwrap();
        assert!(reply.status.is_success());
    }
    let keys: Vec<Vec<u8>> = ids
        .iter()
        .map(|id| {
            let path = format!("/devices/{id}");
            let device = client.request(Method::GET, &path, &[], None).unwrap();
            ingot_tests::primary_key(&device.json().unwrap())
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let workers: Vec<_> = ids
        .into_iter()
        .zip(keys)
        .map(|(id, key)| {
            let mut device = connect(hub, &id, &key, &["$iothub/twin/res/#"]);
            std::thread::spawn(move || {
                let mut latencies = Vec::new();
                let mut in_flight: std::collections::VecDeque<(u64, Instant)> = Default::default();
                let mut seq = 0u64;
                loop {
                    while in_flight.len() < window && Instant::now() < deadline {
                        seq += 1;
                        let topic = format!("$iothub/twin/PATCH/properties/reported/?$rid={seq}");
                        let body = format!(r#"{{"seq":{seq},"temperature":{}}}"#, seq % 40);
                        let id = (seq % 65535 + 1) as u16;
                        device.publish(&topic, body.as_bytes(), Some(id)).unwrap();
                        in_flight.push_back((seq, Instant::now()));
                    }
                    if in_flight.is_empty() {
                        return latencies;
                    }
                    match device.receive().unwrap() {
                        Some(Received::Publish { topic, .. })
                            if topic.starts_with("$iothub/twin/res/204/") =>
                        {
                            // Answers come in order: one transaction per batch, in queue order.
                            if let Some((_, sent)) = in_flight.pop_front() {
                                latencies.push(sent.elapsed());
                            }
                        }
                        Some(Received::Publish { topic, .. }) => panic!("unexpected {topic}"),
                        Some(_) => {}
                        None => panic!("the hub closed the connection"),
                    }
                }
            })
        })
        .collect();
    let latencies: Vec<Duration> = workers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    report(
        &format!("reported patches ({devices} devices, window {window})"),
        latencies,
        started.elapsed(),
    );
}

fn main() {
    let calls: usize = arg("--calls", "2000").parse().unwrap();
    let callers: usize = arg("--callers", "1").parse().unwrap();
    let devices: usize = arg("--devices", "100").parse().unwrap();
    let window: usize = arg("--window", "8").parse().unwrap();
    let seconds: u64 = arg("--seconds", "10").parse().unwrap();
    // The harness runs the hub with two shards (connections are handed over between them).
    let hub = Hub::start();
    methods(&hub, calls, callers);
    patches(&hub, devices, window, seconds);
}
