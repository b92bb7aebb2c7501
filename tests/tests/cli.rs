//! The command line as an operator uses it: zero-configuration start, the local commands that
//! find the hub through its data directory, clear errors, and a clean shutdown.

// Test helpers outside `#[test]` functions unwrap too: a failure is a test failure.
#![allow(clippy::unwrap_used)]

use base64::Engine as _;
use ingot_engine::auth::sas::{self, SasToken};
use ingot_tests::{free_port, ingot_bin, Hub};

fn stdout(output: &std::process::Output) -> String {
    assert!(
        output.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout.clone()).unwrap()
}

fn json(output: &std::process::Output) -> serde_json::Value {
    serde_json::from_str(&stdout(output)).expect("JSON output")
}

#[test]
fn first_start_creates_certificates_policies_and_prints_the_connection_string() {
    let hub = Hub::start();
    let tls = hub.data_dir.join("tls");
    for file in ["ca.pem", "server.pem", "server.key"] {
        assert!(tls.join(file).is_file(), "{file}");
    }
    let cs = hub.connection_string("iothubowner");
    assert!(cs.starts_with(&format!(
        "HostName=localhost:{};SharedAccessKeyName=iothubowner;SharedAccessKey=",
        hub.port
    )));
    for policy in ["service", "device", "registryRead", "registryReadWrite"] {
        assert!(hub
            .connection_string(policy)
            .contains(&format!("SharedAccessKeyName={policy};")));
    }
    let missing = hub.cli(&["connection-string", "--policy", "nobody"]);
    assert!(!missing.status.success());
}

#[test]
fn device_and_module_commands_work_next_to_the_hub() {
    let hub = Hub::start();
    let created = json(&hub.cli(&["device", "create", "d1"]));
    assert_eq!(created["deviceId"], "d1");
    let key = created["authentication"]["symmetricKey"]["primaryKey"]
        .as_str()
        .unwrap()
        .to_owned();

    let duplicate = hub.cli(&["device", "create", "d1"]);
    assert!(!duplicate.status.success());
    assert!(String::from_utf8_lossy(&duplicate.stderr).contains("409"));

    let x509 = json(&hub.cli(&[
        "device",
        "create",
        "x1",
        "--x509-thumbprint",
        &"ab".repeat(20),
    ]));
    assert_eq!(x509["authentication"]["type"], "selfSigned");
    let ca = json(&hub.cli(&[
        "device",
        "create",
        "c1",
        "--x509-ca",
        "--status",
        "disabled",
    ]));
    assert_eq!(ca["authentication"]["type"], "certificateAuthority");
    assert_eq!(ca["status"], "disabled");

    assert_eq!(
        json(&hub.cli(&["device", "show", "d1"]))["etag"],
        created["etag"]
    );
    let listed = json(&hub.cli(&["device", "list"]));
    let ids: Vec<_> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["deviceId"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["c1", "d1", "x1"]);

    let cs = stdout(&hub.cli(&["device", "connection-string", "d1"]));
    assert_eq!(
        cs.trim(),
        format!("HostName=localhost;DeviceId=d1;SharedAccessKey={key}")
    );
    let cs = stdout(&hub.cli(&["device", "connection-string", "x1"]));
    assert_eq!(cs.trim(), "HostName=localhost;DeviceId=x1;x509=true");

    // A device token verifies with the device's key and is scoped to the device.
    let token = stdout(&hub.cli(&["sas-token", "--device", "d1", "--ttl", "60"]));
    let parsed = SasToken::parse(token.trim()).unwrap();
    let raw_key = base64::engine::general_purpose::STANDARD
        .decode(&key)
        .unwrap();
    parsed
        .verify(&[&raw_key], ingot_control_plane::api::now_secs())
        .unwrap();
    assert_eq!(parsed.audience().unwrap(), "localhost/devices/d1");

    let disabled = json(&hub.cli(&["device", "update", "d1", "--status", "disabled"]));
    assert_eq!(disabled["status"], "disabled");
    let rotated = json(&hub.cli(&["device", "update", "d1", "--regenerate-keys"]));
    assert_ne!(
        rotated["authentication"]["symmetricKey"]["primaryKey"]
            .as_str()
            .unwrap(),
        key
    );

    let module = json(&hub.cli(&["module", "create", "d1", "m1"]));
    assert_eq!(module["moduleId"], "m1");
    let module_cs = stdout(&hub.cli(&["module", "connection-string", "d1", "m1"]));
    assert!(module_cs.starts_with("HostName=localhost;DeviceId=d1;ModuleId=m1;SharedAccessKey="));
    let module_token = stdout(&hub.cli(&["sas-token", "--device", "d1", "--module", "m1"]));
    let parsed = SasToken::parse(module_token.trim()).unwrap();
    assert_eq!(
        parsed.audience().unwrap(),
        "localhost/devices/d1/modules/m1"
    );
    assert_eq!(
        json(&hub.cli(&["module", "list", "d1"]))
            .as_array()
            .unwrap()
            .len(),
        1
    );
    stdout(&hub.cli(&["module", "delete", "d1", "m1"]));
    assert!(!hub.cli(&["module", "show", "d1", "m1"]).status.success());

    stdout(&hub.cli(&["device", "delete", "d1"]));
    assert!(!hub.cli(&["device", "show", "d1"]).status.success());
}

#[test]
fn policy_tokens_authorize_with_their_permissions() {
    let hub = Hub::start();
    let token = stdout(&hub.cli(&["sas-token", "--policy", "registryRead"]));
    let parsed = SasToken::parse(token.trim()).unwrap();
    assert_eq!(parsed.skn.as_deref(), Some("registryRead"));
    assert!(sas::covers(
        &parsed.audience().unwrap(),
        "localhost/devices/x"
    ));

    // A registryRead connection string can list but not create.
    let read_cs = hub.connection_string("registryRead");
    let list = hub
        .command("device")
        .args(["list", "--connection-string", &read_cs])
        .output()
        .unwrap();
    assert!(list.status.success());
    let create = hub
        .command("device")
        .args(["create", "nope", "--connection-string", &read_cs])
        .output()
        .unwrap();
    assert!(!create.status.success());
    assert!(String::from_utf8_lossy(&create.stderr).contains("401"));
}

#[test]
fn sigterm_shuts_down_cleanly_and_data_persists() {
    let mut hub = Hub::start();
    json(&hub.cli(&["device", "create", "keep"]));
    let status = hub.terminate();
    assert!(status.success(), "exit status {status}");
    hub.restart();
    assert_eq!(
        json(&hub.cli(&["device", "show", "keep"]))["deviceId"],
        "keep"
    );
}

#[test]
fn bad_configuration_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("ingot.toml");
    let cases = [
        ("https_port = \"eighty\"", "https_port"),
        ("unknown_setting = 1", "unknown_setting"),
        ("[tls]\ncert_file = \"/nonexistent.pem\"", "tls"),
    ];
    for (text, expected) in cases {
        std::fs::write(&config, text).unwrap();
        let out = std::process::Command::new(ingot_bin())
            .args(["serve", "--config"])
            .arg(&config)
            .args(["--data-dir"])
            .arg(dir.path().join("data"))
            .output()
            .unwrap();
        assert!(!out.status.success(), "{text:?} was accepted");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expected), "{text:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    // An environment override with a bad value is refused the same way.
    let out = std::process::Command::new(ingot_bin())
        .args(["serve", "--data-dir"])
        .arg(dir.path().join("data"))
        .env("INGOT_HTTPS_PORT", "0")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("https_port"));
}

#[test]
fn a_port_in_use_is_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(ingot_bin())
        .args([
            "serve",
            "--listen-address",
            "127.0.0.1",
            "--https-port",
            &port,
            "--data-dir",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("bind the HTTPS listener"), "{stderr}");
}

#[test]
fn a_second_hub_on_the_same_data_directory_is_refused() {
    let hub = Hub::start();
    let out = std::process::Command::new(ingot_bin())
        .args([
            "serve",
            "--listen-address",
            "127.0.0.1",
            "--https-port",
            &free_port().to_string(),
            "--data-dir",
        ])
        .arg(&hub.data_dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("another hub"));
}

#[test]
fn operator_certificates_are_served() {
    // Use one hub's development certificate as "the company's" certificate for another.
    let donor = Hub::start();
    let tls = donor.data_dir.join("tls");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("ingot.toml");
    std::fs::write(
        &config,
        format!(
            "[tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
            tls.join("server.pem").display(),
            tls.join("server.key").display()
        ),
    )
    .unwrap();
    let port = free_port();
    let data = dir.path().join("data");
    let mut child = std::process::Command::new(ingot_bin())
        .args([
            "serve",
            "--listen-address",
            "127.0.0.1",
            "--https-port",
            &port.to_string(),
            "--config",
        ])
        .arg(&config)
        .arg("--data-dir")
        .arg(&data)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(std::time::Instant::now() < deadline);
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(
        !data.join("tls").exists(),
        "no development CA when the operator brings a certificate"
    );
    let list = std::process::Command::new(ingot_bin())
        .args(["device", "list", "--data-dir"])
        .arg(&data)
        .arg("--ca")
        .arg(tls.join("ca.pem"))
        .output()
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        list.status.success(),
        "{}",
        String::from_utf8_lossy(&list.stderr)
    );
}

#[test]
fn a_data_directory_keeps_its_partition_count() {
    let mut hub = Hub::start(); // two shards, so two partitions
    let status = hub.terminate();
    assert!(status.success(), "{status}: {}", hub.log());
    let serve = |extra: &[&str]| {
        std::process::Command::new(ingot_bin())
            .args([
                "serve",
                "--listen-address",
                "127.0.0.1",
                "--https-port",
                &free_port().to_string(),
            ])
            .args([
                "--mqtt-port",
                &free_port().to_string(),
                "--mqtt-tls-port",
                &free_port().to_string(),
            ])
            .arg("--data-dir")
            .arg(&hub.data_dir)
            .args(extra)
            .env("INGOT_STORE__SEGMENT_BYTES_MAX", "1048576")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    // One shard on a machine with another core count: the store keeps its two partitions.
    let mut one_shard = serve(&["--shards", "1"]);
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert!(
        one_shard.try_wait().unwrap().is_none(),
        "the hub must keep running"
    );
    let _ = one_shard.kill();
    let _ = one_shard.wait();
    let reader = ingot_engine::store::Reader::open(&hub.data_dir).unwrap();
    assert_eq!(reader.partition_count(), 2);
    // Asking for another partition count explicitly is a clear error.
    let out = std::process::Command::new(ingot_bin())
        .args([
            "serve",
            "--listen-address",
            "127.0.0.1",
            "--https-port",
            &free_port().to_string(),
        ])
        .arg("--data-dir")
        .arg(&hub.data_dir)
        .env("INGOT_STORE__PARTITIONS", "3")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("partition"), "{stderr}");
}

#[test]
fn route_test_evaluates_a_condition_against_a_message_file() {
    let dir = tempfile::tempdir().unwrap();
    let message = dir.path().join("message.json");
    // One line of `ingot monitor-events`, as a back end would copy it.
    std::fs::write(
        &message,
        serde_json::json!({
            "deviceId": "dev-1",
            "body": {"Weather": {"Temperature": 55}},
            "properties": {"processingPath": "hot", "level": "2"},
            "systemProperties": {
                "content-type": "application/json",
                "content-encoding": "utf-8",
                "iothub-connection-device-id": "dev-1"
            }
        })
        .to_string(),
    )
    .unwrap();
    let twin = dir.path().join("twin.json");
    std::fs::write(
        &twin,
        r#"{"tags": {"region": "us"}, "properties": {"reported": {}}}"#,
    )
    .unwrap();
    let run = |condition: &str| {
        let out = std::process::Command::new(ingot_bin())
            .args(["route", "test", "--condition", condition, "--message"])
            .arg(&message)
            .arg("--twin")
            .arg(&twin)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let result = |condition: &str| {
        let (ok, out, err) = run(condition);
        assert!(ok, "{condition}: {err}");
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["result"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert_eq!(
        result("processingPath = 'hot' AND $connectionDeviceId = 'dev-1'"),
        "match"
    );
    assert_eq!(
        result("$body.Weather.Temperature > 50 AND $twin.tags.region = 'us'"),
        "match"
    );
    assert_eq!(result("as_number(level) >= 3"), "noMatch");
    // An application property is a string: comparing it with a number is undefined.
    assert_eq!(result("level = 2"), "undefined");
    let (ok, _, err) = run("processingPath = 'hot' AND (");
    assert!(!ok);
    assert!(err.contains("at "), "the error names the position: {err}");
}

#[test]
fn sigterm_ends_the_hub_while_connections_are_still_in_their_handshake() {
    // Sockets that connect and say nothing keep their tasks waiting in the TLS handshake and in
    // CONNECT; stopping must not wait for them (nor for anything they hold).
    let mut hub = Hub::start();
    let idle: Vec<std::net::TcpStream> = (0..4)
        .flat_map(|_| [hub.mqtt_tls_port, hub.mqtt_port])
        .map(|port| std::net::TcpStream::connect(("127.0.0.1", port)).unwrap())
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(200));
    let started = std::time::Instant::now();
    let status = hub.terminate();
    assert!(status.success(), "{status}: {}", hub.log());
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    drop(idle);
}
