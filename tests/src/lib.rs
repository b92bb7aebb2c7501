//! The harness of the black-box tests: it runs the real `ingot` binary (built by
//! `cargo build --bins`, which `tests/run` does first) on a free port with a fresh data
//! directory, and talks to it over real TLS with the same client the CLI uses.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use ingot_control_plane::client::{ServiceClient, ServiceConnectionString};

/// The `ingot` binary next to this test executable (`target/<profile>/ingot`), or `$INGOT_BIN`.
pub fn ingot_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("INGOT_BIN") {
        return PathBuf::from(bin);
    }
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>");
    let bin = dir.join("ingot");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build --bins` first (tests/run does)",
        bin.display()
    );
    bin
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// One hub process. Dropping it kills the process.
#[derive(Debug)]
pub struct Hub {
    pub data_dir: PathBuf,
    pub port: u16,
    child: Option<Child>,
    _tmp: Option<tempfile::TempDir>,
}

impl Hub {
    /// A hub on a fresh data directory.
    pub fn start() -> Self {
        let tmp = tempfile::tempdir().expect("temp dir");
        let data_dir = tmp.path().join("data");
        let mut hub = Hub {
            data_dir,
            port: free_port(),
            child: None,
            _tmp: Some(tmp),
        };
        hub.restart();
        hub
    }

    /// Starts (again) on the same data directory and port.
    pub fn restart(&mut self) {
        let args = [
            "--https-port",
            &self.port.to_string(),
            "--listen-address",
            "127.0.0.1",
        ];
        let child = self
            .command("serve")
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn ingot serve");
        self.child = Some(child);
        self.wait_listening();
    }

    fn wait_listening(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("ingot serve exited early with {status}");
            }
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("ingot serve did not listen within 30 s");
    }

    /// An `ingot` command that finds this hub through its data directory.
    pub fn command(&self, subcommand: &str) -> Command {
        let mut command = Command::new(ingot_bin());
        command
            .arg(subcommand)
            .env("INGOT_DATA_DIR", &self.data_dir)
            .env_remove("INGOT_CONNECTION_STRING");
        command
    }

    /// Runs `ingot ARGS...` against this hub and returns its output.
    pub fn cli(&self, args: &[&str]) -> Output {
        let (first, rest) = args.split_first().expect("a subcommand");
        self.command(first).args(rest).output().expect("run ingot")
    }

    pub fn connection_string(&self, policy: &str) -> String {
        let out = self.cli(&["connection-string", "--policy", policy]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .expect("utf-8")
            .trim()
            .to_owned()
    }

    pub fn ca(&self) -> PathBuf {
        self.data_dir.join("tls").join("ca.pem")
    }

    pub fn client(&self, policy: &str) -> ServiceClient {
        let cs: ServiceConnectionString = self.connection_string(policy).parse().expect("parses");
        ServiceClient::new(cs, Some(&self.ca())).expect("client")
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGKILL: the crash the durability promises are about.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, and the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let pid = child.id().to_string();
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill -TERM");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the hub did not exit within 20 s of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        self.kill();
    }
}
