//! What flows between the shards and the control plane for twins, direct methods,
//! cloud-to-device messages and sessions.
//!
//! The shard that owns a device owns its live connection: its subscriptions, its pending method
//! calls (by `$rid`) and its C2D messages in flight (by packet id). What must outlive a connection
//! (twin documents, C2D queues, feedback, persistent sessions) is kept by the control plane in its
//! crash-safe store, whose commits are blocking fsyncs that must never run on a shard's core.
//!
//! Two bounded channels connect them:
//! - shards -> control plane: [`DeviceEvent`]s on one queue (twin requests, C2D completions,
//!   presence and session changes), consumed by one thread that commits them in batches;
//! - control plane -> shard: [`Outbound`] messages through the owning shard's inbox
//!   ([`crate::shard::Engine::deliver`]), which hands them to the live connection.
//!
//! Both are bounded. When the events queue is full a twin request is answered with status 429
//! at once (the device retries), and when a connection's outbound queue is full a twin response
//! or desired patch is dropped and counted (the SDK re-reads the twin after reconnecting); a C2D
//! message stays queued in the store and is delivered again.

/// A device or module, as owned ids.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IdentityKey {
    pub device_id: String,
    pub module_id: Option<String>,
}

impl IdentityKey {
    pub fn new(device_id: &str, module_id: Option<&str>) -> Self {
        Self {
            device_id: device_id.to_owned(),
            module_id: module_id.map(str::to_owned),
        }
    }
}

/// One live connection of an identity: the owning shard numbers its connections, and a device's
/// owning shard never changes while the hub runs, so (identity, connection) is unique.
pub type ConnectionId = u64;

/// What a device connection tells the control plane.
#[derive(Debug)]
pub enum DeviceEvent {
    /// A connection was accepted (CONNACK sent). `subscriptions` are those it resumed from a
    /// persistent session.
    Connected {
        identity: IdentityKey,
        connection: ConnectionId,
        subscriptions: SubscriptionSet,
    },
    /// The connection ended.
    Disconnected {
        identity: IdentityKey,
        connection: ConnectionId,
    },
    /// The connection's subscriptions changed (SUBSCRIBE or UNSUBSCRIBE answered).
    Subscribed {
        identity: IdentityKey,
        connection: ConnectionId,
        subscriptions: SubscriptionSet,
    },
    /// The filters of a clean-session-0 client changed; `None`: its session ended (a clean
    /// session connect). Persisted so that sessions survive restarts.
    Session {
        client_id: String,
        filters: Option<Vec<String>>,
    },
    /// `$iothub/twin/GET/?$rid=`: answer with [`Outbound::TwinResponse`] on this connection.
    TwinGet {
        identity: IdentityKey,
        connection: ConnectionId,
        rid: String,
    },
    /// `$iothub/twin/PATCH/properties/reported/?$rid=`: apply, persist, then answer.
    TwinReportedPatch {
        identity: IdentityKey,
        connection: ConnectionId,
        rid: String,
        body: Budgeted,
    },
    /// The device acknowledged (PUBACK) the C2D message with this lock token: it is complete.
    C2dCompleted {
        identity: IdentityKey,
        lock_token: u64,
    },
}

/// The subscriptions of a connection that the control plane acts on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SubscriptionSet {
    pub cloud_to_device: bool,
    pub methods: bool,
    pub desired_patches: bool,
}

/// What the control plane sends to a device's connection.
#[derive(Debug)]
pub enum Outbound {
    /// `$iothub/twin/res/{status}/?$rid={rid}[&$version={v}]`, QoS 0.
    TwinResponse {
        status: u16,
        rid: String,
        version: Option<u64>,
        body: Vec<u8>,
    },
    /// `$iothub/twin/PATCH/properties/desired/?$version={v}`, QoS 0, to a subscribed connection.
    DesiredPatch { version: u64, body: Vec<u8> },
    /// `$iothub/methods/POST/{name}/?$rid=`, QoS 0. The answer (or why there is none) goes to
    /// `reply`.
    Method {
        name: String,
        payload: Vec<u8>,
        reply: async_channel::Sender<MethodOutcome>,
    },
    /// The identity's twin as routes read it (`tags`, `properties.desired`,
    /// `properties.reported`): sent when the route table reads `$twin`, at connect and after
    /// each change. Not sent to the device.
    Twin(std::sync::Arc<serde_json::Value>),
    /// A C2D message, QoS 1, on `topic` (`devices/{d}/messages/devicebound/{bag}`); its PUBACK
    /// comes back as [`DeviceEvent::C2dCompleted`] with `lock_token`.
    C2d {
        lock_token: u64,
        topic: String,
        body: Vec<u8>,
    },
}

/// A routable event the control plane produces about a device or module (Azure's twin-change,
/// lifecycle and connection-state events): routed on the shard that owns the device's partition,
/// by the routes of its source, and appended like telemetry to the endpoints they choose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemEvent {
    pub device_id: String,
    pub module_id: Option<String>,
    /// By stored name (`store::format::property_name`): content type and encoding, message
    /// source, connection device and module id, ...
    pub system_properties: Vec<(String, String)>,
    /// `hubName`, `deviceId`, `opType`, `iothub-message-schema`, ...
    pub application_properties: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// How a direct method call ended on the device side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MethodOutcome {
    /// The device answered `$iothub/methods/res/{status}/?$rid=` with this payload.
    Response { status: i32, payload: Vec<u8> },
    /// No connection, or the connection has not subscribed to `$iothub/methods/POST/#`.
    NotOnline,
    /// The connection has the maximum number of calls in flight, or its queue is full.
    Busy,
}

/// Bytes that count against a shared budget until dropped: what devices put on the events queue
/// is bounded in bytes as well as in entries.
#[derive(Debug)]
pub struct Budgeted {
    bytes: Vec<u8>,
    used: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Budgeted {
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }
}

impl Drop for Budgeted {
    fn drop(&mut self) {
        self.used
            .fetch_sub(self.bytes.len(), std::sync::atomic::Ordering::Relaxed);
    }
}

/// A byte budget shared by the shards (see [`Budgeted`]).
#[derive(Debug, Clone)]
pub struct ByteBudget {
    used: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    max: usize,
}

impl ByteBudget {
    pub fn new(max: usize) -> Self {
        Self {
            used: std::sync::Arc::default(),
            max,
        }
    }

    /// A copy of `bytes` charged to the budget, or `None` when it would exceed it.
    pub fn take(&self, bytes: &[u8]) -> Option<Budgeted> {
        use std::sync::atomic::Ordering::Relaxed;
        let len = bytes.len();
        let mut used = self.used.load(Relaxed);
        loop {
            if used + len > self.max {
                return None;
            }
            match self
                .used
                .compare_exchange_weak(used, used + len, Relaxed, Relaxed)
            {
                Ok(_) => break,
                Err(now) => used = now,
            }
        }
        Some(Budgeted {
            bytes: bytes.to_vec(),
            used: self.used.clone(),
        })
    }

    pub fn used(&self) -> usize {
        self.used.load(std::sync::atomic::Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_is_returned_when_the_bytes_are_dropped() {
        let budget = ByteBudget::new(10);
        let a = budget.take(b"123456").unwrap();
        assert!(budget.take(b"12345").is_none());
        let b = budget.take(b"1234").unwrap();
        assert_eq!(budget.used(), 10);
        drop(a);
        assert_eq!(budget.used(), 4);
        assert_eq!(b.bytes(), b"1234");
        drop(b);
        assert_eq!(budget.used(), 0);
    }
}
