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
use ingot_engine::store::{ArchivedMessage, ArchivedProperty, Record};
use serde_json::Value;

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

/// Appends the record's JSON object (one line of a `files` endpoint, one element of a webhook
/// batch) to `out`, without a line break. Written directly, not through a `serde_json::Value`:
/// this runs for every delivered message. A property named twice keeps its last value, as a
/// JSON object would.
pub fn write_record(record: &Record<'_>, out: &mut Vec<u8>) {
    let message = record.message;
    let enqueued = utc_time(record.enqueued_time_ms);
    out.extend_from_slice(b"{\"EnqueuedTimeUtc\":\"");
    out.extend_from_slice(enqueued.as_bytes());
    out.extend_from_slice(b"\",\"Properties\":");
    write_properties(message.application_properties(), |n| n, out);
    out.extend_from_slice(b",\"SystemProperties\":");
    let system = message.system_properties();
    write_properties(system, azure_system_name, out);
    // Azure always carries the enqueued time; the record's header has it when the stored
    // properties do not.
    if !system
        .iter()
        .any(|p| p.name() == property_name::ENQUEUED_TIME)
    {
        out.pop();
        if !system.is_empty() {
            out.push(b',');
        }
        out.extend_from_slice(b"\"enqueuedTime\":\"");
        out.extend_from_slice(enqueued.as_bytes());
        out.extend_from_slice(b"\"}");
    }
    out.extend_from_slice(b",\"Body\":");
    write_body(message, out);
    out.push(b'}');
}

fn write_properties(
    properties: &[ArchivedProperty],
    rename: impl Fn(&str) -> &str,
    out: &mut Vec<u8>,
) {
    out.push(b'{');
    let mut first = true;
    for (i, p) in properties.iter().enumerate() {
        if properties[i + 1..].iter().any(|q| q.name() == p.name()) {
            continue;
        }
        if !first {
            out.push(b',');
        }
        first = false;
        write_string(rename(p.name()), out);
        out.push(b':');
        write_string(p.value(), out);
    }
    out.push(b'}');
}

fn write_string(text: &str, out: &mut Vec<u8>) {
    // Writing a string into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, text);
}

/// The JSON object of a record (tests and tools; delivery writes bytes with [`write_record`]).
pub fn record_json(record: &Record<'_>) -> Value {
    let mut out = Vec::new();
    write_record(record, &mut out);
    serde_json::from_slice(&out).unwrap_or(Value::Null)
}

fn is_json_body(message: &ArchivedMessage) -> bool {
    message
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
            })
}

fn write_body(message: &ArchivedMessage, out: &mut Vec<u8>) {
    let body = message.body();
    if is_json_body(message) {
        if !body.contains(&b'\n') && !body.contains(&b'\r') {
            // Valid JSON on one line: the device's own text, as it sent it.
            if serde_json::from_slice::<serde::de::IgnoredAny>(body).is_ok() {
                out.extend_from_slice(body.trim_ascii());
                return;
            }
        } else if let Ok(value) = serde_json::from_slice::<Value>(body) {
            // Over several lines: made compact, so that a record stays one line.
            let _ = serde_json::to_writer(&mut *out, &value);
            return;
        }
    }
    out.push(b'"');
    let start = out.len();
    out.resize(
        start + base64::encoded_len(body.len(), true).unwrap_or(0),
        0,
    );
    let written = BASE64.encode_slice(body, &mut out[start..]).unwrap_or(0);
    out.truncate(start + written);
    out.push(b'"');
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

    #[test]
    fn records_are_one_line_of_valid_json_whatever_the_message() {
        // Pretty-printed JSON is made compact; escapes, a property named twice, and a stored
        // enqueued time.
        with_record(
            &[
                ("content-type", "application/json; charset=utf-8"),
                ("content-encoding", "utf-8"),
                ("iothub-enqueuedtime", "2025-01-01T00:00:00.0000000Z"),
            ],
            &[("q", "say \"hi\"\nbye"), ("dup", "1"), ("dup", "2")],
            b"{\n  \"a\": [1, 2],\r\n  \"b\": \"x\"\n}",
            |json| {
                assert_eq!(json["Body"], serde_json::json!({"a": [1, 2], "b": "x"}));
                assert_eq!(json["Properties"]["q"], "say \"hi\"\nbye");
                assert_eq!(json["Properties"]["dup"], "2");
                assert_eq!(
                    json["SystemProperties"]["enqueuedTime"],
                    "2025-01-01T00:00:00.0000000Z"
                );
            },
        );
        let dir = tempfile::tempdir().unwrap();
        let mut config = StoreConfig::new(1);
        config.segment_bytes_max = 1 << 20;
        let mut store = Store::open(dir.path(), config).unwrap();
        let bodies: [&[u8]; 4] = [b" [1,2] ", b"{\"a\":\n1}", b"", b"\xff\xfe"];
        let system = [
            PropertyRef {
                name: "content-type",
                value: "application/json",
            },
            PropertyRef {
                name: "content-encoding",
                value: "utf-8",
            },
        ];
        for body in bodies {
            let message = MessageRef {
                system_properties: &system,
                application_properties: &[],
                body,
            };
            store.append_batch(PartitionId(0), &[message], 1).unwrap();
        }
        drop(store);
        let reader = Reader::open(dir.path()).unwrap();
        let mut partition = reader.partition(PartitionId(0), StartAt::Start).unwrap();
        let mut seen = Vec::new();
        while let Some(record) = partition.next().unwrap() {
            let mut out = Vec::new();
            write_record(&record, &mut out);
            assert!(!out.contains(&b'\n'), "{}", String::from_utf8_lossy(&out));
            let value: Value = serde_json::from_slice(&out).unwrap();
            seen.push(value["Body"].clone());
        }
        assert_eq!(
            seen,
            [
                serde_json::json!([1, 2]),
                serde_json::json!({"a": 1}),
                serde_json::json!(""),
                serde_json::json!("//4="),
            ]
        );
    }
}
