//! The property bag at the end of telemetry and C2D topics (azure-protocol.md 2.3, 2.4).
//!
//! A bag is `key=value` pairs joined by `&`, each key and value percent-encoded. Decoding is lazy:
//! [`PropertyBag`] is a `&str` view, and iterating it decodes one pair at a time into
//! `Cow<'a, str>`, which borrows unless a `%` escape is present. So the common bag
//! (`%24.ct=application%2Fjson`) costs an allocation per escaped value and a bag without escapes
//! costs none; the shard pays only for the properties it actually keeps. The decoder is as
//! tolerant as the SDKs in the wild need (checklist item 6): `$.` or `%24.` prefixes, a leading
//! `?`, one trailing `/`, keys without `=`, percent-decoding only (never `+` to space), and bytes
//! that do not decode to UTF-8 are replaced with U+FFFD as Python's `unquote` does, so a bag never
//! fails to decode.

use std::borrow::Cow;

use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

/// What the encoder escapes: everything but RFC 3986 unreserved characters, which is what
/// Python's `quote(safe="")` does and what the real hub's C2D topics show (`%24.to=%2Fdevices`).
/// It covers the characters that must be escaped for the SDK parsers: `/`, `&`, `=`.
const BAG_ESCAPED: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// The system properties a bag can carry, by their `$.` wire keys (azure-protocol.md 2.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum SystemProperty {
    /// `$.mid`
    MessageId,
    /// `$.cid`
    CorrelationId,
    /// `$.uid`
    UserId,
    /// `$.ct`, routing's `$contentType`.
    ContentType,
    /// `$.ce`, routing's `$contentEncoding`.
    ContentEncoding,
    /// `$.exp`, ISO-8601.
    AbsoluteExpiryTime,
    /// `$.on`, a module's output name.
    OutputName,
    /// `$.ifid`
    InterfaceId,
    /// `$.ctime`
    CreationTime,
    /// `$.sub`, a PnP component name.
    ComponentName,
    /// `$.schema`
    MessageSchema,
    /// `$.to`: set by the hub on C2D; ignored when a device sends it.
    To,
    /// `$.cdid`: set by the hub or edge on delivered messages.
    ConnectionDeviceId,
    /// `$.cmid`: set by the hub or edge on delivered messages.
    ConnectionModuleId,
    /// `$.diagid`
    DiagnosticId,
    /// `$.diagctx`
    DiagnosticContext,
}

impl SystemProperty {
    pub const ALL: [SystemProperty; 16] = [
        Self::MessageId,
        Self::CorrelationId,
        Self::UserId,
        Self::ContentType,
        Self::ContentEncoding,
        Self::AbsoluteExpiryTime,
        Self::OutputName,
        Self::InterfaceId,
        Self::CreationTime,
        Self::ComponentName,
        Self::MessageSchema,
        Self::To,
        Self::ConnectionDeviceId,
        Self::ConnectionModuleId,
        Self::DiagnosticId,
        Self::DiagnosticContext,
    ];

    /// The decoded key in a bag, e.g. `$.mid`.
    pub fn wire_key(self) -> &'static str {
        match self {
            Self::MessageId => "$.mid",
            Self::CorrelationId => "$.cid",
            Self::UserId => "$.uid",
            Self::ContentType => "$.ct",
            Self::ContentEncoding => "$.ce",
            Self::AbsoluteExpiryTime => "$.exp",
            Self::OutputName => "$.on",
            Self::InterfaceId => "$.ifid",
            Self::CreationTime => "$.ctime",
            Self::ComponentName => "$.sub",
            Self::MessageSchema => "$.schema",
            Self::To => "$.to",
            Self::ConnectionDeviceId => "$.cdid",
            Self::ConnectionModuleId => "$.cmid",
            Self::DiagnosticId => "$.diagid",
            Self::DiagnosticContext => "$.diagctx",
        }
    }

    /// The IoT Hub system property name (as in routing and on the Event Hubs-compatible side).
    /// Names the doc does not give (`$.on`, `$.diag*`) follow the .NET SDK's wire names.
    pub fn name(self) -> &'static str {
        match self {
            Self::MessageId => "message-id",
            Self::CorrelationId => "correlation-id",
            Self::UserId => "user-id",
            Self::ContentType => "content-type",
            Self::ContentEncoding => "content-encoding",
            Self::AbsoluteExpiryTime => "absolute-expiry-time",
            Self::OutputName => "iothub-outputname",
            Self::InterfaceId => "iothub-interface-id",
            Self::CreationTime => "iothub-creation-time-utc",
            Self::ComponentName => "dt-subject",
            Self::MessageSchema => "iothub-message-schema",
            Self::To => "to",
            Self::ConnectionDeviceId => "iothub-connection-device-id",
            Self::ConnectionModuleId => "iothub-connection-module-id",
            Self::DiagnosticId => "iothub-diag-id",
            Self::DiagnosticContext => "diag-correlation-context",
        }
    }

    /// The system property for a decoded key; `None` makes it an application property (an
    /// unknown `$.xyz` included, as the doc's table says).
    pub fn from_wire_key(key: &str) -> Option<Self> {
        // Every key of the bag goes through here: a match compiles to a length-and-bytes
        // dispatch instead of sixteen string comparisons.
        let system = match key {
            "$.mid" => Self::MessageId,
            "$.cid" => Self::CorrelationId,
            "$.uid" => Self::UserId,
            "$.ct" => Self::ContentType,
            "$.ce" => Self::ContentEncoding,
            "$.exp" => Self::AbsoluteExpiryTime,
            "$.on" => Self::OutputName,
            "$.ifid" => Self::InterfaceId,
            "$.ctime" => Self::CreationTime,
            "$.sub" => Self::ComponentName,
            "$.schema" => Self::MessageSchema,
            "$.to" => Self::To,
            "$.cdid" => Self::ConnectionDeviceId,
            "$.cmid" => Self::ConnectionModuleId,
            "$.diagid" => Self::DiagnosticId,
            "$.diagctx" => Self::DiagnosticContext,
            _ => return None,
        };
        Some(system)
    }
}

/// A property's name: a known system property or an application property.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PropertyName<'a> {
    System(SystemProperty),
    Application(Cow<'a, str>),
}

/// One decoded pair. `value` is `None` for a bare `key` and `Some("")` for `key=`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Property<'a> {
    pub name: PropertyName<'a>,
    pub value: Option<Cow<'a, str>>,
}

/// One pair as it is on the wire, before percent-decoding. Request ids (`$rid`) are echoed
/// from this form so that the response topic carries exactly the bytes the device sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawPair<'a> {
    pub key: &'a str,
    pub value: Option<&'a str>,
}

impl<'a> RawPair<'a> {
    pub fn decoded_key(&self) -> Cow<'a, str> {
        percent_decode(self.key)
    }

    pub fn decoded_value(&self) -> Option<Cow<'a, str>> {
        self.value.map(percent_decode)
    }
}

/// A property bag as received, decoded lazily.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PropertyBag<'a> {
    raw: &'a str,
}

impl<'a> PropertyBag<'a> {
    /// The bag after the topic's last fixed segment. A leading `?` (edgeHub's form) and one
    /// trailing `/` are not part of it.
    pub fn new(raw: &'a str) -> Self {
        let raw = raw.strip_prefix('?').unwrap_or(raw);
        let raw = raw.strip_suffix('/').unwrap_or(raw);
        Self { raw }
    }

    /// The bag's bytes as received (without a leading `?` or trailing `/`); their length bounds
    /// the decoded size, for the 256 KB message limit.
    pub fn raw(&self) -> &'a str {
        self.raw
    }

    pub fn is_empty(&self) -> bool {
        self.raw_pairs().next().is_none()
    }

    /// The pairs, undecoded; empty pairs (`a=1&&b=2`) are skipped.
    pub fn raw_pairs(&self) -> impl Iterator<Item = RawPair<'a>> + 'a {
        self.raw
            .split('&')
            .filter(|pair| !pair.is_empty())
            .map(|pair| match pair.split_once('=') {
                Some((key, value)) => RawPair {
                    key,
                    value: Some(value),
                },
                None => RawPair {
                    key: pair,
                    value: None,
                },
            })
    }

    /// Every property, decoded, in wire order.
    pub fn iter(&self) -> impl Iterator<Item = Property<'a>> + 'a {
        self.raw_pairs().map(|pair| {
            let key = pair.decoded_key();
            let name = match SystemProperty::from_wire_key(&key) {
                Some(system) => PropertyName::System(system),
                None => PropertyName::Application(key),
            };
            Property {
                name,
                value: pair.decoded_value(),
            }
        })
    }

    /// The application properties only, as (name, value).
    pub fn application(&self) -> impl Iterator<Item = (Cow<'a, str>, Option<Cow<'a, str>>)> + 'a {
        self.iter().filter_map(|property| match property.name {
            PropertyName::Application(name) => Some((name, property.value)),
            PropertyName::System(_) => None,
        })
    }

    /// The system properties, gathered; when a key repeats, the last value wins (as in the
    /// SDKs' dictionaries).
    pub fn system(&self) -> SystemProperties<'a> {
        let mut system = SystemProperties::default();
        for property in self.iter() {
            if let PropertyName::System(name) = property.name {
                *system.slot(name) = property.value;
            }
        }
        system
    }

    /// The value of the first pair whose decoded key is `key`, undecoded.
    pub fn raw_value(&self, key: &str) -> Option<&'a str> {
        self.raw_pairs()
            .find(|pair| pair.decoded_key() == key)
            .and_then(|pair| pair.value)
    }
}

/// The system properties of one bag, by name. A field is `None` when the bag does not carry
/// the property, or carries it without `=`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SystemProperties<'a> {
    pub message_id: Option<Cow<'a, str>>,
    pub correlation_id: Option<Cow<'a, str>>,
    pub user_id: Option<Cow<'a, str>>,
    pub content_type: Option<Cow<'a, str>>,
    pub content_encoding: Option<Cow<'a, str>>,
    pub absolute_expiry_time: Option<Cow<'a, str>>,
    pub output_name: Option<Cow<'a, str>>,
    pub interface_id: Option<Cow<'a, str>>,
    pub creation_time: Option<Cow<'a, str>>,
    pub component_name: Option<Cow<'a, str>>,
    pub message_schema: Option<Cow<'a, str>>,
    pub to: Option<Cow<'a, str>>,
    pub connection_device_id: Option<Cow<'a, str>>,
    pub connection_module_id: Option<Cow<'a, str>>,
    pub diagnostic_id: Option<Cow<'a, str>>,
    pub diagnostic_context: Option<Cow<'a, str>>,
}

impl<'a> SystemProperties<'a> {
    fn slot(&mut self, property: SystemProperty) -> &mut Option<Cow<'a, str>> {
        match property {
            SystemProperty::MessageId => &mut self.message_id,
            SystemProperty::CorrelationId => &mut self.correlation_id,
            SystemProperty::UserId => &mut self.user_id,
            SystemProperty::ContentType => &mut self.content_type,
            SystemProperty::ContentEncoding => &mut self.content_encoding,
            SystemProperty::AbsoluteExpiryTime => &mut self.absolute_expiry_time,
            SystemProperty::OutputName => &mut self.output_name,
            SystemProperty::InterfaceId => &mut self.interface_id,
            SystemProperty::CreationTime => &mut self.creation_time,
            SystemProperty::ComponentName => &mut self.component_name,
            SystemProperty::MessageSchema => &mut self.message_schema,
            SystemProperty::To => &mut self.to,
            SystemProperty::ConnectionDeviceId => &mut self.connection_device_id,
            SystemProperty::ConnectionModuleId => &mut self.connection_module_id,
            SystemProperty::DiagnosticId => &mut self.diagnostic_id,
            SystemProperty::DiagnosticContext => &mut self.diagnostic_context,
        }
    }
}

/// Percent-decoding only: `+` stays `+`. Borrows unless an escape is present.
///
/// Without a `%` the text is returned as is: it is already UTF-8, and skipping the crate's
/// byte-by-byte scan and re-validation halves the cost of a bag walk.
fn percent_decode(text: &str) -> Cow<'_, str> {
    if !text.as_bytes().contains(&b'%') {
        return Cow::Borrowed(text);
    }
    percent_decode_str(text).decode_utf8_lossy()
}

/// Appends a bag to a topic being built, escaping keys and values (azure-protocol.md 2.4:
/// null value -> `key`, empty -> `key=`, else `key=value`).
#[derive(Debug)]
pub struct PropertyBagWriter<'o> {
    out: &'o mut String,
    pair_count: usize,
}

impl<'o> PropertyBagWriter<'o> {
    /// Starts a bag at the end of `out`, which holds the topic up to and including its `/`.
    pub fn new(out: &'o mut String) -> Self {
        Self { out, pair_count: 0 }
    }

    pub fn system(&mut self, property: SystemProperty, value: Option<&str>) -> &mut Self {
        self.pair(property.wire_key(), value)
    }

    pub fn application(&mut self, name: &str, value: Option<&str>) -> &mut Self {
        self.pair(name, value)
    }

    fn pair(&mut self, key: &str, value: Option<&str>) -> &mut Self {
        if self.pair_count > 0 {
            self.out.push('&');
        }
        self.pair_count += 1;
        self.out.extend(utf8_percent_encode(key, BAG_ESCAPED));
        if let Some(value) = value {
            self.out.push('=');
            self.out.extend(utf8_percent_encode(value, BAG_ESCAPED));
        }
        self
    }
}

/// Appends `text` escaped as in a bag (used for a method name in a topic segment).
pub(super) fn push_escaped(out: &mut String, text: &str) {
    out.extend(utf8_percent_encode(text, BAG_ESCAPED));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decoded(raw: &str) -> Vec<(String, Option<String>)> {
        PropertyBag::new(raw)
            .iter()
            .map(|p| {
                let name = match p.name {
                    PropertyName::System(system) => format!("system:{}", system.name()),
                    PropertyName::Application(name) => name.into_owned(),
                };
                (name, p.value.map(Cow::into_owned))
            })
            .collect()
    }

    fn pairs(expected: &[(&str, Option<&str>)]) -> Vec<(String, Option<String>)> {
        expected
            .iter()
            .map(|(k, v)| (k.to_string(), v.map(str::to_string)))
            .collect()
    }

    #[test]
    #[allow(clippy::type_complexity)] // The row type reads best spelled out.
    fn decodes_bags_from_the_protocol_reference() {
        let table: &[(&str, &[(&str, Option<&str>)])] = &[
            // azure-protocol.md 2.3: the Python SDK's bag.
            (
                "%24.mid=id%201&%24.cid=c%2F1&%24.ct=application%2Fjson&%24.ce=utf-8\
                 &temp%20alert=a%26b%3Dc&z=1",
                &[
                    ("system:message-id", Some("id 1")),
                    ("system:correlation-id", Some("c/1")),
                    ("system:content-type", Some("application/json")),
                    ("system:content-encoding", Some("utf-8")),
                    ("temp alert", Some("a&b=c")),
                    ("z", Some("1")),
                ],
            ),
            // Section 11 sequence A telemetry.
            (
                "%24.ct=application%2Fjson&%24.ce=utf-8",
                &[
                    ("system:content-type", Some("application/json")),
                    ("system:content-encoding", Some("utf-8")),
                ],
            ),
            // Literal `$.` as in the docs' samples; `+` is not a space.
            (
                "$.ct=text%2Fplain&$.uid=a+b&$.exp=2030-01-01T00:00:00Z",
                &[
                    ("system:content-type", Some("text/plain")),
                    ("system:user-id", Some("a+b")),
                    ("system:absolute-expiry-time", Some("2030-01-01T00:00:00Z")),
                ],
            ),
            // edgeHub's leading `?`, a trailing `/`, missing `=`, empty value, empty pair.
            (
                "?food=pizza&&flag&empty=/",
                &[("food", Some("pizza")), ("flag", None), ("empty", Some(""))],
            ),
            // Section 2.4 C2D example: bare system keys.
            (
                "iothub-ack=Full&%24.to=%2Fdevices%2Fdev%2Fmessages%2FdeviceBound&%24.cid&%24.uid",
                &[
                    ("iothub-ack", Some("Full")),
                    ("system:to", Some("/devices/dev/messages/deviceBound")),
                    ("system:correlation-id", None),
                    ("system:user-id", None),
                ],
            ),
            // Module and PnP keys, an unknown `$.` key (application), `%24` spelled in lower case.
            (
                "%24.on=out1&%24.ifid=urn%3Aa&%24.sub=thermo&%24.schema=s&%24.ctime=t&%24.xyz=1\
                 &%24%2emid=m",
                &[
                    ("system:iothub-outputname", Some("out1")),
                    ("system:iothub-interface-id", Some("urn:a")),
                    ("system:dt-subject", Some("thermo")),
                    ("system:iothub-message-schema", Some("s")),
                    ("system:iothub-creation-time-utc", Some("t")),
                    ("$.xyz", Some("1")),
                    ("system:message-id", Some("m")),
                ],
            ),
            ("", &[]),
            ("/", &[]),
            ("?", &[]),
            // Broken escapes stay literal; bytes that are not UTF-8 become U+FFFD.
            (
                "a=%zz&b=%ff",
                &[("a", Some("%zz")), ("b", Some("\u{fffd}"))],
            ),
        ];
        for &(raw, expected) in table {
            assert_eq!(decoded(raw), pairs(expected), "{raw:?}");
        }
    }

    #[test]
    fn splits_system_and_application_properties() {
        let bag = PropertyBag::new("%24.mid=1&%24.ct=a%2Fb&color=red&%24.mid=2&n");
        let system = bag.system();
        assert_eq!(
            system.message_id.as_deref(),
            Some("2"),
            "the last value wins"
        );
        assert_eq!(system.content_type.as_deref(), Some("a/b"));
        assert_eq!(system.correlation_id, None);
        let application: Vec<_> = bag.application().collect();
        assert_eq!(
            application,
            vec![
                (Cow::Borrowed("color"), Some(Cow::Borrowed("red"))),
                (Cow::Borrowed("n"), None)
            ]
        );
        assert!(!bag.is_empty());
        assert!(PropertyBag::new("&&").is_empty());
    }

    #[test]
    fn decoding_borrows_unless_escaped() {
        let bag = PropertyBag::new("$.ct=json&a=b&c%20d=e");
        let properties: Vec<_> = bag.iter().collect();
        assert!(matches!(
            properties.first().and_then(|p| p.value.as_ref()),
            Some(Cow::Borrowed(_))
        ));
        assert!(matches!(
            properties.get(2).map(|p| &p.name),
            Some(PropertyName::Application(Cow::Owned(_)))
        ));
    }

    #[test]
    fn wire_keys_are_unique_and_round_trip() {
        for property in SystemProperty::ALL {
            assert_eq!(
                SystemProperty::from_wire_key(property.wire_key()),
                Some(property)
            );
        }
        assert_eq!(
            SystemProperty::from_wire_key("%24.mid"),
            None,
            "keys match after decoding"
        );
    }

    /// Random keys and values over the characters that matter to the format: whatever the
    /// writer escapes, the decoder reads back exactly, and no input makes a parser panic.
    #[test]
    fn random_bags_round_trip_and_never_panic() {
        const ALPHABET: &[&str] = &[
            "a", "Z", "0", "%", "&", "=", "/", "+", " ", "$", ".", "?", "#", "\u{e9}", "%2", "%24.",
        ];
        struct Prng(u64);
        impl Prng {
            fn below(&mut self, bound: usize) -> usize {
                self.0 ^= self.0 << 13;
                self.0 ^= self.0 >> 7;
                self.0 ^= self.0 << 17;
                (self.0 % bound as u64) as usize
            }
            fn text(&mut self, len_min: usize) -> String {
                let len = len_min + self.below(6);
                (0..len)
                    .map(|_| {
                        ALPHABET
                            .get(self.below(ALPHABET.len()))
                            .copied()
                            .unwrap_or("a")
                    })
                    .collect()
            }
        }
        let mut prng = Prng(0x5eed);
        for round in 0..20_000 {
            let pairs: Vec<(String, Option<String>)> = (0..3)
                .map(|_| {
                    let key = prng.text(1);
                    let value = if prng.below(4) == 0 {
                        None
                    } else {
                        Some(prng.text(0))
                    };
                    (key, value)
                })
                .collect();
            let mut bag = String::new();
            let mut writer = PropertyBagWriter::new(&mut bag);
            for (key, value) in &pairs {
                writer.application(key, value.as_deref());
            }
            let decoded: Vec<(String, Option<String>)> = PropertyBag::new(&bag)
                .raw_pairs()
                .map(|pair| {
                    let key = pair.decoded_key().into_owned();
                    (key, pair.decoded_value().map(Cow::into_owned))
                })
                .collect();
            assert_eq!(decoded, pairs, "round {round}: {bag:?}");
            // The raw text itself, unescaped, as a device might send it.
            let raw = prng.text(0) + &prng.text(0);
            let _ = PropertyBag::new(&raw).iter().count();
            let _ = PropertyBag::new(&raw).system();
            let identity = crate::iothub::Identity {
                device_id: "d",
                module_id: None,
            };
            let _ = crate::iothub::PublishTopic::parse(&raw, identity);
            let _ = crate::iothub::Subscription::parse(&raw, identity);
            let _ = crate::iothub::Username::parse(&raw);
        }
    }

    #[test]
    fn encodes_c2d_bags_as_the_hub_does() {
        let mut topic = String::from("devices/dev1/messages/devicebound/");
        PropertyBagWriter::new(&mut topic)
            .system(SystemProperty::MessageId, Some("m1"))
            .system(
                SystemProperty::To,
                Some("/devices/dev1/messages/deviceBound"),
            )
            .system(SystemProperty::CorrelationId, None)
            .application("color", Some("red"))
            .application("a/b&c=d", Some("x=y&z/w"))
            .application("empty", Some(""))
            .application("sp ace", Some("caf\u{e9}+"));
        assert_eq!(
            topic,
            "devices/dev1/messages/devicebound/%24.mid=m1\
             &%24.to=%2Fdevices%2Fdev1%2Fmessages%2FdeviceBound&%24.cid&color=red\
             &a%2Fb%26c%3Dd=x%3Dy%26z%2Fw&empty=&sp%20ace=caf%C3%A9%2B"
        );
        // What the writer produces, the decoder reads back exactly.
        let bag = PropertyBag::new(
            topic
                .strip_prefix("devices/dev1/messages/devicebound/")
                .expect("prefix"),
        );
        let application: Vec<_> = bag.application().collect();
        assert_eq!(
            application,
            vec![
                (Cow::Borrowed("color"), Some(Cow::Borrowed("red"))),
                (
                    Cow::Owned("a/b&c=d".into()),
                    Some(Cow::Owned("x=y&z/w".into()))
                ),
                (Cow::Borrowed("empty"), Some(Cow::Borrowed(""))),
                (
                    Cow::Owned("sp ace".into()),
                    Some(Cow::Owned("caf\u{e9}+".into()))
                ),
            ]
        );
        assert_eq!(
            bag.system().to.as_deref(),
            Some("/devices/dev1/messages/deviceBound")
        );
    }
}
