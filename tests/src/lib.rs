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
    /// Plain MQTT.
    pub mqtt_port: u16,
    /// MQTT over TLS.
    pub mqtt_tls_port: u16,
    child: Option<Child>,
    /// Extra `INGOT_*` settings for `ingot serve`.
    env: Vec<(String, String)>,
    /// A TOML configuration file for `ingot serve --config`.
    config: Option<PathBuf>,
    _tmp: Option<tempfile::TempDir>,
}

impl Hub {
    /// A hub on a fresh data directory.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// A hub on a fresh data directory with extra settings (`("INGOT_MQTT__...", "...")`).
    pub fn start_with(env: &[(&str, &str)]) -> Self {
        Self::start_configured(env, None)
    }

    /// A hub on a fresh data directory with a TOML configuration file of this content.
    pub fn start_with_config(toml: &str) -> Self {
        Self::start_configured(&[], Some(toml))
    }

    fn start_configured(env: &[(&str, &str)], toml: Option<&str>) -> Self {
        let tmp = tempfile::tempdir().expect("temp dir");
        let data_dir = tmp.path().join("data");
        let config = toml.map(|toml| {
            let path = tmp.path().join("ingot.toml");
            std::fs::write(&path, toml).expect("write the configuration");
            path
        });
        let mut hub = Hub {
            config,
            data_dir,
            port: free_port(),
            mqtt_port: free_port(),
            mqtt_tls_port: free_port(),
            child: None,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            _tmp: Some(tmp),
        };
        hub.restart();
        hub
    }

    /// Starts (again) on the same data directory and ports.
    pub fn restart(&mut self) {
        let (https, mqtt, mqtt_tls) = (
            self.port.to_string(),
            self.mqtt_port.to_string(),
            self.mqtt_tls_port.to_string(),
        );
        let args = [
            "--https-port",
            &https,
            "--mqtt-port",
            &mqtt,
            "--mqtt-tls-port",
            &mqtt_tls,
            "--listen-address",
            "127.0.0.1",
            // Two shards even on one core, so that connections are handed over between shards.
            "--shards",
            "2",
        ];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("hub log file");
        let child = self
            .command("serve")
            .args(args)
            .args(
                self.config
                    .iter()
                    .flat_map(|c| [std::ffi::OsStr::new("--config"), c.as_os_str()]),
            )
            // Small segments: tests make many hubs, and each preallocates two segments.
            .env("INGOT_STORE__SEGMENT_BYTES_MAX", "1048576")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
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
                panic!(
                    "ingot serve exited early with {status}; its log:\n{}",
                    self.log()
                );
            }
            let up = |port| TcpStream::connect(("127.0.0.1", port)).is_ok();
            if up(self.port) && up(self.mqtt_port) && up(self.mqtt_tls_port) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "ingot serve did not listen within 30 s; its log:\n{}",
            self.log()
        );
    }

    fn log_path(&self) -> PathBuf {
        self.data_dir.with_extension("log")
    }

    /// What the hub wrote on stderr.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
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

    /// Registers a SAS device through the REST API and returns its raw primary key.
    pub fn create_sas_device(&self, id: &str) -> Vec<u8> {
        let client = self.client("iothubowner");
        let path = format!("/devices/{}", ingot_control_plane::client::segment(id));
        let body = serde_json::json!({ "deviceId": id });
        let reply = client
            .request(hyper::Method::PUT, &path, &[], Some(&body))
            .expect("request");
        primary_key(&reply.success().expect("device created"))
    }

    /// Adds a SAS module to a device through the REST API and returns its raw primary key.
    pub fn create_sas_module(&self, device_id: &str, module_id: &str) -> Vec<u8> {
        let client = self.client("iothubowner");
        let path = format!(
            "/devices/{}/modules/{}",
            ingot_control_plane::client::segment(device_id),
            ingot_control_plane::client::segment(module_id)
        );
        let reply = client
            .request(hyper::Method::PUT, &path, &[], Some(&serde_json::json!({})))
            .expect("request");
        primary_key(&reply.success().expect("module created"))
    }

    /// Connects a SAS device over plain MQTT as the SDKs do; panics unless CONNACK is 0.
    /// Returns the client and the CONNACK's session-present flag.
    pub fn connect_device(
        &self,
        id: &str,
        key: &[u8],
        clean_session: bool,
    ) -> (mqtt_client::Client, bool) {
        let mut client = mqtt_client::Client::plain(self.mqtt_port).expect("connect");
        let (user, password) = (device_username(id), device_token(id, key));
        let mut options = mqtt_client::ConnectOptions::device(id, &user, &password);
        options.clean_session = clean_session;
        match client.connect(&options).expect("CONNECT") {
            Some(mqtt_client::Received::Connack {
                code: 0,
                session_present,
            }) => (client, session_present),
            other => panic!("{id}: {other:?}"),
        }
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
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "the hub did not exit within 20 s of SIGTERM; its log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The raw primary key of a device or module document.
pub fn primary_key(doc: &serde_json::Value) -> Vec<u8> {
    use base64::Engine as _;
    let key = doc["authentication"]["symmetricKey"]["primaryKey"]
        .as_str()
        .expect("a SAS identity");
    base64::engine::general_purpose::STANDARD
        .decode(key)
        .expect("base64 key")
}

/// The value after `name` on the command line, or `default` (for the examples).
pub fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| default.to_owned())
}

/// A device SAS token valid for an hour, as the device SDK makes it.
pub fn device_token(id: &str, key: &[u8]) -> String {
    let expiry = ingot_control_plane::api::now_secs() + 3600;
    ingot_engine::auth::sas::generate(&format!("localhost/devices/{id}"), key, expiry, None)
}

/// The MQTT username of a device, as the device SDK sends it.
pub fn device_username(id: &str) -> String {
    format!("localhost/{id}/?api-version=2021-04-12&DeviceClientType=ingot-tests")
}

/// A TLS client connection to `port` on 127.0.0.1, trusting `ca` (the hub's development CA) and
/// presenting `client_auth` (a certificate chain and its key) when given.
pub fn tls_connect(
    ca: &Path,
    port: u16,
    protocols: &[&'static rustls::SupportedProtocolVersion],
    client_auth: Option<(
        Vec<rustls::pki_types::CertificateDer<'static>>,
        rustls::pki_types::PrivateKeyDer<'static>,
    )>,
) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in ingot_control_plane::tls::load_certs(ca).expect("the hub's CA") {
        roots.add(cert).expect("a usable CA certificate");
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(protocols)
        .expect("TLS versions")
        .with_root_certificates(roots);
    let config = match client_auth {
        Some((chain, key)) => builder
            .with_client_auth_cert(chain, key)
            .expect("client certificate"),
        None => builder.with_no_client_auth(),
    };
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("server name");
    let conn =
        rustls::ClientConnection::new(std::sync::Arc::new(config), name).expect("TLS client");
    let tcp = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    tcp.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    tcp.set_nodelay(true).expect("nodelay");
    rustls::StreamOwned::new(conn, tcp)
}

pub mod mqtt_client {
    //! A minimal blocking MQTT 3.1.1 client over plain TCP or rustls, built on the engine's own
    //! encoders (the same codec the load generator uses), for black-box tests of the hub.

    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::time::Duration;

    use bytes::BytesMut;
    use ingot_engine::mqtt::{self, Connect, PacketId, Publish, PublishQos, QoS, ServerPacket};

    /// What the server sent, as owned values.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Received {
        Connack {
            session_present: bool,
            code: u8,
        },
        Puback(u16),
        Suback(u16, Vec<u8>),
        Unsuback(u16),
        Pingresp,
        Publish {
            topic: String,
            payload: Vec<u8>,
            packet_id: Option<u16>,
        },
        Other,
    }

    pub trait Stream: Read + Write + Send {}
    impl<T: Read + Write + Send> Stream for T {}

    pub struct Client {
        stream: Box<dyn Stream>,
        buf: Vec<u8>,
    }

    impl std::fmt::Debug for Client {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("Client").finish_non_exhaustive()
        }
    }

    /// What a CONNECT carries.
    #[derive(Debug, Clone)]
    pub struct ConnectOptions<'a> {
        pub client_id: &'a str,
        pub username: Option<&'a str>,
        pub password: Option<&'a str>,
        pub clean_session: bool,
        pub keep_alive_secs: u16,
    }

    impl<'a> ConnectOptions<'a> {
        /// A device as the Azure SDK connects it: `{host}/{id}/?api-version=...`, clean 0.
        pub fn device(client_id: &'a str, username: &'a str, password: &'a str) -> Self {
            Self {
                client_id,
                username: Some(username),
                password: Some(password),
                clean_session: false,
                keep_alive_secs: 60,
            }
        }
    }

    impl Client {
        pub fn plain(port: u16) -> std::io::Result<Self> {
            let tcp = TcpStream::connect(("127.0.0.1", port))?;
            tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
            tcp.set_nodelay(true)?;
            Ok(Self {
                stream: Box::new(tcp),
                buf: Vec::new(),
            })
        }

        pub fn over(stream: Box<dyn Stream>) -> Self {
            Self {
                stream,
                buf: Vec::new(),
            }
        }

        pub fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
            self.stream.write_all(bytes)
        }

        pub fn connect(
            &mut self,
            options: &ConnectOptions<'_>,
        ) -> std::io::Result<Option<Received>> {
            let mut out = BytesMut::new();
            let connect = Connect {
                clean_session: options.clean_session,
                keep_alive_secs: options.keep_alive_secs,
                client_id: options.client_id,
                will: None,
                username: options.username,
                password: options.password.map(str::as_bytes),
            };
            mqtt::encode_connect(&mut out, &connect).map_err(std::io::Error::other)?;
            self.stream.write_all(&out)?;
            self.receive()
        }

        pub fn publish(
            &mut self,
            topic: &str,
            payload: &[u8],
            packet_id: Option<u16>,
        ) -> std::io::Result<()> {
            let qos = match packet_id.and_then(PacketId::new) {
                Some(id) => PublishQos::AtLeastOnce(id),
                None => PublishQos::AtMostOnce,
            };
            let publish = Publish {
                dup: false,
                qos,
                retain: false,
                topic,
                payload,
            };
            let mut out = BytesMut::new();
            mqtt::encode_publish(&mut out, &publish).map_err(std::io::Error::other)?;
            self.stream.write_all(&out)
        }

        /// Acknowledges a QoS 1 PUBLISH from the server (a C2D message).
        pub fn puback(&mut self, packet_id: u16) -> std::io::Result<()> {
            let [hi, lo] = packet_id.to_be_bytes();
            self.stream.write_all(&[0x40, 0x02, hi, lo])
        }

        pub fn subscribe(
            &mut self,
            packet_id: u16,
            filters: &[(&str, QoS)],
        ) -> std::io::Result<()> {
            let mut out = BytesMut::new();
            let id =
                PacketId::new(packet_id).ok_or_else(|| std::io::Error::other("packet id 0"))?;
            mqtt::encode_subscribe(&mut out, id, filters).map_err(std::io::Error::other)?;
            self.stream.write_all(&out)
        }

        /// The next packet from the server; `None` when it closed the connection.
        pub fn receive(&mut self) -> std::io::Result<Option<Received>> {
            loop {
                if let Some(len) =
                    mqtt::frame(&self.buf, usize::MAX >> 4).map_err(std::io::Error::other)?
                {
                    let frame: Vec<u8> = self.buf.drain(..len).collect();
                    let packet = mqtt::decode_from_server(&frame).map_err(std::io::Error::other)?;
                    return Ok(Some(match packet {
                        ServerPacket::Connack {
                            session_present,
                            code,
                        } => Received::Connack {
                            session_present,
                            code: code as u8,
                        },
                        ServerPacket::Puback(id) => Received::Puback(id.get()),
                        ServerPacket::Suback(suback) => Received::Suback(
                            suback.packet_id.get(),
                            suback.return_codes().map(|c| c.to_byte()).collect(),
                        ),
                        ServerPacket::Unsuback(id) => Received::Unsuback(id.get()),
                        ServerPacket::Pingresp => Received::Pingresp,
                        ServerPacket::Publish(p) => Received::Publish {
                            topic: p.topic.to_owned(),
                            payload: p.payload.to_vec(),
                            packet_id: p.qos.packet_id().map(PacketId::get),
                        },
                        _ => Received::Other,
                    }));
                }
                let mut chunk = [0u8; 16 * 1024];
                match self.stream.read(&mut chunk) {
                    Ok(0) => return Ok(None),
                    Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(None),
                    Err(e) => return Err(e),
                }
            }
        }

        /// Waits until the server closes the connection; `Err` if it sends anything else or
        /// stays open past the read timeout.
        pub fn expect_closed(&mut self) -> std::io::Result<()> {
            match self.receive()? {
                None => Ok(()),
                Some(other) => Err(std::io::Error::other(format!(
                    "expected a close, got {other:?}"
                ))),
            }
        }
    }
}
