//! Azure's JSON encoding of a routed message, as IoT Hub writes it to a storage endpoint:
//!
//! ```json
//! {"EnqueuedTimeUtc":"2026-11-26T21:00:00.1230000Z","Properties":{"level":"critical"},
//!  "SystemProperties":{"connectionDeviceId":"dev1","connectionAuthMethod":"{...}",
//!   "connectionDeviceGenerationId":"...","contentType":"application/json",
//!   "contentEncoding":"utf-8","enqueuedTime":"2026-11-26T21:00:00.1230000Z"},
//!  "Body":{"temp":31}}
//! ```
//!
//! `Body` is the JSON value itself when the message says `contentType` `application/json` and
//! `contentEncoding` `utf-8` (and the body parses), as Azure does; otherwise the body's bytes in
//! base64. Ingot's stored system property names are mapped to Azure's.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use chrono::{DateTime, SecondsFormat, Utc};
use ingot_engine::store::format::property_name;
use ingot_engine::store::Record;
use serde_json::{Map, Value};

/// Azure's name of a system property stored under Ingot's `name`.
pub fn azure_system_name(name: &str) -> &str {
    match name {
        property_name::CONNECTION_DEVICE_ID => "connectionDeviceId",
        property_name::CONNECTION_MODULE_ID => "connectionModuleId",
        property_name::CONNECTION_AUTH_GENERATION_ID => "connectionDeviceGenerationId",
        property_name::CONNECTION_AUTH_METHOD => "connectionAuthMethod",
        property_name::ENQUEUED_TIME => "enqueuedTime",
        property_name::MESSAGE_ID => "messageId",
        property_name::CORRELATION_ID => "correlationId",
        property_name::USER_ID => "userId",
        property_name::CONTENT_TYPE => "contentType",
        property_name::CONTENT_ENCODING => "contentEncoding",
        property_name::ABSOLUTE_EXPIRY_TIME => "absoluteExpiryTime",
        property_name::INTERFACE_ID => "interfaceId",
        // `iothub-message-source`, `dt-dataschema`, `dt-subject` keep their names, as in Azure.
        other => other,
    }
}

/// The record's JSON object (one line of a `files` endpoint, one element of a webhook batch).
pub fn record_json(record: &Record<'_>) -> Value {
    let message = record.message;
    let enqueued = utc_time(record.enqueued_time_ms);
    let mut system = Map::new();
    for p in message.system_properties() {
        system.insert(azure_system_name(p.name()).to_owned(), p.value().into());
    }
    // Azure always carries the enqueued time; a record's header is the authority for it.
    system
        .entry("enqueuedTime")
        .or_insert_with(|| enqueued.clone().into());
    let properties: Map<String, Value> = message
        .application_properties()
        .iter()
        .map(|p| (p.name().to_owned(), Value::String(p.value().to_owned())))
        .collect();
    let mut out = Map::new();
    out.insert("EnqueuedTimeUtc".into(), enqueued.into());
    out.insert("Properties".into(), Value::Object(properties));
    out.insert("SystemProperties".into(), Value::Object(system));
    out.insert("Body".into(), body_json(message));
    Value::Object(out)
}

fn body_json(message: &ingot_engine::store::format::ArchivedMessage) -> Value {
    let body = message.body();
    let json = message
        .system_property(property_name::CONTENT_TYPE)
        .is_some_and(|ct| {
            ct.split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .eq_ignore_ascii_case("application/json")
        })
        && message
            .system_property(property_name::CONTENT_ENCODING)
            .is_some_and(|ce| {
                let ce = ce.trim();
                ce.eq_ignore_ascii_case("utf-8") || ce.eq_ignore_ascii_case("utf8")
            });
    if json {
        if let Ok(value) = serde_json::from_slice::<Value>(body) {
            return value;
        }
    }
    Value::String(BASE64.encode(body))
}

/// Azure's time format in these records: UTC with seven fractional digits.
fn utc_time(unix_ms: u64) -> String {
    let time = i64::try_from(unix_ms)
        .ok()
        .and_then(DateTime::<Utc>::from_timestamp_millis)
        .unwrap_or_default();
    let mut text = time.to_rfc3339_opts(SecondsFormat::Millis, true);
    // "....123Z" -> "....1230000Z"
    text.insert_str(text.len() - 1, "0000");
    text
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use ingot_engine::store::{
        MessageRef, PartitionId, PropertyRef, Reader, StartAt, Store, StoreConfig,
    };

    fn with_record(
        system: &[(&str, &str)],
        app: &[(&str, &str)],
        body: &[u8],
        check: impl Fn(Value),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let mut config = StoreConfig::new(1);
        config.segment_bytes_max = 1 << 20;
        let mut store = Store::open(dir.path(), config).unwrap();
        let system: Vec<PropertyRef> = system
            .iter()
            .map(|(name, value)| PropertyRef { name, value })
            .collect();
        let app: Vec<PropertyRef> = app
            .iter()
            .map(|(name, value)| PropertyRef { name, value })
            .collect();
        let message = MessageRef {
            system_properties: &system,
            application_properties: &app,
            body,
        };
        store
            .append_batch(PartitionId(0), &[message], 1_764_190_800_123)
            .unwrap();
        drop(store);
        let reader = Reader::open(dir.path()).unwrap();
        let mut partition = reader.partition(PartitionId(0), StartAt::Start).unwrap();
        let record = partition.next().unwrap().unwrap();
        check(record_json(&record));
    }

    #[test]
    fn json_bodies_are_inline_and_names_are_azures() {
        with_record(
            &[
                ("iothub-connection-device-id", "dev1"),
                ("iothub-connection-auth-generation-id", "g1"),
                ("iothub-connection-auth-method", "{\"scope\":\"device\"}"),
                ("content-type", "application/json"),
                ("content-encoding", "UTF-8"),
                ("message-id", "m1"),
            ],
            &[("level", "critical")],
            br#"{"temp":31}"#,
            |json| {
                assert_eq!(
                    json,
                    serde_json::json!({
                        "EnqueuedTimeUtc": "2025-11-26T21:00:00.1230000Z",
                        "Properties": {"level": "critical"},
                        "SystemProperties": {
                            "connectionDeviceId": "dev1",
                            "connectionDeviceGenerationId": "g1",
                            "connectionAuthMethod": "{\"scope\":\"device\"}",
                            "contentType": "application/json",
                            "contentEncoding": "UTF-8",
                            "messageId": "m1",
                            "enqueuedTime": "2025-11-26T21:00:00.1230000Z",
                        },
                        "Body": {"temp": 31},
                    })
                );
            },
        );
    }

    #[test]
    fn other_bodies_are_base64() {
        // JSON content type without the utf-8 encoding: base64, as Azure does.
        with_record(
            &[("content-type", "application/json")],
            &[],
            br#"{"temp":31}"#,
            |json| assert_eq!(json["Body"], "eyJ0ZW1wIjozMX0="),
        );
        // Declared JSON that does not parse, and plain text.
        with_record(
            &[
                ("content-type", "application/json"),
                ("content-encoding", "utf-8"),
            ],
            &[],
            b"{not json",
            |json| assert_eq!(json["Body"], BASE64.encode(b"{not json")),
        );
        with_record(&[], &[], &[0xff, 0x00], |json| {
            assert_eq!(json["Body"], "/wA=");
            assert_eq!(json["Properties"], serde_json::json!({}));
            assert_eq!(
                json["SystemProperties"]["enqueuedTime"],
                "2025-11-26T21:00:00.1230000Z"
            );
        });
    }
}
