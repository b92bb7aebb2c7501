//! Crash safety of the registry: every device whose creation was acknowledged (HTTP 200)
//! survives a SIGKILL of the hub at a random moment, with the keys and etag it was acknowledged
//! with, and the statistics counters agree with the records.

// Test helpers outside `#[test]` functions unwrap too: a failure is a test failure.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::Method;
use ingot_control_plane::client::segment;
use ingot_tests::Hub;
use rand::Rng;

const ROUNDS: usize = 5;
const WRITERS: usize = 4;

#[test]
fn acknowledged_devices_survive_kill_9() {
    let mut hub = Hub::start();
    let acknowledged: Arc<Mutex<HashMap<String, serde_json::Value>>> = Arc::default();
    let mut rng = rand::thread_rng();
    for round in 0..ROUNDS {
        let stop = Arc::new(AtomicBool::new(false));
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let client = hub.client("iothubowner");
                let stop = stop.clone();
                let acknowledged = acknowledged.clone();
                std::thread::spawn(move || {
                    let mut n = 0;
                    while !stop.load(Ordering::Relaxed) {
                        let id = format!("crash-{round}-{w}-{n}");
                        n += 1;
                        let body = serde_json::json!({"deviceId": id, "authentication": {"symmetricKey": {}}});
                        let path = format!("/devices/{}", segment(&id));
                        // Errors are expected once the hub is killed; only 200s count.
                        if let Ok(reply) = client.request(Method::PUT, &path, &[], Some(&body)) {
                            if reply.status == 200 {
                                let doc = reply.json().expect("json");
                                acknowledged.lock().unwrap().insert(id, doc);
                            }
                        }
                    }
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(rng.gen_range(200..900)));
        hub.kill();
        stop.store(true, Ordering::Relaxed);
        for writer in writers {
            writer.join().unwrap();
        }
        hub.restart();

        let client = hub.client("iothubowner");
        let acknowledged = acknowledged.lock().unwrap();
        assert!(
            !acknowledged.is_empty(),
            "round {round} acknowledged nothing"
        );
        for (id, doc) in acknowledged.iter() {
            let reply = client
                .request(Method::GET, &format!("/devices/{}", segment(id)), &[], None)
                .unwrap();
            assert_eq!(
                reply.status, 200,
                "acknowledged device {id} was lost in round {round}"
            );
            let stored = reply.json().unwrap();
            assert_eq!(stored["etag"], doc["etag"], "{id}");
            assert_eq!(stored["authentication"], doc["authentication"], "{id}");
        }
        let stats = client
            .request(Method::GET, "/statistics/devices", &[], None)
            .unwrap()
            .json()
            .unwrap();
        let total = stats["totalDeviceCount"].as_u64().unwrap();
        // Devices committed but not yet acknowledged when the hub died may exist too.
        assert!(total >= acknowledged.len() as u64);
        let listed = client.list_devices(None).unwrap().len() as u64;
        assert_eq!(
            listed, total,
            "statistics disagree with the records after round {round}"
        );
    }
}
