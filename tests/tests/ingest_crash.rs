//! Nothing acknowledged is lost: devices publish QoS 1 messages while the hub is killed with
//! SIGKILL at a random moment; after a restart, every message whose PUBACK a device received is
//! in the segment store, exactly once.

// Test helpers outside `#[test]` functions unwrap too: a failure is a test failure.
#![allow(clippy::unwrap_used)]

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ingot_engine::store::{PartitionId, Reader, StartAt};
use ingot_tests::mqtt_client::{Client, ConnectOptions, Received};
use ingot_tests::{device_token, device_username, Hub};
use rand::Rng;

const DEVICES: usize = 4;
const ROUNDS: usize = 3;
const WINDOW: u16 = 16;

/// Publishes `{device}:{round}:{n}` bodies with a window of unacknowledged messages until the
/// connection breaks; records every body whose PUBACK arrived.
fn publish_until_killed(port: u16, id: &str, key: &[u8], round: usize, acked: &Mutex<Vec<String>>) {
    let (user, token) = (device_username(id), device_token(id, key));
    let Ok(mut client) = Client::plain(port) else {
        return;
    };
    match client.connect(&ConnectOptions::device(id, &user, &token)) {
        Ok(Some(Received::Connack { code: 0, .. })) => {}
        _ => return,
    }
    let topic = format!("devices/{id}/messages/events/");
    let mut in_flight: std::collections::VecDeque<(u16, String)> = Default::default();
    let mut n: u32 = 0;
    loop {
        while in_flight.len() < usize::from(WINDOW) {
            n += 1;
            let packet_id = u16::try_from(n % 60_000).unwrap().max(1);
            let body = format!("{id}:{round}:{n}");
            if client
                .publish(&topic, body.as_bytes(), Some(packet_id))
                .is_err()
            {
                return;
            }
            in_flight.push_back((packet_id, body));
        }
        match client.receive() {
            Ok(Some(Received::Puback(packet_id))) => {
                let (expected, body) = in_flight.pop_front().unwrap();
                assert_eq!(packet_id, expected, "PUBACKs arrive in order");
                acked.lock().unwrap().push(body);
            }
            _ => return, // the hub is gone
        }
    }
}

#[test]
fn acknowledged_messages_survive_kill_9() {
    let mut hub = Hub::start_with(&[("INGOT_STORE__FSYNC", "always")]);
    let keys: Vec<(String, Vec<u8>)> = (0..DEVICES)
        .map(|i| format!("crash-{i}"))
        .map(|id| {
            let key = hub.create_sas_device(&id);
            (id, key)
        })
        .collect();
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let mut rng = rand::thread_rng();
    for round in 0..ROUNDS {
        let stop = Arc::new(AtomicBool::new(false));
        let port = hub.mqtt_port;
        let publishers: Vec<_> = keys
            .iter()
            .cloned()
            .map(|(id, key)| {
                let acked = acked.clone();
                let stop = stop.clone();
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        publish_until_killed(port, &id, &key, round, &acked);
                        std::thread::sleep(Duration::from_millis(10));
                    }
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(rng.gen_range(300..1200)));
        hub.kill();
        stop.store(true, Ordering::Relaxed);
        for publisher in publishers {
            publisher.join().unwrap();
        }
        hub.restart();

        let acked = acked.lock().unwrap();
        assert!(!acked.is_empty(), "round {round} acknowledged nothing");
        let reader = Reader::open(&hub.data_dir).unwrap();
        let mut stored: HashMap<String, usize> = HashMap::new();
        for p in 0..reader.partition_count() {
            let mut partition = reader.partition(PartitionId(p), StartAt::Start).unwrap();
            while let Some(record) = partition.next().unwrap() {
                let body = String::from_utf8(record.message.body().to_vec()).unwrap();
                *stored.entry(body).or_default() += 1;
            }
        }
        let acked_set: HashSet<&String> = acked.iter().collect();
        for body in &acked_set {
            assert_eq!(
                stored.get(*body),
                Some(&1),
                "acknowledged {body} must be stored exactly once (round {round})"
            );
        }
    }
}
