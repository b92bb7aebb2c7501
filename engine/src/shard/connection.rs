//! One device connection: TLS handshake, CONNECT and authentication, the handoff to the owning
//! shard, then the session loop that turns PUBLISH packets into appended records and PUBACKs.
//!
//! The loop works in batches: it decodes every complete packet in its read buffer (borrowing
//! topics, properties and bodies from that buffer, so a message is copied once, into the
//! segment), appends the batch to the device's partition in one call (one flush under
//! `fsync=always`), and only then writes the PUBACKs, in order. It reads again only after the
//! acknowledgements are written: a slow disk or a slow client stops the reading, which is the
//! backpressure TCP carries back to the device. The read buffer holds at most one maximal
//! packet plus one read, and a batch at most `inflight_count_max` messages.

use std::borrow::Cow;
use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use glommio::net::TcpStream;

use super::read_buffer::ReadBuffer;
use super::{LiveConnection, Shard, ShardMsg};
use crate::auth::device::{self, AuthFailure, Authenticated, Credential, Presented};
use crate::iothub::property_bag::{PropertyName, SystemProperty};
use crate::iothub::topic::{PublishTopic, Subscription};
use crate::iothub::username::Username;
use crate::iothub::Identity;
use crate::mqtt::{self, ConnectReturnCode, Packet, PacketId, PublishQos, QoS, SubackCode};
use crate::net::handoff;
use crate::net::tls::TlsStream;
use crate::net::transport::Transport;
use crate::services::{DeviceEvent, IdentityKey, MethodOutcome, Outbound, SubscriptionSet};
use crate::store::format::property_name;
use crate::store::{Fsync, MessageRef, PropertyRef};

/// Bytes read per read call.
const READ_CHUNK_BYTES: usize = 64 * 1024;
/// The hub closes a connection after 1.5 x its keepalive, and never waits longer than this
/// (Azure's cap), so a keepalive of 0 does not make a half-open connection immortal.
const KEEPALIVE_CAP: Duration = Duration::from_secs(1767);
/// Messages from the control plane waiting for one connection (twin responses, desired patches,
/// method calls, C2D messages); more are dropped and counted, or refused (method calls).
const OUTBOUND_DEPTH: usize = 64;
/// Direct method calls in flight on one connection.
const METHODS_IN_FLIGHT_MAX: usize = 1024;
/// Largest reported-properties patch passed to the control plane: the 32 KB section limit is
/// measured without JSON punctuation, so the text may be longer, but not this much.
const REPORTED_PATCH_BYTES_MAX: usize = 128 * 1024;
/// C2D messages sent and not yet acknowledged on one connection (a queue holds at most 50).
const C2D_IN_FLIGHT_MAX: usize = 64;
/// When routes read `$twin`, how long a new connection waits for its twin from the control
/// plane before it routes its first messages (without it, `$twin` is undefined).
const TWIN_WAIT: Duration = Duration::from_secs(2);

/// Why the shard closes a live connection from outside its loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// A newer connection of the same identity arrived.
    Replaced,
    /// The registry disabled, deleted or re-keyed the identity.
    Revoked,
    Shutdown,
}

/// Subscriptions of a client, kept across reconnects when it connects with clean session 0.
#[derive(Debug, Clone, Default)]
pub struct Session {
    pub filters: Vec<String>,
}

/// A session as its shard and its connections share it: a connection that replaces another of
/// the same client works on the same session from its first packet, while the old one closes.
/// Borrowed only between awaits.
pub type SharedSession = std::rc::Rc<std::cell::RefCell<Session>>;

/// An authenticated CONNECT, as owned values that can move to another shard.
#[derive(Debug)]
pub struct Connected {
    client_id: String,
    device_id: String,
    module_id: Option<String>,
    clean_session: bool,
    keep_alive_secs: u16,
    credential: Credential,
    auth: Authenticated,
    model_id: Option<String>,
    /// `iothub-connection-auth-method`, built once per connection.
    auth_method_json: String,
}

impl Connected {
    fn key(&self) -> String {
        identity_key(&self.device_id, self.module_id.as_deref())
    }
}

fn identity_key(device_id: &str, module_id: Option<&str>) -> String {
    match module_id {
        Some(module_id) => format!("{device_id}/{module_id}"),
        None => device_id.to_owned(),
    }
}

/// A connection on its way to the shard that owns its device.
#[derive(Debug)]
pub struct HandOff {
    fd: OwnedFd,
    tls: Option<(rustls::ServerConnection, Vec<u8>)>,
    /// Plaintext read after the CONNECT packet.
    plaintext: Vec<u8>,
    connected: Connected,
}

/// Message ids for messages that arrive without one: random, UUID-shaped, from a per-shard
/// generator (xorshift64*) so that no lock or syscall is on the path.
#[derive(Debug)]
pub struct MessageIdSource {
    state: u64,
}

impl MessageIdSource {
    pub fn new(shard: u64) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        Self {
            state: (nanos ^ (shard.wrapping_add(1)).wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1,
        }
    }

    fn next_u64(&mut self) -> u64 {
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        self.state.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Appends a new id to `out` (no allocation when `out` has room).
    pub fn write_id(&mut self, out: &mut String) {
        use std::fmt::Write as _;
        let (a, b) = (self.next_u64(), self.next_u64());
        let _ = write!(
            out,
            "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
            a >> 32,
            (a >> 16) & 0xffff,
            a & 0xfff,
            0x8000 | (b >> 48) & 0x3fff,
            b & 0xffff_ffff_ffff
        );
    }

    #[cfg(test)]
    fn next_id(&mut self) -> String {
        let mut id = String::new();
        self.write_id(&mut id);
        id
    }
}

/// Serves a freshly accepted socket.
pub async fn accept(shard: Rc<Shard>, tcp: TcpStream, tls: bool) {
    let stats = shard.shared.stats.clone();
    stats.connections_accepted.fetch_add(1, Relaxed);
    if shard.shutting_down.get() {
        return;
    }
    let _ = tcp.set_nodelay(true);
    let limits = &shard.shared.config.limits;
    let throttled = shard.open_connections.get() >= limits.connections_per_shard_max
        || !shard.rate[usize::from(tls)]
            .borrow_mut()
            .try_take(Instant::now());
    let timeout = shard.shared.config.limits.connect_timeout;
    let tls_config = shard.shared.config.tls.clone();
    let opened = glommio::timer::timeout(timeout, async {
        let transport = if tls {
            match TlsStream::accept(tcp, tls_config).await {
                Ok(stream) => Transport::Tls(Box::new(stream)),
                Err(e) => {
                    stats.handshake_failures.fetch_add(1, Relaxed);
                    tracing::debug!("TLS handshake failed: {e}");
                    return Ok(None);
                }
            }
        } else {
            Transport::Plain(tcp)
        };
        Ok(Some(transport))
    })
    .await;
    let Ok(Some(mut transport)) = opened else {
        stats.handshake_failures.fetch_add(1, Relaxed);
        return;
    };
    let connect = glommio::timer::timeout(timeout, async {
        Ok(read_connect(&shard, &mut transport, throttled).await)
    })
    .await;
    let (connected, leftover) = match connect {
        Ok(Some(connected)) => connected,
        _ => {
            transport.close().await;
            return;
        }
    };
    let owner = shard.owner_of(&connected.device_id);
    if owner == shard.shared.id {
        run(shard, transport, connected, leftover).await;
        return;
    }
    // Hand the connection to the shard that owns the device's partition.
    let (fd, tls) = match transport {
        Transport::Plain(tcp) => (handoff::release(tcp), None),
        Transport::Tls(stream) => {
            let (tcp, conn, ciphertext) = stream.into_parts();
            (handoff::release(tcp), Some((conn, ciphertext)))
        }
    };
    let Ok(fd) = fd else { return };
    stats.handoffs.fetch_add(1, Relaxed);
    let handoff = HandOff {
        fd,
        tls,
        plaintext: leftover,
        connected,
    };
    let _ = shard.shared.peers[owner]
        .send(ShardMsg::HandOff(Box::new(handoff)))
        .await;
}

/// Continues a connection handed over by another shard.
pub async fn adopt(shard: Rc<Shard>, handoff: HandOff) {
    let tcp = handoff::adopt(handoff.fd);
    let transport = match handoff.tls {
        Some((conn, ciphertext)) => {
            Transport::Tls(Box::new(TlsStream::from_parts(tcp, conn, ciphertext)))
        }
        None => Transport::Plain(tcp),
    };
    run(shard, transport, handoff.connected, handoff.plaintext).await;
}

/// Reads the first packet, which must be a CONNECT, and authenticates it. Answers refusals
/// with their CONNACK; returns the session and the bytes read after the CONNECT on success.
async fn read_connect(
    shard: &Shard,
    transport: &mut Transport,
    throttled: bool,
) -> Option<(Connected, Vec<u8>)> {
    let stats = &shard.shared.stats;
    let limits = &shard.shared.config.limits;
    // A CONNECT is small: start with 4 KiB and double only if a client sends more.
    let mut buf = vec![0u8; 4 * 1024];
    let mut filled = 0;
    let frame_len = loop {
        match mqtt::frame(&buf[..filled], limits.packet_bytes_max) {
            Ok(Some(len)) => break len,
            Ok(None) => {}
            Err(_) => {
                stats.connects_malformed.fetch_add(1, Relaxed);
                return None;
            }
        }
        if filled == buf.len() {
            if buf.len() >= limits.packet_bytes_max + READ_CHUNK_BYTES {
                return None;
            }
            buf.resize(buf.len() * 2, 0);
        }
        match transport.read(&mut buf[filled..]).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => filled += n,
        }
    };
    let frame = buf.get(..frame_len)?;
    let connect = match mqtt::decode(frame) {
        Ok(Packet::Connect(connect)) => connect,
        Ok(_) => {
            stats.connects_malformed.fetch_add(1, Relaxed);
            return None;
        }
        Err(e) => {
            stats.connects_malformed.fetch_add(1, Relaxed);
            if let Some(code) = e.connack_code() {
                connack(transport, false, code).await;
            }
            return None;
        }
    };
    if throttled {
        stats.connects_throttled.fetch_add(1, Relaxed);
        connack(transport, false, ConnectReturnCode::ServerUnavailable).await;
        return None;
    }
    let username = match Username::parse_connect(connect.username, connect.client_id) {
        Ok(username) => username,
        Err(e) => {
            stats.connects_not_authorized.fetch_add(1, Relaxed);
            connack(transport, false, e.connack_code()).await;
            return None;
        }
    };
    let identity = username.identity;
    let chain = transport.peer_certificates();
    let presented = Presented {
        device_id: identity.device_id,
        module_id: identity.module_id,
        password: connect.password,
        client_chain: &chain,
    };
    let identities = &*shard.shared.identities;
    let hostname = &shard.shared.config.hostname;
    let now = super::stats::now_secs();
    let auth = device::authenticate(&presented, hostname, identities, now);
    let credential = identities.credential(identity.device_id, identity.module_id);
    let (auth, credential) = match (auth, credential) {
        (Ok(auth), Some(credential)) => (auth, credential),
        (Err(failure), _) => {
            stats.connects_not_authorized.fetch_add(1, Relaxed);
            tracing::debug!(device = identity.device_id, "CONNECT refused: {failure}");
            connack(transport, false, ConnectReturnCode::NotAuthorized).await;
            return None;
        }
        (Ok(_), None) => {
            // Deleted between the two look-ups.
            stats.connects_not_authorized.fetch_add(1, Relaxed);
            let _ = AuthFailure::UnknownIdentity;
            connack(transport, false, ConnectReturnCode::NotAuthorized).await;
            return None;
        }
    };
    let scope = if identity.module_id.is_some() {
        "module"
    } else {
        "device"
    };
    let auth_method_json = match auth.method {
        device::AuthMethod::Sas => {
            format!(r#"{{"scope":"{scope}","type":"sas","issuer":"iothub"}}"#)
        }
        device::AuthMethod::SasPolicy => {
            r#"{"scope":"hub","type":"sas","issuer":"iothub"}"#.to_owned()
        }
        device::AuthMethod::X509SelfSigned | device::AuthMethod::X509CertificateAuthority => {
            format!(r#"{{"scope":"{scope}","type":"x509","issuer":"iothub"}}"#)
        }
    };
    let connected = Connected {
        client_id: connect.client_id.to_owned(),
        device_id: identity.device_id.to_owned(),
        module_id: identity.module_id.map(str::to_owned),
        clean_session: connect.clean_session,
        keep_alive_secs: connect.keep_alive_secs,
        credential,
        auth,
        model_id: username.model_id().map(Cow::into_owned),
        auth_method_json,
    };
    let leftover = buf
        .get(frame_len..filled)
        .map(<[u8]>::to_vec)
        .unwrap_or_default();
    Some((connected, leftover))
}

async fn connack(transport: &mut Transport, session_present: bool, code: ConnectReturnCode) {
    let mut out = bytes::BytesMut::new();
    mqtt::encode_connack(&mut out, session_present, code);
    let _ = transport.write_all(&out).await;
}

/// Re-checks live connections after a registry change: the identity's own, and for a device
/// also its modules' (a module connects only while its device is enabled). Closes those whose
/// identity was deleted, disabled, or whose credentials changed.
pub fn recheck(shard: &Shard, device_id: &str, module_id: Option<&str>) {
    let key = identity_key(device_id, module_id);
    let module_prefix = format!("{device_id}/");
    let live = shard.live.borrow();
    let affected = live
        .iter()
        .filter(|(k, _)| **k == key || (module_id.is_none() && k.starts_with(&module_prefix)));
    for (k, connection) in affected {
        let module = k.strip_prefix(&module_prefix);
        let still_valid = match shard.shared.identities.credential(device_id, module) {
            Some(now) => {
                now.enabled
                    && now.secret == connection.credential.secret
                    && now.generation_id == connection.credential.generation_id
            }
            None => false,
        };
        if !still_valid {
            shard.shared.stats.revoked.fetch_add(1, Relaxed);
            let _ = connection.close.try_send(CloseReason::Revoked);
        }
    }
}

/// Closes every connection that authenticated with a CA-signed certificate.
pub fn close_ca_admitted(shard: &Shard) {
    for connection in shard.live.borrow().values() {
        if connection.method == device::AuthMethod::X509CertificateAuthority {
            shard.shared.stats.revoked.fetch_add(1, Relaxed);
            let _ = connection.close.try_send(CloseReason::Revoked);
        }
    }
}

/// The session on the owning shard: register, CONNACK, serve, clean up.
async fn run(shard: Rc<Shard>, mut transport: Transport, connected: Connected, leftover: Vec<u8>) {
    let stats = shard.shared.stats.clone();
    let key = connected.key();
    let id = shard.next_connection_id.get();
    shard.next_connection_id.set(id + 1);
    let (close_tx, close_rx) = async_channel::bounded(1);
    // Unbounded in type, bounded by `deliver` (the shard is its only sender): an unbounded
    // channel allocates its slots on first use, so an idle connection holds none.
    let (outbound_tx, outbound_rx) = async_channel::unbounded();
    let previous = shard.live.borrow_mut().insert(
        key.clone(),
        LiveConnection {
            id,
            credential: connected.credential.clone(),
            method: connected.auth.method,
            close: close_tx,
            outbound: outbound_tx,
        },
    );
    if let Some(previous) = previous {
        stats.replaced.fetch_add(1, Relaxed);
        let _ = previous.close.try_send(CloseReason::Replaced);
    }
    let identity_key = IdentityKey::new(&connected.device_id, connected.module_id.as_deref());
    let events = &shard.shared.events;
    let (session, present): (SharedSession, bool) = if connected.clean_session {
        let ended = shard.sessions.borrow_mut().remove(&connected.client_id);
        if ended.is_some() {
            let client_id = connected.client_id.clone();
            let ended = DeviceEvent::Session {
                client_id,
                filters: None,
            };
            let _ = events.send(ended).await;
        }
        (SharedSession::default(), false)
    } else {
        let mut sessions = shard.sessions.borrow_mut();
        match sessions.get(&connected.client_id) {
            Some(session) => (session.clone(), true),
            None => {
                let session = SharedSession::default();
                sessions.insert(connected.client_id.clone(), session.clone());
                (session, false)
            }
        }
    };
    shard.open_connections.set(shard.open_connections.get() + 1);
    stats.connections_open.fetch_add(1, Relaxed);
    stats.connects_ok.fetch_add(1, Relaxed);

    connack(&mut transport, present, ConnectReturnCode::Accepted).await;
    let identity = Identity {
        device_id: &connected.device_id,
        module_id: connected.module_id.as_deref(),
    };
    let resumed = subscriptions(&session.borrow().filters, identity);
    let _ = events
        .send(DeviceEvent::Connected {
            identity: identity_key.clone(),
            connection: id,
            subscriptions: resumed,
        })
        .await;
    let channels = Channels {
        close: &close_rx,
        outbound: &outbound_rx,
        connection: id,
        identity: &identity_key,
    };
    let ended = serve(
        &shard,
        &mut transport,
        &connected,
        &session,
        leftover,
        channels,
    )
    .await;
    let device = &connected.device_id;
    match &ended {
        // An operating error: the partition refused an append (disk full, IO error).
        Ended::Store(e) => tracing::warn!(%device, "closed a connection: failed to append: {e}"),
        Ended::Violation(why) => tracing::debug!(%device, "closed a connection: {why}"),
        Ended::Io(e) => tracing::debug!(%device, "connection failed: {e}"),
        Ended::Closed(reason) => tracing::debug!(%device, "closed a connection: {reason:?}"),
        _ => tracing::debug!(%device, "connection ended: {ended:?}"),
    }

    {
        let mut live = shard.live.borrow_mut();
        if live.get(&key).is_some_and(|c| c.id == id) {
            live.remove(&key);
        }
    }
    shard
        .open_connections
        .set(shard.open_connections.get().saturating_sub(1));
    stats.connections_open.fetch_sub(1, Relaxed);
    transport.close().await;
    let _ = events
        .send(DeviceEvent::Disconnected {
            identity: identity_key,
            connection: id,
        })
        .await;
}

/// The channels of one live connection besides its socket.
#[derive(Clone, Copy)]
struct Channels<'a> {
    close: &'a async_channel::Receiver<CloseReason>,
    outbound: &'a async_channel::Receiver<Outbound>,
    connection: u64,
    identity: &'a IdentityKey,
}

/// What a connection tracks of the messages it sent to the device.
#[derive(Default)]
struct InFlight {
    /// Direct method calls by `$rid`, waiting for `$iothub/methods/res/`.
    methods: HashMap<String, async_channel::Sender<MethodOutcome>>,
    next_rid: u64,
    /// C2D messages by packet id, waiting for PUBACK: the lock token of each.
    c2d: HashMap<u16, u64>,
    next_packet_id: u16,
}

/// The subscriptions among `filters` that the control plane acts on.
fn subscriptions(filters: &[String], identity: Identity<'_>) -> SubscriptionSet {
    let mut set = SubscriptionSet::default();
    for filter in filters {
        match Subscription::parse(filter, identity) {
            Some(Subscription::CloudToDevice) => set.cloud_to_device = true,
            Some(Subscription::MethodRequests) => set.methods = true,
            Some(Subscription::TwinDesiredPatches) => set.desired_patches = true,
            // Twin answers go to the connection that asked, subscribed or not.
            Some(Subscription::TwinResponses | Subscription::ModuleInputs) | None => {}
        }
    }
    set
}

/// Hands a message from the control plane to the identity's live connection (only
/// `connection`, when given); refuses it when there is none or its queue is full.
pub fn deliver(shard: &Shard, identity: &IdentityKey, connection: Option<u64>, message: Outbound) {
    let key = identity_key(&identity.device_id, identity.module_id.as_deref());
    let refused = {
        let live = shard.live.borrow();
        match live
            .get(&key)
            .filter(|c| connection.is_none_or(|id| c.id == id))
        {
            // The bound of the connection's queue (its only sender is this shard).
            Some(live) if live.outbound.len() >= OUTBOUND_DEPTH => Some(message),
            Some(live) => live
                .outbound
                .try_send(message)
                .err()
                .map(|e| e.into_inner()),
            None => Some(message),
        }
    };
    match refused {
        None => {}
        Some(Outbound::Method { reply, .. }) => {
            let _ = reply.try_send(MethodOutcome::NotOnline);
        }
        Some(_) => {
            shard.shared.stats.outbound_dropped.fetch_add(1, Relaxed);
        }
    }
}

/// Encodes a message from the control plane for the device, into `out`.
fn send_outbound(
    message: Outbound,
    set: SubscriptionSet,
    in_flight: &mut InFlight,
    stats: &super::Stats,
    out: &mut bytes::BytesMut,
) {
    let mut topic = String::new();
    let (payload, qos) = match message {
        Outbound::TwinResponse {
            status,
            rid,
            version,
            body,
        } => {
            crate::iothub::push_twin_response_topic(&mut topic, status, &rid, version);
            (body, PublishQos::AtMostOnce)
        }
        // The hub does not queue patches for a device that has not subscribed: it re-reads the
        // twin after subscribing (azure-protocol.md 2.5).
        Outbound::DesiredPatch { version, body } => {
            if !set.desired_patches {
                return;
            }
            crate::iothub::push_desired_patch_topic(&mut topic, version);
            (body, PublishQos::AtMostOnce)
        }
        Outbound::Method {
            name,
            payload,
            reply,
        } => {
            if !set.methods {
                let _ = reply.try_send(MethodOutcome::NotOnline);
                return;
            }
            if in_flight.methods.len() >= METHODS_IN_FLIGHT_MAX {
                // Calls the service gave up on are forgotten here, before refusing.
                in_flight.methods.retain(|_, reply| !reply.is_closed());
                if in_flight.methods.len() >= METHODS_IN_FLIGHT_MAX {
                    let _ = reply.try_send(MethodOutcome::Busy);
                    return;
                }
            }
            in_flight.next_rid += 1;
            let rid = format!("{:x}", in_flight.next_rid);
            crate::iothub::push_method_request_topic(&mut topic, &name, &rid);
            in_flight.methods.insert(rid, reply);
            (payload, PublishQos::AtMostOnce)
        }
        // Kept by the connection's loop; never written to the device.
        Outbound::Twin(_) => return,
        Outbound::C2d {
            lock_token,
            topic: c2d_topic,
            body,
        } => {
            // Not subscribed yet, or too many in flight: the message stays in the device's
            // queue and the control plane delivers it again.
            if !set.cloud_to_device || in_flight.c2d.len() >= C2D_IN_FLIGHT_MAX {
                stats.outbound_dropped.fetch_add(1, Relaxed);
                return;
            }
            let id = loop {
                in_flight.next_packet_id = in_flight.next_packet_id.wrapping_add(1);
                let candidate = in_flight.next_packet_id;
                if candidate != 0 && !in_flight.c2d.contains_key(&candidate) {
                    break candidate;
                }
            };
            let Some(packet_id) = PacketId::new(id) else {
                return;
            };
            in_flight.c2d.insert(id, lock_token);
            stats.c2d_delivered.fetch_add(1, Relaxed);
            topic = c2d_topic;
            (body, PublishQos::AtLeastOnce(packet_id))
        }
    };
    let publish = mqtt::Publish {
        dup: false,
        qos,
        retain: false,
        topic: &topic,
        payload: &payload,
    };
    if mqtt::encode_publish(out, &publish).is_err() {
        stats.outbound_dropped.fetch_add(1, Relaxed);
    }
}

/// Passes a twin request to the control plane, or answers 429 at once when its queue is full.
fn twin_request(
    shard: &Shard,
    channels: Channels<'_>,
    rid: &str,
    patch: Option<&[u8]>,
    out: &mut bytes::BytesMut,
) {
    let identity = channels.identity.clone();
    let connection = channels.connection;
    let rid_owned = rid.to_owned();
    let event = match patch {
        None => Some(DeviceEvent::TwinGet {
            identity,
            connection,
            rid: rid_owned,
        }),
        // Larger than any valid patch: refused here, without queueing it.
        Some(body) if body.len() > REPORTED_PATCH_BYTES_MAX => {
            let body =
                br#"{"errorCode":400004,"message":"The reported properties patch is too large."}"#;
            let message = Outbound::TwinResponse {
                status: 400,
                rid: rid.to_owned(),
                version: None,
                body: body.to_vec(),
            };
            let set = SubscriptionSet::default();
            let stats = &shard.shared.stats;
            send_outbound(message, set, &mut InFlight::default(), stats, out);
            return;
        }
        Some(body) => {
            shard
                .shared
                .event_bytes
                .take(body)
                .map(|body| DeviceEvent::TwinReportedPatch {
                    identity,
                    connection,
                    rid: rid_owned,
                    body,
                })
        }
    };
    if event.is_none_or(|event| shard.shared.events.try_send(event).is_err()) {
        shard
            .shared
            .stats
            .twin_requests_throttled
            .fetch_add(1, Relaxed);
        let body =
            br#"{"errorCode":429001,"message":"The hub is busy; retry the twin operation."}"#;
        let message = Outbound::TwinResponse {
            status: 429,
            rid: rid.to_owned(),
            version: None,
            body: body.to_vec(),
        };
        send_outbound(
            message,
            SubscriptionSet::default(),
            &mut InFlight::default(),
            &shard.shared.stats,
            out,
        );
    }
}

/// How a session ended.
#[derive(Debug)]
enum Ended {
    ClientDisconnected,
    ClientClosed,
    Closed(CloseReason),
    KeepaliveTimeout,
    TokenExpired,
    Violation(&'static str),
    Io(std::io::Error),
    Store(String),
}

enum Wake {
    Read(std::io::Result<usize>),
    Close(CloseReason),
    Outbound(Outbound),
    Deadline,
}

/// A message decoded from the read buffer, waiting to be appended.
struct Pending<'b> {
    system: std::ops::Range<usize>,
    application: std::ops::Range<usize>,
    body: &'b [u8],
}

async fn serve(
    shard: &Shard,
    transport: &mut Transport,
    connected: &Connected,
    session: &std::cell::RefCell<Session>,
    leftover: Vec<u8>,
    channels: Channels<'_>,
) -> Ended {
    let close_rx = channels.close;
    let mut in_flight = InFlight::default();
    let limits = &shard.shared.config.limits;
    let stats = &shard.shared.stats;
    let partition = shard.partition_of(&connected.device_id);
    let keepalive = if connected.keep_alive_secs == 0 {
        KEEPALIVE_CAP
    } else {
        (Duration::from_secs(u64::from(connected.keep_alive_secs)) * 3 / 2).min(KEEPALIVE_CAP)
    };
    let token_deadline = connected.auth.expires_at_secs.map(|expiry| {
        let now = super::stats::now_secs();
        Instant::now() + Duration::from_secs(expiry.saturating_sub(now))
    });
    let identity = Identity {
        device_id: &connected.device_id,
        module_id: connected.module_id.as_deref(),
    };
    let mut buf = ReadBuffer::new(leftover, limits.packet_bytes_max + READ_CHUNK_BYTES);
    let mut out = bytes::BytesMut::with_capacity(1024);
    // Grows to the batch size on first use; an idle connection holds nothing here.
    let mut acks: Vec<PacketId> = Vec::new();
    let mut last_packet = Instant::now();
    // The device's twin, for routes that read `$twin`: the control plane sends it at connect and
    // after each change. The first messages wait for it (not reading is the backpressure).
    let mut twin: Option<std::sync::Arc<serde_json::Value>> = None;
    if shard.routing.table().is_some_and(|t| t.reads_twin()) {
        let waited = glommio::timer::timeout(TWIN_WAIT, async {
            loop {
                match channels.outbound.recv().await {
                    Ok(Outbound::Twin(received)) => return Ok(Some(received)),
                    Ok(message) => {
                        let set = subscriptions(&session.borrow().filters, identity);
                        send_outbound(message, set, &mut in_flight, stats, &mut out);
                    }
                    Err(_) => return Ok(None),
                }
            }
        })
        .await;
        twin = waited.ok().flatten();
        if twin.is_none() {
            stats.twin_waits_timed_out.fetch_add(1, Relaxed);
        }
    }

    loop {
        // Decode every complete packet, append the telemetry among them, acknowledge.
        let mut consumed = 0;
        let mut disconnect = None;
        let mut ticket: Option<u64> = None;
        {
            let mut arena: Vec<(Cow<'_, str>, Cow<'_, str>)> = Vec::new();
            // Generated message ids are written into one string per batch (no allocation per
            // message); `generated` says which arena slot takes which range of it.
            let mut ids = String::new();
            let mut generated: Vec<(usize, std::ops::Range<usize>)> = Vec::new();
            let mut pending: Vec<Pending<'_>> = Vec::new();
            let mut message_ids = shard.message_ids.borrow_mut();
            while pending.len() < limits.inflight_count_max {
                let rest = buf.data().get(consumed..).unwrap_or_default();
                let len = match mqtt::frame(rest, limits.packet_bytes_max) {
                    Ok(Some(len)) => len,
                    Ok(None) => break,
                    Err(_) => {
                        disconnect = Some(Ended::Violation("malformed or oversize packet"));
                        break;
                    }
                };
                let Some(frame) = rest.get(..len) else { break };
                consumed += len;
                let packet = match mqtt::decode(frame) {
                    Ok(packet) => packet,
                    Err(_) => {
                        disconnect = Some(Ended::Violation("malformed packet"));
                        break;
                    }
                };
                match packet {
                    Packet::Publish(publish) => {
                        let packet_id = match publish.qos {
                            PublishQos::AtMostOnce => None,
                            PublishQos::AtLeastOnce(id) => Some(id),
                            PublishQos::ExactlyOnce(_) => {
                                disconnect = Some(Ended::Violation("QoS 2 is not supported"));
                                break;
                            }
                        };
                        let properties = match PublishTopic::parse(publish.topic, identity) {
                            PublishTopic::Telemetry { properties } => properties,
                            PublishTopic::Foreign => {
                                disconnect = Some(Ended::Violation(
                                    "publish to a topic that is not the identity's",
                                ));
                                break;
                            }
                            PublishTopic::TwinGet { rid } => {
                                twin_request(shard, channels, rid, None, &mut out);
                                acks.extend(packet_id);
                                continue;
                            }
                            PublishTopic::TwinReportedPatch { rid, .. } => {
                                let body = Some(publish.payload);
                                twin_request(shard, channels, rid, body, &mut out);
                                acks.extend(packet_id);
                                continue;
                            }
                            PublishTopic::MethodResponse { status, rid } => {
                                match in_flight.methods.remove(rid) {
                                    Some(reply) => {
                                        let payload = publish.payload.to_vec();
                                        let answer = MethodOutcome::Response { status, payload };
                                        let _ = reply.try_send(answer);
                                    }
                                    None => {
                                        stats.method_responses_unmatched.fetch_add(1, Relaxed);
                                    }
                                }
                                acks.extend(packet_id);
                                continue;
                            }
                            PublishTopic::Unknown => {
                                disconnect = Some(Ended::Violation("unsupported topic"));
                                break;
                            }
                        };
                        let system_start = arena.len();
                        stamp(&mut arena, connected);
                        let mut has_message_id = false;
                        let mut application = Vec::new();
                        for property in properties.iter() {
                            let value = property.value.unwrap_or(Cow::Borrowed(""));
                            match property.name {
                                // The hub sets these; a device cannot spoof them.
                                PropertyName::System(
                                    SystemProperty::To
                                    | SystemProperty::ConnectionDeviceId
                                    | SystemProperty::ConnectionModuleId,
                                ) => {}
                                PropertyName::System(system) => {
                                    has_message_id |= system == SystemProperty::MessageId;
                                    arena.push((Cow::Borrowed(system.name()), value));
                                }
                                PropertyName::Application(name) => application.push((name, value)),
                            }
                        }
                        if !has_message_id {
                            let start = ids.len();
                            message_ids.write_id(&mut ids);
                            generated.push((arena.len(), start..ids.len()));
                            let name = Cow::Borrowed(property_name::MESSAGE_ID);
                            arena.push((name, Cow::Borrowed("")));
                        }
                        let system_end = arena.len();
                        if publish.retain {
                            application.push((Cow::Borrowed("mqtt-retain"), Cow::Borrowed("true")));
                        }
                        arena.extend(application);
                        let size = publish.payload.len()
                            + arena[system_start..]
                                .iter()
                                .map(|(n, v)| n.len() + v.len())
                                .sum::<usize>();
                        if size > crate::limits::D2C_MESSAGE_BYTES_MAX {
                            disconnect = Some(Ended::Violation("message larger than 256 KB"));
                            break;
                        }
                        pending.push(Pending {
                            system: system_start..system_end,
                            application: system_end..arena.len(),
                            body: publish.payload,
                        });
                        if let Some(id) = packet_id {
                            acks.push(id);
                        }
                    }
                    Packet::Subscribe(subscribe) => {
                        let mut session = session.borrow_mut();
                        let before = session.filters.len();
                        let codes: Vec<SubackCode> = subscribe
                            .filters()
                            .map(|(filter, qos)| grant(filter, qos, identity, &mut session))
                            .collect();
                        let _ = mqtt::encode_suback(&mut out, subscribe.packet_id, &codes);
                        if session.filters.len() != before {
                            subscriptions_changed(shard, connected, channels, &session);
                        }
                    }
                    Packet::Unsubscribe(unsubscribe) => {
                        let mut session = session.borrow_mut();
                        let before = session.filters.len();
                        for filter in unsubscribe.filters() {
                            session.filters.retain(|f| f != filter);
                        }
                        mqtt::encode_unsuback(&mut out, unsubscribe.packet_id);
                        if session.filters.len() != before {
                            subscriptions_changed(shard, connected, channels, &session);
                        }
                    }
                    Packet::Pingreq => mqtt::encode_pingresp(&mut out),
                    Packet::Disconnect => {
                        disconnect = Some(Ended::ClientDisconnected);
                        break;
                    }
                    // The device completed a cloud-to-device message.
                    Packet::Puback(packet_id) => {
                        if let Some(lock_token) = in_flight.c2d.remove(&packet_id.get()) {
                            stats.c2d_completed.fetch_add(1, Relaxed);
                            let completed = DeviceEvent::C2dCompleted {
                                identity: channels.identity.clone(),
                                lock_token,
                            };
                            // Lost only when the control plane is far behind: the message is
                            // then delivered again (at least once, as Azure's C2D is).
                            if shard.shared.events.try_send(completed).is_err() {
                                stats.outbound_dropped.fetch_add(1, Relaxed);
                            }
                        }
                    }
                    Packet::Connect(_) => {
                        disconnect = Some(Ended::Violation("second CONNECT"));
                        break;
                    }
                    Packet::Pubrec(_) | Packet::Pubrel(_) | Packet::Pubcomp(_) => {
                        disconnect = Some(Ended::Violation("QoS 2 is not supported"));
                        break;
                    }
                }
            }
            drop(message_ids);
            if consumed > 0 {
                last_packet = Instant::now();
            }
            if !pending.is_empty() {
                let mut properties: Vec<PropertyRef<'_>> = arena
                    .iter()
                    .map(|(name, value)| PropertyRef { name, value })
                    .collect();
                for (slot, range) in &generated {
                    if let (Some(property), Some(id)) =
                        (properties.get_mut(*slot), ids.get(range.clone()))
                    {
                        property.value = id;
                    }
                }
                let messages: Vec<MessageRef<'_>> = pending
                    .iter()
                    .map(|p| MessageRef {
                        system_properties: &properties[p.system.clone()],
                        application_properties: &properties[p.application.clone()],
                        body: p.body,
                    })
                    .collect();
                let now_ms = super::stats::now_ms();
                // With routes, each message goes to the endpoints it matched; the custom ones
                // are appended (and flushed under `always`) here, before any PUBACK. The table
                // is held for the whole batch: a route change applies from the next one.
                let table = shard.routing.table();
                let mut custom = Vec::new();
                let routed = table.as_deref().map(|table| {
                    shard
                        .routing
                        .route(table, &messages, twin.as_deref(), &mut custom)
                });
                let enrichment_values = table
                    .as_deref()
                    .filter(|t| t.has_enrichments())
                    .map(|t| t.enrichment_values(twin.as_deref()));
                let mut enrichment_storage = Vec::new();
                let ranges = match (table.as_deref(), &enrichment_values, &routed) {
                    (Some(table), Some(values), Some(events)) => {
                        Some(super::routing::enrichment_ranges(
                            table,
                            values,
                            events,
                            &custom,
                            &mut enrichment_storage,
                        ))
                    }
                    _ => None,
                };
                let (events, custom) = match (routed, ranges) {
                    (Some(events), Some(ranges)) => {
                        let (events, custom) =
                            super::routing::enriched(&enrichment_storage, events, custom, ranges);
                        (Some(events), custom)
                    }
                    (events, _) => (events, custom),
                };
                if let Some(table) = &table {
                    if let Err(e) = shard.routing.append(table, partition.0, &custom, now_ms) {
                        stats.append_errors.fetch_add(1, Relaxed);
                        return Ended::Store(e.to_string());
                    }
                }
                let events = events.as_deref().unwrap_or(&messages);
                let mut partitions = shard.partitions.borrow_mut();
                let Some(log) = partitions.get_mut(&partition.0) else {
                    return Ended::Store(format!(
                        "partition {partition} is not owned by this shard"
                    ));
                };
                // Under `always`, append now and flush together with the other connections'
                // batches below (group commit); other policies need no flush per batch.
                let group = log.fsync() == Fsync::Always && !events.is_empty();
                let appended = if group {
                    log.append_batch_deferred(events, now_ms).map(drop)
                } else if events.is_empty() {
                    Ok(())
                } else {
                    log.append_batch(events, now_ms).map(drop)
                };
                if let Err(e) = appended {
                    stats.append_errors.fetch_add(1, Relaxed);
                    // Nothing of this batch is acknowledged; the device will resend.
                    return Ended::Store(e.to_string());
                }
                if group {
                    ticket = shard.commits.get(&partition.0).map(|c| c.ticket());
                }
                stats.messages_in.fetch_add(messages.len() as u64, Relaxed);
                let bytes: usize = messages.iter().map(|m| m.body.len()).sum();
                stats.message_bytes_in.fetch_add(bytes as u64, Relaxed);
            }
        }
        if let (Some(ticket), Some(commit)) = (ticket.take(), shard.commits.get(&partition.0)) {
            let flush = || match shard.partitions.borrow_mut().get_mut(&partition.0) {
                Some(log) => log.flush(),
                None => Ok(()),
            };
            if let Err(e) = commit.durable(ticket, flush).await {
                stats.append_errors.fetch_add(1, Relaxed);
                return Ended::Store(e.to_string());
            }
        }
        // Acknowledge only what is appended (and flushed, as the policy promises), in order.
        for id in acks.drain(..) {
            mqtt::encode_puback(&mut out, id);
        }
        buf.consume(consumed);
        if !out.is_empty() {
            if let Err(e) = transport.write_all(&out).await {
                return Ended::Io(e);
            }
            out.clear();
        }
        if let Some(ended) = disconnect {
            if matches!(ended, Ended::Violation(_)) {
                stats.protocol_violations.fetch_add(1, Relaxed);
            }
            return ended;
        }
        if mqtt::frame(buf.data(), limits.packet_bytes_max)
            .ok()
            .flatten()
            .is_some()
        {
            continue; // more complete packets than one batch takes
        }

        // Read more, unless a close request, the keepalive or the token's expiry comes first.
        let mut deadline = last_packet + keepalive;
        let mut token_expired = false;
        if let Some(token) = token_deadline {
            if token < deadline {
                deadline = token;
                token_expired = true;
            }
        }
        let Some(spare) = buf.spare() else {
            return Ended::Violation("packet larger than the limit");
        };
        let wait = deadline.saturating_duration_since(Instant::now());
        let wake = futures_lite::future::or(
            async { Wake::Read(transport.read(spare).await) },
            futures_lite::future::or(
                futures_lite::future::or(
                    async {
                        match close_rx.recv().await {
                            Ok(reason) => Wake::Close(reason),
                            Err(_) => Wake::Close(CloseReason::Shutdown),
                        }
                    },
                    async {
                        match channels.outbound.recv().await {
                            Ok(message) => Wake::Outbound(message),
                            // Never closed while this loop holds the receiver and the shard
                            // holds the sender; wait for the other wake-ups.
                            Err(_) => std::future::pending().await,
                        }
                    },
                ),
                async {
                    glommio::timer::sleep(wait).await;
                    Wake::Deadline
                },
            ),
        )
        .await;
        match wake {
            Wake::Read(Ok(0)) => return Ended::ClientClosed,
            Wake::Read(Ok(n)) => buf.filled_by(n),
            Wake::Read(Err(e)) => return Ended::Io(e),
            Wake::Close(reason) => return Ended::Closed(reason),
            Wake::Outbound(message) => {
                // Take what else is queued too (bounded by the queue's depth), then write it all
                // in one go at the top of the loop.
                let set = subscriptions(&session.borrow().filters, identity);
                for message in std::iter::once(message)
                    .chain(std::iter::from_fn(|| channels.outbound.try_recv().ok()))
                {
                    match message {
                        Outbound::Twin(received) => twin = Some(received),
                        message => send_outbound(message, set, &mut in_flight, stats, &mut out),
                    }
                }
            }
            Wake::Deadline if token_expired => return Ended::TokenExpired,
            Wake::Deadline => {
                stats.keepalive_timeouts.fetch_add(1, Relaxed);
                return Ended::KeepaliveTimeout;
            }
        }
    }
}

/// The hub's stamps on every message of this connection (anti-spoofing).
fn stamp<'a>(arena: &mut Vec<(Cow<'a, str>, Cow<'a, str>)>, connected: &'a Connected) {
    arena.push((
        Cow::Borrowed(property_name::CONNECTION_DEVICE_ID),
        Cow::Borrowed(&connected.device_id),
    ));
    if let Some(module) = &connected.module_id {
        arena.push((
            Cow::Borrowed(property_name::CONNECTION_MODULE_ID),
            Cow::Borrowed(module),
        ));
    }
    arena.push((
        Cow::Borrowed(property_name::CONNECTION_AUTH_GENERATION_ID),
        Cow::Borrowed(&connected.auth.generation_id),
    ));
    arena.push((
        Cow::Borrowed(property_name::CONNECTION_AUTH_METHOD),
        Cow::Borrowed(&connected.auth_method_json),
    ));
    if let Some(model) = &connected.model_id {
        arena.push((
            Cow::Borrowed(property_name::DATA_SCHEMA),
            Cow::Borrowed(model),
        ));
    }
}

/// Tells the control plane what the connection now subscribes to, and persists a
/// clean-session-0 client's filters.
fn subscriptions_changed(
    shard: &Shard,
    connected: &Connected,
    channels: Channels<'_>,
    session: &Session,
) {
    let identity = Identity {
        device_id: &connected.device_id,
        module_id: connected.module_id.as_deref(),
    };
    let events = &shard.shared.events;
    let changed = DeviceEvent::Subscribed {
        identity: channels.identity.clone(),
        connection: channels.connection,
        subscriptions: subscriptions(&session.filters, identity),
    };
    let mut lost = events.try_send(changed).is_err();
    if !connected.clean_session {
        let persisted = DeviceEvent::Session {
            client_id: connected.client_id.clone(),
            filters: Some(session.filters.clone()),
        };
        lost |= events.try_send(persisted).is_err();
    }
    if lost {
        shard.shared.stats.outbound_dropped.fetch_add(1, Relaxed);
    }
}

/// The SUBACK code for one filter (azure-protocol.md 2.2), remembering what was granted.
fn grant(
    filter: &str,
    requested: QoS,
    identity: Identity<'_>,
    session: &mut Session,
) -> SubackCode {
    let code = Subscription::suback_code(filter, requested, identity);
    if matches!(code, SubackCode::Granted(_)) && !session.filters.iter().any(|f| f == filter) {
        session.filters.push(filter.to_owned());
    }
    code
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_ids_are_unique_and_uuid_shaped() {
        let mut source = MessageIdSource::new(3);
        let a = source.next_id();
        let b = source.next_id();
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        assert_eq!(a.as_bytes()[14], b'4');
    }
}
