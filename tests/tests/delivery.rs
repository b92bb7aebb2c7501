//! Delivery to `files` and `webhook` endpoints with the real hub: routes send the matching
//! messages to each endpoint and only those; a webhook receiver that fails (503, refused
//! connections) for a while still gets everything; a hub killed mid-delivery loses nothing after
//! its restart; a receiver that refuses every batch (400) has it dead-lettered.

// Test helpers outside `#[test]` functions unwrap too: a failure is a test failure.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ingot_tests::mqtt_client::Received;
use ingot_tests::{free_port, Hub};
use serde_json::Value;

/// How the test receiver answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Ok,
    Status(u16),
}

/// (partition, offset) -> how many times it arrived, and the record.
type Arrivals = BTreeMap<(u32, u64), (u32, Value)>;

/// A webhook receiver: a small HTTP/1.1 server (keep-alive, Content-Length bodies) on a fixed
/// port that can be stopped (connections refused) and started again.
struct Receiver {
    port: u16,
    mode: Arc<Mutex<Mode>>,
    records: Arc<Mutex<Arrivals>>,
    requests: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    delay: Arc<Mutex<Duration>>,
    running: Option<Arc<AtomicBool>>,
}

impl Receiver {
    fn new(mode: Mode) -> Receiver {
        let mut receiver = Receiver {
            port: free_port(),
            mode: Arc::new(Mutex::new(mode)),
            records: Arc::default(),
            requests: Arc::default(),
            failed: Arc::default(),
            delay: Arc::default(),
            running: None,
        };
        receiver.start();
        receiver
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hook", self.port)
    }

    fn set_mode(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }

    fn start(&mut self) {
        let listener = TcpListener::bind(("127.0.0.1", self.port)).unwrap();
        listener.set_nonblocking(true).unwrap();
        let running = Arc::new(AtomicBool::new(true));
        self.running = Some(running.clone());
        let (mode, records, requests, failed, delay) = (
            self.mode.clone(),
            self.records.clone(),
            self.requests.clone(),
            self.failed.clone(),
            self.delay.clone(),
        );
        std::thread::spawn(move || {
            while running.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let (mode, records, requests, failed, delay, running) = (
                            mode.clone(),
                            records.clone(),
                            requests.clone(),
                            failed.clone(),
                            delay.clone(),
                            running.clone(),
                        );
                        std::thread::spawn(move || {
                            serve(
                                stream, &mode, &records, &requests, &failed, &delay, &running,
                            )
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
    }

    /// Closes the listener and every connection: connections are refused until `start`.
    fn stop(&mut self) {
        if let Some(running) = self.running.take() {
            running.store(false, Ordering::SeqCst);
        }
        std::thread::sleep(Duration::from_millis(100));
    }

    fn unique(&self) -> usize {
        self.records.lock().unwrap().len()
    }

    fn duplicates(&self) -> u32 {
        self.records
            .lock()
            .unwrap()
            .values()
            .map(|(n, _)| n - 1)
            .sum()
    }

    /// The `Body` of every record received.
    fn bodies(&self) -> BTreeSet<String> {
        self.records
            .lock()
            .unwrap()
            .values()
            .map(|(_, r)| body_text(r))
            .collect()
    }

    fn wait_for(&self, unique: usize, within: Duration) {
        let deadline = Instant::now() + within;
        while self.unique() < unique {
            assert!(
                Instant::now() < deadline,
                "the receiver has {} of {unique} records",
                self.unique()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Some(running) = self.running.take() {
            running.store(false, Ordering::SeqCst);
        }
    }
}

fn body_text(record: &Value) -> String {
    match &record["Body"] {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Serves the requests of one connection until it closes or the receiver stops.
fn serve(
    stream: TcpStream,
    mode: &Mutex<Mode>,
    records: &Mutex<Arrivals>,
    requests: &AtomicU64,
    failed: &AtomicU64,
    delay: &Mutex<Duration>,
    running: &AtomicBool,
) {
    stream.set_nonblocking(false).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    loop {
        // The request line and headers.
        let mut headers = BTreeMap::new();
        let mut line = String::new();
        let mut first = true;
        loop {
            if !running.load(Ordering::SeqCst) {
                return;
            }
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    // Idle between requests: look at `running` again. A timeout inside a
                    // request (never seen from the hub's client) drops the connection.
                    if line.is_empty() {
                        continue;
                    }
                    return;
                }
                Err(_) => return,
            }
            let text = line.trim_end();
            if first {
                first = false;
                continue;
            }
            if text.is_empty() {
                break;
            }
            if let Some((name, value)) = text.split_once(':') {
                headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_owned());
            }
        }
        let length: usize = headers
            .get("content-length")
            .map_or(0, |l| l.parse().unwrap());
        let mut body = vec![0; length];
        stream_read_exact(&mut reader, &mut body, running);
        requests.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(*delay.lock().unwrap());
        let status = match *mode.lock().unwrap() {
            Mode::Ok => {
                let partition: u32 = headers["x-ingot-partition"].parse().unwrap();
                let first: u64 = headers["x-ingot-first-offset"].parse().unwrap();
                let last: u64 = headers["x-ingot-last-offset"].parse().unwrap();
                assert_eq!(headers["content-type"], "application/json");
                let batch: Vec<Value> = serde_json::from_slice(&body).unwrap();
                assert_eq!(batch.len() as u64, last - first + 1);
                let mut records = records.lock().unwrap();
                for (i, record) in batch.into_iter().enumerate() {
                    let entry = records
                        .entry((partition, first + i as u64))
                        .or_insert((0, Value::Null));
                    entry.0 += 1;
                    entry.1 = record;
                }
                200
            }
            Mode::Status(status) => {
                failed.fetch_add(1, Ordering::SeqCst);
                status
            }
        };
        let answer = format!("HTTP/1.1 {status} X\r\ncontent-length: 0\r\n\r\n");
        if writer.write_all(answer.as_bytes()).is_err() {
            return;
        }
    }
}

fn stream_read_exact(reader: &mut BufReader<TcpStream>, out: &mut [u8], running: &AtomicBool) {
    let mut done = 0;
    while done < out.len() && running.load(Ordering::SeqCst) {
        match reader.read(&mut out[done..]) {
            Ok(0) => return,
            Ok(n) => done += n,
            Err(_) => continue,
        }
    }
}

/// Publishes `(property bag, body)` messages from `device`, each acknowledged.
fn publish_all(hub: &Hub, device: &str, messages: &[(String, String)]) {
    let key = hub.create_sas_device(device);
    let (mut client, _) = hub.connect_device(device, &key, false);
    for (i, (bag, body)) in messages.iter().enumerate() {
        let id = (i % 60_000) as u16 + 1;
        let topic = format!("devices/{device}/messages/events/{bag}");
        client.publish(&topic, body.as_bytes(), Some(id)).unwrap();
        assert_eq!(client.receive().unwrap(), Some(Received::Puback(id)));
    }
}

const JSON: &str = "%24.ct=application%2Fjson&%24.ce=utf-8";

/// Every line of every rolled file under `root` (temporary files left out).
fn file_lines(root: &Path) -> Vec<Value> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            if path.file_name().unwrap() == ".ingot-tmp" {
                continue;
            }
            if path.is_dir() {
                stack.push(path);
            } else {
                let text = std::fs::read_to_string(&path).unwrap();
                out.extend(text.lines().map(|l| serde_json::from_str(l).unwrap()));
            }
        }
    }
    out
}

fn wait_for_lines(root: &Path, count: usize, within: Duration) -> Vec<Value> {
    let deadline = Instant::now() + within;
    loop {
        let lines = file_lines(root);
        let unique: BTreeSet<String> = lines.iter().map(body_text).collect();
        if unique.len() >= count {
            return lines;
        }
        assert!(
            Instant::now() < deadline,
            "the files hold {} of {count} records",
            unique.len()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn files_and_webhook_endpoints_get_exactly_the_messages_their_routes_match() {
    let receiver = Receiver::new(Mode::Ok);
    let out = tempfile::tempdir().unwrap();
    let config = format!(
        r#"
[[routing.endpoints]]
name = "archive"
type = "files"
path = "{}"
batchFrequencyInSeconds = 1

[[routing.endpoints]]
name = "hook"
type = "webhook"
url = "{}"
maxBatchSize = 7

[[routing.routes]]
name = "critical-to-files"
condition = "level = 'critical'"
endpointNames = ["archive"]

[[routing.routes]]
name = "hot-to-hook"
condition = "$body.temp > 30"
endpointNames = ["hook"]
"#,
        out.path().display(),
        receiver.url()
    );
    let hub = Hub::start_with_config(&config);
    let mut messages = Vec::new();
    let mut critical = BTreeSet::new();
    let mut hot = BTreeSet::new();
    for i in 0..40 {
        let body = format!(r#"{{"temp":{},"i":{i}}}"#, 20 + i % 20);
        let bag = if i % 3 == 0 {
            critical.insert(body.clone());
            format!("level=critical&{JSON}")
        } else {
            format!("level=info&{JSON}")
        };
        if 20 + i % 20 > 30 {
            hot.insert(body.clone());
        }
        messages.push((bag, body));
    }
    publish_all(&hub, "dev-1", &messages);

    receiver.wait_for(hot.len(), Duration::from_secs(20));
    let lines = wait_for_lines(out.path(), critical.len(), Duration::from_secs(20));
    // A little longer: nothing else arrives.
    std::thread::sleep(Duration::from_millis(1500));
    let normalize = |set: &BTreeSet<String>| -> BTreeSet<String> {
        set.iter()
            .map(|b| serde_json::from_str::<Value>(b).unwrap().to_string())
            .collect()
    };
    assert_eq!(receiver.bodies(), normalize(&hot));
    assert_eq!(receiver.duplicates(), 0);
    let file_bodies: Vec<String> = file_lines(out.path()).iter().map(body_text).collect();
    assert_eq!(file_bodies.len(), critical.len(), "each message once");
    assert_eq!(
        file_bodies.into_iter().collect::<BTreeSet<_>>(),
        normalize(&critical)
    );
    // Azure's record shape, and the file names of its default format.
    let line = &lines[0];
    assert_eq!(line["SystemProperties"]["connectionDeviceId"], "dev-1");
    assert_eq!(line["SystemProperties"]["contentType"], "application/json");
    assert_eq!(line["Properties"]["level"], "critical");
    assert!(line["EnqueuedTimeUtc"].as_str().unwrap().ends_with('Z'));
    assert!(line["Body"].is_object());
    assert!(out.path().join("127").is_dir() || out.path().join("localhost").is_dir());
}

#[test]
fn a_webhook_receiver_that_fails_for_a_while_still_gets_everything() {
    let mut receiver = Receiver::new(Mode::Status(503));
    let config = format!(
        r#"
[[routing.endpoints]]
name = "hook"
type = "webhook"
url = "{}"
maxBatchSize = 10
maxDeliveryAttempts = 100
initialBackoffMs = 20
maxBackoffMs = 200
timeoutMs = 2000

[[routing.routes]]
name = "all"
endpointNames = ["hook"]
"#,
        receiver.url()
    );
    let hub = Hub::start_with_config(&config);
    let messages: Vec<(String, String)> =
        (0..60).map(|i| (String::new(), format!("m{i}"))).collect();
    publish_all(&hub, "dev-1", &messages);
    // 503 for a while, then refused connections, then a receiver that works.
    let deadline = Instant::now() + Duration::from_secs(20);
    while receiver.failed.load(Ordering::SeqCst) < 3 {
        assert!(Instant::now() < deadline, "no retries");
        std::thread::sleep(Duration::from_millis(10));
    }
    receiver.stop();
    std::thread::sleep(Duration::from_millis(800));
    let failed = receiver.failed.load(Ordering::SeqCst);
    receiver.set_mode(Mode::Ok);
    receiver.start();
    receiver.wait_for(60, Duration::from_secs(20));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(receiver.unique(), 60);
    let expected: BTreeSet<String> = (0..60)
        .map(|i| {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD.encode(format!("m{i}"))
        })
        .collect();
    assert_eq!(receiver.bodies(), expected, "non-JSON bodies are base64");
    assert_eq!(
        receiver.duplicates(),
        0,
        "a failed attempt is never counted"
    );
    assert!(
        !hub.data_dir.join("endpoints/hook/deadletter").exists(),
        "nothing dead-lettered"
    );
    eprintln!("503 answers: {failed}");
}

#[test]
fn a_hub_killed_mid_delivery_loses_nothing_after_its_restart() {
    let receiver = Receiver::new(Mode::Ok);
    *receiver.delay.lock().unwrap() = Duration::from_millis(100);
    let out = tempfile::tempdir().unwrap();
    let config = format!(
        r#"
[[routing.endpoints]]
name = "hook"
type = "webhook"
url = "{}"
maxBatchSize = 5
initialBackoffMs = 20
maxBackoffMs = 100

[[routing.endpoints]]
name = "archive"
type = "files"
path = "{}"
batchFrequencyInSeconds = 1
maxChunkSizeInBytes = 1024

[[routing.routes]]
name = "all-to-hook"
endpointNames = ["hook"]

[[routing.routes]]
name = "all-to-files"
endpointNames = ["archive"]
"#,
        receiver.url(),
        out.path().display()
    );
    let mut hub = Hub::start_with_config(&config);
    let total = 200;
    let messages = |range: std::ops::Range<u32>| -> Vec<(String, String)> {
        range
            .map(|i| (JSON.to_owned(), format!("{{\"n\":{i}}}")))
            .collect()
    };
    publish_all(&hub, "dev-1", &messages(0..total / 2));
    // Kill while the webhook receiver is part way (it takes 100 ms per batch of 5) and after
    // some files rolled (1 KiB each).
    let deadline = Instant::now() + Duration::from_secs(20);
    while receiver.unique() < 20 || file_lines(out.path()).is_empty() {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(5));
    }
    hub.kill();
    let before = receiver.unique();
    assert!(
        before < total as usize / 2,
        "the kill came after everything was delivered"
    );
    let files_before = file_lines(out.path()).len();
    hub.restart();
    publish_all(&hub, "dev-2", &messages(total / 2..total));
    receiver.wait_for(total as usize, Duration::from_secs(30));
    let lines = wait_for_lines(out.path(), total as usize, Duration::from_secs(30));
    let bodies: BTreeSet<String> = lines.iter().map(body_text).collect();
    let expected: BTreeSet<String> = (0..total).map(|i| format!("{{\"n\":{i}}}")).collect();
    assert_eq!(bodies, expected);
    assert_eq!(receiver.bodies(), expected);
    // Resumed at the checkpoints: only what was in flight (a batch of 5 per partition at most)
    // arrives again.
    assert!(
        receiver.duplicates() <= 10,
        "{} duplicates",
        receiver.duplicates()
    );
    eprintln!(
        "webhook: {before} of {} before the kill, {} duplicates after the restart; \
         files: {files_before} lines before the kill, {} duplicate lines",
        total / 2,
        receiver.duplicates(),
        lines.len() - total as usize
    );
}

#[test]
fn a_receiver_that_refuses_every_batch_gets_it_dead_lettered() {
    let receiver = Receiver::new(Mode::Status(400));
    let config = format!(
        r#"
[[routing.endpoints]]
name = "hook"
type = "webhook"
url = "{}"
maxBatchSize = 10

[[routing.routes]]
name = "all"
endpointNames = ["hook"]
"#,
        receiver.url()
    );
    let hub = Hub::start_with_config(&config);
    let messages: Vec<(String, String)> = (0..15)
        .map(|i| (JSON.to_owned(), format!("{{\"n\":{i}}}")))
        .collect();
    publish_all(&hub, "dev-1", &messages);
    let dir = hub.data_dir.join("endpoints/hook/deadletter");
    let deadline = Instant::now() + Duration::from_secs(20);
    let lines = loop {
        let mut lines = Vec::new();
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for entry in entries {
                let path = entry.unwrap().path();
                if path.extension().is_some_and(|e| e == "jsonl") {
                    let text = std::fs::read_to_string(&path).unwrap();
                    lines.extend(
                        text.lines()
                            .map(|l| serde_json::from_str::<Value>(l).unwrap()),
                    );
                }
            }
        }
        if lines.len() >= 15 {
            break lines;
        }
        assert!(Instant::now() < deadline, "{} dead-lettered", lines.len());
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(lines.len(), 15);
    let bodies: BTreeSet<u64> = lines
        .iter()
        .map(|l| l["record"]["Body"]["n"].as_u64().unwrap())
        .collect();
    assert_eq!(bodies, (0..15).collect());
    for line in &lines {
        assert!(line["reason"].as_str().unwrap().contains("400"), "{line}");
        assert!(line["offset"].is_u64() && line["partition"].is_u64());
    }
    // One attempt per batch (per file): a 400 is not retried.
    let files = std::fs::read_dir(&dir).unwrap().count() as u64;
    assert_eq!(receiver.requests.load(Ordering::SeqCst), files);
    assert!(hub.log().contains("dead-lettering"), "a warning names it");
}

/// An HTTPS receiver with a certificate for `localhost` from a CA of its own: the bodies of
/// every batch it acknowledged, and the CA's PEM.
fn https_receiver() -> (u16, Arc<Mutex<Vec<Value>>>, String) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "webhook test CA");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![cert.der().clone()],
        rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
    )
    .unwrap();
    let config = Arc::new(config);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let received: Arc<Mutex<Vec<Value>>> = Arc::default();
    let sink = received.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let (config, sink) = (config.clone(), sink.clone());
            std::thread::spawn(move || {
                let tls = rustls::ServerConnection::new(config).unwrap();
                let mut reader = BufReader::new(rustls::StreamOwned::new(tls, stream));
                loop {
                    let mut length = 0;
                    let mut line = String::new();
                    loop {
                        line.clear();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        let text = line.trim_end().to_ascii_lowercase();
                        if text.is_empty() {
                            break;
                        }
                        if let Some(value) = text.strip_prefix("content-length:") {
                            length = value.trim().parse().unwrap();
                        }
                    }
                    let mut body = vec![0; length];
                    if reader.read_exact(&mut body).is_err() {
                        return;
                    }
                    let batch: Vec<Value> = serde_json::from_slice(&body).unwrap();
                    sink.lock().unwrap().extend(batch);
                    let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
                    let stream = reader.get_mut();
                    if stream
                        .write_all(answer)
                        .and_then(|_| stream.flush())
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    (port, received, ca.pem())
}

#[test]
fn https_webhooks_verify_the_receiver_against_the_trusted_cas() {
    let (port, received, ca) = https_receiver();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca).unwrap();
    let config = format!(
        r#"
[[routing.endpoints]]
name = "trusted"
type = "webhook"
url = "https://localhost:{port}/hook"
caFile = "{}"

[[routing.endpoints]]
name = "untrusted"
type = "webhook"
url = "https://localhost:{port}/hook"
maxDeliveryAttempts = 1

[[routing.routes]]
name = "a"
endpointNames = ["trusted"]

[[routing.routes]]
name = "b"
endpointNames = ["untrusted"]
"#,
        ca_file.display()
    );
    let hub = Hub::start_with_config(&config);
    let messages: Vec<(String, String)> = (0..5)
        .map(|i| (JSON.to_owned(), format!("{{\"n\":{i}}}")))
        .collect();
    publish_all(&hub, "dev-1", &messages);
    let deadline = Instant::now() + Duration::from_secs(20);
    let dead = hub.data_dir.join("endpoints/untrusted/deadletter");
    loop {
        let got = received.lock().unwrap().len();
        let dead_letters = std::fs::read_dir(&dead).map_or(0, |d| d.count());
        if got >= 5 && dead_letters > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{got} received, {dead_letters} dead-letter files"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    let bodies: BTreeSet<u64> = received
        .lock()
        .unwrap()
        .iter()
        .map(|r| r["Body"]["n"].as_u64().unwrap())
        .collect();
    assert_eq!(bodies, (0..5).collect());
    assert_eq!(
        received.lock().unwrap().len(),
        5,
        "only the trusted endpoint's"
    );
    let text = std::fs::read_dir(&dead)
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
        .collect::<String>();
    assert!(text.contains("TLS handshake"), "{text}");
}

fn cli_ok(hub: &Hub, args: &[&str]) -> Value {
    let out = hub.cli(args);
    assert!(
        out.status.success(),
        "ingot {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.trim()).unwrap_or(Value::Null)
}

/// `files` and `webhook` endpoints added at run time with `ingot endpoint add`, fed by a route on
/// the sender's twin: they deliver, show their counters, take new settings when replaced, and
/// stop when removed.
#[test]
fn endpoints_added_at_run_time_deliver_twin_routed_messages() {
    let first = Receiver::new(Mode::Ok);
    let second = Receiver::new(Mode::Ok);
    let out = tempfile::tempdir().unwrap();
    let hub = Hub::start_with_config("");
    let key = hub.create_sas_device("dev-eu");
    let other_key = hub.create_sas_device("dev-us");
    let reply = hub
        .client("iothubowner")
        .request(
            hyper::Method::PATCH,
            "/twins/dev-eu",
            &[("if-match", "\"*\"")],
            Some(&serde_json::json!({"tags": {"region": "eu"}})),
        )
        .unwrap();
    reply.success().unwrap();
    let archive = out.path().to_str().unwrap();
    cli_ok(
        &hub,
        &[
            "endpoint",
            "add",
            "archive",
            "--type",
            "files",
            "--path",
            archive,
            "--set",
            "batchFrequencyInSeconds=1",
        ],
    );
    cli_ok(
        &hub,
        &[
            "endpoint",
            "add",
            "hook",
            "--type",
            "webhook",
            "--url",
            &first.url(),
        ],
    );
    for (route, endpoint) in [("eu-files", "archive"), ("eu-hook", "hook")] {
        cli_ok(
            &hub,
            &[
                "route",
                "add",
                route,
                "--condition",
                "$twin.tags.region = 'eu'",
                "--endpoint",
                endpoint,
            ],
        );
    }
    let err = hub.cli(&["endpoint", "add", "bad", "--type", "webhook"]);
    assert!(!err.status.success());
    assert!(String::from_utf8_lossy(&err.stderr).contains("url"));

    let (mut eu, _) = hub.connect_device("dev-eu", &key, true);
    let (mut us, _) = hub.connect_device("dev-us", &other_key, true);
    for (i, (client, device)) in [(&mut eu, "dev-eu"), (&mut us, "dev-us")]
        .into_iter()
        .enumerate()
    {
        for n in 0..5u16 {
            let topic = format!("devices/{device}/messages/events/");
            let body = format!("{device}-{n}");
            client
                .publish(&topic, body.as_bytes(), Some(n + 1))
                .unwrap();
            assert_eq!(
                client.receive().unwrap(),
                Some(Received::Puback(n + 1)),
                "{i}"
            );
        }
    }
    first.wait_for(5, Duration::from_secs(20));
    let lines = wait_for_lines(out.path(), 5, Duration::from_secs(20));
    // Not JSON: the records carry the bodies in base64.
    let b64 = |s: &str| {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(s)
    };
    let expected: BTreeSet<String> = (0..5).map(|n| b64(&format!("dev-eu-{n}"))).collect();
    assert_eq!(first.bodies(), expected);
    assert_eq!(
        lines.iter().map(body_text).collect::<BTreeSet<_>>(),
        expected
    );

    // Counters, as `ingot endpoint list` shows them.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let list = cli_ok(&hub, &["endpoint", "list"]);
        let hook = list
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == "hook")
            .unwrap()
            .clone();
        if hook["delivery"]["delivered"] == 5 && hook["delivery"]["lag"] == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{hook}");
        std::thread::sleep(Duration::from_millis(50));
    }

    // Replaced with another URL: what follows goes there, nothing is sent twice.
    cli_ok(
        &hub,
        &[
            "endpoint",
            "add",
            "hook",
            "--type",
            "webhook",
            "--url",
            &second.url(),
        ],
    );
    eu.publish("devices/dev-eu/messages/events/", b"dev-eu-after", Some(9))
        .unwrap();
    assert_eq!(eu.receive().unwrap(), Some(Received::Puback(9)));
    second.wait_for(1, Duration::from_secs(20));
    assert_eq!(second.bodies(), [b64("dev-eu-after")].into_iter().collect());
    assert_eq!(first.unique(), 5);
    assert_eq!(first.duplicates() + second.duplicates(), 0);

    // Removed: the route first, then the endpoint (its worker stops, its log is deleted).
    cli_ok(&hub, &["route", "remove", "eu-hook"]);
    cli_ok(&hub, &["endpoint", "remove", "hook"]);
    assert!(!hub.data_dir.join("endpoints").join("hook").exists());
    let list = cli_ok(&hub, &["endpoint", "list"]);
    assert_eq!(list.as_array().unwrap().len(), 1);
}
