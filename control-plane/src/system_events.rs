//! Azure's routable system events (azure-protocol.md 7.4): device and module lifecycle
//! (`deviceLifecycleEvents`), twin changes (`twinChangeEvents`) and connection state
//! (`deviceConnectionStateEvents`).
//!
//! Each is built only when a route reads its source (Azure emits them only then), after the
//! change it reports is committed, and handed to the shard that owns the device, which routes it
//! by the routes of that source and appends it to the endpoints they choose, in order with the
//! device's other events.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use ingot_engine::route::RouteSource;
use ingot_engine::services::SystemEvent;
use ingot_engine::shard::Engine;
use ingot_engine::store::format::property_name;
use serde_json::{json, Map, Value};

use crate::routing::RoutingState;
use crate::twin::TwinDoc;

/// A lifecycle operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifecycle {
    Created,
    Deleted,
}

/// Builds system events and hands them to the shards.
#[derive(Debug)]
pub struct SystemEvents {
    engine: Arc<Engine>,
    routing: Arc<RoutingState>,
    hub_name: String,
    /// The last connection-state sequence number: strictly increasing, and across restarts too
    /// (it never falls behind the clock in microseconds).
    sequence: AtomicU64,
    /// Events the shards could not take (a full inbox).
    dropped: AtomicU64,
}

/// Azure's timestamps: ISO-8601 UTC with 7 fraction digits.
fn timestamp() -> String {
    let now = chrono::Utc::now();
    format!(
        "{}.{:07}Z",
        now.format("%Y-%m-%dT%H:%M:%S"),
        now.timestamp_subsec_nanos() / 100
    )
}

/// One more than the last number, and never behind `now` (microseconds since the epoch): so
/// numbers keep increasing across restarts as long as the clock does.
fn next_sequence(last: &AtomicU64, now: u64) -> u64 {
    let next = |last: u64| last.saturating_add(1).max(now);
    let previous = last
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |l| Some(next(l)))
        .unwrap_or_default();
    next(previous)
}

fn now_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or_default()
}

/// The twin as lifecycle events and `replaceTwin` carry it: identity, etag, version, tags (when
/// any) and both property sections with their metadata.
pub fn twin_body(device_id: &str, module_id: Option<&str>, twin: &TwinDoc) -> Value {
    let mut body = Map::new();
    body.insert("deviceId".into(), device_id.into());
    if let Some(module_id) = module_id {
        body.insert("moduleId".into(), module_id.into());
    }
    body.insert("etag".into(), twin.etag().into());
    body.insert("version".into(), twin.version().into());
    if !twin.tags().is_empty() {
        body.insert("tags".into(), Value::Object(twin.tags().clone()));
    }
    body.insert("properties".into(), twin.properties_with_metadata());
    Value::Object(body)
}

impl SystemEvents {
    pub fn new(engine: Arc<Engine>, routing: Arc<RoutingState>, hub_name: String) -> Self {
        SystemEvents {
            engine,
            routing,
            hub_name,
            sequence: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        }
    }

    /// Whether a route reads lifecycle events (to read a twin before deleting it, only then).
    pub fn wants_lifecycle(&self) -> bool {
        self.routing.wants(RouteSource::DeviceLifecycleEvents)
    }

    /// Events the shards' inboxes had no room for.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// A device or module was created or deleted; `twin` is its twin (as created, or as it was
    /// before the deletion). Built only when a route reads lifecycle events.
    pub fn lifecycle(
        &self,
        op: Lifecycle,
        device_id: &str,
        module_id: Option<&str>,
        twin: impl FnOnce() -> Option<Value>,
    ) {
        let source = RouteSource::DeviceLifecycleEvents;
        if !self.routing.wants(source) {
            return;
        }
        let op_type = match op {
            Lifecycle::Created => "createDeviceIdentity",
            Lifecycle::Deleted => "deleteDeviceIdentity",
        };
        let body = twin().unwrap_or_else(|| {
            let mut body = json!({ "deviceId": device_id });
            if let Some(module_id) = module_id {
                body["moduleId"] = module_id.into();
            }
            body
        });
        self.emit(
            source,
            device_id,
            module_id,
            op_type,
            "deviceLifecycleNotification",
            &body,
        );
    }

    /// A twin changed: `updateTwin` with the changed parts (`tags`, `properties.desired` or
    /// `properties.reported`, each section with its new `$version`) and the twin's new
    /// `version`, or `replaceTwin` with the whole twin. `body` is built only when wanted.
    pub fn twin_changed(
        &self,
        replace: bool,
        device_id: &str,
        module_id: Option<&str>,
        body: impl FnOnce() -> Value,
    ) {
        let source = RouteSource::TwinChangeEvents;
        if !self.routing.wants(source) {
            return;
        }
        let op_type = if replace { "replaceTwin" } else { "updateTwin" };
        self.emit(
            source,
            device_id,
            module_id,
            op_type,
            "twinChangeNotification",
            &body(),
        );
    }

    /// A device or module connected or disconnected.
    pub fn connection(&self, connected: bool, device_id: &str, module_id: Option<&str>) {
        let source = RouteSource::DeviceConnectionStateEvents;
        if !self.routing.wants(source) {
            return;
        }
        let op_type = if connected {
            "deviceConnected"
        } else {
            "deviceDisconnected"
        };
        let body = json!({ "sequenceNumber": self.next_sequence() });
        self.emit(
            source,
            device_id,
            module_id,
            op_type,
            "deviceConnectionStateNotification",
            &body,
        );
    }

    /// The next sequence number as Azure writes it: 64 upper-case hex digits, so that later
    /// numbers also compare greater as strings.
    fn next_sequence(&self) -> String {
        format!("{:064X}", next_sequence(&self.sequence, now_micros()))
    }

    fn emit(
        &self,
        source: RouteSource,
        device_id: &str,
        module_id: Option<&str>,
        op_type: &str,
        schema: &str,
        body: &Value,
    ) {
        let message_source = match source {
            RouteSource::DeviceMessages => "deviceMessages",
            RouteSource::TwinChangeEvents => "twinChangeEvents",
            RouteSource::DeviceLifecycleEvents => "deviceLifecycleEvents",
            RouteSource::DeviceConnectionStateEvents => "deviceConnectionStateEvents",
        };
        let mut system = vec![
            (
                property_name::CONTENT_TYPE.to_owned(),
                "application/json".to_owned(),
            ),
            (
                property_name::CONTENT_ENCODING.to_owned(),
                "utf-8".to_owned(),
            ),
            (
                property_name::CORRELATION_ID.to_owned(),
                format!("{:032x}", rand::random::<u128>()),
            ),
            (property_name::USER_ID.to_owned(), self.hub_name.clone()),
            (
                property_name::CONNECTION_DEVICE_ID.to_owned(),
                device_id.to_owned(),
            ),
        ];
        if let Some(module_id) = module_id {
            system.push((
                property_name::CONNECTION_MODULE_ID.to_owned(),
                module_id.to_owned(),
            ));
        }
        system.push((
            property_name::MESSAGE_SOURCE.to_owned(),
            message_source.to_owned(),
        ));
        let mut application = vec![
            ("hubName".to_owned(), self.hub_name.clone()),
            ("deviceId".to_owned(), device_id.to_owned()),
        ];
        if let Some(module_id) = module_id {
            application.push(("moduleId".to_owned(), module_id.to_owned()));
        }
        application.extend([
            ("operationTimestamp".to_owned(), timestamp()),
            ("opType".to_owned(), op_type.to_owned()),
            ("iothub-message-schema".to_owned(), schema.to_owned()),
        ]);
        let event = SystemEvent {
            device_id: device_id.to_owned(),
            module_id: module_id.map(str::to_owned),
            system_properties: system,
            application_properties: application,
            body: body.to_string().into_bytes(),
        };
        if let Err(e) = self.engine.route_event(source, event) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(device = %device_id, "a {message_source} event was not routed: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn sequence_numbers_strictly_increase_and_follow_the_clock() {
        let last = AtomicU64::new(0);
        assert_eq!(next_sequence(&last, 1000), 1000);
        assert_eq!(next_sequence(&last, 1000), 1001);
        assert_eq!(
            next_sequence(&last, 900),
            1002,
            "a clock going back does not"
        );
        assert_eq!(next_sequence(&last, 5000), 5000);
        // A restart starts from the clock, past what came before.
        let restarted = AtomicU64::new(0);
        assert!(next_sequence(&restarted, 6000) > 5000);
        let a = format!("{:064X}", 0xFFu64);
        let b = format!("{:064X}", 0x100u64);
        assert!(a < b && a.len() == 64);
    }

    #[test]
    fn timestamps_have_seven_fraction_digits() {
        let t = timestamp();
        let (_, fraction) = t.split_once('.').unwrap();
        assert_eq!(fraction.len(), 8, "{t}");
        assert!(fraction.ends_with('Z'));
        assert!(chrono::DateTime::parse_from_rfc3339(&t).is_ok(), "{t}");
    }
}
