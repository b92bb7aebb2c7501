//! Shards: one glommio executor per core, each pinned, each accepting device connections and
//! owning a share of the event log's partitions.
//!
//! A connection is accepted by whichever shard the kernel picks (glommio binds every listener
//! with SO_REUSEPORT). After CONNECT, when the device's partition belongs to another shard, the
//! connection is handed over once, as plain values: its socket (duplicated descriptor), its
//! rustls state, the bytes already read and the authenticated session. From then on one core
//! reads that device's packets and appends them to its partition, in order, with no lock: a
//! partition is a `PartitionLog` that only its shard ever touches.
//!
//! Messages between shards, and from the control plane (a tokio thread) to a shard, go through
//! bounded `async-channel` queues; a foreign send wakes the receiving executor through glommio's
//! cross-thread waker, so an idle shard sleeps until work arrives.

mod connection;
mod group_commit;
mod read_buffer;
mod routing;
mod stats;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use glommio::net::TcpListener;
use glommio::{LocalExecutorBuilder, Placement};

pub use routing::RoutingUpdate;
pub use stats::Stats;

use crate::auth::device::{Credential, IdentityLookup};
use crate::services::{ByteBudget, DeviceEvent, IdentityKey, MethodOutcome, Outbound};
use crate::store::{partition_of, PartitionId, PartitionLog};

/// Queue depth of each shard's inbox (handoffs and control-plane commands).
const INBOX_DEPTH: usize = 4096;
/// Bytes of device payloads (reported patches) waiting on the control plane's events queue, over
/// the whole hub; more are answered 429 at once.
const EVENT_BYTES_MAX: usize = 64 * 1024 * 1024;
/// How often each shard enforces retention on its partitions.
const RETENTION_INTERVAL: Duration = Duration::from_secs(60);

/// What the data plane needs to run; built and validated by the control plane's config.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// The hub's host name: the scope of device SAS tokens.
    pub hostname: String,
    pub listen_address: IpAddr,
    /// MQTT over TLS (8883); `None` turns it off.
    pub mqtt_tls_port: Option<u16>,
    /// Plain MQTT (1883); `None` turns it off.
    pub mqtt_port: Option<u16>,
    pub shards: usize,
    pub tls: Arc<rustls::ServerConfig>,
    pub limits: ConnectionLimits,
}

/// Bounds on what one connection, and the hub, may use.
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    /// Time from accept to a complete CONNECT (TLS handshake included).
    pub connect_timeout: Duration,
    /// Open connections per shard; more are refused with CONNACK 3.
    pub connections_per_shard_max: usize,
    /// New connections per second per listener over the whole hub (each shard takes an equal
    /// share); more get CONNACK 3.
    pub connect_rate_per_sec: u32,
    /// Largest MQTT packet (a 256 KB message plus its topic and properties).
    pub packet_bytes_max: usize,
    /// Most QoS 1 messages decoded from one connection before they are appended and
    /// acknowledged: the in-flight window that bounds a batch.
    pub inflight_count_max: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(10),
            connections_per_shard_max: 500_000,
            connect_rate_per_sec: 10_000,
            packet_bytes_max: crate::limits::D2C_MESSAGE_BYTES_MAX + 64 * 1024,
            inflight_count_max: 1024,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("failed to bind the {what} listener on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("failed to start shard {shard}: {reason}")]
    Start { shard: usize, reason: String },
}

/// A message to a shard.
#[derive(Debug)]
enum ShardMsg {
    HandOff(Box<connection::HandOff>),
    /// The routes or endpoints changed; `done` is told once the change is in force here.
    Routing {
        update: Box<routing::ShardUpdate>,
        done: async_channel::Sender<()>,
    },
    /// A system event to route and append to the device's partition of its endpoints.
    SystemEvent {
        source: crate::route::RouteSource,
        event: Box<crate::services::SystemEvent>,
    },
    /// The registry changed this identity: re-check its live connection.
    IdentityChanged {
        device_id: String,
        module_id: Option<String>,
    },
    /// The registered CA certificates changed: close connections that a CA admitted, so that
    /// they reconnect and their chains are checked against the new set.
    AuthoritiesChanged,
    /// A message from the control plane for the identity's live connection (`connection`:
    /// only that one, e.g. the answer to its twin request).
    Deliver {
        identity: IdentityKey,
        connection: Option<u64>,
        message: Outbound,
    },
    Shutdown,
}

/// What the shards share with the control plane besides identities.
#[derive(Debug)]
pub struct EngineServices {
    /// Where connections send twin requests, C2D completions, presence and session changes.
    pub events: async_channel::Sender<DeviceEvent>,
    /// Persistent sessions (client id, subscription filters) restored at start.
    pub sessions: Vec<(String, Vec<String>)>,
    /// Message routing at start: the route table (`None`: every device message goes to
    /// `events`) and the logs of the custom endpoints (in `added`).
    pub routing: RoutingUpdate,
}

/// Why a message could not be handed to a shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DeliverError {
    #[error("the owning shard's inbox is full")]
    InboxFull,
    #[error("the data plane is not running")]
    NotRunning,
}

/// The running data plane.
#[derive(Debug)]
pub struct Engine {
    inboxes: Vec<async_channel::Sender<ShardMsg>>,
    handles: std::sync::Mutex<Vec<glommio::ExecutorJoinHandle<()>>>,
    partition_count: u32,
    stats: Arc<Stats>,
}

impl Engine {
    /// Starts one shard per `config.shards`, pinned to CPUs in order, and gives shard `s` the
    /// partitions `p` with `p % shards == s`. Returns once every listener is bound.
    pub fn start(
        config: EngineConfig,
        partitions: Vec<PartitionLog>,
        identities: Arc<dyn IdentityLookup>,
        services: EngineServices,
    ) -> Result<Engine, EngineError> {
        let shards = config.shards.max(1);
        let partition_count = partitions.len() as u32;
        let stats = Arc::new(Stats::default());
        let (inbox_senders, inbox_receivers): (Vec<_>, Vec<_>) = (0..shards)
            .map(|_| async_channel::bounded(INBOX_DEPTH))
            .unzip();
        let mut owned: Vec<Vec<PartitionLog>> = (0..shards).map(|_| Vec::new()).collect();
        for partition in partitions {
            owned[partition.id().0 as usize % shards].push(partition);
        }
        let mut routing = services
            .routing
            .split(shards)
            .into_iter()
            .map(Some)
            .collect::<Vec<_>>();
        // A session belongs to the shard that owns its client's device.
        let mut sessions: Vec<HashMap<String, connection::Session>> =
            (0..shards).map(|_| HashMap::new()).collect();
        if partition_count > 0 {
            for (client_id, filters) in services.sessions {
                let device_id = client_id.split('/').next().unwrap_or_default();
                let owner = partition_of(device_id, partition_count).0 as usize % shards;
                sessions[owner].insert(client_id, connection::Session { filters });
            }
        }
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let config = Arc::new(config);
        let event_bytes = ByteBudget::new(EVENT_BYTES_MAX);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), EngineError>>();
        let mut handles = Vec::with_capacity(shards);
        for (id, ((inbox, partitions), sessions)) in inbox_receivers
            .into_iter()
            .zip(owned)
            .zip(sessions)
            .enumerate()
        {
            let routing = routing.get_mut(id).and_then(Option::take);
            let shared = ShardShared {
                events: services.events.clone(),
                event_bytes: event_bytes.clone(),
                id,
                shard_count: shards,
                partition_count,
                config: config.clone(),
                identities: identities.clone(),
                peers: inbox_senders.clone(),
                stats: stats.clone(),
            };
            let ready = ready_tx.clone();
            let handle = LocalExecutorBuilder::new(Placement::Fixed(id % cpus))
                .name(&format!("ingot-shard-{id}"))
                .spawn(move || async move {
                    run_shard(shared, partitions, sessions, routing, inbox, ready).await
                })
                .map_err(|e| EngineError::Start {
                    shard: id,
                    reason: e.to_string(),
                })?;
            handles.push(handle);
        }
        drop(ready_tx);
        let handles = std::sync::Mutex::new(handles);
        let engine = Engine {
            inboxes: inbox_senders,
            handles,
            partition_count,
            stats,
        };
        for _ in 0..shards {
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    engine.shutdown();
                    return Err(e);
                }
                Err(_) => {
                    let reason = "a shard exited during start-up".to_owned();
                    engine.shutdown();
                    return Err(EngineError::Start { shard: 0, reason });
                }
            }
        }
        Ok(engine)
    }

    /// Partitions of `events` (and of every custom endpoint log).
    pub fn partition_count(&self) -> u32 {
        self.partition_count
    }

    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    /// Tells the shard that owns the identity's partition to re-check its live connection: a
    /// disabled, deleted or re-keyed identity is disconnected. Never blocks; a full inbox is
    /// counted (the shard is far behind) and the change is then caught at the next CONNECT.
    pub fn identity_changed(&self, device_id: &str, module_id: Option<&str>) {
        if self.partition_count == 0 {
            return;
        }
        let partition = partition_of(device_id, self.partition_count);
        let owner = partition.0 as usize % self.inboxes.len();
        let msg = ShardMsg::IdentityChanged {
            device_id: device_id.to_owned(),
            module_id: module_id.map(str::to_owned),
        };
        if self.inboxes[owner].try_send(msg).is_err() {
            self.stats
                .inbox_full
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    fn owner(&self, device_id: &str) -> Option<usize> {
        if self.partition_count == 0 || self.inboxes.is_empty() {
            return None;
        }
        let partition = partition_of(device_id, self.partition_count);
        Some(partition.0 as usize % self.inboxes.len())
    }

    /// Hands `message` to the shard that owns the identity, for its live connection (only
    /// `connection`, when given). Never blocks. A message for an identity with no live connection
    /// is dropped by the shard (a method call is answered `NotOnline`).
    pub fn deliver(
        &self,
        identity: IdentityKey,
        connection: Option<u64>,
        message: Outbound,
    ) -> Result<(), DeliverError> {
        let owner = self
            .owner(&identity.device_id)
            .ok_or(DeliverError::NotRunning)?;
        let msg = ShardMsg::Deliver {
            identity,
            connection,
            message,
        };
        self.try_send(owner, msg)
    }

    /// Calls a direct method on the identity's live connection and waits for the device's answer.
    /// Has no timeout of its own: the caller bounds the wait (`responseTimeoutInSeconds`), and a
    /// call given up is forgotten by the connection when its answer arrives or the connection
    /// ends.
    pub async fn invoke_method(
        &self,
        identity: IdentityKey,
        name: String,
        payload: Vec<u8>,
    ) -> MethodOutcome {
        let (reply, outcome) = async_channel::bounded(1);
        let message = Outbound::Method {
            name,
            payload,
            reply,
        };
        match self.deliver(identity, None, message) {
            Ok(()) => outcome.recv().await.unwrap_or(MethodOutcome::NotOnline),
            Err(DeliverError::InboxFull) => MethodOutcome::Busy,
            Err(DeliverError::NotRunning) => MethodOutcome::NotOnline,
        }
    }

    /// Puts a routing change in force on every shard, and returns once each has applied it
    /// (between two of its batches: no message is routed by half a change, none is lost).
    /// Waits for room in full inboxes rather than failing: a route change must not be dropped.
    pub async fn update_routing(&self, update: RoutingUpdate) -> Result<(), DeliverError> {
        let shards = self.inboxes.len();
        let (done, applied) = async_channel::bounded(shards.max(1));
        for (inbox, update) in self.inboxes.iter().zip(update.split(shards)) {
            let msg = ShardMsg::Routing {
                update: Box::new(update),
                done: done.clone(),
            };
            inbox
                .send(msg)
                .await
                .map_err(|_| DeliverError::NotRunning)?;
        }
        for _ in 0..shards {
            applied.recv().await.map_err(|_| DeliverError::NotRunning)?;
        }
        Ok(())
    }

    /// Hands a system event to the shard that owns its device, to be routed by the routes of
    /// `source` and appended to the endpoints they choose. Never blocks: a full inbox is counted
    /// and refused (the event is lost, as Azure's are not guaranteed either).
    pub fn route_event(
        &self,
        source: crate::route::RouteSource,
        event: crate::services::SystemEvent,
    ) -> Result<(), DeliverError> {
        let owner = self
            .owner(&event.device_id)
            .ok_or(DeliverError::NotRunning)?;
        let msg = ShardMsg::SystemEvent {
            source,
            event: Box::new(event),
        };
        self.try_send(owner, msg)
    }

    /// Puts `msg` in shard `owner`'s inbox without waiting; a full inbox is counted.
    fn try_send(&self, owner: usize, msg: ShardMsg) -> Result<(), DeliverError> {
        self.inboxes[owner].try_send(msg).map_err(|e| {
            if e.is_full() {
                self.stats
                    .inbox_full
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                DeliverError::InboxFull
            } else {
                DeliverError::NotRunning
            }
        })
    }

    /// Tells every shard that the registered CA certificates changed.
    pub fn certificate_authorities_changed(&self) {
        for inbox in &self.inboxes {
            if inbox.try_send(ShardMsg::AuthoritiesChanged).is_err() {
                self.stats
                    .inbox_full
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }

    /// Stops accepting, closes every connection, flushes every partition and joins the shards.
    /// Blocks; a second call returns at once.
    pub fn shutdown(&self) {
        for inbox in &self.inboxes {
            let _ = inbox.send_blocking(ShardMsg::Shutdown);
        }
        let handles = match self.handles.lock() {
            Ok(mut handles) => std::mem::take(&mut *handles),
            Err(poisoned) => std::mem::take(&mut *poisoned.into_inner()),
        };
        for handle in handles {
            let _ = handle.join();
        }
    }
}

/// What every task of a shard shares (immutable after start).
struct ShardShared {
    id: usize,
    shard_count: usize,
    partition_count: u32,
    config: Arc<EngineConfig>,
    identities: Arc<dyn IdentityLookup>,
    peers: Vec<async_channel::Sender<ShardMsg>>,
    stats: Arc<Stats>,
    events: async_channel::Sender<DeviceEvent>,
    event_bytes: ByteBudget,
}

/// A live, authenticated connection as its shard tracks it.
struct LiveConnection {
    id: u64,
    credential: Credential,
    method: crate::auth::device::AuthMethod,
    close: async_channel::Sender<connection::CloseReason>,
    outbound: async_channel::Sender<Outbound>,
}

/// A shard's state. Single-threaded: `RefCell`s are borrowed only between awaits.
struct Shard {
    shared: ShardShared,
    partitions: RefCell<HashMap<u32, PartitionLog>>,
    /// Group commit state per partition, used under `fsync = always`.
    commits: HashMap<u32, group_commit::GroupCommit>,
    /// Live connections by identity (`device` or `device/module`): one per identity.
    live: RefCell<HashMap<String, LiveConnection>>,
    /// Subscriptions of clean-session-0 clients, by client id, kept across reconnects.
    sessions: RefCell<HashMap<String, connection::SharedSession>>,
    next_connection_id: Cell<u64>,
    open_connections: Cell<usize>,
    /// Connect-rate limiters, one per listener (`[plain, tls]`), each with this shard's share.
    rate: [RefCell<stats::RateLimiter>; 2],
    shutting_down: Cell<bool>,
    message_ids: RefCell<connection::MessageIdSource>,
    /// `None` without routes: every device message goes to `events`.
    routing: routing::ShardRouting,
}

impl Shard {
    fn owner_of(&self, device_id: &str) -> usize {
        partition_of(device_id, self.shared.partition_count).0 as usize % self.shared.shard_count
    }

    fn partition_of(&self, device_id: &str) -> PartitionId {
        partition_of(device_id, self.shared.partition_count)
    }
}

async fn run_shard(
    shared: ShardShared,
    partitions: Vec<PartitionLog>,
    sessions: HashMap<String, connection::Session>,
    routing: Option<routing::ShardUpdate>,
    inbox: async_channel::Receiver<ShardMsg>,
    ready: std::sync::mpsc::Sender<Result<(), EngineError>>,
) {
    let config = shared.config.clone();
    let per_shard_rate = (config.limits.connect_rate_per_sec / shared.shard_count as u32).max(1);
    let seed = shared.id as u64;
    let shard = Rc::new(Shard {
        commits: partitions
            .iter()
            .map(|p| (p.id().0, group_commit::GroupCommit::default()))
            .collect(),
        partitions: RefCell::new(partitions.into_iter().map(|p| (p.id().0, p)).collect()),
        shared,
        live: RefCell::default(),
        sessions: RefCell::new(
            sessions
                .into_iter()
                .map(|(id, s)| (id, Rc::new(RefCell::new(s))))
                .collect(),
        ),
        next_connection_id: Cell::new(0),
        open_connections: Cell::new(0),
        rate: [
            RefCell::new(stats::RateLimiter::new(per_shard_rate)),
            RefCell::new(stats::RateLimiter::new(per_shard_rate)),
        ],
        shutting_down: Cell::new(false),
        message_ids: RefCell::new(connection::MessageIdSource::new(seed)),
        routing: routing::ShardRouting::new(routing),
    });

    let mut listeners = Vec::new();
    for (what, port, tls) in [
        ("MQTT/TLS", config.mqtt_tls_port, true),
        ("MQTT", config.mqtt_port, false),
    ] {
        let Some(port) = port else { continue };
        let addr = SocketAddr::new(config.listen_address, port);
        match TcpListener::bind(addr) {
            Ok(listener) => listeners.push((listener, tls)),
            Err(e) => {
                let source = std::io::Error::other(e.to_string());
                let _ = ready.send(Err(EngineError::Bind { what, addr, source }));
                return;
            }
        }
    }
    let _ = ready.send(Ok(()));

    let mut accept_tasks = Vec::new();
    for (listener, tls) in listeners {
        let shard = shard.clone();
        accept_tasks.push(glommio::spawn_local(accept_loop(shard, listener, tls)).detach());
    }
    let retention = {
        let shard = shard.clone();
        glommio::spawn_local(async move {
            loop {
                glommio::timer::sleep(RETENTION_INTERVAL).await;
                let now_ms = stats::now_ms();
                for partition in shard.partitions.borrow_mut().values_mut() {
                    if let Err(e) = partition.enforce_retention(now_ms) {
                        tracing::warn!("failed to enforce retention: {e}");
                    }
                }
                shard.routing.enforce_retention(now_ms);
            }
        })
        .detach()
    };

    while let Ok(msg) = inbox.recv().await {
        match msg {
            ShardMsg::HandOff(handoff) => {
                let shard = shard.clone();
                glommio::spawn_local(connection::adopt(shard, *handoff)).detach();
            }
            ShardMsg::IdentityChanged {
                device_id,
                module_id,
            } => {
                connection::recheck(&shard, &device_id, module_id.as_deref());
            }
            ShardMsg::AuthoritiesChanged => connection::close_ca_admitted(&shard),
            ShardMsg::Deliver {
                identity,
                connection,
                message,
            } => connection::deliver(&shard, &identity, connection, message),
            ShardMsg::Routing { update, done } => {
                shard.routing.apply(*update);
                let _ = done.try_send(());
            }
            ShardMsg::SystemEvent { source, event } => {
                if let Err(e) = routing::route_event(&shard, source, &event) {
                    shard
                        .shared
                        .stats
                        .append_errors
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::warn!("failed to append a {source:?} event: {e}");
                }
            }
            ShardMsg::Shutdown => break,
        }
    }

    // Shutdown: stop accepting, close connections (each flushes nothing: appends are synchronous),
    // then flush the partitions so `never`/`interval` data reaches the disk before exit.
    shard.shutting_down.set(true);
    for task in accept_tasks {
        task.cancel();
    }
    retention.cancel();
    let closers: Vec<_> = shard
        .live
        .borrow()
        .values()
        .map(|c| c.close.clone())
        .collect();
    for close in closers {
        let _ = close.try_send(connection::CloseReason::Shutdown);
    }
    // Give connections a moment to close their sockets cleanly.
    for _ in 0..100 {
        if shard.open_connections.get() == 0 {
            break;
        }
        glommio::timer::sleep(Duration::from_millis(10)).await;
    }
    shard.routing.flush_all();
    for partition in shard.partitions.borrow_mut().values_mut() {
        if let Err(e) = partition.flush() {
            tracing::error!(
                "failed to flush partition {} at shutdown: {e}",
                partition.id()
            );
        }
    }
}

async fn accept_loop(shard: Rc<Shard>, listener: TcpListener, tls: bool) {
    loop {
        match listener.accept().await {
            Ok(stream) => {
                let shard = shard.clone();
                glommio::spawn_local(connection::accept(shard, stream, tls)).detach();
            }
            Err(e) => {
                // Out of descriptors and the like: count, back off, keep serving.
                shard
                    .shared
                    .stats
                    .accept_errors
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::debug!("accept failed: {e}");
                glommio::timer::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}
