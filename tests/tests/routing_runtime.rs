//! Routes and endpoints changed at run time, through the HTTPS API and the `ingot route` and
//! `ingot endpoint` commands: a change is in force on every shard when the call returns, is kept
//! across restarts, never touches what the configuration file defines, and loses no message
//! even while devices publish at full speed.

// Test helpers outside `#[test]` functions unwrap too: a failure is a test failure.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use ingot_engine::store::{PartitionId, Reader, StartAt};
use ingot_tests::mqtt_client::Received;
use ingot_tests::Hub;

const FILE_ROUTING: &str = r#"
[[routing.endpoints]]
name = "from-file"
type = "log"

[[routing.routes]]
name = "file-route"
condition = "level = 'file'"
endpointNames = ["from-file"]
"#;

/// The bodies of every record in the store at `dir` (empty when there is no store).
fn bodies(dir: &Path) -> BTreeSet<String> {
    let mut all = BTreeSet::new();
    if !dir.exists() {
        return all;
    }
    let reader = Reader::open(dir).unwrap();
    for p in 0..reader.partition_count() {
        let mut partition = reader.partition(PartitionId(p), StartAt::Start).unwrap();
        while let Some(record) = partition.next().unwrap() {
            all.insert(String::from_utf8_lossy(record.message.body()).into_owned());
        }
    }
    all
}

fn ok(out: std::process::Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    if stdout.trim().is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_str(&stdout).unwrap()
    }
}

fn failed(out: std::process::Output) -> String {
    assert!(!out.status.success(), "expected a failure");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn publish(
    client: &mut ingot_tests::mqtt_client::Client,
    device: &str,
    bag: &str,
    body: &str,
    id: u16,
) {
    let topic = format!("devices/{device}/messages/events/{bag}");
    client.publish(&topic, body.as_bytes(), Some(id)).unwrap();
    assert_eq!(client.receive().unwrap(), Some(Received::Puback(id)));
}

fn names(list: &serde_json::Value) -> Vec<(String, String)> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["name"].as_str().unwrap().to_owned(),
                v["origin"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[test]
fn routes_and_endpoints_change_at_run_time_and_persist() {
    let mut hub = Hub::start_with_config(FILE_ROUTING);
    let key = hub.create_sas_device("dev-1");
    let (mut client, _) = hub.connect_device("dev-1", &key, true);
    publish(&mut client, "dev-1", "level=critical", "before", 1);

    ok(hub.cli(&["endpoint", "add", "alerts", "--type", "log"]));
    let route = ok(hub.cli(&[
        "route",
        "add",
        "critical",
        "--condition",
        "level = 'critical'",
        "--endpoint",
        "alerts",
    ]));
    assert_eq!(route["condition"], "level = 'critical'");
    assert_eq!(route["source"], "DeviceMessages");
    assert_eq!(route["isEnabled"], true);
    // In force when the command returned, on the connection that was already open.
    publish(&mut client, "dev-1", "level=critical", "after-add", 2);
    publish(&mut client, "dev-1", "level=file", "to-file", 3);

    let endpoints = ok(hub.cli(&["endpoint", "list"]));
    assert_eq!(
        names(&endpoints),
        [
            ("from-file".to_owned(), "configFile".to_owned()),
            ("alerts".to_owned(), "api".to_owned())
        ]
    );
    let routes = ok(hub.cli(&["route", "list"]));
    assert_eq!(
        names(&routes),
        [
            ("file-route".to_owned(), "configFile".to_owned()),
            ("critical".to_owned(), "api".to_owned())
        ]
    );

    // Refusals: what the configuration file defines, an endpoint a route uses, a route to an
    // unknown endpoint, a condition that does not parse.
    let err = failed(hub.cli(&["route", "remove", "file-route"]));
    assert!(err.contains("configuration file"), "{err}");
    let err = failed(hub.cli(&["endpoint", "remove", "from-file"]));
    assert!(err.contains("configuration file"), "{err}");
    let err = failed(hub.cli(&["endpoint", "remove", "alerts"]));
    assert!(err.contains("used by route 'critical'"), "{err}");
    let err = failed(hub.cli(&["route", "add", "x", "--endpoint", "nowhere"]));
    assert!(err.contains("unknown endpoint 'nowhere'"), "{err}");
    let err = failed(hub.cli(&[
        "route",
        "add",
        "x",
        "--condition",
        "level = ",
        "--endpoint",
        "alerts",
    ]));
    assert!(err.contains("at "), "{err}");
    let err = failed(hub.cli(&[
        "route",
        "add",
        "x",
        "--endpoint",
        "alerts",
        "--endpoint",
        "events",
    ]));
    assert!(err.contains("exactly one endpoint"), "{err}");
    // Reads need RegistryRead, changes RegistryWrite.
    let reader = hub.client("registryRead");
    let reply = reader
        .request(hyper::Method::GET, "/routing", &[], None)
        .unwrap();
    let routing = reply.success().unwrap();
    assert_eq!(routing["fallbackRoute"]["isEnabled"], true);
    assert_eq!(routing["routes"].as_array().unwrap().len(), 2);
    let reply = reader
        .request(hyper::Method::DELETE, "/routing/routes/critical", &[], None)
        .unwrap();
    assert_eq!(reply.status, 401);

    // Kept across a restart.
    drop(client);
    assert_eq!(hub.terminate().code(), Some(0));
    hub.restart();
    let (mut client, _) = hub.connect_device("dev-1", &key, true);
    publish(&mut client, "dev-1", "level=critical", "after-restart", 4);

    // Disable the route by replacing it: messages go back to `events` (the fallback).
    ok(hub.cli(&[
        "route",
        "add",
        "critical",
        "--condition",
        "level = 'critical'",
        "--endpoint",
        "alerts",
        "--disabled",
    ]));
    publish(&mut client, "dev-1", "level=critical", "while-disabled", 5);
    ok(hub.cli(&["route", "remove", "critical"]));
    publish(&mut client, "dev-1", "level=critical", "after-remove", 6);
    // Without the fallback, a message no route matched goes nowhere.
    let fallback = ok(hub.cli(&["route", "fallback", "off"]));
    assert_eq!(fallback["isEnabled"], false);
    publish(&mut client, "dev-1", "level=info", "dropped", 7);
    ok(hub.cli(&["route", "fallback", "on"]));
    publish(&mut client, "dev-1", "level=info", "fallback-back", 8);
    let alerts_dir = hub.data_dir.join("endpoints").join("alerts");
    assert!(alerts_dir.exists());
    drop(client);
    let status = hub.terminate();
    assert_eq!(status.code(), Some(0), "{}", hub.log());
    assert_eq!(
        bodies(&alerts_dir),
        ["after-add", "after-restart"]
            .map(str::to_owned)
            .into_iter()
            .collect(),
    );
    assert_eq!(
        bodies(&hub.data_dir.join("endpoints").join("from-file")),
        ["to-file".to_owned()].into_iter().collect()
    );
    assert_eq!(
        bodies(&hub.data_dir),
        ["before", "while-disabled", "after-remove", "fallback-back"]
            .map(str::to_owned)
            .into_iter()
            .collect(),
    );

    // Removing the endpoint deletes its log, and is kept too.
    hub.restart();
    ok(hub.cli(&["endpoint", "remove", "alerts"]));
    assert!(!alerts_dir.exists());
    let err = failed(hub.cli(&["endpoint", "show", "alerts"]));
    assert!(err.contains("alerts"), "{err}");
    assert_eq!(hub.terminate().code(), Some(0));
    hub.restart();
    let endpoints = ok(hub.cli(&["endpoint", "list"]));
    assert_eq!(
        names(&endpoints),
        [("from-file".to_owned(), "configFile".to_owned())]
    );
}

/// Devices publish QoS 1 as fast as they can while routes and endpoints are added and removed
/// over and over: every acknowledged message is in `events` (a permanent route sends everything
/// there), and each message routed to a toggled endpoint was sent while its route existed.
#[test]
fn route_changes_under_load_lose_nothing() {
    let hub = Hub::start_with_config(
        r#"
[[routing.routes]]
name = "everything"
endpointNames = ["events"]
"#,
    );
    let devices = 4;
    let keys: Vec<_> = (0..devices)
        .map(|d| hub.create_sas_device(&format!("load-{d}")))
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let mut publishers = Vec::new();
    for (d, key) in keys.into_iter().enumerate() {
        let (mut client, _) = hub.connect_device(&format!("load-{d}"), &key, true);
        let stop = stop.clone();
        publishers.push(std::thread::spawn(move || {
            let topic = format!("devices/load-{d}/messages/events/kind=load");
            let mut acked = Vec::new();
            let mut n = 0u32;
            while !stop.load(Ordering::Relaxed) {
                // A window of 16 in flight.
                let mut ids = Vec::new();
                for _ in 0..16 {
                    n += 1;
                    let id = (n % 60_000 + 1) as u16;
                    let body = format!("load-{d}-{n}");
                    client.publish(&topic, body.as_bytes(), Some(id)).unwrap();
                    ids.push((id, body));
                }
                for (id, body) in ids {
                    assert_eq!(client.receive().unwrap(), Some(Received::Puback(id)));
                    acked.push(body);
                }
            }
            acked
        }));
    }
    let rounds = 12;
    for round in 0..rounds {
        let name = format!("toggle-{}", round % 3);
        ok(hub.cli(&["endpoint", "add", &name, "--type", "log"]));
        ok(hub.cli(&[
            "route",
            "add",
            "to-toggle",
            "--condition",
            "kind = 'load'",
            "--endpoint",
            &name,
        ]));
        std::thread::sleep(std::time::Duration::from_millis(150));
        ok(hub.cli(&["route", "remove", "to-toggle"]));
        if round % 2 == 0 {
            ok(hub.cli(&["endpoint", "remove", &name]));
        }
    }
    stop.store(true, Ordering::Relaxed);
    let acked: BTreeSet<String> = publishers
        .into_iter()
        .flat_map(|p| p.join().unwrap())
        .collect();
    let mut hub = hub;
    assert_eq!(hub.terminate().code(), Some(0));
    assert!(
        acked.len() > 1000,
        "only {} messages were sent",
        acked.len()
    );
    let events = bodies(&hub.data_dir);
    let missing: Vec<_> = acked.difference(&events).take(5).collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged messages are not in events, e.g. {missing:?}",
        acked.difference(&events).count()
    );
    assert_eq!(events.len(), acked.len(), "nothing else is in events");
    // The endpoints still configured got messages, all of them acknowledged ones.
    let mut routed = 0;
    for name in ["toggle-0", "toggle-1", "toggle-2"] {
        let got = bodies(&hub.data_dir.join("endpoints").join(name));
        assert!(got.is_subset(&acked), "{name} holds messages never sent");
        routed += got.len();
    }
    assert!(routed > 0, "no message was routed to a toggled endpoint");
}

fn patch_twin(hub: &Hub, device: &str, patch: serde_json::Value) {
    let reply = hub
        .client("iothubowner")
        .request(
            hyper::Method::PATCH,
            &format!("/twins/{device}"),
            &[("if-match", "\"*\"")],
            Some(&patch),
        )
        .unwrap();
    reply.success().unwrap();
}

/// `$twin` conditions see the sender's twin at ingest: for connections made before a route read
/// `$twin` (sent to all when the route is added), for connections made after (the first messages
/// wait for the twin), and after a tag or desired-property change.
#[test]
fn twin_conditions_route_by_the_senders_twin() {
    let mut hub = Hub::start_with_config("");
    let eu_key = hub.create_sas_device("dev-eu");
    let us_key = hub.create_sas_device("dev-us");
    patch_twin(
        &hub,
        "dev-eu",
        serde_json::json!({"tags": {"region": "eu"}}),
    );
    let (mut eu, _) = hub.connect_device("dev-eu", &eu_key, true);
    let (mut us, _) = hub.connect_device("dev-us", &us_key, true);
    publish(&mut eu, "dev-eu", "", "eu-before-route", 1);

    ok(hub.cli(&["endpoint", "add", "eu", "--type", "log"]));
    ok(hub.cli(&[
        "route",
        "add",
        "by-region",
        "--condition",
        "$twin.tags.region = 'eu'",
        "--endpoint",
        "eu",
    ]));
    publish(&mut eu, "dev-eu", "", "eu-1", 2);
    publish(&mut us, "dev-us", "", "us-1", 2);

    // A tag change reaches the live connection.
    patch_twin(
        &hub,
        "dev-us",
        serde_json::json!({"tags": {"region": "eu"}}),
    );
    std::thread::sleep(std::time::Duration::from_millis(500));
    publish(&mut us, "dev-us", "", "us-2", 3);

    // A new connection has its twin before its first message is routed.
    drop(eu);
    let (mut eu, _) = hub.connect_device("dev-eu", &eu_key, true);
    publish(&mut eu, "dev-eu", "", "eu-2", 1);

    // Desired properties, in a route added while the table already reads `$twin`.
    ok(hub.cli(&["endpoint", "add", "fast", "--type", "log"]));
    ok(hub.cli(&[
        "route",
        "add",
        "fast-mode",
        "--condition",
        "$twin.properties.desired.mode = 'fast' AND $twin.tags.region = 'eu'",
        "--endpoint",
        "fast",
    ]));
    patch_twin(
        &hub,
        "dev-eu",
        serde_json::json!({"properties": {"desired": {"mode": "fast"}}}),
    );
    std::thread::sleep(std::time::Duration::from_millis(500));
    publish(&mut eu, "dev-eu", "", "eu-3", 2);
    publish(&mut us, "dev-us", "", "us-3", 4);

    drop((eu, us));
    assert_eq!(hub.terminate().code(), Some(0));
    let set =
        |items: &[&str]| -> BTreeSet<String> { items.iter().map(|s| s.to_string()).collect() };
    let endpoints = hub.data_dir.join("endpoints");
    assert_eq!(
        bodies(&endpoints.join("eu")),
        set(&["eu-1", "us-2", "eu-2", "eu-3", "us-3"])
    );
    assert_eq!(bodies(&endpoints.join("fast")), set(&["eu-3"]));
    assert_eq!(bodies(&hub.data_dir), set(&["eu-before-route", "us-1"]));
}

/// (body, application properties) of every record in the store at `dir`.
fn properties(dir: &Path) -> std::collections::BTreeMap<String, Vec<(String, String)>> {
    let reader = Reader::open(dir).unwrap();
    let mut all = std::collections::BTreeMap::new();
    for p in 0..reader.partition_count() {
        let mut partition = reader.partition(PartitionId(p), StartAt::Start).unwrap();
        while let Some(record) = partition.next().unwrap() {
            let message = record.message;
            let mut props: Vec<(String, String)> = message
                .application_properties()
                .iter()
                .map(|p| (p.name().to_owned(), p.value().to_owned()))
                .collect();
            props.sort();
            all.insert(String::from_utf8_lossy(message.body()).into_owned(), props);
        }
    }
    all
}

#[test]
fn enrichments_add_properties_to_the_messages_of_their_endpoints() {
    let mut hub = Hub::start_with_config(
        r#"
[[routing.endpoints]]
name = "eu"
type = "log"

[[routing.routes]]
name = "to-eu"
endpointNames = ["eu"]

[[routing.routes]]
name = "to-events"
endpointNames = ["events"]

[[routing.enrichments]]
key = "source"
value = "ingot"
endpointNames = ["events"]
"#,
    );
    let a_key = hub.create_sas_device("dev-a");
    let b_key = hub.create_sas_device("dev-b");
    patch_twin(
        &hub,
        "dev-a",
        serde_json::json!({"tags": {"region": "eu", "floor": 3}}),
    );
    ok(hub.cli(&[
        "enrichment",
        "add",
        "region",
        "--value",
        "$twin.tags.region",
        "--endpoint",
        "eu",
    ]));
    ok(hub.cli(&[
        "enrichment",
        "add",
        "hub",
        "--value",
        "$iothubname",
        "--endpoint",
        "eu",
        "--endpoint",
        "events",
    ]));
    ok(hub.cli(&[
        "enrichment",
        "add",
        "floor",
        "--value",
        "$twin.tags.floor",
        "--endpoint",
        "eu",
    ]));
    let err = failed(hub.cli(&[
        "enrichment",
        "add",
        "x",
        "--value",
        "v",
        "--endpoint",
        "nowhere",
    ]));
    assert!(err.contains("unknown endpoint 'nowhere'"), "{err}");
    ok(hub.cli(&["endpoint", "add", "spare", "--type", "log"]));
    ok(hub.cli(&[
        "enrichment",
        "add",
        "tmp",
        "--value",
        "v",
        "--endpoint",
        "spare",
    ]));
    let err = failed(hub.cli(&["endpoint", "remove", "spare"]));
    assert!(err.contains("used by enrichment 'tmp'"), "{err}");
    ok(hub.cli(&["enrichment", "remove", "tmp"]));
    ok(hub.cli(&["endpoint", "remove", "spare"]));
    let list = ok(hub.cli(&["enrichment", "list"]));
    assert_eq!(list.as_array().unwrap().len(), 4);

    let (mut a, _) = hub.connect_device("dev-a", &a_key, true);
    let (mut b, _) = hub.connect_device("dev-b", &b_key, true);
    publish(&mut a, "dev-a", "source=device", "from-a", 1);
    publish(&mut b, "dev-b", "", "from-b", 1);
    drop((a, b));
    assert_eq!(hub.terminate().code(), Some(0));

    let pairs = |items: &[(&str, &str)]| -> Vec<(String, String)> {
        items
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let events = properties(&hub.data_dir);
    assert_eq!(
        events["from-a"],
        pairs(&[("hub", "localhost"), ("source", "ingot")]),
        "the enrichment replaces the device's own property of that name"
    );
    assert_eq!(
        events["from-b"],
        pairs(&[("hub", "localhost"), ("source", "ingot")])
    );
    let eu = properties(&hub.data_dir.join("endpoints").join("eu"));
    assert_eq!(
        eu["from-a"],
        pairs(&[
            ("floor", "3"),
            ("hub", "localhost"),
            ("region", "eu"),
            ("source", "device")
        ])
    );
    assert_eq!(
        eu["from-b"],
        pairs(&[
            ("floor", "$twin.tags.floor"),
            ("hub", "localhost"),
            ("region", "$twin.tags.region")
        ]),
        "a twin path the twin lacks is written as the path itself"
    );
}
