//! The control plane's side of live devices: twin requests from devices, presence, C2D delivery
//! and persistent sessions.
//!
//! The shards send [`DeviceEvent`]s on one bounded queue; one thread takes them in batches and
//! commits each batch's twin patches, C2D completions and session changes in one transaction
//! per kind (one fsync for many devices), then answers the devices through the engine. Presence
//! (which identity has a live connection, and what it subscribed to) is kept in memory: it is
//! what a connection is, so it does not outlive the process.
//!
//! C2D delivery: when a device's connection subscribes to its devicebound topic (or resumes a
//! session that had), its queue is sent in order; a message sent while it is subscribed goes out
//! at once; messages not completed within the lock timeout are sent again; each delivery round
//! counts, and a message delivered too often leaves with `DeliveryCountExceeded` feedback.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ingot_engine::iothub::{push_c2d_topic_prefix, PropertyBagWriter, SystemProperty};
use ingot_engine::services::{Budgeted, DeviceEvent, IdentityKey, Outbound, SubscriptionSet};
use ingot_engine::shard::Engine;

use crate::registry::{C2dMessage, Registry, RegistryError};

/// Events taken from the queue in one batch.
const BATCH_MAX: usize = 1024;
/// Depth of the shards' event queue.
pub const EVENT_QUEUE_DEPTH: usize = 65_536;
/// How often unacknowledged C2D messages are looked at again.
const REDELIVERY_TICK: Duration = Duration::from_secs(5);

/// C2D settings (azure-protocol.md 8; Azure's defaults).
#[derive(Debug, Clone, Copy)]
pub struct C2dSettings {
    pub queue_depth: usize,
    pub default_ttl: Duration,
    pub max_delivery_count: u32,
    /// A delivered message not completed within this time is delivered again.
    pub lock_timeout: Duration,
}

impl Default for C2dSettings {
    fn default() -> Self {
        Self {
            queue_depth: ingot_engine::limits::C2D_QUEUE_DEPTH,
            default_ttl: Duration::from_secs(3600),
            max_delivery_count: 10,
            lock_timeout: Duration::from_secs(60),
        }
    }
}

/// A live connection, as the control plane knows it.
#[derive(Debug, Clone)]
struct Presence {
    connection: u64,
    subscriptions: SubscriptionSet,
    /// When the queue was last sent to this connection.
    last_delivery: Option<Instant>,
    /// When it connected, RFC 3339 (`connectionStateUpdatedTime`).
    since: Arc<str>,
}

/// Live devices and their C2D queues.
#[derive(Debug)]
pub struct Devices {
    registry: Arc<Registry>,
    engine: Arc<Engine>,
    /// The route table in force: which system events are wanted.
    routing: Arc<crate::routing::RoutingState>,
    /// Connection-state and reported-property twin-change events.
    system_events: Arc<crate::system_events::SystemEvents>,
    presence: Mutex<HashMap<IdentityKey, Presence>>,
    pub c2d: C2dSettings,
}

impl Devices {
    pub fn new(
        registry: Arc<Registry>,
        engine: Arc<Engine>,
        c2d: C2dSettings,
        routing: Arc<crate::routing::RoutingState>,
        system_events: Arc<crate::system_events::SystemEvents>,
    ) -> Arc<Self> {
        Arc::new(Self {
            registry,
            engine,
            routing,
            system_events,
            presence: Mutex::default(),
            c2d,
        })
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    pub fn routing(&self) -> &Arc<crate::routing::RoutingState> {
        &self.routing
    }

    fn presence(&self) -> std::sync::MutexGuard<'_, HashMap<IdentityKey, Presence>> {
        match self.presence.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Whether the identity has a live connection.
    pub fn is_connected(&self, device_id: &str, module_id: Option<&str>) -> bool {
        self.presence()
            .contains_key(&IdentityKey::new(device_id, module_id))
    }

    /// When the identity's live connection began, if it has one.
    pub fn connected_since(&self, device_id: &str, module_id: Option<&str>) -> Option<String> {
        self.presence()
            .get(&IdentityKey::new(device_id, module_id))
            .map(|p| p.since.to_string())
    }

    /// Devices (not modules) with a live connection.
    pub fn connected_device_count(&self) -> usize {
        self.presence()
            .keys()
            .filter(|k| k.module_id.is_none())
            .count()
    }

    /// Starts the thread that serves the shards' events; it ends when every sender is gone.
    /// Must be called within the tokio runtime, whose timers the thread uses.
    pub fn spawn(
        self: &Arc<Self>,
        events: async_channel::Receiver<DeviceEvent>,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        let devices = self.clone();
        let runtime = tokio::runtime::Handle::current();
        std::thread::Builder::new()
            .name("ingot-devices".into())
            .spawn(move || devices.run(&runtime, events))
    }

    /// The thread's loop. Registry commits block this thread only (never a runtime worker).
    fn run(&self, runtime: &tokio::runtime::Handle, events: async_channel::Receiver<DeviceEvent>) {
        let mut last_tick = Instant::now();
        loop {
            let first = runtime.block_on(async {
                tokio::select! {
                    event = events.recv() => event.ok().map(Some),
                    () = tokio::time::sleep(REDELIVERY_TICK) => Some(None),
                }
            });
            let Some(first) = first else { return };
            let mut batch: Vec<DeviceEvent> = first.into_iter().collect();
            while batch.len() < BATCH_MAX {
                match events.try_recv() {
                    Ok(event) => batch.push(event),
                    Err(_) => break,
                }
            }
            if !batch.is_empty() {
                self.handle(batch);
            }
            if last_tick.elapsed() >= REDELIVERY_TICK {
                last_tick = Instant::now();
                self.redeliver_due();
            }
        }
    }

    fn handle(&self, batch: Vec<DeviceEvent>) {
        let mut patches: Vec<(IdentityKey, u64, String, Budgeted)> = Vec::new();
        let mut completed: Vec<(String, u64)> = Vec::new();
        let mut sessions: Vec<(String, Option<Vec<String>>)> = Vec::new();
        let mut deliver: Vec<IdentityKey> = Vec::new();
        let mut twins: Vec<IdentityKey> = Vec::new();
        // Connection-state changes in the order seen: (identity, connected).
        let mut connections: Vec<(IdentityKey, bool)> = Vec::new();
        for event in batch {
            match event {
                DeviceEvent::TwinReportedPatch {
                    identity,
                    connection,
                    rid,
                    body,
                } => patches.push((identity, connection, rid, body)),
                DeviceEvent::TwinGet {
                    identity,
                    connection,
                    rid,
                } => {
                    // A GET sees every patch sent before it.
                    self.apply_patches(std::mem::take(&mut patches));
                    self.twin_get(identity, connection, rid);
                }
                DeviceEvent::C2dCompleted {
                    identity,
                    lock_token,
                } => completed.push((identity.device_id, lock_token)),
                DeviceEvent::Session { client_id, filters } => sessions.push((client_id, filters)),
                DeviceEvent::Connected {
                    identity,
                    connection,
                    subscriptions,
                }
                | DeviceEvent::Subscribed {
                    identity,
                    connection,
                    subscriptions,
                } => {
                    let mut presence = self.presence();
                    let newly_connected = !presence.contains_key(&identity);
                    let entry = presence
                        .entry(identity.clone())
                        .or_insert_with(|| Presence {
                            connection,
                            subscriptions: SubscriptionSet::default(),
                            last_delivery: None,
                            since: now_rfc3339().into(),
                        });
                    let newly_c2d = subscriptions.cloud_to_device
                        && (entry.connection != connection || !entry.subscriptions.cloud_to_device);
                    if entry.connection != connection || newly_connected {
                        entry.last_delivery = None;
                        entry.since = now_rfc3339().into();
                        twins.push(identity.clone());
                        if newly_connected {
                            connections.push((identity.clone(), true));
                        }
                    }
                    entry.connection = connection;
                    entry.subscriptions = subscriptions;
                    if newly_c2d && identity.module_id.is_none() {
                        deliver.push(identity);
                    }
                }
                DeviceEvent::Disconnected {
                    identity,
                    connection,
                } => {
                    let mut presence = self.presence();
                    if presence
                        .get(&identity)
                        .is_some_and(|p| p.connection == connection)
                    {
                        presence.remove(&identity);
                        connections.push((identity, false));
                    }
                }
            }
        }
        self.apply_patches(patches);
        if !completed.is_empty() {
            if let Err(e) = self.registry.c2d_complete(&completed) {
                // The messages stay queued and are delivered again: at least once.
                tracing::error!("failed to complete C2D messages: {e}");
            }
        }
        if !sessions.is_empty() {
            if let Err(e) = self.registry.save_sessions(&sessions) {
                tracing::error!("failed to save MQTT sessions: {e}");
            }
        }
        for (identity, connected) in connections {
            self.system_events.connection(
                connected,
                &identity.device_id,
                identity.module_id.as_deref(),
            );
        }
        for identity in twins {
            self.push_twin(&identity);
        }
        for identity in deliver {
            self.deliver_queue(&identity);
        }
    }

    /// Sends the identity's twin to its live connection when routes read `$twin` (the
    /// connection routes with it; a new connection waits for it before its first messages).
    pub fn push_twin(&self, identity: &IdentityKey) {
        if !self.routing.reads_twin() {
            return;
        }
        let Some(connection) = self.presence().get(identity).map(|p| p.connection) else {
            return;
        };
        match self
            .registry
            .twin(&identity.device_id, identity.module_id.as_deref())
        {
            Ok(twin) => {
                let view = std::sync::Arc::new(twin.routing_view());
                self.send(identity.clone(), Some(connection), Outbound::Twin(view));
            }
            Err(e) => tracing::debug!("no twin to send for routing: {e}"),
        }
    }

    /// A `twinChangeEvents` `updateTwin` for a committed reported patch: the patch with the new
    /// reported `$version`, and the twin's new `version`.
    fn reported_changed(
        &self,
        identity: &IdentityKey,
        patch: Option<&serde_json::Value>,
        reported_version: u64,
    ) {
        let module_id = identity.module_id.as_deref();
        self.system_events
            .twin_changed(false, &identity.device_id, module_id, || {
                let mut reported = patch.cloned().unwrap_or_else(|| serde_json::json!({}));
                if let Some(object) = reported.as_object_mut() {
                    object.insert("$version".into(), reported_version.into());
                }
                let version = self
                    .registry
                    .twin(&identity.device_id, module_id)
                    .map(|t| t.version())
                    .unwrap_or_default();
                serde_json::json!({
                    "version": version,
                    "properties": { "reported": reported },
                })
            });
    }

    /// Sends every live connection its twin: after a route change that made routes read
    /// `$twin`.
    pub fn push_twins_to_all(&self) {
        let online: Vec<IdentityKey> = self.presence().keys().cloned().collect();
        for identity in online {
            self.push_twin(&identity);
        }
    }

    /// Commits reported patches in one transaction, then answers each device.
    fn apply_patches(&self, patches: Vec<(IdentityKey, u64, String, Budgeted)>) {
        if patches.is_empty() {
            return;
        }
        let mut parsed = Vec::with_capacity(patches.len());
        let mut invalid = Vec::new();
        for (i, (identity, _, _, body)) in patches.iter().enumerate() {
            match serde_json::from_slice::<serde_json::Value>(body.bytes()) {
                Ok(value) => parsed.push((
                    identity.device_id.clone(),
                    identity.module_id.clone(),
                    value,
                )),
                Err(_) => invalid.push(i),
            }
        }
        let results = self.registry.patch_reported_batch(&parsed);
        let mut results = match results {
            Ok(results) => results.into_iter(),
            Err(e) => {
                tracing::error!("failed to store reported properties: {e}");
                for (identity, connection, rid, _) in patches {
                    self.twin_error(identity, connection, rid, 500, 500001, "ServerError");
                }
                return;
            }
        };
        let mut patch_bodies = parsed.iter().map(|(_, _, value)| value);
        for (i, (identity, connection, rid, _)) in patches.into_iter().enumerate() {
            if invalid.contains(&i) {
                let message = "The reported properties are not valid JSON.";
                self.twin_error(identity, connection, rid, 400, 400004, message);
                continue;
            }
            let patch = patch_bodies.next();
            match results.next() {
                Some(Ok(version)) => {
                    let response = Outbound::TwinResponse {
                        status: 204,
                        rid,
                        version: Some(version),
                        body: Vec::new(),
                    };
                    self.reported_changed(&identity, patch, version);
                    self.push_twin(&identity);
                    self.send(identity, Some(connection), response);
                }
                Some(Err(RegistryError::Twin(e))) => {
                    let (status, code, _) = e.code();
                    let message = e.to_string();
                    self.twin_error(identity, connection, rid, status, code, &message);
                }
                Some(Err(e)) => {
                    let message = e.to_string();
                    self.twin_error(identity, connection, rid, 404, 404001, &message);
                }
                None => {}
            }
        }
    }

    fn twin_get(&self, identity: IdentityKey, connection: u64, rid: String) {
        match self
            .registry
            .twin(&identity.device_id, identity.module_id.as_deref())
        {
            Ok(twin) => {
                let body = serde_json::to_vec(&twin.device_view()).unwrap_or_default();
                let response = Outbound::TwinResponse {
                    status: 200,
                    rid,
                    version: None,
                    body,
                };
                self.send(identity, Some(connection), response);
            }
            // Deleted since it connected (its connection is being closed).
            Err(e @ (RegistryError::DeviceNotFound | RegistryError::ModuleNotFound)) => {
                let message = e.to_string();
                self.twin_error(identity, connection, rid, 404, 404001, &message);
            }
            Err(e) => {
                tracing::error!("failed to read a twin: {e}");
                self.twin_error(identity, connection, rid, 500, 500001, "ServerError");
            }
        }
    }

    fn twin_error(
        &self,
        identity: IdentityKey,
        connection: u64,
        rid: String,
        status: u16,
        code: u32,
        message: &str,
    ) {
        let body = serde_json::json!({
            "errorCode": code,
            "trackingId": format!("{:032x}", rand::random::<u128>()),
            "message": message,
            "timestampUtc": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        });
        let response = Outbound::TwinResponse {
            status,
            rid,
            version: None,
            body: body.to_string().into_bytes(),
        };
        self.send(identity, Some(connection), response);
    }

    fn send(&self, identity: IdentityKey, connection: Option<u64>, message: Outbound) {
        if let Err(e) = self.engine.deliver(identity, connection, message) {
            tracing::debug!("could not hand a message to a shard: {e}");
        }
    }

    /// Sends a desired-properties patch to the identity's connection, if it subscribed.
    pub fn push_desired(&self, device_id: &str, module_id: Option<&str>, patch: serde_json::Value) {
        let identity = IdentityKey::new(device_id, module_id);
        let subscribed = self
            .presence()
            .get(&identity)
            .is_some_and(|p| p.subscriptions.desired_patches);
        if !subscribed {
            return;
        }
        let version = patch
            .get("$version")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0);
        let body = serde_json::to_vec(&patch).unwrap_or_default();
        self.send(identity, None, Outbound::DesiredPatch { version, body });
    }

    /// Sends a just-queued message at once when its device is connected and subscribed.
    pub fn c2d_enqueued(&self, message: &C2dMessage) {
        let identity = IdentityKey::new(&message.device_id, None);
        let subscribed = self
            .presence()
            .get(&identity)
            .is_some_and(|p| p.subscriptions.cloud_to_device);
        if subscribed {
            self.send(identity, None, c2d_outbound(message));
        }
    }

    /// Sends a device's whole queue to its connection, counting one delivery of each message.
    fn deliver_queue(&self, identity: &IdentityKey) {
        // Most devices have nothing queued: a read transaction says so without a commit.
        match self.registry.c2d_count(&identity.device_id) {
            Ok(0) => {
                if let Some(p) = self.presence().get_mut(identity) {
                    p.last_delivery = Some(Instant::now());
                }
                return;
            }
            Ok(_) => {}
            Err(e) => {
                tracing::error!("failed to read a C2D queue: {e}");
                return;
            }
        }
        let now_ms = now_ms();
        let messages = match self.registry.c2d_take_for_delivery(
            &identity.device_id,
            self.c2d.max_delivery_count,
            now_ms,
        ) {
            Ok(messages) => messages,
            Err(e) => {
                tracing::error!("failed to read a C2D queue: {e}");
                return;
            }
        };
        if let Some(p) = self.presence().get_mut(identity) {
            p.last_delivery = Some(Instant::now());
        }
        for message in &messages {
            self.send(identity.clone(), None, c2d_outbound(message));
        }
    }

    /// Delivers again the queues of subscribed devices whose last delivery is older than the
    /// lock timeout and that still have messages.
    fn redeliver_due(&self) {
        let lock_timeout = self.c2d.lock_timeout;
        let due: Vec<IdentityKey> = self
            .presence()
            .iter()
            .filter(|(k, p)| {
                k.module_id.is_none()
                    && p.subscriptions.cloud_to_device
                    && p.last_delivery.is_none_or(|t| t.elapsed() >= lock_timeout)
            })
            .map(|(k, _)| k.clone())
            .collect();
        for identity in due {
            self.deliver_queue(&identity);
        }
    }
}

/// The MQTT form of a queued message (azure-protocol.md 2.4): the bag carries the settable
/// system properties, `$.to`, `iothub-ack` and the application properties.
pub fn c2d_outbound(message: &C2dMessage) -> Outbound {
    let mut topic = String::with_capacity(128);
    push_c2d_topic_prefix(&mut topic, &message.device_id);
    let to = format!("/devices/{}/messages/deviceBound", message.device_id);
    let expiry = chrono::DateTime::from_timestamp_millis(message.content.expiry_ms as i64)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true));
    {
        let mut bag = PropertyBagWriter::new(&mut topic);
        bag.system(SystemProperty::MessageId, Some(&message.content.message_id));
        if let Some(cid) = &message.content.correlation_id {
            bag.system(SystemProperty::CorrelationId, Some(cid));
        }
        if let Some(uid) = &message.content.user_id {
            bag.system(SystemProperty::UserId, Some(uid));
        }
        if let Some(ct) = &message.content.content_type {
            bag.system(SystemProperty::ContentType, Some(ct));
        }
        if let Some(ce) = &message.content.content_encoding {
            bag.system(SystemProperty::ContentEncoding, Some(ce));
        }
        if let Some(expiry) = &expiry {
            bag.system(SystemProperty::AbsoluteExpiryTime, Some(expiry));
        }
        bag.system(SystemProperty::To, Some(&to));
        bag.application("iothub-ack", Some(message.content.ack.as_str()));
        for (name, value) in &message.content.properties {
            bag.application(name, Some(value));
        }
    }
    Outbound::C2d {
        lock_token: message.lock_token,
        topic,
        body: message.content.body.clone(),
    }
}

fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
