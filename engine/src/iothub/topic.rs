//! IoT Hub's MQTT topics (azure-protocol.md 2.2, 2.5, 2.6): what a device may publish to, what it
//! may subscribe to, and the topics the hub publishes on.
//!
//! Topics are parsed against the connection's [`Identity`], so the shard never sees a telemetry
//! topic without knowing it is the device's own: `devices/{id}/...` of anyone else is
//! [`PublishTopic::Foreign`], and the `$iothub/...` topics are implicitly the connection's. The
//! parser only slices the topic; the property bag is decoded later, lazily, by whoever needs it.
//! Request ids are kept as sent and echoed verbatim, since the SDKs match them byte for byte.

use std::fmt::Write as _;

use super::property_bag::{self, PropertyBag};
use super::Identity;
use crate::mqtt::{QoS, SubackCode};

/// A topic a device publishes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishTopic<'a> {
    /// `devices/{d}/messages/events/{bag}` from a device, or
    /// `devices/{d}/modules/{m}/messages/events/{bag}` from a module, of the connection's own
    /// identity.
    Telemetry { properties: PropertyBag<'a> },
    /// `$iothub/twin/GET/?$rid={rid}`; the body is to be ignored.
    TwinGet { rid: &'a str },
    /// `$iothub/twin/PATCH/properties/reported/?$rid={rid}[&$version={v}]`.
    TwinReportedPatch { rid: &'a str, version: Option<u64> },
    /// `$iothub/methods/res/{status}/?$rid={rid}`.
    MethodResponse { status: i32, rid: &'a str },
    /// A telemetry topic of another device or module, or of the wrong form for this
    /// connection (a module using the device form). The hub closes the connection.
    Foreign,
    /// Anything else, including a `$iothub` topic without its `$rid`. The hub closes the
    /// connection (azure-protocol.md 9.3).
    Unknown,
}

impl<'a> PublishTopic<'a> {
    pub fn parse(topic: &'a str, identity: Identity<'_>) -> Self {
        if let Some(rest) = topic.strip_prefix("devices/") {
            return Self::parse_telemetry(rest, identity);
        }
        if let Some(rest) = topic.strip_prefix("$iothub/") {
            return Self::parse_iothub(rest).unwrap_or(Self::Unknown);
        }
        Self::Unknown
    }

    fn parse_telemetry(rest: &'a str, identity: Identity<'_>) -> Self {
        let Some((device_id, rest)) = rest.split_once('/') else {
            return Self::Unknown;
        };
        let (module_id, rest) = match rest.strip_prefix("modules/") {
            Some(rest) => match rest.split_once('/') {
                Some((module_id, rest)) => (Some(module_id), rest),
                None => return Self::Unknown,
            },
            None => (None, rest),
        };
        let Some(bag) = rest.strip_prefix("messages/events") else {
            return Self::Unknown;
        };
        let bag = match bag.strip_prefix('/') {
            Some(bag) => bag,
            None if bag.is_empty() => bag,
            None => return Self::Unknown,
        };
        if device_id != identity.device_id || module_id != identity.module_id {
            return Self::Foreign;
        }
        Self::Telemetry {
            properties: PropertyBag::new(bag),
        }
    }

    fn parse_iothub(rest: &'a str) -> Option<Self> {
        if let Some(query) = rest.strip_prefix("twin/GET") {
            let query = query_of(query)?;
            return Some(Self::TwinGet {
                rid: rid_of(query)?,
            });
        }
        if let Some(query) = rest.strip_prefix("twin/PATCH/properties/reported") {
            let query = query_of(query)?;
            let rid = rid_of(query)?;
            let version = match query.raw_value("$version") {
                Some(version) => Some(version.parse().ok()?),
                None => None,
            };
            return Some(Self::TwinReportedPatch { rid, version });
        }
        if let Some(rest) = rest.strip_prefix("methods/res/") {
            let (status, query) = match rest.split_once('/') {
                Some((status, query)) => (status, query),
                None => rest.split_once('?')?,
            };
            let query = PropertyBag::new(query);
            return Some(Self::MethodResponse {
                status: status.parse().ok()?,
                rid: rid_of(query)?,
            });
        }
        None
    }
}

/// The query after a fixed topic path: `/?{query}` (what the SDKs send) or `?{query}`.
fn query_of(rest: &str) -> Option<PropertyBag<'_>> {
    let rest = rest.strip_prefix('/').unwrap_or(rest);
    rest.strip_prefix('?').map(PropertyBag::new)
}

/// The request id, as sent; `%24rid` is accepted for `$rid` like `%24.` is in bags.
fn rid_of(query: PropertyBag<'_>) -> Option<&str> {
    query.raw_value("$rid")
}

/// A subscription filter the hub supports for a device or module (azure-protocol.md 2.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Subscription {
    /// `devices/{d}/messages/devicebound/#`, devices only: modules receive no C2D.
    CloudToDevice,
    /// `devices/{d}/modules/{m}/inputs/#` (Python) or `devices/{d}/modules/{m}/#` (C SDK),
    /// modules only.
    ModuleInputs,
    /// `$iothub/twin/res/#`
    TwinResponses,
    /// `$iothub/twin/PATCH/properties/desired/#`
    TwinDesiredPatches,
    /// `$iothub/methods/POST/#`
    MethodRequests,
}

impl Subscription {
    /// The subscription `filter` stands for, or `None` for a filter the hub refuses (another
    /// identity's topics, any wildcard use other than the documented trailing `#`).
    pub fn parse(filter: &str, identity: Identity<'_>) -> Option<Self> {
        match filter {
            "$iothub/twin/res/#" => return Some(Self::TwinResponses),
            "$iothub/twin/PATCH/properties/desired/#" => return Some(Self::TwinDesiredPatches),
            "$iothub/methods/POST/#" => return Some(Self::MethodRequests),
            _ => {}
        }
        let rest = filter
            .strip_prefix("devices/")?
            .strip_prefix(identity.device_id)?;
        let rest = rest.strip_prefix('/')?;
        match identity.module_id {
            None => (rest == "messages/devicebound/#").then_some(Self::CloudToDevice),
            Some(module_id) => {
                let rest = rest.strip_prefix("modules/")?.strip_prefix(module_id)?;
                matches!(rest, "/inputs/#" | "/#").then_some(Self::ModuleInputs)
            }
        }
    }

    /// The SUBACK return code for `filter`: `min(requested, 1)` when supported, 0x80 otherwise.
    pub fn suback_code(filter: &str, requested: QoS, identity: Identity<'_>) -> SubackCode {
        match Self::parse(filter, identity) {
            Some(_) => SubackCode::Granted(requested.min(QoS::AtLeastOnce)),
            None => SubackCode::Failure,
        }
    }
}

/// Appends `$iothub/twin/res/{status}/?$rid={rid}[&$version={version}]`, the exact form the C
/// and Python SDKs parse (checklist item 5).
pub fn push_twin_response_topic(out: &mut String, status: u16, rid: &str, version: Option<u64>) {
    let _ = write!(out, "$iothub/twin/res/{status}/?$rid={rid}");
    if let Some(version) = version {
        let _ = write!(out, "&$version={version}");
    }
}

/// Appends `$iothub/twin/PATCH/properties/desired/?$version={version}`.
pub fn push_desired_patch_topic(out: &mut String, version: u64) {
    let _ = write!(
        out,
        "$iothub/twin/PATCH/properties/desired/?$version={version}"
    );
}

/// Appends `$iothub/methods/POST/{method}/?$rid={rid}`. The method name is escaped like a bag
/// value so that a `/` in it cannot move the rid out of segment 4 (Python percent-decodes it).
pub fn push_method_request_topic(out: &mut String, method_name: &str, rid: &str) {
    out.push_str("$iothub/methods/POST/");
    property_bag::push_escaped(out, method_name);
    let _ = write!(out, "/?$rid={rid}");
}

/// Appends `devices/{d}/messages/devicebound/`; a [`property_bag::PropertyBagWriter`] on `out`
/// then appends the bag.
pub fn push_c2d_topic_prefix(out: &mut String, device_id: &str) {
    let _ = write!(out, "devices/{device_id}/messages/devicebound/");
}

/// Appends `devices/{d}/modules/{m}/inputs/{input}/`, before a bag.
pub fn push_module_input_topic_prefix(
    out: &mut String,
    device_id: &str,
    module_id: &str,
    input: &str,
) {
    let _ = write!(out, "devices/{device_id}/modules/{module_id}/inputs/");
    property_bag::push_escaped(out, input);
    out.push('/');
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iothub::property_bag::PropertyBagWriter;

    const DEV1: Identity<'static> = Identity {
        device_id: "dev1",
        module_id: None,
    };
    const MOD1: Identity<'static> = Identity {
        device_id: "dev1",
        module_id: Some("mod1"),
    };

    /// Topics with the identity they are published from and the expected parse (the telemetry
    /// variant as its raw bag).
    #[test]
    fn parses_device_publish_topics() {
        #[derive(Debug, PartialEq)]
        enum Expect<'a> {
            Telemetry(&'a str),
            TwinGet(&'a str),
            Patch(&'a str, Option<u64>),
            MethodResponse(i32, &'a str),
            Foreign,
            Unknown,
        }
        use Expect::*;
        let table: &[(&str, Identity<'_>, Expect<'_>)] = &[
            // Section 11 sequence A, as the Python SDK sends them.
            (
                "devices/dev1/messages/events/%24.ct=application%2Fjson&%24.ce=utf-8",
                DEV1,
                Telemetry("%24.ct=application%2Fjson&%24.ce=utf-8"),
            ),
            (
                "$iothub/twin/GET/?$rid=6f1c-uuid",
                DEV1,
                TwinGet("6f1c-uuid"),
            ),
            (
                "$iothub/twin/PATCH/properties/reported/?$rid=77",
                DEV1,
                Patch("77", None),
            ),
            (
                "$iothub/twin/PATCH/properties/reported/?$rid=a&$version=5",
                DEV1,
                Patch("a", Some(5)),
            ),
            (
                "$iothub/methods/res/200/?$rid=1",
                DEV1,
                MethodResponse(200, "1"),
            ),
            (
                "$iothub/methods/res/-1/?$rid=x",
                MOD1,
                MethodResponse(-1, "x"),
            ),
            // Tolerated spellings.
            ("devices/dev1/messages/events/", DEV1, Telemetry("")),
            ("devices/dev1/messages/events", DEV1, Telemetry("")),
            (
                "devices/dev1/messages/events/?food=pizza",
                DEV1,
                Telemetry("food=pizza"),
            ),
            ("devices/dev1/messages/events/a=1/", DEV1, Telemetry("a=1")),
            ("$iothub/twin/GET?$rid=2", DEV1, TwinGet("2")),
            ("$iothub/twin/GET/?%24rid=3", DEV1, TwinGet("3")),
            (
                "$iothub/methods/res/404?$rid=9",
                DEV1,
                MethodResponse(404, "9"),
            ),
            // Modules.
            (
                "devices/dev1/modules/mod1/messages/events/%24.on=out1",
                MOD1,
                Telemetry("%24.on=out1"),
            ),
            ("devices/dev1/modules/mod1/messages/events/", DEV1, Foreign),
            ("devices/dev1/messages/events/", MOD1, Foreign),
            ("devices/dev1/modules/mod2/messages/events/", MOD1, Foreign),
            // Other devices.
            ("devices/dev2/messages/events/", DEV1, Foreign),
            ("devices/dev/messages/events/", DEV1, Foreign),
            ("devices/dev10/messages/events/", DEV1, Foreign),
            // Everything else.
            ("devices/dev1/messages/eventsx", DEV1, Unknown),
            ("devices/dev1/messages/devicebound/", DEV1, Unknown),
            ("devices/dev1", DEV1, Unknown),
            ("devices/dev1/modules/mod1", MOD1, Unknown),
            ("$iothub/twin/GET/", DEV1, Unknown),
            ("$iothub/twin/GET/?x=1", DEV1, Unknown),
            (
                "$iothub/twin/PATCH/properties/reported/?$rid=1&$version=v",
                DEV1,
                Unknown,
            ),
            (
                "$iothub/twin/PATCH/properties/desired/?$rid=1",
                DEV1,
                Unknown,
            ),
            ("$iothub/methods/res/abc/?$rid=1", DEV1, Unknown),
            ("$iothub/methods/res/200/", DEV1, Unknown),
            ("$iothub/methods/POST/reboot/?$rid=1", DEV1, Unknown),
            ("a/b", DEV1, Unknown),
            ("", DEV1, Unknown),
        ];
        for (topic, identity, expected) in table {
            let actual = match PublishTopic::parse(topic, *identity) {
                PublishTopic::Telemetry { properties } => Telemetry(properties.raw()),
                PublishTopic::TwinGet { rid } => TwinGet(rid),
                PublishTopic::TwinReportedPatch { rid, version } => Patch(rid, version),
                PublishTopic::MethodResponse { status, rid } => MethodResponse(status, rid),
                PublishTopic::Foreign => Foreign,
                PublishTopic::Unknown => Unknown,
            };
            assert_eq!(&actual, expected, "{topic:?} from {identity:?}");
        }
    }

    #[test]
    fn grants_documented_filters_only() {
        let q1 = QoS::AtLeastOnce;
        let granted1 = SubackCode::Granted(QoS::AtLeastOnce);
        let table: &[(&str, Identity<'_>, QoS, SubackCode)] = &[
            ("devices/dev1/messages/devicebound/#", DEV1, q1, granted1),
            ("$iothub/twin/res/#", DEV1, q1, granted1),
            (
                "$iothub/twin/PATCH/properties/desired/#",
                DEV1,
                q1,
                granted1,
            ),
            ("$iothub/methods/POST/#", DEV1, q1, granted1),
            // C SDK subscribes at QoS 0; QoS 2 is granted as 1 [azure-protocol.md 2.1].
            (
                "$iothub/twin/res/#",
                DEV1,
                QoS::AtMostOnce,
                SubackCode::Granted(QoS::AtMostOnce),
            ),
            ("$iothub/methods/POST/#", DEV1, QoS::ExactlyOnce, granted1),
            ("devices/dev1/modules/mod1/inputs/#", MOD1, q1, granted1),
            ("devices/dev1/modules/mod1/#", MOD1, q1, granted1),
            ("$iothub/twin/res/#", MOD1, q1, granted1),
            ("$iothub/methods/POST/#", MOD1, q1, granted1),
            // Refused: other identities, C2D for modules, inputs for devices, other wildcards.
            (
                "devices/dev2/messages/devicebound/#",
                DEV1,
                q1,
                SubackCode::Failure,
            ),
            (
                "devices/dev10/messages/devicebound/#",
                DEV1,
                q1,
                SubackCode::Failure,
            ),
            (
                "devices/dev/messages/devicebound/#",
                DEV1,
                q1,
                SubackCode::Failure,
            ),
            (
                "devices/dev1/messages/devicebound/#",
                MOD1,
                q1,
                SubackCode::Failure,
            ),
            (
                "devices/dev1/modules/mod1/inputs/#",
                DEV1,
                q1,
                SubackCode::Failure,
            ),
            (
                "devices/dev1/modules/mod2/inputs/#",
                MOD1,
                q1,
                SubackCode::Failure,
            ),
            (
                "devices/+/messages/devicebound/#",
                DEV1,
                q1,
                SubackCode::Failure,
            ),
            (
                "devices/dev1/messages/devicebound/+",
                DEV1,
                q1,
                SubackCode::Failure,
            ),
            ("devices/dev1/#", DEV1, q1, SubackCode::Failure),
            ("$iothub/#", DEV1, q1, SubackCode::Failure),
            ("#", DEV1, q1, SubackCode::Failure),
            ("$iothub/twin/res/200", DEV1, q1, SubackCode::Failure),
        ];
        for &(filter, identity, requested, expected) in table {
            assert_eq!(
                Subscription::suback_code(filter, requested, identity),
                expected,
                "{filter:?} from {identity:?}"
            );
        }
    }

    #[test]
    fn writes_hub_topics_exactly() {
        let mut topic = String::new();
        push_twin_response_topic(&mut topic, 200, "6f1c-uuid", None);
        assert_eq!(topic, "$iothub/twin/res/200/?$rid=6f1c-uuid");
        topic.clear();
        push_twin_response_topic(&mut topic, 204, "ho", Some(88));
        assert_eq!(topic, "$iothub/twin/res/204/?$rid=ho&$version=88");
        topic.clear();
        push_desired_patch_topic(&mut topic, 8);
        assert_eq!(topic, "$iothub/twin/PATCH/properties/desired/?$version=8");
        topic.clear();
        push_method_request_topic(&mut topic, "reboot", "1");
        assert_eq!(topic, "$iothub/methods/POST/reboot/?$rid=1");
        topic.clear();
        push_method_request_topic(&mut topic, "a/b c", "2");
        assert_eq!(topic, "$iothub/methods/POST/a%2Fb%20c/?$rid=2");
        topic.clear();
        push_c2d_topic_prefix(&mut topic, "dev1");
        PropertyBagWriter::new(&mut topic)
            .system(crate::iothub::SystemProperty::MessageId, Some("m1"))
            .system(
                crate::iothub::SystemProperty::To,
                Some("/devices/dev1/messages/deviceBound"),
            )
            .application("color", Some("red"));
        // Section 11 sequence A's C2D delivery, byte for byte.
        assert_eq!(
            topic,
            "devices/dev1/messages/devicebound/%24.mid=m1\
             &%24.to=%2Fdevices%2Fdev1%2Fmessages%2FdeviceBound&color=red"
        );
        topic.clear();
        push_module_input_topic_prefix(&mut topic, "dev1", "mod1", "in1");
        assert_eq!(topic, "devices/dev1/modules/mod1/inputs/in1/");
    }

    #[test]
    fn a_device_parses_what_the_hub_writes() {
        // The twin response a device receives carries the rid it sent, unchanged.
        let sent = "$iothub/twin/GET/?$rid=6f1c-uuid";
        let PublishTopic::TwinGet { rid } = PublishTopic::parse(sent, DEV1) else {
            panic!("not a twin GET");
        };
        let mut response = String::new();
        push_twin_response_topic(&mut response, 200, rid, None);
        assert_eq!(response, "$iothub/twin/res/200/?$rid=6f1c-uuid");
    }
}
