//! Twins, direct methods, C2D messages and sessions as raw MQTT devices and the REST API see them:
//! persistence across kill -9 and restarts, scoping of every topic to the connection's identity,
//! the protocol limits and the permissions of the service calls.

// Test helpers outside `#[test]` functions unwrap too: a failure is a test failure.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::Method;
use ingot_engine::mqtt::QoS;
use ingot_tests::mqtt_client::{Client, ConnectOptions, Received};
use ingot_tests::Hub;
use serde_json::{json, Value};

fn connect(hub: &Hub, id: &str, key: &[u8]) -> (Client, bool) {
    hub.connect_device(id, key, false)
}

fn subscribe(client: &mut Client, filters: &[&str]) -> Vec<u8> {
    let filters: Vec<(&str, QoS)> = filters.iter().map(|f| (*f, QoS::AtLeastOnce)).collect();
    client.subscribe(1, &filters).unwrap();
    loop {
        match client.receive().unwrap() {
            Some(Received::Suback(1, codes)) => return codes,
            Some(_) => {}
            None => panic!("closed while subscribing"),
        }
    }
}

/// The next PUBLISH from the hub (PUBACKs and the like are skipped).
fn next_publish(client: &mut Client) -> (String, Vec<u8>, Option<u16>) {
    loop {
        match client.receive().unwrap() {
            Some(Received::Publish {
                topic,
                payload,
                packet_id,
            }) => return (topic, payload, packet_id),
            Some(_) => {}
            None => panic!("the hub closed the connection"),
        }
    }
}

/// A twin request and its response: (status, body).
fn twin_call(client: &mut Client, topic: &str, body: &[u8], rid: &str) -> (u16, Vec<u8>, String) {
    client.publish(topic, body, Some(9)).unwrap();
    loop {
        let (topic, payload, _) = next_publish(client);
        let Some(rest) = topic.strip_prefix("$iothub/twin/res/") else {
            continue;
        };
        let (status, query) = rest.split_once("/?").unwrap();
        if query.split('&').any(|kv| kv == format!("$rid={rid}")) {
            return (status.parse().unwrap(), payload, query.to_owned());
        }
    }
}

fn rest(hub: &Hub, policy: &str, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
    let reply = hub
        .client(policy)
        .request(method, path, &[("if-match", "\"*\"")], body.as_ref())
        .unwrap();
    (reply.status.as_u16(), reply.json().unwrap_or(Value::Null))
}

fn error_code(body: &Value) -> u64 {
    let inner: Value = serde_json::from_str(body["Message"].as_str().unwrap()).unwrap();
    inner["errorCode"].as_u64().unwrap()
}

fn send_c2d(hub: &Hub, device: &str, body: &str, headers: &[(&str, &str)]) -> (u16, Value) {
    let reply = hub
        .client("service")
        .request_bytes(
            Method::POST,
            &format!("/devices/{device}/messages/deviceBound"),
            headers,
            Some((Bytes::from(body.to_owned()), "text/plain")),
        )
        .unwrap();
    (reply.status.as_u16(), reply.json().unwrap_or(Value::Null))
}

#[test]
fn acknowledged_reported_patches_survive_kill_9() {
    let mut hub = Hub::start();
    let devices: Vec<(String, Vec<u8>)> = (0..4)
        .map(|i| {
            let id = format!("rep-{i}");
            let key = hub.create_sas_device(&id);
            (id, key)
        })
        .collect();
    let mut acked = vec![0u64; devices.len()];
    for round in 0..3 {
        let stop = Arc::new(AtomicBool::new(false));
        let workers: Vec<_> = devices
            .iter()
            .zip(acked.clone())
            .map(|((id, key), start)| {
                let (id, key, stop) = (id.clone(), key.clone(), stop.clone());
                let port = hub.mqtt_port;
                std::thread::spawn(move || {
                    let mut last = start;
                    let Ok(mut client) = Client::plain(port) else {
                        return last;
                    };
                    let user = ingot_tests::device_username(&id);
                    let password = ingot_tests::device_token(&id, &key);
                    let options = ConnectOptions::device(&id, &user, &password);
                    if !matches!(
                        client.connect(&options),
                        Ok(Some(Received::Connack { code: 0, .. }))
                    ) {
                        return last;
                    }
                    let mut seq = start;
                    while !stop.load(Ordering::Relaxed) {
                        seq += 1;
                        let patch = json!({ "seq": seq, format!("k{seq}"): seq }).to_string();
                        let rid = seq.to_string();
                        let topic = format!("$iothub/twin/PATCH/properties/reported/?$rid={rid}");
                        if client.publish(&topic, patch.as_bytes(), Some(1)).is_err() {
                            break;
                        }
                        // Wait for the 204: from then on the patch must survive anything.
                        let answered = loop {
                            match client.receive() {
                                Ok(Some(Received::Publish { topic, .. })) => {
                                    if topic
                                        .starts_with(&format!("$iothub/twin/res/204/?$rid={rid}&"))
                                    {
                                        break true;
                                    }
                                }
                                Ok(Some(_)) => {}
                                _ => break false,
                            }
                        };
                        if !answered {
                            break;
                        }
                        last = seq;
                    }
                    last
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(400 + 300 * round));
        hub.kill();
        stop.store(true, Ordering::Relaxed);
        for (i, worker) in workers.into_iter().enumerate() {
            acked[i] = worker.join().unwrap();
        }
        hub.restart();
        for ((id, _), last) in devices.iter().zip(&acked) {
            let (status, twin) = rest(
                &hub,
                "iothubowner",
                Method::GET,
                &format!("/twins/{id}"),
                None,
            );
            assert_eq!(status, 200);
            let reported = &twin["properties"]["reported"];
            let stored = reported["seq"].as_u64().unwrap_or(0);
            assert!(
                stored >= *last,
                "{id}: acknowledged seq {last}, stored {stored} (round {round})"
            );
            for k in 1..=*last {
                assert_eq!(reported[format!("k{k}")], k, "{id}: k{k} lost");
            }
        }
        // Continue from what is stored (a patch may have landed after its 204 was lost).
        for (i, (id, _)) in devices.iter().enumerate() {
            let (_, twin) = rest(
                &hub,
                "iothubowner",
                Method::GET,
                &format!("/twins/{id}"),
                None,
            );
            acked[i] = twin["properties"]["reported"]["seq"].as_u64().unwrap_or(0);
        }
    }
    assert!(
        acked.iter().all(|&n| n > 0),
        "every device got patches acknowledged: {acked:?}"
    );
}

#[test]
fn c2d_queues_and_sessions_survive_a_restart() {
    let mut hub = Hub::start();
    let key = hub.create_sas_device("dev");
    let (mut client, present) = connect(&hub, "dev", &key);
    assert!(!present);
    let codes = subscribe(
        &mut client,
        &[
            "devices/dev/messages/devicebound/#",
            "$iothub/methods/POST/#",
        ],
    );
    assert_eq!(codes, [1, 1]);
    drop(client);
    let (status, _) = send_c2d(&hub, "dev", "before restart", &[("iothub-app-n", "1")]);
    assert_eq!(status, 200);
    assert_eq!(hub.terminate().code(), Some(0));
    hub.restart();
    let (status, _) = send_c2d(&hub, "dev", "after restart", &[("iothub-messageid", "m2")]);
    assert_eq!(status, 200);

    // The persisted session is resumed: no SUBSCRIBE, yet both messages arrive, in order.
    let (mut client, present) = connect(&hub, "dev", &key);
    assert!(present, "the session survived the restart");
    let (topic, body, id) = next_publish(&mut client);
    assert!(
        topic.starts_with("devices/dev/messages/devicebound/"),
        "{topic}"
    );
    assert!(
        topic.contains("n=1") && topic.contains("%24.to=%2Fdevices%2Fdev%2Fmessages%2FdeviceBound")
    );
    assert_eq!(body, b"before restart");
    client.puback(id.unwrap()).unwrap();
    let (topic, body, id) = next_publish(&mut client);
    assert!(topic.contains("%24.mid=m2"), "{topic}");
    assert_eq!(body, b"after restart");
    client.puback(id.unwrap()).unwrap();

    // The method subscription came back too.
    let hub_client = hub.client("service");
    let call = std::thread::spawn(move || {
        hub_client
            .request(
                Method::POST,
                "/twins/dev/methods",
                &[],
                Some(&json!({"methodName": "ping", "payload": {"n": 1}, "responseTimeoutInSeconds": 10})),
            )
            .unwrap()
    });
    let (topic, payload, _) = next_publish(&mut client);
    let rid = topic
        .strip_prefix("$iothub/methods/POST/ping/?$rid=")
        .unwrap()
        .to_owned();
    assert_eq!(
        serde_json::from_slice::<Value>(&payload).unwrap(),
        json!({"n": 1})
    );
    // An answer with an unknown rid is dropped; the real one completes the call.
    client
        .publish("$iothub/methods/res/200/?$rid=nope", b"{}", Some(2))
        .unwrap();
    client
        .publish(
            &format!("$iothub/methods/res/200/?$rid={rid}"),
            br#"{"pong":true}"#,
            Some(3),
        )
        .unwrap();
    let reply = call.join().unwrap();
    assert_eq!(reply.status.as_u16(), 200);
    assert_eq!(
        reply.json().unwrap(),
        json!({"status": 200, "payload": {"pong": true}})
    );

    // Both messages were completed: the queue is empty.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, twin) = rest(&hub, "iothubowner", Method::GET, "/twins/dev", None);
        if twin["cloudToDeviceMessageCount"] == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "C2D messages were not completed: {twin}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_device_reaches_only_its_own_twin_methods_and_messages() {
    let hub = Hub::start();
    let key_a = hub.create_sas_device("a");
    hub.create_sas_device("b");
    let (status, _) = rest(
        &hub,
        "service",
        Method::PATCH,
        "/twins/b",
        Some(json!({"properties": {"desired": {"secret": "of b"}}})),
    );
    assert_eq!(status, 200);
    let (mut a, _) = connect(&hub, "a", &key_a);
    let codes = subscribe(
        &mut a,
        &[
            "devices/b/messages/devicebound/#",
            "$iothub/twin/res/#",
            "$iothub/twin/PATCH/properties/desired/#",
        ],
    );
    assert_eq!(codes, [0x80, 1, 1], "another device's C2D topic is refused");
    // The registry and the statistics see the live connection.
    // (Presence is updated by the device thread, right after CONNACK: allow it a moment.)
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, device) = rest(&hub, "iothubowner", Method::GET, "/devices/a", None);
        if device["connectionState"] == "Connected" {
            break;
        }
        assert!(Instant::now() < deadline, "{device}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (_, stats) = rest(&hub, "service", Method::GET, "/statistics/service", None);
    assert_eq!(stats, json!({"connectedDeviceCount": 1}));
    let (_, device) = rest(&hub, "iothubowner", Method::GET, "/devices/b", None);
    assert_eq!(device["connectionState"], "Disconnected");
    let (status, body, _) = twin_call(&mut a, "$iothub/twin/GET/?$rid=1", b" ", "1");
    assert_eq!(status, 200);
    let twin: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        twin,
        json!({"desired": {"$version": 1}, "reported": {"$version": 1}})
    );

    // A desired patch of a reaches a; b's does not.
    rest(
        &hub,
        "service",
        Method::PATCH,
        "/twins/b",
        Some(json!({"properties": {"desired": {"x": 1}}})),
    );
    let (status, twin_a) = rest(
        &hub,
        "service",
        Method::PATCH,
        "/twins/a",
        Some(json!({"properties": {"desired": {"mine": true}}})),
    );
    assert_eq!(status, 200);
    let (topic, payload, _) = next_publish(&mut a);
    assert_eq!(topic, "$iothub/twin/PATCH/properties/desired/?$version=2");
    assert_eq!(
        serde_json::from_slice::<Value>(&payload).unwrap(),
        json!({"mine": true, "$version": 2})
    );
    assert_eq!(twin_a["properties"]["desired"]["$version"], 2);

    // Malformed reported JSON is a 400 on the twin topic, and the connection stays.
    let (status, body, _) = twin_call(
        &mut a,
        "$iothub/twin/PATCH/properties/reported/?$rid=2",
        b"{not json",
        "2",
    );
    assert_eq!(status, 400);
    assert_eq!(
        serde_json::from_slice::<Value>(&body).unwrap()["errorCode"],
        400004
    );
    // A patch far over the limit is refused at the shard, never queued.
    let huge = format!(r#"{{"x":"{}"}}"#, "y".repeat(200 * 1024));
    let (status, _, _) = twin_call(
        &mut a,
        "$iothub/twin/PATCH/properties/reported/?$rid=big",
        huge.as_bytes(),
        "big",
    );
    assert_eq!(status, 400);
    let (status, _, query) = twin_call(
        &mut a,
        "$iothub/twin/PATCH/properties/reported/?$rid=3",
        br#"{"ok":1}"#,
        "3",
    );
    assert_eq!((status, query.as_str()), (204, "$rid=3&$version=2"));

    // Service calls need ServiceConnect.
    for (method, path, request) in [
        (Method::GET, "/twins/a", None),
        (Method::PATCH, "/twins/a", Some(json!({"tags": {"t": 1}}))),
        (
            Method::POST,
            "/twins/a/methods",
            Some(json!({"methodName": "m"})),
        ),
        (Method::DELETE, "/devices/a/commands", None),
    ] {
        let (status, answer) = rest(
            &hub,
            "registryReadWrite",
            method.clone(),
            path,
            request.clone(),
        );
        assert_eq!(status, 401, "{method} {path}: {answer}");
        let (status, _) = rest(&hub, "device", method.clone(), path, request);
        assert_eq!(status, 401, "{method} {path} with the device policy");
    }
    let (status, _) = send_c2d(&hub, "a", "x", &[]);
    assert_eq!(status, 200);
}

#[test]
fn twin_rest_api_etags_limits_and_modules() {
    let hub = Hub::start();
    hub.create_sas_device("t");
    let (status, twin) = rest(&hub, "service", Method::GET, "/twins/t", None);
    assert_eq!(status, 200);
    assert_eq!(twin["deviceId"], "t");
    assert_eq!(twin["connectionState"], "Disconnected");
    let etag = twin["etag"].as_str().unwrap().to_owned();

    let patch = |if_match: &str, body: Value| {
        let reply = hub
            .client("service")
            .request(
                Method::PATCH,
                "/twins/t",
                &[("if-match", if_match)],
                Some(&body),
            )
            .unwrap();
        (reply.status.as_u16(), reply.json().unwrap_or(Value::Null))
    };
    let (status, after) = patch(&format!("\"{etag}\""), json!({"tags": {"floor": 1}}));
    assert_eq!(status, 200);
    assert_eq!(after["tags"], json!({"floor": 1}));
    let (status, body) = patch(&format!("\"{etag}\""), json!({"tags": {"floor": 2}}));
    assert_eq!(status, 412, "a stale etag: {body}");
    // Limits: desired over 32 KB, depth over 10, keys with '.', '$' or ' '.
    let big = "x".repeat(4000);
    let huge: serde_json::Map<String, Value> =
        (0..10).map(|i| (format!("k{i}"), json!(big))).collect();
    let (status, body) = patch("\"*\"", json!({"properties": {"desired": huge}}));
    assert_eq!((status, error_code(&body) / 1000), (400, 400), "{body}");
    // Ten levels of objects below `desired` are allowed (Azure's own example), eleven are not.
    let nested = |levels: usize| {
        let mut value = json!("leaf");
        for i in 0..levels {
            value = json!({ format!("l{i}"): value });
        }
        json!({"properties": {"desired": {"root": value}}})
    };
    assert_eq!(patch("\"*\"", nested(10)).0, 200);
    assert_eq!(patch("\"*\"", nested(11)).0, 400);
    for bad in ["a.b", "$x", "a b"] {
        let (status, _) = patch("\"*\"", json!({"tags": {bad: 1}}));
        assert_eq!(status, 400, "key {bad:?}");
    }
    let (status, body) = patch("\"*\"", json!({"properties": {"reported": {"x": 1}}}));
    assert_eq!(status, 400, "reported properties are the device's: {body}");
    // PUT replaces tags and desired.
    let reply = hub
        .client("service")
        .request(
            Method::PUT,
            "/twins/t",
            &[("if-match", "\"*\"")],
            Some(&json!({"tags": {"new": true}, "properties": {"desired": {"d": 1}}})),
        )
        .unwrap();
    let replaced = reply.json().unwrap();
    assert_eq!(replaced["tags"], json!({"new": true}));
    assert_eq!(replaced["properties"]["desired"]["d"], 1);
    // Unknown identities.
    let (status, body) = rest(&hub, "service", Method::GET, "/twins/nobody", None);
    assert_eq!((status, error_code(&body)), (404, 404001));
    let client = hub.client("iothubowner");
    let reply = client
        .request(
            Method::PUT,
            "/devices/t/modules/m1",
            &[],
            Some(&json!({"deviceId": "t", "moduleId": "m1"})),
        )
        .unwrap();
    assert!(reply.status.is_success());
    let (status, module_twin) = rest(
        &hub,
        "service",
        Method::PATCH,
        "/twins/t/modules/m1",
        Some(json!({"properties": {"desired": {"m": 1}}})),
    );
    assert_eq!(status, 200);
    assert_eq!(module_twin["moduleId"], "m1");
    assert_eq!(module_twin["properties"]["desired"]["m"], 1);
    let (status, body) = rest(&hub, "service", Method::GET, "/twins/t/modules/nope", None);
    assert_eq!((status, error_code(&body)), (404, 404010));
    // Deleting the device deletes its twins: a new device of the same id starts afresh.
    let (status, _) = rest(&hub, "iothubowner", Method::DELETE, "/devices/t", None);
    assert_eq!(status, 204);
    hub.create_sas_device("t");
    let (_, fresh) = rest(&hub, "service", Method::GET, "/twins/t", None);
    assert_eq!(fresh["tags"], Value::Null);
    assert_eq!(fresh["properties"]["desired"]["$version"], 1);
}

#[test]
fn c2d_limits_expiry_purge_and_feedback() {
    let hub = Hub::start();
    hub.create_sas_device("q");
    for i in 0..50 {
        let (status, _) = send_c2d(&hub, "q", &format!("m{i}"), &[]);
        assert_eq!(status, 200);
    }
    let (status, body) = send_c2d(&hub, "q", "one too many", &[]);
    assert_eq!((status, error_code(&body)), (403, 403004));
    let (status, body) = rest(&hub, "service", Method::DELETE, "/devices/q/commands", None);
    assert_eq!(status, 200);
    assert_eq!(
        body,
        json!({"totalMessagesPurged": 50, "deviceId": "q", "moduleId": null})
    );
    let (status, _) = send_c2d(&hub, "q", &"x".repeat(64 * 1024 + 1), &[]);
    assert_eq!(status, 413);
    let (status, body) = send_c2d(&hub, "nobody", "x", &[]);
    assert_eq!((status, error_code(&body)), (404, 404001));
    let (status, _) = send_c2d(&hub, "q", "x", &[("iothub-ack", "sometimes")]);
    assert_eq!(status, 400);

    // A message that expires leaves negative feedback; completing the batch removes it.
    let (status, _) = send_c2d(
        &hub,
        "q",
        "short-lived",
        &[
            ("iothub-ttl", "1"),
            ("iothub-ack", "negative"),
            ("iothub-messageid", "ttl-1"),
        ],
    );
    assert_eq!(status, 200);
    std::thread::sleep(Duration::from_millis(1500));
    send_c2d(&hub, "q", "sweeps the queue", &[]);
    let client = hub.client("service");
    let reply = client
        .request(Method::GET, "/messages/serviceBound/feedback", &[], None)
        .unwrap();
    assert_eq!(reply.status.as_u16(), 200);
    let records = reply.json().unwrap();
    let expired: Vec<&Value> = records
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["originalMessageId"] == "ttl-1")
        .collect();
    assert_eq!(expired.len(), 1);
    assert_eq!(expired[0]["statusCode"], "Expired");
    let lock = reply.headers["iothub-lock-token"]
        .to_str()
        .unwrap()
        .to_owned();
    let done = client
        .request(
            Method::DELETE,
            &format!("/messages/serviceBound/feedback/{lock}"),
            &[],
            None,
        )
        .unwrap();
    assert_eq!(done.status.as_u16(), 204);
    let empty = client
        .request(Method::GET, "/messages/serviceBound/feedback", &[], None)
        .unwrap();
    assert_eq!(empty.status.as_u16(), 204);
}

#[test]
fn modules_have_their_own_twin_and_methods() {
    let hub = Hub::start();
    hub.create_sas_device("edge");
    let key = hub.create_sas_module("edge", "m1");
    let token = ingot_engine::auth::sas::generate(
        "localhost/devices/edge/modules/m1",
        &key,
        ingot_control_plane::api::now_secs() + 600,
        None,
    );
    let mut module = Client::plain(hub.mqtt_port).unwrap();
    let user = "localhost/edge/m1/?api-version=2021-04-12";
    let ack = module
        .connect(&ConnectOptions::device("edge/m1", user, &token))
        .unwrap();
    assert!(matches!(ack, Some(Received::Connack { code: 0, .. })));
    assert_eq!(
        subscribe(
            &mut module,
            &["$iothub/twin/res/#", "$iothub/methods/POST/#"]
        ),
        [1, 1]
    );
    let (status, _, _) = twin_call(
        &mut module,
        "$iothub/twin/PATCH/properties/reported/?$rid=r1",
        br#"{"module":"m1"}"#,
        "r1",
    );
    assert_eq!(status, 204);
    // The module's twin has it; the device's does not.
    let (_, module_twin) = rest(&hub, "service", Method::GET, "/twins/edge/modules/m1", None);
    assert_eq!(module_twin["properties"]["reported"]["module"], "m1");
    let (_, device_twin) = rest(&hub, "service", Method::GET, "/twins/edge", None);
    assert_eq!(device_twin["properties"]["reported"]["module"], Value::Null);
    let (status, found) = rest(
        &hub,
        "service",
        Method::POST,
        "/devices/query",
        Some(
            json!({"query": "SELECT * FROM devices.modules WHERE properties.reported.module = 'm1'"}),
        ),
    );
    assert_eq!(status, 200);
    assert_eq!(found.as_array().unwrap().len(), 1);
    assert_eq!(found[0]["moduleId"], "m1");

    let service = hub.client("service");
    let call = std::thread::spawn(move || {
        service
            .request(
                Method::POST,
                "/twins/edge/modules/m1/methods",
                &[],
                Some(&json!({"methodName": "hello", "responseTimeoutInSeconds": 5})),
            )
            .unwrap()
    });
    let (topic, payload, _) = next_publish(&mut module);
    let rid = topic
        .strip_prefix("$iothub/methods/POST/hello/?$rid=")
        .unwrap();
    assert_eq!(payload, b"null");
    module
        .publish(
            &format!("$iothub/methods/res/202/?$rid={rid}"),
            b"\"hi\"",
            Some(4),
        )
        .unwrap();
    let reply = call.join().unwrap();
    assert_eq!(
        reply.json().unwrap(),
        json!({"status": 202, "payload": "hi"})
    );
    // The device itself is offline: a call to it is 404103 at once.
    let (status, body) = rest(
        &hub,
        "service",
        Method::POST,
        "/twins/edge/methods",
        Some(json!({"methodName": "hello", "responseTimeoutInSeconds": 5})),
    );
    assert_eq!((status, error_code(&body)), (404, 404103));
}

#[test]
fn twin_queries_group_count_filter_and_page() {
    let hub = Hub::start();
    for (id, region, extra) in [("q1", "us", true), ("q2", "us", false), ("q3", "eu", false)] {
        hub.create_sas_device(id);
        let mut tags = json!({"location": {"region": region}});
        if extra {
            tags["special"] = json!(true);
        }
        let (status, _) = rest(
            &hub,
            "service",
            Method::PATCH,
            &format!("/twins/{id}"),
            Some(json!({"tags": tags})),
        );
        assert_eq!(status, 200);
    }
    let query = |text: &str, headers: &[(&str, &str)]| {
        let reply = hub
            .client("registryRead")
            .request(
                Method::POST,
                "/devices/query",
                headers,
                Some(&json!({"query": text})),
            )
            .unwrap();
        assert_eq!(reply.status.as_u16(), 200, "{text}: {:?}", reply.body);
        let item_type = reply.headers["x-ms-item-type"].to_str().unwrap().to_owned();
        (reply.json().unwrap(), item_type, reply.continuation)
    };
    let (groups, item_type, _) = query(
        "SELECT tags.location.region AS region, COUNT() AS n FROM devices GROUP BY tags.location.region",
        &[],
    );
    assert_eq!(item_type, "raw");
    let mut groups: Vec<(String, u64)> = groups
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            (
                g["region"].as_str().unwrap().to_owned(),
                g["n"].as_u64().unwrap(),
            )
        })
        .collect();
    groups.sort();
    assert_eq!(groups, [("eu".to_owned(), 1), ("us".to_owned(), 2)]);
    let (special, item_type, _) =
        query("SELECT * FROM devices WHERE IS_DEFINED(tags.special)", &[]);
    assert_eq!(item_type, "twin");
    assert_eq!(special.as_array().unwrap().len(), 1);
    assert_eq!(special[0]["deviceId"], "q1");
    // Pages of two, then the rest; no continuation header on the last page.
    let (first, _, token) = query("SELECT * FROM devices", &[("x-ms-max-item-count", "2")]);
    assert_eq!(first.as_array().unwrap().len(), 2);
    let token = token.expect("a continuation token");
    let (rest_page, _, last) = query(
        "SELECT * FROM devices",
        &[("x-ms-max-item-count", "2"), ("x-ms-continuation", &token)],
    );
    assert_eq!(rest_page.as_array().unwrap().len(), 1);
    assert!(last.is_none());
    let reply = hub
        .client("registryRead")
        .request(
            Method::POST,
            "/devices/query",
            &[],
            Some(&json!({"query": "SELEKT * FROM devices"})),
        )
        .unwrap();
    assert_eq!(reply.status.as_u16(), 400);
    assert_eq!(error_code(&reply.json().unwrap()), 400006);
}

#[test]
fn an_unacknowledged_c2d_message_is_delivered_again_on_reconnect() {
    let hub = Hub::start();
    let key = hub.create_sas_device("flaky");
    let (mut client, _) = connect(&hub, "flaky", &key);
    subscribe(&mut client, &["devices/flaky/messages/devicebound/#"]);
    let (status, _) = send_c2d(&hub, "flaky", "once", &[("iothub-messageid", "again")]);
    assert_eq!(status, 200);
    let (topic, _, _) = next_publish(&mut client);
    assert!(topic.contains("%24.mid=again"));
    drop(client); // no PUBACK
    let (mut client, present) = connect(&hub, "flaky", &key);
    assert!(present);
    let (topic, body, id) = next_publish(&mut client);
    assert!(topic.contains("%24.mid=again"), "{topic}");
    assert_eq!(body, b"once");
    client.puback(id.unwrap()).unwrap();
}

#[test]
fn a_connection_that_replaces_another_keeps_its_session() {
    // A device whose network dropped reconnects before the hub noticed: the new connection
    // replaces the old one and must keep the subscriptions (the Python SDK never resubscribes).
    let hub = Hub::start();
    let key = hub.create_sas_device("roamer");
    let (mut first, _) = connect(&hub, "roamer", &key);
    subscribe(&mut first, &["$iothub/methods/POST/#"]);
    let (mut second, present) = connect(&hub, "roamer", &key);
    assert!(
        present,
        "the session is present for the replacing connection"
    );
    first.expect_closed().unwrap();
    let service = hub.client("service");
    let call = std::thread::spawn(move || {
        service
            .request(
                Method::POST,
                "/twins/roamer/methods",
                &[],
                Some(
                    &json!({"methodName": "where", "responseTimeoutInSeconds": 5,
                             "connectTimeoutInSeconds": 5}),
                ),
            )
            .unwrap()
    });
    let (topic, _, _) = next_publish(&mut second);
    let rid = topic
        .strip_prefix("$iothub/methods/POST/where/?$rid=")
        .unwrap()
        .to_owned();
    second
        .publish(
            &format!("$iothub/methods/res/200/?$rid={rid}"),
            b"\"here\"",
            Some(1),
        )
        .unwrap();
    let reply = call.join().unwrap();
    assert_eq!(
        reply.json().unwrap(),
        json!({"status": 200, "payload": "here"})
    );
}
