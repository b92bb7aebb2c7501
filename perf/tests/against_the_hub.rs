//! Black-box, against a real hub: `run --e2e` (publish -> readable in the segment files),
//! prepared fleet files (`fleet create`, `--fleet`), and `connections --until-failure`.

#![allow(clippy::unwrap_used)]

mod common;

use common::{load, ok, read_json, Hub};

#[test]
fn e2e_latency_is_measured_through_the_segment_files() {
    let hub = Hub::start(&[("INGOT_STORE__FSYNC", "never")]);
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("e2e.json");
    let plot = dir.path().join("e2e.html");
    let out = load(&[
        "run",
        "--data-dir",
        hub.data_dir(),
        "--port",
        &hub.port(),
        "--devices",
        "4",
        "--rate",
        "2000",
        "--warmup",
        "1",
        "--duration",
        "2",
        "--e2e",
        "--quiet",
        "--json",
        json.to_str().unwrap(),
        "--plot",
        plot.to_str().unwrap(),
    ]);
    let stdout = ok(&out);
    assert!(stdout.contains("e2e p50"), "{stdout}");
    let result = read_json(&json);
    let e2e = &result["e2e"];
    let sent = result["throughput"]["messages_sent"].as_u64().unwrap();
    assert!(sent > 1000, "{result}");
    // Every message sent while measuring was read from the log, once and in order per device.
    assert_eq!(e2e["read_measured"].as_u64(), Some(sent), "{e2e}");
    assert_eq!(e2e["unread"], 0, "{e2e}");
    assert_eq!(e2e["out_of_order"], 0, "{e2e}");
    assert_eq!(e2e["gaps"], 0, "{e2e}");
    assert_eq!(e2e["foreign"], 0, "{e2e}");
    assert!(e2e["read_errors"].is_u64(), "{e2e}");
    assert!(
        e2e["read"].as_u64().unwrap() > sent,
        "warm-up messages are read too"
    );
    let latency = &e2e["latency_us"];
    assert_eq!(latency["count"].as_u64(), Some(sent));
    let (p50, p99) = (
        latency["p50"].as_u64().unwrap(),
        latency["p99"].as_u64().unwrap(),
    );
    assert!(0 < p50 && p50 <= p99, "{latency}");
    assert!(
        p99 < 5_000_000,
        "a loopback hub makes messages readable within seconds"
    );
    let timeline = result["timeline"].as_array().unwrap();
    assert!(
        timeline.iter().any(|s| s["e2e_p99_us"].is_u64()),
        "per-second e2e samples: {result}"
    );
    let page = std::fs::read_to_string(&plot).unwrap();
    assert!(page.contains("e2e p99"), "the plot shows the e2e series");

    // Messages of another run in the same log are told apart by the nonce.
    let out = load(&[
        "run",
        "--data-dir",
        hub.data_dir(),
        "--port",
        &hub.port(),
        "--devices",
        "2",
        "--qos",
        "0",
        "--rate",
        "500",
        "--warmup",
        "0.2",
        "--duration",
        "1",
        "--e2e",
        "--quiet",
        "--json",
        json.to_str().unwrap(),
    ]);
    ok(&out);
    let result = read_json(&json);
    assert_eq!(result["e2e"]["unread"], 0, "{result}");
    assert!(result["e2e"]["latency_us"]["p99"].is_u64(), "{result}");
}

#[test]
fn e2e_is_refused_where_it_means_nothing() {
    let cases: [(&[&str], &str); 3] = [
        (&["--target", "mqtt"], "--target ingot"),
        (
            &[
                "--connection-string",
                "HostName=h;SharedAccessKeyName=k;SharedAccessKey=AAAA",
            ],
            "--data-dir",
        ),
        (
            &["--data-dir", "/nonexistent", "--payload", "10"],
            "at least",
        ),
    ];
    for (extra, expected) in cases {
        let mut args = vec!["run", "--e2e", "--duration", "0.1", "--quiet"];
        args.extend_from_slice(extra);
        let out = load(&args);
        assert!(!out.status.success(), "{extra:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expected), "{extra:?}: {stderr}");
    }
}

#[test]
fn a_prepared_fleet_connects_without_the_registry() {
    let hub = Hub::start(&[("INGOT_STORE__FSYNC", "never")]);
    let dir = tempfile::tempdir().unwrap();
    let fleet = dir.path().join("fleet.jsonl");
    let out = load(&[
        "fleet",
        "create",
        "--data-dir",
        hub.data_dir(),
        "--devices",
        "150",
        "--device-prefix",
        "fl-",
        "--out",
        fleet.to_str().unwrap(),
    ]);
    assert!(ok(&out).contains("150 devices registered"));
    let text = std::fs::read_to_string(&fleet).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 150);
    assert_eq!(lines[7]["deviceId"], "fl-7");
    let keys: std::collections::HashSet<&str> = lines
        .iter()
        .map(|l| l["primaryKey"].as_str().unwrap())
        .collect();
    assert_eq!(keys.len(), 150, "random keys, one per device");

    // The registry holds exactly the keys of the file.
    let cs = ingot_control_plane::local::service_connection_string(&hub.data_dir, "iothubowner")
        .unwrap();
    let client = ingot_control_plane::client::ServiceClient::new(
        cs.parse().unwrap(),
        ingot_control_plane::local::dev_ca(&hub.data_dir).as_deref(),
    )
    .unwrap();
    let device = client
        .request(hyper::Method::GET, "/devices/fl-149", &[], None)
        .unwrap()
        .success()
        .unwrap();
    assert_eq!(
        device["authentication"]["symmetricKey"]["primaryKey"],
        lines[149]["primaryKey"]
    );

    // A run from the file alone: no --data-dir, so no registry request is possible.
    let json = dir.path().join("run.json");
    let out = load(&[
        "run",
        "--fleet",
        fleet.to_str().unwrap(),
        "--devices",
        "max",
        "--port",
        &hub.port(),
        "--warmup",
        "0.2",
        "--duration",
        "0.5",
        "--connect-rate",
        "2000",
        "--quiet",
        "--json",
        json.to_str().unwrap(),
    ]);
    ok(&out);
    let result = read_json(&json);
    assert_eq!(result["connect"]["ok"], 150, "{result}");
    assert_eq!(result["config"]["devices"], 150);
    assert_eq!(result["errors"]["total"], 0, "{result}");
    assert!(result["throughput"]["messages_acked"].as_u64().unwrap() > 0);

    // A CSV export whose key is wrong is refused by the hub, and the run says so.
    let csv = dir.path().join("wrong.csv");
    let host = lines[0]["hostName"].as_str().unwrap();
    std::fs::write(
        &csv,
        format!(
            "deviceId,primaryKey,hostName\nfl-0,{},{host}\n",
            "A".repeat(44)
        ),
    )
    .unwrap();
    let out = load(&[
        "run",
        "--fleet",
        csv.to_str().unwrap(),
        "--devices",
        "1",
        "--port",
        &hub.port(),
        "--duration",
        "0.2",
        "--quiet",
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("connack_refused_5_not_authorized")
            || stderr.contains("connack_refused_4_bad_username_or_password"),
        "{stderr}"
    );

    // More devices than the file holds is an error, not a silent shorter run.
    let out = load(&[
        "run",
        "--fleet",
        fleet.to_str().unwrap(),
        "--devices",
        "151",
        "--port",
        &hub.port(),
        "--quiet",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("fewer than --devices 151"));
}

#[test]
fn connections_stop_at_the_first_failure() {
    // One shard that holds 5 connections: the sixth is refused with CONNACK 3.
    let hub = Hub::start(&[("INGOT_MQTT__CONNECTIONS_PER_SHARD_MAX", "5")]);
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("c.json");
    let out = load(&[
        "connections",
        "--data-dir",
        hub.data_dir(),
        "--port",
        &hub.port(),
        "--devices",
        "40",
        "--connect-rate",
        "50",
        "--until-failure",
        "--hold",
        "0.2",
        "--hub-pid",
        &hub.pid(),
        "--quiet",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(ok(&out).contains("stopped at the first failure"));
    let result = read_json(&json);
    assert_eq!(result["connect"]["ok"], 5, "{result}");
    assert_eq!(result["stopped_at_failure"], true);
    // At 50/s the halt is seen long before the 40th connect is due.
    let failed = result["connect"]["failed"].as_u64().unwrap();
    assert!((1..=3).contains(&failed), "{result}");
    assert!(result["errors"]["connack_refused_3_server_unavailable"].as_u64() >= Some(1));
}
