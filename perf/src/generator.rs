//! The generator: one mio event loop per thread, each owning its share of the connections.
//!
//! A connection is a plain struct (socket, optional rustls `ClientConnection` driven sans-IO,
//! write buffer, pre-encoded PUBLISH, FIFO of send times), so a thread can hold thousands of
//! them and a message costs a `memcpy` of the template, two bytes of packet id and a share of
//! one `write` syscall. The trade-off is that the loop is hand-written state-machine code rather
//! than async functions; in exchange nothing is allocated per message, a window of PUBLISHes
//! leaves in one write, and the generator's cost per message is small enough that it measures
//! the broker, not itself.
//!
//! Timeline of a run, driven by the main thread through one shared phase: connect (at
//! `--connect-rate`), warm-up (publishing, not counted), measure (counted), stop (DISCONNECT,
//! close). Each thread reads the phase once per loop turn and never blocks for long in `poll`,
//! so a phase change is seen within a few milliseconds.

use std::io::{self, Read as _, Write as _};
use std::net::{IpAddr, SocketAddr, ToSocketAddrs as _};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use hdrhistogram::Histogram;
use ingot_engine::mqtt::{
    decode_from_server, encode_connect, encode_disconnect, encode_publish, frame, Connect,
    ConnectReturnCode, PacketId, Publish, PublishQos, ServerPacket,
};
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use rustls::pki_types::ServerName;

use crate::cli::{DeviceCount, RunArgs};
use crate::fleet::Device;
use crate::latency::{histogram, Clock, Pacer, SendTimes};
use crate::report;

pub const PHASE_CONNECT: u8 = 0;
pub const PHASE_WARMUP: u8 = 1;
pub const PHASE_MEASURE: u8 = 2;
pub const PHASE_STOP: u8 = 3;

/// Largest packet accepted from the broker; a broker sends nothing bigger than a CONNACK or
/// PUBACK to a publisher, so anything larger is a fault.
const PACKET_BYTES_MAX: usize = 64 * 1024;
/// Bytes read per `read` call, shared by all connections of a thread.
const READ_CHUNK_BYTES: usize = 64 * 1024;
/// Longest a thread sleeps in `poll`: the bound on how late it notices a phase change.
const POLL_MAX: Duration = Duration::from_millis(5);
/// Fill-and-write rounds one connection gets per turn before the others get theirs.
const ROUNDS_PER_TURN: usize = 8;
/// How long stopping waits for DISCONNECTs to leave.
const STOP_GRACE: Duration = Duration::from_secs(1);

/// Everything a worker thread needs to know, shared read-only.
#[derive(Debug)]
pub struct Plan {
    pub addr: SocketAddr,
    pub tls: Option<TlsPlan>,
    pub qos1: bool,
    pub payload_bytes: usize,
    /// QoS 1: unacknowledged PUBLISHes per connection; QoS 0: PUBLISHes per write.
    pub window: usize,
    /// Open loop: messages per second per connection.
    pub rate_per_conn: Option<f64>,
    /// New connections per second, over all threads.
    pub connect_rate: f64,
    pub connect_timeout: Duration,
    pub keep_alive_secs: u16,
    pub send_buffer_bytes: Option<usize>,
    pub source_ips: Vec<IpAddr>,
    /// `false` for `connections`: connect and stay idle.
    pub publish: bool,
    /// `run --e2e`: stamp every payload with this run's nonce, send time and sequence.
    pub e2e_nonce: Option<u64>,
    /// Open no more connections after the first one that fails (`connections --devices max`).
    pub stop_at_failure: bool,
}

#[derive(Debug, Clone)]
pub struct TlsPlan {
    pub config: Arc<rustls::ClientConfig>,
    pub server_name: ServerName<'static>,
}

/// A rustls client configuration for MQTT: the hub's CA (or `ca`) trusted, no ALPN, and no
/// session resumption, so that every connect pays for the full handshake a fresh device pays.
pub fn client_tls(ca: Option<&Path>) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut config = ingot_control_plane::tls::client_config(ca).context("TLS client setup")?;
    config.alpn_protocols.clear();
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// What `run` and `connections` both need before connecting: the CPUs to pin to, the fleet of
/// devices, and the TLS plan when `--tls` is given.
/// `count` devices, or all of the `--fleet` file when `None`.
pub fn prepare_target(
    common: &crate::cli::TargetArgs,
    count: Option<usize>,
) -> anyhow::Result<(Option<Vec<usize>>, crate::fleet::Fleet, Option<TlsPlan>)> {
    let cpus = common
        .cpus
        .as_deref()
        .map(crate::pin::parse_cpus)
        .transpose()?;
    let fleet = crate::fleet::prepare(common, count)?;
    let tls = if common.tls {
        Some(TlsPlan {
            config: client_tls(fleet.ca.as_deref())?,
            server_name: ServerName::try_from(fleet.server_name.clone())
                .context("the TLS server name is not valid")?,
        })
    } else {
        None
    };
    Ok((cpus, fleet, tls))
}

/// A non-blocking, close-on-exec TCP socket of `addr`'s family (the generator's connections
/// and the sink's listeners).
pub fn nonblocking_socket(addr: &SocketAddr) -> io::Result<rustix::fd::OwnedFd> {
    use rustix::net::{AddressFamily, SocketFlags, SocketType};
    let family = if addr.is_ipv4() {
        AddressFamily::INET
    } else {
        AddressFamily::INET6
    };
    let flags = SocketFlags::NONBLOCK | SocketFlags::CLOEXEC;
    Ok(rustix::net::socket_with(
        family,
        SocketType::STREAM,
        flags,
        None,
    )?)
}

/// Resolves `host:port` to the first address.
pub fn resolve(host: &str, port: u16) -> anyhow::Result<SocketAddr> {
    (host, port)
        .to_socket_addrs()
        .with_context(|| format!("resolve {host}"))?
        .next()
        .with_context(|| format!("{host} has no address"))
}

/// What went wrong, counted per kind; never a panic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    ConnectIo,
    ConnectTimeout,
    ConnackRefused(u8),
    Tls,
    Decode,
    UnexpectedPacket,
    UnexpectedPuback,
    ClosedByPeer,
    Io,
}

const ERROR_SLOTS: usize = 15;

impl ErrorKind {
    fn slot(self) -> usize {
        match self {
            Self::ConnectIo => 0,
            Self::ConnectTimeout => 1,
            Self::Tls => 2,
            Self::Decode => 3,
            Self::UnexpectedPacket => 4,
            Self::UnexpectedPuback => 5,
            Self::ClosedByPeer => 6,
            Self::Io => 7,
            // CONNACK codes 1-5 are the only refusals the decoder lets through.
            Self::ConnackRefused(code) => 8 + usize::from(code.min(6)),
        }
    }
}

/// The name of error slot `slot` in the JSON.
fn slot_name(slot: usize) -> &'static str {
    match slot {
        0 => "connect_io",
        1 => "connect_timeout",
        2 => "tls",
        3 => "decode",
        4 => "unexpected_packet",
        5 => "unexpected_puback",
        6 => "closed_by_peer",
        7 => "io",
        9 => "connack_refused_1_protocol_version",
        10 => "connack_refused_2_identifier",
        11 => "connack_refused_3_server_unavailable",
        12 => "connack_refused_4_bad_username_or_password",
        13 => "connack_refused_5_not_authorized",
        _ => "connack_refused_other",
    }
}

/// Error counts by kind; a fixed array, so counting never allocates.
#[derive(Debug, Clone, Copy, Default)]
pub struct Errors([u64; ERROR_SLOTS]);

impl Errors {
    pub fn count(&mut self, kind: ErrorKind) {
        if let Some(n) = self.0.get_mut(kind.slot()) {
            *n += 1;
        }
    }

    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }

    pub fn add(&mut self, other: &Errors) {
        for (a, b) in self.0.iter_mut().zip(other.0) {
            *a += b;
        }
    }

    /// Non-zero counts by name.
    pub fn named(&self) -> Vec<(&'static str, u64)> {
        self.0
            .iter()
            .enumerate()
            .filter(|(_, &n)| n > 0)
            .map(|(slot, &n)| (slot_name(slot), n))
            .collect()
    }
}

/// Cumulative counters a worker publishes for the progress line.
#[derive(Debug, Default)]
pub struct Counters {
    /// Connections whose connect was started (or failed to start).
    pub opened: AtomicU64,
    pub sent: AtomicU64,
    pub acked: AtomicU64,
    pub errors: AtomicU64,
    pub connected: AtomicU64,
    pub connect_failed: AtomicU64,
}

#[derive(Debug)]
pub struct Shared {
    pub phase: AtomicU8,
    pub threads: Vec<Counters>,
    /// A connection failed and the plan says to open no more.
    pub halted: AtomicBool,
}

impl Shared {
    fn sum(&self, field: impl Fn(&Counters) -> &AtomicU64) -> u64 {
        self.threads
            .iter()
            .map(|c| field(c).load(Ordering::Relaxed))
            .sum()
    }
}

/// What one worker measured.
#[derive(Debug)]
pub struct ThreadResult {
    /// PUBLISH->PUBACK latency of the acks received while measuring, microseconds.
    pub latency_us: Histogram<u64>,
    /// TCP connect start -> CONNACK, microseconds.
    pub connect_us: Histogram<u64>,
    pub sent_measured: u64,
    pub acked_measured: u64,
    pub errors: Errors,
    pub connected: u64,
    pub connect_failed: u64,
    /// When the last CONNACK arrived (clock ns), for the connect rate.
    pub last_connack_ns: u64,
}

/// The running workers of a run or a connection test.
#[derive(Debug)]
pub struct Session {
    pub shared: Arc<Shared>,
    pub clock: Clock,
    pub devices: usize,
    handles: Vec<std::thread::JoinHandle<ThreadResult>>,
    progress: mpsc::Receiver<Histogram<u64>>,
    /// `run --e2e`: the reader's histogram of each second.
    pub e2e_progress: Option<mpsc::Receiver<Histogram<u64>>>,
    /// One sample per progress line: the run's timeline (JSON and `--plot`).
    pub samples: Vec<report::Sample>,
    last_tick: Instant,
    last_sent: u64,
    last_acked: u64,
}

impl Session {
    /// Starts `threads` workers, connection i on thread `i % threads`, thread k pinned to
    /// `cpus[k % len]`; their times are on `clock`.
    pub fn start(
        plan: Arc<Plan>,
        devices: Vec<Device>,
        threads: usize,
        cpus: Option<Vec<usize>>,
        clock: Clock,
    ) -> anyhow::Result<Self> {
        let threads = threads.clamp(1, devices.len().max(1));
        let count = devices.len();
        let shared = Arc::new(Shared {
            phase: AtomicU8::new(PHASE_CONNECT),
            threads: (0..threads).map(|_| Counters::default()).collect(),
            halted: AtomicBool::new(false),
        });
        let mut shares: Vec<Vec<(usize, Device)>> = (0..threads).map(|_| Vec::new()).collect();
        for (i, device) in devices.into_iter().enumerate() {
            if let Some(share) = shares.get_mut(i % threads) {
                share.push((i, device));
            }
        }
        let (sender, progress) = mpsc::channel();
        let mut handles = Vec::with_capacity(threads);
        for (k, share) in shares.into_iter().enumerate() {
            let plan = plan.clone();
            let shared = shared.clone();
            let sender = sender.clone();
            let cpu = cpus.as_deref().and_then(|c| crate::pin::cpu_for(c, k));
            let handle = std::thread::Builder::new()
                .name(format!("load-{k}"))
                .spawn(move || {
                    let mut worker = Worker::new(k, threads, plan, share, shared, clock, sender);
                    if let Some(cpu) = cpu {
                        if let Err(e) = crate::pin::pin_current_thread(cpu) {
                            eprintln!("ingot-load: {e:#}");
                        }
                    }
                    worker.run()
                })
                .context("spawn a generator thread")?;
            handles.push(handle);
        }
        Ok(Self {
            shared,
            clock,
            devices: count,
            handles,
            progress,
            e2e_progress: None,
            samples: Vec::new(),
            last_tick: Instant::now(),
            last_sent: 0,
            last_acked: 0,
        })
    }

    pub fn set_phase(&self, phase: u8) {
        self.shared.phase.store(phase, Ordering::Release);
    }

    pub fn connected(&self) -> u64 {
        self.shared.sum(|c| &c.connected)
    }

    pub fn connect_failed(&self) -> u64 {
        self.shared.sum(|c| &c.connect_failed)
    }

    /// Whether opening stopped at a failure (`Plan::stop_at_failure`).
    pub fn halted(&self) -> bool {
        self.shared.halted.load(Ordering::Acquire)
    }

    /// Waits until every connection has its CONNACK or has failed (after a halt: every one
    /// opened so far), or `timeout` passes.
    pub fn wait_connected(&mut self, timeout: Duration, quiet: bool) {
        let deadline = Instant::now() + timeout;
        loop {
            let done = self.connected() + self.connect_failed();
            let target = if self.halted() {
                self.shared.sum(|c| &c.opened)
            } else {
                self.devices as u64
            };
            if done >= target || Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
            self.tick(quiet, "connect");
        }
    }

    /// Sleeps `secs`, printing progress once per second.
    pub fn hold(&mut self, secs: f64, quiet: bool, what: &'static str) {
        let end = Instant::now() + Duration::from_secs_f64(secs.max(0.0));
        while Instant::now() < end {
            let left = end.saturating_duration_since(Instant::now());
            std::thread::sleep(left.min(Duration::from_millis(50)));
            self.tick(quiet, what);
        }
    }

    /// Prints the progress line and records a sample when a second has passed since the last.
    fn tick(&mut self, quiet: bool, what: &'static str) {
        let elapsed = self.last_tick.elapsed();
        if elapsed < Duration::from_secs(1) {
            return;
        }
        let mut interval = histogram();
        while let Ok(h) = self.progress.try_recv() {
            // Histograms of the same bounds always add.
            let _ = interval.add(&h);
        }
        let e2e = self.e2e_progress.as_ref().map(|receiver| {
            let mut e2e = histogram();
            while let Ok(h) = receiver.try_recv() {
                let _ = e2e.add(&h);
            }
            e2e
        });
        self.last_tick = Instant::now();
        let sent = self.shared.sum(|c| &c.sent);
        let acked = self.shared.sum(|c| &c.acked);
        let secs = elapsed.as_secs_f64();
        let quantile = |h: &Histogram<u64>, q: f64| (!h.is_empty()).then(|| h.value_at_quantile(q));
        let sample = report::Sample {
            phase: what,
            at_secs: self.clock.now_ns() as f64 / 1e9,
            sent_per_sec: (sent - self.last_sent) as f64 / secs,
            acked_per_sec: (acked - self.last_acked) as f64 / secs,
            acked_total: acked,
            p50_us: quantile(&interval, 0.5),
            p99_us: quantile(&interval, 0.99),
            max_us: (!interval.is_empty()).then(|| interval.max()),
            e2e_p50_us: e2e.as_ref().and_then(|h| quantile(h, 0.5)),
            e2e_p99_us: e2e.as_ref().and_then(|h| quantile(h, 0.99)),
            e2e: e2e.is_some(),
            connected: self.connected(),
            devices: self.devices as u64,
            errors: self.shared.sum(|c| &c.errors),
        };
        if !quiet {
            eprintln!("{}", report::progress_line(&sample));
        }
        self.samples.push(sample);
        self.last_sent = sent;
        self.last_acked = acked;
    }

    /// Stops the workers (they send DISCONNECT and close) and collects their results.
    pub fn finish(self) -> anyhow::Result<Vec<ThreadResult>> {
        self.set_phase(PHASE_STOP);
        let mut results = Vec::with_capacity(self.handles.len());
        for handle in self.handles {
            match handle.join() {
                Ok(result) => results.push(result),
                Err(_) => bail!("a generator thread panicked"),
            }
        }
        Ok(results)
    }
}

/// `ingot-load run`.
pub fn run_command(args: &RunArgs) -> anyhow::Result<()> {
    let common = &args.common;
    if args.window == 0 || args.window > usize::from(u16::MAX) {
        bail!("--window must be between 1 and 65535");
    }
    if args.duration.is_nan() || args.duration <= 0.0 {
        bail!("--duration must be positive");
    }
    if let Some(rate) = args.rate {
        if rate.is_nan() || rate <= 0.0 {
            bail!("--rate must be positive");
        }
    }
    let e2e_dir = if args.e2e {
        Some(check_e2e(args)?)
    } else {
        None
    };
    let count = match common.devices {
        DeviceCount::Count(n) => Some(n),
        DeviceCount::Max => None,
    };
    let (cpus, fleet, tls) = prepare_target(common, count)?;
    let devices = fleet.devices.len();
    let send_buffer = match args.send_buffer {
        Some(0) => None,
        Some(bytes) => Some(bytes),
        None if args.qos == 0 => Some(64 * 1024),
        None => None,
    };
    let nonce = crate::e2e::new_nonce();
    let plan = Arc::new(Plan {
        addr: resolve(&common.host, common.port())?,
        tls,
        qos1: args.qos == 1,
        payload_bytes: args.payload,
        window: args.window,
        rate_per_conn: args.rate.map(|r| r / devices as f64),
        connect_rate: common.connect_rate.max(1.0),
        connect_timeout: Duration::from_secs_f64(common.connect_timeout.max(0.1)),
        keep_alive_secs: common.keep_alive,
        send_buffer_bytes: send_buffer,
        source_ips: common.source_ips(),
        publish: true,
        e2e_nonce: e2e_dir.is_some().then_some(nonce),
        stop_at_failure: false,
    });
    let clock = Clock::new();
    // The reader is at the end of every partition before the first connect, so it sees every
    // message of this run.
    let mut tail = match &e2e_dir {
        Some(dir) => Some(crate::e2e::Tail::start(
            dir,
            nonce,
            clock,
            devices,
            Duration::from_micros(args.e2e_poll_us),
            Duration::from_secs_f64(args.e2e_drain.max(0.0)),
        )?),
        None => None,
    };
    let mut session = Session::start(plan, fleet.devices, common.threads, cpus.clone(), clock)?;
    session.e2e_progress = tail.as_mut().and_then(|t| t.progress.take());
    let connect_budget =
        devices as f64 / common.connect_rate.max(1.0) + common.connect_timeout.max(0.1) + 1.0;
    session.wait_connected(Duration::from_secs_f64(connect_budget), common.quiet);
    if session.connected() == 0 {
        let results = session.finish()?;
        let outcome = report::Outcome::merge(&results, 0.0);
        bail!(
            "no connection was accepted ({} failed: {})",
            outcome.connect_failed,
            report::errors_text(&outcome.errors)
        );
    }
    session.set_phase(PHASE_WARMUP);
    session.hold(args.warmup, common.quiet, "warmup");
    session.set_phase(PHASE_MEASURE);
    let measure_started = Instant::now();
    session.hold(args.duration, common.quiet, "measure");
    session.set_phase(PHASE_STOP);
    let measured_secs = measure_started.elapsed().as_secs_f64();
    let samples = std::mem::take(&mut session.samples);
    let results = session.finish()?;
    let mut outcome = report::Outcome::merge(&results, measured_secs);
    if let Some(tail) = tail {
        let e2e = tail.finish(outcome.sent)?;
        if e2e.read == 0 && outcome.sent > 0 {
            eprintln!(
                "ingot-load: --e2e read none of this run's messages: is {} the data directory \
                 of the hub at {}:{}?",
                e2e_dir.as_deref().unwrap_or(Path::new("")).display(),
                common.host,
                common.port()
            );
        }
        outcome.e2e = Some(e2e);
    }
    let label = common
        .label
        .clone()
        .unwrap_or_else(|| report::default_label(args));
    println!("{}", report::summary_line(&label, args, &outcome));
    if let Some(path) = &common.json {
        let json = report::run_json(&label, args, cpus.as_deref(), devices, &outcome, &samples);
        report::write_json(path, &json)?;
    }
    if let Some(path) = &args.plot {
        let html = crate::plot::html(&label, &report::config_text(args, devices), &samples);
        std::fs::write(path, html).with_context(|| format!("write {}", path.display()))?;
    }
    Ok(())
}

/// `--e2e` is only meaningful against a local Ingot hub whose data directory this process can
/// read; returns that directory.
fn check_e2e(args: &RunArgs) -> anyhow::Result<std::path::PathBuf> {
    let common = &args.common;
    if common.target != crate::cli::Target::Ingot {
        bail!(
            "--e2e reads the hub's segment files: it needs --target ingot (another broker has \
             no such log)"
        );
    }
    let Some(dir) = &common.data_dir else {
        bail!(
            "--e2e reads the segment files of a hub on this machine: pass its --data-dir (a \
             --connection-string alone does not say where they are)"
        );
    };
    if args.payload < crate::e2e::STAMP_BYTES {
        bail!(
            "--e2e stamps the first {} bytes of every payload: --payload must be at least that",
            crate::e2e::STAMP_BYTES
        );
    }
    Ok(dir.clone())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// TCP connect in progress; the CONNECT waits in the write buffer.
    Connecting,
    AwaitConnack,
    Ready,
}

#[derive(Debug)]
struct Conn {
    socket: TcpStream,
    tls: Option<Box<rustls::ClientConnection>>,
    state: State,
    opened_ns: u64,
    /// Plaintext waiting to be written (or handed to rustls) from `written` on.
    wbuf: Vec<u8>,
    written: usize,
    /// The unprocessed tail of what was read: a packet cut by a read boundary.
    pending: Vec<u8>,
    /// One encoded PUBLISH; sending copies it and patches in the packet id.
    template: Vec<u8>,
    /// Where the packet id sits in `template` (QoS 1).
    id_at: Option<usize>,
    last_id: u16,
    times: SendTimes,
    pacer: Option<Pacer>,
    /// The socket took everything last time (no `WouldBlock` since the last writable event).
    writable: bool,
    /// Spreads the first intended send times of the connections over one interval.
    stagger: u64,
    /// The connection's index in the run (for `--e2e` sequence numbers).
    index: usize,
    /// Messages appended so far (the `--e2e` counter).
    counter: u32,
}

impl Conn {
    fn flushed(&self) -> bool {
        self.written >= self.wbuf.len() && self.tls.as_ref().is_none_or(|t| !t.wants_write())
    }

    /// Writes what can be written; `Ok` also when the socket is full (then `writable` is off).
    fn flush(&mut self) -> Result<(), ErrorKind> {
        loop {
            match &mut self.tls {
                None => {
                    let Some(rest) = self.wbuf.get(self.written..) else {
                        break;
                    };
                    if rest.is_empty() {
                        break;
                    }
                    match self.socket.write(rest) {
                        Ok(0) => return Err(ErrorKind::Io),
                        Ok(n) => self.written += n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            self.writable = false;
                            break;
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(_) => return Err(ErrorKind::Io),
                    }
                }
                Some(tls) => {
                    let rest = self.wbuf.get(self.written..).unwrap_or_default();
                    let mut progress = false;
                    if !rest.is_empty() {
                        // rustls encrypts into its own buffer up to its limit and says how much
                        // it took; the rest waits here.
                        let n = tls.writer().write(rest).map_err(|_| ErrorKind::Tls)?;
                        self.written += n;
                        progress = n > 0;
                    }
                    let mut blocked = false;
                    while tls.wants_write() {
                        match tls.write_tls(&mut self.socket) {
                            Ok(0) => return Err(ErrorKind::Io),
                            Ok(_) => progress = true,
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                                self.writable = false;
                                blocked = true;
                                break;
                            }
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                            Err(_) => return Err(ErrorKind::Io),
                        }
                    }
                    let all_given = self.written >= self.wbuf.len();
                    if blocked || all_given || !progress {
                        break;
                    }
                }
            }
        }
        if self.written >= self.wbuf.len() {
            self.wbuf.clear();
            self.written = 0;
        }
        Ok(())
    }

    /// Appends one PUBLISH from the template with the next packet id and, with `--e2e`, the
    /// payload stamped with `sent_ns`.
    fn append_publish(&mut self, plan: &Plan, sent_ns: u64, measured: bool) {
        let start = self.wbuf.len();
        self.wbuf.extend_from_slice(&self.template);
        if let Some(nonce) = plan.e2e_nonce {
            let at = start + self.template.len() - plan.payload_bytes;
            if let Some(payload) = self.wbuf.get_mut(at..) {
                let seq = crate::e2e::sequence(self.index, self.counter, measured);
                crate::e2e::write_stamp(payload, nonce, sent_ns, seq);
            }
            self.counter = self.counter.wrapping_add(1);
        }
        if let Some(at) = self.id_at {
            // Packet ids run 1..=65535 and wrap; the window (at most 65535) keeps every id in
            // flight distinct.
            self.last_id = self.last_id.checked_add(1).unwrap_or(1);
            let at = start + at;
            if let Some(slot) = self.wbuf.get_mut(at..at + 2) {
                slot.copy_from_slice(&self.last_id.to_be_bytes());
            }
        }
    }
}

/// The per-thread tallies; plain integers and histograms, merged after the run.
#[derive(Debug)]
struct Tally {
    latency_us: Histogram<u64>,
    interval_us: Histogram<u64>,
    connect_us: Histogram<u64>,
    sent: u64,
    acked: u64,
    sent_measured: u64,
    acked_measured: u64,
    errors: Errors,
    connected: u64,
    connect_failed: u64,
    last_connack_ns: u64,
}

struct Worker {
    plan: Arc<Plan>,
    devices: Vec<(usize, Device)>,
    shared: Arc<Shared>,
    index: usize,
    clock: Clock,
    progress: mpsc::Sender<Histogram<u64>>,
    poll: Poll,
    conns: Vec<Option<Conn>>,
    scratch: Vec<u8>,
    tally: Tally,
    payload: Vec<u8>,
    /// Connections opened so far (index into `devices`).
    opened: usize,
    connect_interval_ns: u64,
    publishing: bool,
    measuring: bool,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("index", &self.index)
            .finish()
    }
}

impl Worker {
    fn new(
        index: usize,
        threads: usize,
        plan: Arc<Plan>,
        devices: Vec<(usize, Device)>,
        shared: Arc<Shared>,
        clock: Clock,
        progress: mpsc::Sender<Histogram<u64>>,
    ) -> Self {
        let connect_interval_ns = (1e9 * threads as f64 / plan.connect_rate) as u64;
        let payload = vec![b'x'; plan.payload_bytes];
        Self {
            conns: (0..devices.len()).map(|_| None).collect(),
            devices,
            shared,
            index,
            clock,
            progress,
            // Creating an epoll instance fails only when the process is out of descriptors;
            // then there is nothing this thread can do, and saying so is the right outcome.
            poll: Poll::new().expect("create an epoll instance"),
            scratch: vec![0; READ_CHUNK_BYTES],
            tally: Tally {
                latency_us: histogram(),
                interval_us: histogram(),
                connect_us: histogram(),
                sent: 0,
                acked: 0,
                sent_measured: 0,
                acked_measured: 0,
                errors: Errors::default(),
                connected: 0,
                connect_failed: 0,
                last_connack_ns: 0,
            },
            payload,
            opened: 0,
            connect_interval_ns,
            publishing: false,
            measuring: false,
            plan,
        }
    }

    fn run(&mut self) -> ThreadResult {
        let mut events = Events::with_capacity(1024);
        let mut next_report_ns = self.clock.now_ns() + 1_000_000_000;
        let mut next_timeout_check_ns = 0;
        loop {
            let phase = self.shared.phase.load(Ordering::Acquire);
            if phase >= PHASE_STOP {
                break;
            }
            let publishing = self.plan.publish && phase >= PHASE_WARMUP;
            let now = self.clock.now_ns();
            if publishing && !self.publishing {
                self.publishing = true;
                // Closed-loop connections send only when an ack or a writable event arrives,
                // so the first window of every connection is started here.
                for slot in 0..self.conns.len() {
                    self.service(slot, now);
                }
            }
            if phase >= PHASE_MEASURE && !self.measuring {
                self.measuring = true;
                self.tally.latency_us.reset();
            }
            self.open_due(now);
            if now >= next_timeout_check_ns {
                self.expire_connects(now);
                next_timeout_check_ns = now + 100_000_000;
            }
            let timeout = self.poll_timeout(now);
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() != io::ErrorKind::Interrupted {
                    self.tally.errors.count(ErrorKind::Io);
                }
                continue;
            }
            let now = self.clock.now_ns();
            for event in events.iter() {
                let slot = event.token().0;
                if let Some(Some(conn)) = self.conns.get_mut(slot) {
                    if event.is_writable() {
                        conn.writable = true;
                    }
                }
                self.on_event(slot, now);
            }
            if self.publishing && (self.plan.rate_per_conn.is_some() || !self.plan.qos1) {
                // Open loop and QoS 0 send without waiting for the broker: every connection
                // whose socket has room gets its turn.
                let now = self.clock.now_ns();
                for slot in 0..self.conns.len() {
                    if self.conns.get(slot).is_some_and(|c| {
                        c.as_ref()
                            .is_some_and(|c| c.writable && c.state == State::Ready)
                    }) {
                        self.service(slot, now);
                    }
                }
            }
            self.publish_counters();
            if now >= next_report_ns {
                next_report_ns = now + 1_000_000_000;
                // One histogram clone per second per thread, off the per-message path.
                let _ = self.progress.send(self.tally.interval_us.clone());
                self.tally.interval_us.reset();
            }
        }
        self.stop();
        self.publish_counters();
        ThreadResult {
            latency_us: std::mem::replace(&mut self.tally.latency_us, histogram()),
            connect_us: std::mem::replace(&mut self.tally.connect_us, histogram()),
            sent_measured: self.tally.sent_measured,
            acked_measured: self.tally.acked_measured,
            errors: self.tally.errors,
            connected: self.tally.connected,
            connect_failed: self.tally.connect_failed,
            last_connack_ns: self.tally.last_connack_ns,
        }
    }

    fn publish_counters(&self) {
        let Some(counters) = self.shared.threads.get(self.index) else {
            return;
        };
        counters.opened.store(self.opened as u64, Ordering::Relaxed);
        counters.sent.store(self.tally.sent, Ordering::Relaxed);
        counters.acked.store(self.tally.acked, Ordering::Relaxed);
        counters
            .errors
            .store(self.tally.errors.total(), Ordering::Relaxed);
        counters
            .connected
            .store(self.tally.connected, Ordering::Relaxed);
        counters
            .connect_failed
            .store(self.tally.connect_failed, Ordering::Relaxed);
    }

    fn poll_timeout(&self, now: u64) -> Duration {
        let mut until_ns = POLL_MAX.as_nanos() as u64;
        let halted = self.plan.stop_at_failure && self.shared.halted.load(Ordering::Acquire);
        if self.opened < self.devices.len() && !halted {
            let due = self.opened as u64 * self.connect_interval_ns;
            until_ns = until_ns.min(due.saturating_sub(now));
        }
        if self.publishing {
            if !self.plan.qos1 && self.plan.rate_per_conn.is_none() {
                let any_writable = self
                    .conns
                    .iter()
                    .flatten()
                    .any(|c| c.writable && c.state == State::Ready);
                if any_writable {
                    return Duration::ZERO;
                }
            }
            if self.plan.rate_per_conn.is_some() {
                for conn in self.conns.iter().flatten() {
                    if let Some(pacer) = &conn.pacer {
                        let can_send = !self.plan.qos1 || conn.times.len() < self.plan.window;
                        if can_send && conn.writable {
                            until_ns = until_ns.min(pacer.next_ns().saturating_sub(now));
                        }
                    }
                }
                // epoll sleeps in whole milliseconds, rounded up: sleeping until the next
                // intended send would make it up to 1 ms late, and that lateness would be
                // charged to the broker. Sleep a millisecond short and spin the rest; the
                // generator has its own core.
                return Duration::from_nanos(until_ns.saturating_sub(1_000_000));
            }
        }
        Duration::from_nanos(until_ns)
    }

    /// Opens the connections whose turn has come at the connect rate.
    fn open_due(&mut self, now: u64) {
        while self.opened < self.devices.len()
            && self.opened as u64 * self.connect_interval_ns <= now
            && !(self.plan.stop_at_failure && self.shared.halted.load(Ordering::Acquire))
        {
            let slot = self.opened;
            self.opened += 1;
            match self.open(slot, now) {
                Ok(conn) => {
                    if let Some(entry) = self.conns.get_mut(slot) {
                        *entry = Some(conn);
                    }
                }
                Err(e) => {
                    self.tally.errors.count(ErrorKind::ConnectIo);
                    self.tally.connect_failed += 1;
                    self.connect_failed(&format!("connection {slot}: {e}"));
                }
            }
        }
    }

    /// A connect failed: with `stop_at_failure`, no thread opens another one.
    fn connect_failed(&self, what: &str) {
        if self.plan.stop_at_failure && !self.shared.halted.swap(true, Ordering::AcqRel) {
            eprintln!(
                "ingot-load: the first failed connect ({what}) after {} connections; opening \
                 no more",
                self.shared.sum(|c| &c.connected)
            );
        }
    }

    fn open(&mut self, slot: usize, now: u64) -> io::Result<Conn> {
        let plan = &self.plan;
        let Some((index, device)) = self.devices.get(slot) else {
            return Err(io::Error::other("no such device"));
        };
        let source = if plan.source_ips.is_empty() {
            None
        } else {
            plan.source_ips.get(index % plan.source_ips.len()).copied()
        };
        let mut socket = connect_socket(plan.addr, source, plan.send_buffer_bytes)?;
        self.poll.registry().register(
            &mut socket,
            Token(slot),
            Interest::READABLE | Interest::WRITABLE,
        )?;
        let mut wbuf = Vec::with_capacity(256 + plan.window * (plan.payload_bytes + 64));
        encode_connect(
            &mut wbuf,
            &Connect {
                clean_session: true,
                keep_alive_secs: plan.keep_alive_secs,
                client_id: &device.client_id,
                will: None,
                username: device.username.as_deref(),
                password: device.password.as_deref().map(str::as_bytes),
            },
        )
        .map_err(io::Error::other)?;
        let mut template = Vec::new();
        let qos = if plan.qos1 {
            PublishQos::AtLeastOnce(PacketId::new(1).ok_or_else(|| io::Error::other("id"))?)
        } else {
            PublishQos::AtMostOnce
        };
        encode_publish(
            &mut template,
            &Publish {
                dup: false,
                qos,
                retain: false,
                topic: &device.topic,
                payload: &self.payload,
            },
        )
        .map_err(io::Error::other)?;
        let id_at = plan.qos1.then(|| template.len() - self.payload.len() - 2);
        let tls = match &plan.tls {
            Some(tls) => Some(Box::new(
                rustls::ClientConnection::new(tls.config.clone(), tls.server_name.clone())
                    .map_err(io::Error::other)?,
            )),
            None => None,
        };
        let stagger = (*index as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        Ok(Conn {
            socket,
            tls,
            state: State::Connecting,
            opened_ns: now,
            wbuf,
            written: 0,
            pending: Vec::new(),
            template,
            id_at,
            last_id: 0,
            times: SendTimes::with_window(if plan.qos1 { plan.window } else { 0 }),
            pacer: None,
            writable: false,
            stagger,
            index: *index,
            counter: 0,
        })
    }

    fn expire_connects(&mut self, now: u64) {
        let timeout = self.plan.connect_timeout.as_nanos() as u64;
        for slot in 0..self.conns.len() {
            let expired = self.conns.get(slot).is_some_and(|c| {
                c.as_ref().is_some_and(|c| {
                    c.state != State::Ready && now.saturating_sub(c.opened_ns) > timeout
                })
            });
            if expired {
                self.fail(slot, ErrorKind::ConnectTimeout);
            }
        }
    }

    /// Counts `kind` and closes the connection.
    fn fail(&mut self, slot: usize, kind: ErrorKind) {
        let Some(entry) = self.conns.get_mut(slot) else {
            return;
        };
        let Some(mut conn) = entry.take() else {
            return;
        };
        self.tally.errors.count(kind);
        if conn.state != State::Ready {
            self.tally.connect_failed += 1;
            self.connect_failed(&format!("{kind:?}"));
        }
        let _ = self.poll.registry().deregister(&mut conn.socket);
    }

    fn on_event(&mut self, slot: usize, now: u64) {
        let Some(Some(conn)) = self.conns.get_mut(slot) else {
            return;
        };
        if conn.state == State::Connecting {
            match conn.socket.take_error() {
                Ok(None) => {}
                Ok(Some(_)) | Err(_) => return self.fail(slot, ErrorKind::ConnectIo),
            }
            match conn.socket.peer_addr() {
                Ok(_) => conn.state = State::AwaitConnack,
                Err(e) if e.kind() == io::ErrorKind::NotConnected => return,
                Err(_) => return self.fail(slot, ErrorKind::ConnectIo),
            }
        }
        if let Err(kind) = self.read_all(slot, now) {
            return self.fail(slot, kind);
        }
        self.service(slot, now);
    }

    /// Flushes, then fills and flushes again while the socket takes it.
    fn service(&mut self, slot: usize, now: u64) {
        let publishing = self.publishing;
        let measuring = self.measuring;
        let plan = self.plan.clone();
        let Some(Some(conn)) = self.conns.get_mut(slot) else {
            return;
        };
        if conn.state == State::Connecting {
            return;
        }
        for _ in 0..ROUNDS_PER_TURN {
            if let Err(kind) = conn.flush() {
                return self.fail(slot, kind);
            }
            if !conn.flushed() || !publishing || conn.state != State::Ready {
                return;
            }
            let added = fill(conn, &plan, now, measuring);
            self.tally.sent += added;
            if measuring {
                self.tally.sent_measured += added;
            }
            if added == 0 {
                return;
            }
        }
        // Keep the last batch moving even when the rounds ran out.
        if let Err(kind) = conn.flush() {
            self.fail(slot, kind);
        }
    }

    /// Reads until the socket is empty, handling every whole packet.
    fn read_all(&mut self, slot: usize, now: u64) -> Result<(), ErrorKind> {
        loop {
            let Some(Some(conn)) = self.conns.get_mut(slot) else {
                return Ok(());
            };
            let n = match &mut conn.tls {
                None => match conn.socket.read(&mut self.scratch) {
                    Ok(0) => return Err(ErrorKind::ClosedByPeer),
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => return Err(ErrorKind::Io),
                },
                Some(tls) => {
                    match tls.reader().read(&mut self.scratch) {
                        Ok(0) => return Err(ErrorKind::ClosedByPeer),
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            // No plaintext buffered: read records from the socket.
                            match tls.read_tls(&mut conn.socket) {
                                Ok(0) => return Err(ErrorKind::ClosedByPeer),
                                Ok(_) => {
                                    tls.process_new_packets().map_err(|_| ErrorKind::Tls)?;
                                    continue;
                                }
                                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                                Err(_) => return Err(ErrorKind::Io),
                            }
                        }
                        Err(_) => return Err(ErrorKind::Tls),
                    }
                }
            };
            let Some(bytes) = self.scratch.get(..n) else {
                return Ok(());
            };
            let tally = &mut self.tally;
            let measuring = self.measuring;
            if conn.pending.is_empty() {
                let used = parse(conn, bytes, now, measuring, tally)?;
                if let Some(rest) = bytes.get(used..) {
                    conn.pending.extend_from_slice(rest);
                }
            } else {
                let mut pending = std::mem::take(&mut conn.pending);
                pending.extend_from_slice(bytes);
                // On an error the connection closes, so the pending bytes may be dropped.
                let used = parse(conn, &pending, now, measuring, tally)?;
                pending.drain(..used.min(pending.len()));
                conn.pending = pending;
            }
        }
    }

    /// Sends DISCONNECT on every ready connection, waits briefly for the bytes to leave, closes.
    fn stop(&mut self) {
        let mut waiting = 0usize;
        for conn in self.conns.iter_mut().flatten() {
            if conn.state == State::Ready {
                encode_disconnect(&mut conn.wbuf);
            }
            let _ = conn.flush();
            if let Some(tls) = &mut conn.tls {
                tls.send_close_notify();
                let _ = conn.flush();
            }
            if !conn.flushed() {
                waiting += 1;
            }
        }
        let deadline = Instant::now() + STOP_GRACE;
        let mut events = Events::with_capacity(1024);
        while waiting > 0 && Instant::now() < deadline {
            if self
                .poll
                .poll(&mut events, Some(Duration::from_millis(10)))
                .is_err()
            {
                break;
            }
            for event in events.iter() {
                if let Some(Some(conn)) = self.conns.get_mut(event.token().0) {
                    if !conn.flushed() && conn.flush().is_ok() && conn.flushed() {
                        waiting = waiting.saturating_sub(1);
                    }
                }
            }
        }
        for conn in self.conns.iter_mut().flatten() {
            let _ = conn.socket.shutdown(std::net::Shutdown::Write);
        }
        self.conns.clear();
    }
}

/// Adds PUBLISHes to an empty write buffer: up to the free window (QoS 1), a window's worth
/// (QoS 0), or what the schedule says is due (open loop). Returns how many.
fn fill(conn: &mut Conn, plan: &Plan, now: u64, measuring: bool) -> u64 {
    let mut added = 0u64;
    match plan.rate_per_conn {
        None => {
            let room = if plan.qos1 {
                plan.window.saturating_sub(conn.times.len())
            } else {
                plan.window
            };
            for _ in 0..room {
                conn.append_publish(plan, now, measuring);
                if plan.qos1 {
                    conn.times.push(now);
                }
            }
            added = room as u64;
        }
        Some(rate) => {
            let stagger = conn.stagger;
            let mut pacer = *conn.pacer.get_or_insert_with(|| {
                let interval = (1e9 / rate.max(1e-6)) as u64;
                Pacer::new(rate, now + stagger % interval.max(1))
            });
            while (added as usize) < plan.window {
                if plan.qos1 && conn.times.len() >= plan.window {
                    break;
                }
                let Some(intended) = pacer.take_due(now) else {
                    break;
                };
                conn.append_publish(plan, intended, measuring);
                if plan.qos1 {
                    conn.times.push(intended);
                }
                added += 1;
            }
            conn.pacer = Some(pacer);
        }
    }
    added
}

/// Handles every whole packet at the start of `buf`; returns how many bytes that was.
fn parse(
    conn: &mut Conn,
    buf: &[u8],
    now: u64,
    measuring: bool,
    tally: &mut Tally,
) -> Result<usize, ErrorKind> {
    let mut at = 0usize;
    loop {
        let rest = buf.get(at..).unwrap_or_default();
        let len = match frame(rest, PACKET_BYTES_MAX) {
            Ok(Some(len)) => len,
            Ok(None) => return Ok(at),
            Err(_) => return Err(ErrorKind::Decode),
        };
        let packet = rest.get(..len).ok_or(ErrorKind::Decode)?;
        match decode_from_server(packet).map_err(|_| ErrorKind::Decode)? {
            ServerPacket::Connack { code, .. } if conn.state == State::AwaitConnack => {
                if code != ConnectReturnCode::Accepted {
                    return Err(ErrorKind::ConnackRefused(code as u8));
                }
                conn.state = State::Ready;
                tally.connected += 1;
                tally.last_connack_ns = tally.last_connack_ns.max(now);
                tally
                    .connect_us
                    .saturating_record(now.saturating_sub(conn.opened_ns) / 1_000);
            }
            ServerPacket::Puback(_) => match conn.times.ack(now) {
                Some(latency_us) => {
                    tally.acked += 1;
                    tally.interval_us.saturating_record(latency_us);
                    if measuring {
                        tally.acked_measured += 1;
                        tally.latency_us.saturating_record(latency_us);
                    }
                }
                None => tally.errors.count(ErrorKind::UnexpectedPuback),
            },
            ServerPacket::Pingresp => {}
            _ => tally.errors.count(ErrorKind::UnexpectedPacket),
        }
        at += len;
    }
}

/// A non-blocking TCP socket, connect started, with TCP_NODELAY (small PUBLISH batches must not
/// wait for Nagle), an optional send-buffer cap, and an optional source address.
fn connect_socket(
    addr: SocketAddr,
    source: Option<IpAddr>,
    send_buffer_bytes: Option<usize>,
) -> io::Result<TcpStream> {
    use rustix::net::sockopt;
    let fd = nonblocking_socket(&addr)?;
    sockopt::set_tcp_nodelay(&fd, true)?;
    if let Some(bytes) = send_buffer_bytes {
        sockopt::set_socket_send_buffer_size(&fd, bytes)?;
    }
    if let Some(ip) = source {
        rustix::net::bind(&fd, &SocketAddr::new(ip, 0))?;
    }
    match rustix::net::connect(&fd, &addr) {
        Ok(()) => {}
        Err(e) if e == rustix::io::Errno::INPROGRESS => {}
        Err(e) => return Err(e.into()),
    }
    Ok(TcpStream::from_std(std::net::TcpStream::from(fd)))
}
