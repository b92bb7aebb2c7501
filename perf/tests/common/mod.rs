//! What the black-box tests of `ingot-load` share: the binary, free ports, and a real hub (the
//! `ingot` binary next to the test executable, built by `cargo build --workspace --bins` as
//! `tests/run` does, or `$INGOT_BIN`) on a fresh data directory.

#![allow(dead_code, clippy::unwrap_used)]

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_ingot-load");

/// Kills a child process even when an assertion fails.
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn wait_listening(port: u16, child: &mut Child, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited early with {status}");
        }
        assert!(Instant::now() < deadline, "{what} did not listen on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `ingot-load ARGS...`, its output.
pub fn load(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

/// Asserts success and returns stdout.
pub fn ok(output: &Output) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

pub fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn ingot_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("INGOT_BIN") {
        return PathBuf::from(bin);
    }
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().and_then(Path::parent).unwrap().join("ingot");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build --workspace --bins` first (tests/run does)",
        bin.display()
    );
    bin
}

/// A hub with plain MQTT on `mqtt_port`; killed on drop.
pub struct Hub {
    pub data_dir: PathBuf,
    pub mqtt_port: u16,
    pub child: Killed,
    _tmp: tempfile::TempDir,
}

impl Hub {
    pub fn start(env: &[(&str, &str)]) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let data_dir = tmp.path().join("data");
        let (https, mqtt, tls) = (free_port(), free_port(), free_port());
        let log = std::fs::File::create(tmp.path().join("hub.log")).unwrap();
        let mut child = Command::new(ingot_bin())
            .arg("serve")
            .arg("--data-dir")
            .arg(&data_dir)
            .args(["--https-port", &https.to_string()])
            .args(["--mqtt-port", &mqtt.to_string()])
            .args(["--mqtt-tls-port", &tls.to_string()])
            .args(["--listen-address", "127.0.0.1", "--shards", "1"])
            .env("INGOT_STORE__SEGMENT_BYTES_MAX", "1048576")
            .env_remove("INGOT_DATA_DIR")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        for port in [https, mqtt, tls] {
            wait_listening(port, &mut child, "ingot serve");
        }
        Hub {
            data_dir,
            mqtt_port: mqtt,
            child: Killed(child),
            _tmp: tmp,
        }
    }

    pub fn data_dir(&self) -> &str {
        self.data_dir.to_str().unwrap()
    }

    pub fn port(&self) -> String {
        self.mqtt_port.to_string()
    }

    pub fn pid(&self) -> String {
        self.child.0.id().to_string()
    }
}

/// A null sink whose descriptor limit is `nofile` (soft and hard, as `ulimit -n` sets them).
pub fn sink_with_limit(nofile: u32) -> (Killed, u16) {
    let port = free_port();
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -n {nofile} && exec \"$0\" sink --port {port} --duration 60 --quiet"
        ))
        .arg(BIN)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    wait_listening(port, &mut child, "the sink");
    (Killed(child), port)
}
