//! The data plane as devices see it: MQTT CONNECT with SAS tokens and X.509 certificates,
//! telemetry appended to the segment store in order with the hub's stamps, PUBACK only after the
//! append, protocol errors that close only the offending connection, revocation within a second.

// Test helpers outside `#[test]` functions unwrap too: a failure is a test failure.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use base64::Engine as _;
use hyper::Method;
use ingot_engine::auth::sas;
use ingot_engine::store::{PartitionId, Reader, StartAt};
use ingot_tests::mqtt_client::{Client, ConnectOptions, Received};
use ingot_tests::Hub;

fn create_device(hub: &Hub, id: &str) -> Vec<u8> {
    hub.create_sas_device(id)
}

fn token(id: &str, key: &[u8]) -> String {
    ingot_tests::device_token(id, key)
}

fn username(id: &str) -> String {
    ingot_tests::device_username(id)
}

fn connect(hub: &Hub, id: &str, key: &[u8]) -> Client {
    let mut client = Client::plain(hub.mqtt_port).unwrap();
    let (user, password) = (username(id), token(id, key));
    let ack = client
        .connect(&ConnectOptions::device(id, &user, &password))
        .unwrap();
    // Clean session 0: a reconnect finds its session (session_present), a first connect not.
    assert!(
        matches!(ack, Some(Received::Connack { code: 0, .. })),
        "{id}: {ack:?}"
    );
    client
}

fn connack_code(hub: &Hub, options: &ConnectOptions<'_>) -> Option<Received> {
    let mut client = Client::plain(hub.mqtt_port).unwrap();
    client.connect(options).unwrap()
}

/// A stored record: offset, system properties, application properties, body.
type Stored = (
    u64,
    HashMap<String, String>,
    HashMap<String, String>,
    Vec<u8>,
);

/// Every record of the store, by device, in offset order per partition.
fn records_by_device(hub: &Hub) -> HashMap<String, Vec<Stored>> {
    let reader = Reader::open(&hub.data_dir).unwrap();
    let mut by_device: HashMap<_, Vec<_>> = HashMap::new();
    for p in 0..reader.partition_count() {
        let mut partition = reader.partition(PartitionId(p), StartAt::Start).unwrap();
        let mut last = None;
        while let Some(record) = partition.next().unwrap() {
            if let Some(last) = last {
                assert_eq!(record.offset.0, last + 1, "offsets are dense");
            }
            last = Some(record.offset.0);
            let message = record.message;
            let system: HashMap<String, String> = message
                .system_properties()
                .iter()
                .map(|p| (p.name().to_owned(), p.value().to_owned()))
                .collect();
            let app: HashMap<String, String> = message
                .application_properties()
                .iter()
                .map(|p| (p.name().to_owned(), p.value().to_owned()))
                .collect();
            let device = system["iothub-connection-device-id"].clone();
            by_device.entry(device).or_default().push((
                record.offset.0,
                system,
                app,
                message.body().to_vec(),
            ));
        }
    }
    by_device
}

#[test]
fn telemetry_is_appended_in_order_and_acknowledged() {
    let hub = Hub::start();
    // Enough devices that some land on the shard that did not accept them (a handoff).
    let devices: Vec<String> = (0..6).map(|i| format!("dev-{i}")).collect();
    let mut clients = Vec::new();
    for id in &devices {
        let key = create_device(&hub, id);
        clients.push((id.clone(), connect(&hub, id, &key)));
    }
    const N: u16 = 50;
    for (id, client) in &mut clients {
        for i in 1..=N {
            let topic = format!(
                "devices/{id}/messages/events/%24.mid=m{i}&%24.ct=application%2Fjson&%24.ce=utf-8&color=red%20x&%24.cdid=spoofed"
            );
            client
                .publish(&topic, format!("{{\"n\":{i}}}").as_bytes(), Some(i))
                .unwrap();
        }
        // QoS 0 and an empty property bag.
        client
            .publish(&format!("devices/{id}/messages/events/"), b"qos0", None)
            .unwrap();
        for i in 1..=N {
            assert_eq!(
                client.receive().unwrap(),
                Some(Received::Puback(i)),
                "{id}: PUBACKs in order"
            );
        }
    }
    // A ping after the QoS 0 message proves the hub processed it.
    for (_, client) in &mut clients {
        client.send_raw(&[0xc0, 0x00]).unwrap();
        assert_eq!(client.receive().unwrap(), Some(Received::Pingresp));
    }

    let stored = records_by_device(&hub);
    let generation: HashMap<String, String> = devices
        .iter()
        .map(|id| {
            let doc = hub
                .client("iothubowner")
                .request(Method::GET, &format!("/devices/{id}"), &[], None)
                .unwrap()
                .success()
                .unwrap();
            (id.clone(), doc["generationId"].as_str().unwrap().to_owned())
        })
        .collect();
    for id in &devices {
        let records = &stored[id];
        assert_eq!(
            records.len(),
            usize::from(N) + 1,
            "{id}: every message stored once"
        );
        for (i, (_, system, app, body)) in records.iter().take(usize::from(N)).enumerate() {
            let n = i + 1;
            assert_eq!(
                body,
                format!("{{\"n\":{n}}}").as_bytes(),
                "{id}: order kept"
            );
            assert_eq!(system["message-id"], format!("m{n}"));
            assert_eq!(system["content-type"], "application/json");
            assert_eq!(system["content-encoding"], "utf-8");
            assert_eq!(
                system["iothub-connection-device-id"], *id,
                "the hub's stamp, not the device's"
            );
            assert_eq!(
                system["iothub-connection-auth-generation-id"],
                generation[id]
            );
            assert!(system["iothub-connection-auth-method"].contains("\"sas\""));
            assert_eq!(app["color"], "red x", "percent-decoded, no + to space");
            assert!(
                !app.contains_key("$.cdid") && !app.contains_key("iothub-connection-device-id")
            );
        }
        let (_, system, _, body) = &records[usize::from(N)];
        assert_eq!(body, b"qos0");
        assert_eq!(
            system["message-id"].len(),
            36,
            "a message id is stamped when none was sent"
        );
    }
}

#[test]
fn bad_credentials_get_connack_5_and_bad_ids_connack_2() {
    let hub = Hub::start();
    let key = create_device(&hub, "d1");
    let user = username("d1");
    let wrong = token("d1", b"wrong key of some length");
    assert_eq!(
        connack_code(&hub, &ConnectOptions::device("d1", &user, &wrong)),
        Some(Received::Connack {
            session_present: false,
            code: 5
        })
    );
    let other_device = token("d2", &key);
    assert_eq!(
        connack_code(&hub, &ConnectOptions::device("d1", &user, &other_device)),
        Some(Received::Connack {
            session_present: false,
            code: 5
        }),
        "a token scoped to another device"
    );
    let unknown_user = username("nobody");
    let unknown = token("nobody", &key);
    assert_eq!(
        connack_code(
            &hub,
            &ConnectOptions::device("nobody", &unknown_user, &unknown)
        ),
        Some(Received::Connack {
            session_present: false,
            code: 5
        })
    );
    let good = token("d1", &key);
    assert_eq!(
        connack_code(&hub, &ConnectOptions::device("someone-else", &user, &good)),
        Some(Received::Connack {
            session_present: false,
            code: 2
        }),
        "client id must match the username's identity"
    );
    let expired = sas::generate(
        "localhost/devices/d1",
        &key,
        ingot_control_plane::api::now_secs() - 600,
        None,
    );
    assert_eq!(
        connack_code(&hub, &ConnectOptions::device("d1", &user, &expired)),
        Some(Received::Connack {
            session_present: false,
            code: 5
        })
    );
    // Disabled devices cannot connect.
    let client = hub.client("iothubowner");
    let disabled = serde_json::json!({"deviceId": "d1", "status": "disabled"});
    client
        .request(
            Method::PUT,
            "/devices/d1",
            &[("if-match", "\"*\"")],
            Some(&disabled),
        )
        .unwrap()
        .success()
        .unwrap();
    assert_eq!(
        connack_code(&hub, &ConnectOptions::device("d1", &user, &good)),
        Some(Received::Connack {
            session_present: false,
            code: 5
        })
    );
    // A policy token with DeviceConnect works for any device.
    let device_policy = hub.connection_string("device");
    let policy_key = device_policy.split("SharedAccessKey=").nth(1).unwrap();
    let policy_key = base64::engine::general_purpose::STANDARD
        .decode(policy_key)
        .unwrap();
    let key2 = create_device(&hub, "d2");
    let _ = key2;
    let policy_token = sas::generate(
        "localhost/devices/d2",
        &policy_key,
        ingot_control_plane::api::now_secs() + 60,
        Some("device"),
    );
    let user2 = username("d2");
    assert_eq!(
        connack_code(&hub, &ConnectOptions::device("d2", &user2, &policy_token)),
        Some(Received::Connack {
            session_present: false,
            code: 0
        })
    );
}

#[test]
fn protocol_violations_close_only_that_connection() {
    let hub = Hub::start();
    let key = create_device(&hub, "good");
    let bad_key = create_device(&hub, "bad");
    let mut good = connect(&hub, "good", &key);

    // QoS 2.
    let mut bad = connect(&hub, "bad", &bad_key);
    bad.send_raw(&[
        0x34, 0x0a, 0x00, 0x03, b'a', b'/', b'b', 0x00, 0x01, b'x', b'y', b'z',
    ])
    .unwrap();
    bad.expect_closed().unwrap();
    // Another device's topic.
    let mut bad = connect(&hub, "bad", &bad_key);
    bad.publish("devices/good/messages/events/", b"spoof", Some(1))
        .unwrap();
    bad.expect_closed().unwrap();
    // Garbage.
    let mut bad = connect(&hub, "bad", &bad_key);
    bad.send_raw(&[0xff, 0xff, 0xff, 0xff, 0xff, 0x01]).unwrap();
    bad.expect_closed().unwrap();
    // A packet that announces more than the limit is refused from its header alone.
    let mut bad = connect(&hub, "bad", &bad_key);
    bad.send_raw(&[0x30, 0xff, 0xff, 0xff, 0x7f]).unwrap();
    bad.expect_closed().unwrap();
    // A message over 256 KB.
    let mut bad = connect(&hub, "bad", &bad_key);
    bad.publish(
        "devices/bad/messages/events/",
        &vec![b'x'; 256 * 1024 + 1],
        Some(1),
    )
    .unwrap();
    bad.expect_closed().unwrap();
    // Not a CONNECT first.
    let mut bad = Client::plain(hub.mqtt_port).unwrap();
    bad.send_raw(&[0xc0, 0x00]).unwrap();
    bad.expect_closed().unwrap();

    // The well-behaved device never noticed.
    good.publish("devices/good/messages/events/", b"still here", Some(7))
        .unwrap();
    assert_eq!(good.receive().unwrap(), Some(Received::Puback(7)));
    let stored = records_by_device(&hub);
    assert!(
        !stored.contains_key("bad"),
        "nothing of the violating connections was stored"
    );
    assert_eq!(stored["good"].len(), 1);
}

#[test]
fn revocation_and_replacement_close_connections_within_a_second() {
    let hub = Hub::start();
    let client = hub.client("iothubowner");
    let key = create_device(&hub, "victim");

    // Disabling a device closes its live connection.
    let mut device = connect(&hub, "victim", &key);
    let started = Instant::now();
    let disabled = serde_json::json!({"deviceId": "victim", "status": "disabled",
        "authentication": {"symmetricKey": {"primaryKey": base64::engine::general_purpose::STANDARD.encode(&key)}}});
    client
        .request(
            Method::PUT,
            "/devices/victim",
            &[("if-match", "\"*\"")],
            Some(&disabled),
        )
        .unwrap()
        .success()
        .unwrap();
    device.expect_closed().unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "closed after {:?}",
        started.elapsed()
    );

    // Re-keying closes it too.
    let enabled = serde_json::json!({"deviceId": "victim", "status": "enabled",
        "authentication": {"symmetricKey": {"primaryKey": base64::engine::general_purpose::STANDARD.encode(&key)}}});
    let doc = client
        .request(
            Method::PUT,
            "/devices/victim",
            &[("if-match", "\"*\"")],
            Some(&enabled),
        )
        .unwrap()
        .success()
        .unwrap();
    let secondary = doc["authentication"]["symmetricKey"]["secondaryKey"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut device = connect(&hub, "victim", &key);
    let rekeyed = serde_json::json!({"deviceId": "victim", "authentication": {"symmetricKey": {"secondaryKey": secondary}}});
    let started = Instant::now();
    client
        .request(
            Method::PUT,
            "/devices/victim",
            &[("if-match", "\"*\"")],
            Some(&rekeyed),
        )
        .unwrap()
        .success()
        .unwrap();
    device.expect_closed().unwrap();
    assert!(started.elapsed() < Duration::from_secs(1));

    // Deleting closes it.
    let doc = client
        .request(Method::GET, "/devices/victim", &[], None)
        .unwrap()
        .success()
        .unwrap();
    let key = base64::engine::general_purpose::STANDARD
        .decode(
            doc["authentication"]["symmetricKey"]["primaryKey"]
                .as_str()
                .unwrap(),
        )
        .unwrap();
    let mut device = connect(&hub, "victim", &key);
    let started = Instant::now();
    client
        .request(
            Method::DELETE,
            "/devices/victim",
            &[("if-match", "\"*\"")],
            None,
        )
        .unwrap()
        .success()
        .unwrap();
    device.expect_closed().unwrap();
    assert!(started.elapsed() < Duration::from_secs(1));

    // A second connection of the same identity replaces the first.
    let key = create_device(&hub, "twice");
    let mut first = connect(&hub, "twice", &key);
    let mut second = connect(&hub, "twice", &key);
    first.expect_closed().unwrap();
    second.send_raw(&[0xc0, 0x00]).unwrap();
    assert_eq!(second.receive().unwrap(), Some(Received::Pingresp));
}

#[test]
fn sessions_keepalive_and_subscriptions() {
    let hub = Hub::start();
    let key = create_device(&hub, "s1");
    let (user, password) = (username("s1"), token("s1", &key));

    // Clean session 0: the subscriptions survive a reconnect (the Python SDK never re-subscribes).
    let mut client = Client::plain(hub.mqtt_port).unwrap();
    let options = ConnectOptions::device("s1", &user, &password);
    assert_eq!(
        client.connect(&options).unwrap(),
        Some(Received::Connack {
            session_present: false,
            code: 0
        })
    );
    use ingot_engine::mqtt::QoS;
    client
        .subscribe(
            3,
            &[
                ("devices/s1/messages/devicebound/#", QoS::AtLeastOnce),
                ("$iothub/methods/POST/#", QoS::ExactlyOnce),
                ("devices/other/messages/devicebound/#", QoS::AtLeastOnce),
            ],
        )
        .unwrap();
    assert_eq!(
        client.receive().unwrap(),
        Some(Received::Suback(3, vec![1, 1, 0x80]))
    );
    client.send_raw(&[0xe0, 0x00]).unwrap(); // DISCONNECT
    client.expect_closed().unwrap();
    let mut client = Client::plain(hub.mqtt_port).unwrap();
    assert_eq!(
        client.connect(&options).unwrap(),
        Some(Received::Connack {
            session_present: true,
            code: 0
        })
    );
    drop(client);

    // Clean session 1 discards it.
    let mut clean = options.clone();
    clean.clean_session = true;
    let mut client = Client::plain(hub.mqtt_port).unwrap();
    assert_eq!(
        client.connect(&clean).unwrap(),
        Some(Received::Connack {
            session_present: false,
            code: 0
        })
    );
    drop(client);

    // Keepalive: silence for 1.5 x keepalive closes the connection.
    let mut quiet = options.clone();
    quiet.keep_alive_secs = 1;
    let mut client = Client::plain(hub.mqtt_port).unwrap();
    assert!(matches!(
        client.connect(&quiet).unwrap(),
        Some(Received::Connack { code: 0, .. })
    ));
    let started = Instant::now();
    client.expect_closed().unwrap();
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1400) && waited < Duration::from_secs(4),
        "closed after {waited:?}"
    );
}

/// An MQTT client on the TLS port (TLS 1.2, as the Azure Python SDK uses), optionally with a
/// client certificate.
fn tls_client(hub: &Hub, client_cert: Option<(&rcgen::Certificate, &rcgen::KeyPair)>) -> Client {
    let auth = client_cert.map(|(cert, key)| {
        let key = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap();
        (vec![cert.der().clone()], key)
    });
    let stream = ingot_tests::tls_connect(
        &hub.ca(),
        hub.mqtt_tls_port,
        &[&rustls::version::TLS12],
        auth,
    );
    Client::over(Box::new(stream))
}

#[test]
fn tls_with_sas_and_x509_thumbprints() {
    let hub = Hub::start();
    let key = create_device(&hub, "t1");
    let mut client = tls_client(&hub, None);
    let (user, password) = (username("t1"), token("t1", &key));
    assert_eq!(
        client
            .connect(&ConnectOptions::device("t1", &user, &password))
            .unwrap(),
        Some(Received::Connack {
            session_present: false,
            code: 0
        })
    );
    client
        .publish("devices/t1/messages/events/a=1", b"over tls", Some(1))
        .unwrap();
    assert_eq!(client.receive().unwrap(), Some(Received::Puback(1)));

    // An X.509 device registered by the SHA-256 thumbprint of its self-signed certificate.
    let cert_key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "x1");
    let cert = params.self_signed(&cert_key).unwrap();
    let (_, sha256) = ingot_engine::auth::device::thumbprints_of(cert.der());
    let out = hub.cli(&["device", "create", "x1", "--x509-thumbprint", &sha256]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let user = username("x1");
    let no_password = ConnectOptions {
        password: None,
        ..ConnectOptions::device("x1", &user, "")
    };
    let mut client = tls_client(&hub, Some((&cert, &cert_key)));
    assert_eq!(
        client.connect(&no_password).unwrap(),
        Some(Received::Connack {
            session_present: false,
            code: 0
        })
    );
    client
        .publish("devices/x1/messages/events/", b"x509", Some(2))
        .unwrap();
    assert_eq!(client.receive().unwrap(), Some(Received::Puback(2)));

    // Another certificate, or none, is refused.
    let other_key = rcgen::KeyPair::generate().unwrap();
    let other = rcgen::CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .self_signed(&other_key)
        .unwrap();
    let mut client = tls_client(&hub, Some((&other, &other_key)));
    assert_eq!(
        client.connect(&no_password).unwrap(),
        Some(Received::Connack {
            session_present: false,
            code: 5
        })
    );
    let mut client = tls_client(&hub, None);
    assert_eq!(
        client.connect(&no_password).unwrap(),
        Some(Received::Connack {
            session_present: false,
            code: 5
        })
    );

    let stored = records_by_device(&hub);
    assert_eq!(stored["t1"][0].3, b"over tls");
    assert!(stored["x1"][0].1["iothub-connection-auth-method"].contains("x509"));
}

#[test]
fn x509_certificate_authority_devices() {
    let hub = Hub::start();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "fleet CA");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.clone().self_signed(&ca_key).unwrap();
    let ca_file = hub.data_dir.with_extension("fleet-ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let leaf = |cn: &str, issuer: &rcgen::Certificate, issuer_key: &rcgen::KeyPair| {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        (params.signed_by(&key, issuer, issuer_key).unwrap(), key)
    };

    let out = hub.cli(&["device", "create", "c1", "--x509-ca"]);
    assert!(out.status.success());
    let (cert, key) = leaf("c1", &ca, &ca_key);
    let user = username("c1");
    let options = ConnectOptions {
        password: None,
        ..ConnectOptions::device("c1", &user, "")
    };

    // Before the CA is registered, the chain leads nowhere.
    let mut client = tls_client(&hub, Some((&cert, &key)));
    assert_eq!(
        client.connect(&options).unwrap(),
        Some(Received::Connack {
            session_present: false,
            code: 5
        })
    );

    let out = hub.cli(&["ca", "add", "fleet", "--cert", ca_file.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed = hub.cli(&["ca", "list"]);
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(listed[0]["name"], "fleet");
    assert_eq!(listed[0]["properties"]["isVerified"], true);
    // A leaf is not a CA.
    let leaf_file = hub.data_dir.with_extension("leaf.pem");
    std::fs::write(&leaf_file, cert.pem()).unwrap();
    assert!(!hub
        .cli(&["ca", "add", "leaf", "--cert", leaf_file.to_str().unwrap()])
        .status
        .success());

    let mut client = tls_client(&hub, Some((&cert, &key)));
    assert!(matches!(
        client.connect(&options).unwrap(),
        Some(Received::Connack { code: 0, .. })
    ));
    client
        .publish("devices/c1/messages/events/", b"ca-signed", Some(1))
        .unwrap();
    assert_eq!(client.receive().unwrap(), Some(Received::Puback(1)));

    // The CN must be the device id, and another CA's leaf is refused.
    let (wrong_cn, wrong_key) = leaf("c2", &ca, &ca_key);
    let mut other = tls_client(&hub, Some((&wrong_cn, &wrong_key)));
    assert_eq!(
        other.connect(&options).unwrap(),
        Some(Received::Connack {
            session_present: false,
            code: 5
        })
    );
    let stranger_key = rcgen::KeyPair::generate().unwrap();
    let stranger = ca_params.self_signed(&stranger_key).unwrap();
    let (foreign, foreign_key) = leaf("c1", &stranger, &stranger_key);
    let mut other = tls_client(&hub, Some((&foreign, &foreign_key)));
    assert_eq!(
        other.connect(&options).unwrap(),
        Some(Received::Connack {
            session_present: false,
            code: 5
        })
    );

    // Removing the CA disconnects the devices it admitted, within a second.
    let started = Instant::now();
    assert!(hub.cli(&["ca", "remove", "fleet"]).status.success());
    client.expect_closed().unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "closed after {:?}",
        started.elapsed()
    );
    let mut again = tls_client(&hub, Some((&cert, &key)));
    assert_eq!(
        again.connect(&options).unwrap(),
        Some(Received::Connack {
            session_present: false,
            code: 5
        })
    );
}

#[test]
fn clients_that_never_connect_are_closed_after_the_connect_timeout() {
    let hub = Hub::start_with(&[("INGOT_MQTT__CONNECT_TIMEOUT_MS", "500")]);
    let mut silent = Client::plain(hub.mqtt_port).unwrap();
    let mut partial = Client::plain(hub.mqtt_port).unwrap();
    partial
        .send_raw(&[0x10, 0x20, 0x00, 0x04, b'M', b'Q'])
        .unwrap();
    let started = Instant::now();
    silent.expect_closed().unwrap();
    partial.expect_closed().unwrap();
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(400) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
    // Over TLS, a client that never finishes the handshake is closed too.
    let mut tcp = std::net::TcpStream::connect(("127.0.0.1", hub.mqtt_tls_port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    use std::io::Read;
    let mut buf = [0u8; 16];
    assert_eq!(tcp.read(&mut buf).unwrap_or(0), 0, "closed without a byte");
}

#[test]
fn the_connect_rate_limit_answers_connack_3() {
    let hub = Hub::start_with(&[("INGOT_MQTT__CONNECT_RATE_PER_SEC", "4")]);
    let key = create_device(&hub, "r1");
    let (user, password) = (username("r1"), token("r1", &key));
    let codes: Vec<u8> = (0..12)
        .map(|_| {
            let mut client = Client::plain(hub.mqtt_port).unwrap();
            match client
                .connect(&ConnectOptions::device("r1", &user, &password))
                .unwrap()
            {
                Some(Received::Connack { code, .. }) => code,
                other => panic!("{other:?}"),
            }
        })
        .collect();
    assert!(codes.contains(&0), "{codes:?}");
    assert!(
        codes.contains(&3),
        "over the rate: CONNACK 3 (server unavailable, retried by SDKs): {codes:?}"
    );
    assert!(codes.iter().all(|c| *c == 0 || *c == 3), "{codes:?}");
}

#[test]
fn modules_connect_with_their_own_keys_and_topics() {
    let hub = Hub::start();
    create_device(&hub, "edge1");
    let client = hub.client("iothubowner");
    let doc = client
        .request(
            Method::PUT,
            "/devices/edge1/modules/m1",
            &[],
            Some(&serde_json::json!({})),
        )
        .unwrap()
        .success()
        .unwrap();
    let key = base64::engine::general_purpose::STANDARD
        .decode(
            doc["authentication"]["symmetricKey"]["primaryKey"]
                .as_str()
                .unwrap(),
        )
        .unwrap();
    let token = sas::generate(
        "localhost/devices/edge1/modules/m1",
        &key,
        ingot_control_plane::api::now_secs() + 600,
        None,
    );
    let user = "localhost/edge1/m1/?api-version=2021-04-12";
    let mut module = Client::plain(hub.mqtt_port).unwrap();
    let ack = module
        .connect(&ConnectOptions::device("edge1/m1", user, &token))
        .unwrap();
    assert!(
        matches!(ack, Some(Received::Connack { code: 0, .. })),
        "{ack:?}"
    );
    module
        .publish(
            "devices/edge1/modules/m1/messages/events/%24.on=out1&k=v",
            b"from a module",
            Some(1),
        )
        .unwrap();
    assert_eq!(module.receive().unwrap(), Some(Received::Puback(1)));
    // The device form of the topic is not the module's own.
    module
        .publish("devices/edge1/messages/events/", b"spoof", Some(2))
        .unwrap();
    module.expect_closed().unwrap();

    let stored = records_by_device(&hub);
    let records = &stored["edge1"];
    assert_eq!(records.len(), 1);
    let (_, system, app, body) = &records[0];
    assert_eq!(body, b"from a module");
    assert_eq!(system["iothub-connection-module-id"], "m1");
    assert_eq!(system["iothub-outputname"], "out1");
    assert_eq!(app["k"], "v");

    // Disabling the device disconnects its modules too.
    let mut module = Client::plain(hub.mqtt_port).unwrap();
    let ack = module
        .connect(&ConnectOptions::device("edge1/m1", user, &token))
        .unwrap();
    assert!(matches!(ack, Some(Received::Connack { code: 0, .. })));
    let disabled = serde_json::json!({"deviceId": "edge1", "status": "disabled"});
    client
        .request(
            Method::PUT,
            "/devices/edge1",
            &[("if-match", "\"*\"")],
            Some(&disabled),
        )
        .unwrap()
        .success()
        .unwrap();
    module.expect_closed().unwrap();
}
