//! Bad input never takes the hub down: malformed bodies, oversize bodies, bad tokens, garbage
//! instead of TLS and half-open connections get a clear error for that client, and the hub keeps
//! serving everyone else.

// Test helpers outside `#[test]` functions unwrap too: a failure is a test failure.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::TcpStream;

use hyper::Method;
use ingot_tests::Hub;

fn error_name(reply: &ingot_control_plane::client::Reply) -> serde_json::Value {
    let outer: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
    serde_json::from_str(outer["Message"].as_str().unwrap()).unwrap()
}

#[test]
fn malformed_and_oversize_requests_get_azure_errors() {
    let hub = Hub::start();
    let client = hub.client("iothubowner");

    let reply = client
        .request(
            Method::PUT,
            "/devices/d1",
            &[],
            Some(&serde_json::json!([1, 2])),
        )
        .unwrap();
    assert_eq!(reply.status, 400);
    assert_eq!(error_name(&reply)["errorCode"], 400012);

    let reply = client
        .request(
            Method::PUT,
            "/devices/a%2Fb",
            &[],
            Some(&serde_json::json!({})),
        )
        .unwrap();
    assert_eq!(reply.status, 400, "an id with '/' is invalid");

    let big = serde_json::json!({"statusReason": "x".repeat(5 * 1024 * 1024)});
    let reply = client
        .request(Method::PUT, "/devices/d1", &[], Some(&big))
        .unwrap();
    assert_eq!(reply.status, 413);

    let too_many: Vec<_> = (0..101)
        .map(|i| serde_json::json!({"id": format!("b{i}"), "importMode": "create"}))
        .collect();
    let reply = client
        .request(
            Method::POST,
            "/devices",
            &[],
            Some(&serde_json::Value::Array(too_many)),
        )
        .unwrap();
    assert_eq!(reply.status, 400);

    let reply = client.request(Method::GET, "/nowhere", &[], None).unwrap();
    assert_eq!(reply.status, 404);
    let reply = client
        .request(Method::POST, "/devices/d1", &[], None)
        .unwrap();
    assert_eq!(reply.status, 405);

    // Still serving.
    let reply = client
        .request(
            Method::PUT,
            "/devices/d1",
            &[],
            Some(&serde_json::json!({})),
        )
        .unwrap();
    assert_eq!(reply.status, 200);
}

#[test]
fn bad_tokens_are_refused() {
    let hub = Hub::start();
    let client = hub.client("iothubowner");
    let cases: [&[(&str, &str)]; 3] = [
        &[(
            "authorization",
            "SharedAccessSignature sr=localhost&sig=AAAA&se=99999999999&skn=iothubowner",
        )],
        &[("authorization", "Basic dXNlcjpwYXNz")],
        &[(
            "authorization",
            "SharedAccessSignature sr=localhost&sig=AAAA&se=1&skn=nobody",
        )],
    ];
    for headers in cases {
        // The client adds its own valid token; a second Authorization header must not help.
        let reply = client
            .request(Method::GET, "/devices", headers, None)
            .unwrap();
        assert_eq!(reply.status, 401, "{headers:?}");
    }

    // A token for another hub, and an expired one, signed with the right key.
    use base64::Engine as _;
    let cs = hub.connection_string("iothubowner");
    let key = cs.split("SharedAccessKey=").nth(1).unwrap();
    let key = base64::engine::general_purpose::STANDARD
        .decode(key)
        .unwrap();
    let now = ingot_control_plane::api::now_secs();
    let other_hub =
        ingot_engine::auth::sas::generate("otherhub", &key, now + 60, Some("iothubowner"));
    let expired =
        ingot_engine::auth::sas::generate("localhost", &key, now - 400, Some("iothubowner"));
    for token in [other_hub, expired] {
        let reply = raw_request(
            &hub,
            &format!("GET /devices HTTP/1.1\r\nhost: localhost\r\nauthorization: {token}\r\n\r\n"),
        );
        assert!(reply.starts_with("HTTP/1.1 401"), "{reply}");
    }
}

/// One HTTP/1.1 request over TLS, written by hand so that no client adds its own token.
fn raw_request(hub: &Hub, request: &str) -> String {
    let versions = rustls::DEFAULT_VERSIONS;
    let mut tls = ingot_tests::tls_connect(&hub.ca(), hub.port, versions, None);
    tls.write_all(request.as_bytes()).unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tls.read(&mut buf).unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
fn garbage_and_half_open_connections_do_not_block_others() {
    let hub = Hub::start();
    // Plain text where TLS is expected.
    let mut garbage = TcpStream::connect(("127.0.0.1", hub.port)).unwrap();
    garbage
        .write_all(b"GET / HTTP/1.1\r\n\r\n\x00\xff\xfe")
        .unwrap();
    // Connections that never send a byte, and one that stops mid-handshake.
    let idle: Vec<_> = (0..50)
        .map(|_| TcpStream::connect(("127.0.0.1", hub.port)).unwrap())
        .collect();
    let mut partial = TcpStream::connect(("127.0.0.1", hub.port)).unwrap();
    partial
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .unwrap();

    let client = hub.client("iothubowner");
    for i in 0..10 {
        let reply = client
            .request(
                Method::PUT,
                &format!("/devices/ok{i}"),
                &[],
                Some(&serde_json::json!({})),
            )
            .unwrap();
        assert_eq!(reply.status, 200);
    }
    drop(idle);
    let reply = client
        .request(Method::GET, "/statistics/devices", &[], None)
        .unwrap();
    assert_eq!(reply.json().unwrap()["totalDeviceCount"], 10);
}
