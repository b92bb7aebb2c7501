//! What a route condition reads from a message: the [`MessageView`] trait, an implementation
//! over the store's borrowed and archived messages, and the `$body` content-type rules.

use crate::store::format::{property_name, ArchivedMessage, MessageRef, PropertyRef};

/// The parts of a message a condition reads. The evaluator calls these a few times per
/// condition; an ingest message has a handful of properties, so linear scans are fine.
pub trait MessageView {
    /// The system property with this stored name (`store::format::property_name`), compared
    /// exactly: the hub writes these names itself.
    fn system_property(&self, name: &str) -> Option<&str>;

    /// The application property whose name equals `lowercase_name` ignoring case (compare with
    /// [`eq_ignore_case`]). When several match, the first.
    fn application_property(&self, lowercase_name: &str) -> Option<&str>;

    /// The body bytes as the device sent them.
    fn body(&self) -> &[u8];

    /// The sending device's (or module's) twin as the REST API shows it (`tags`, `properties`),
    /// or `None`, which makes every `$twin` reference undefined.
    fn twin(&self) -> Option<&serde_json::Value> {
        None
    }
}

/// Whether `name` equals `lowercase` (already lowercased) ignoring case, without allocating.
#[inline]
pub fn eq_ignore_case(name: &str, lowercase: &str) -> bool {
    if name.is_ascii() && lowercase.is_ascii() {
        name.eq_ignore_ascii_case(lowercase)
    } else {
        name.chars()
            .flat_map(char::to_lowercase)
            .eq(lowercase.chars())
    }
}

fn find_exact<'a>(properties: &'a [PropertyRef<'a>], name: &str) -> Option<&'a str> {
    properties.iter().find(|p| p.name == name).map(|p| p.value)
}

fn find_ignore_case<'a>(properties: &'a [PropertyRef<'a>], lowercase: &str) -> Option<&'a str> {
    properties
        .iter()
        .find(|p| eq_ignore_case(p.name, lowercase))
        .map(|p| p.value)
}

/// A message as ingest holds it ([`MessageRef`]) with the sender's twin, if the caller has it.
#[derive(Debug, Clone, Copy)]
pub struct RouteMessage<'a> {
    pub message: MessageRef<'a>,
    pub twin: Option<&'a serde_json::Value>,
}

impl MessageView for RouteMessage<'_> {
    fn system_property(&self, name: &str) -> Option<&str> {
        find_exact(self.message.system_properties, name)
    }

    fn application_property(&self, lowercase_name: &str) -> Option<&str> {
        find_ignore_case(self.message.application_properties, lowercase_name)
    }

    fn body(&self) -> &[u8] {
        self.message.body
    }

    fn twin(&self) -> Option<&serde_json::Value> {
        self.twin
    }
}

/// A stored message (read back from a log), without a twin.
impl MessageView for ArchivedMessage {
    fn system_property(&self, name: &str) -> Option<&str> {
        ArchivedMessage::system_property(self, name)
    }

    fn application_property(&self, lowercase_name: &str) -> Option<&str> {
        self.application_properties()
            .iter()
            .find(|p| eq_ignore_case(p.name(), lowercase_name))
            .map(|p| p.value())
    }

    fn body(&self) -> &[u8] {
        ArchivedMessage::body(self)
    }
}

/// How a JSON body is encoded, when `$body` may be read at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyEncoding {
    Utf8,
    Utf16Le,
    Utf16Be,
    Utf32Le,
    Utf32Be,
}

/// Whether `$body` is queryable for this message and in which encoding: the content type must
/// be `application/json` (any case, parameters allowed) and the encoding UTF-8, UTF-16 or
/// UTF-32, from the content-encoding system property or else the content type's `charset`
/// parameter. Without an encoding, as in Azure, the body is not queryable.
pub fn body_encoding<M: MessageView + ?Sized>(message: &M) -> Option<BodyEncoding> {
    let content_type = message.system_property(property_name::CONTENT_TYPE)?;
    let mut parts = content_type.split(';');
    let media = parts.next()?.trim();
    if !media.eq_ignore_ascii_case("application/json") {
        return None;
    }
    let charset = parts.find_map(|p| {
        let (key, value) = p.split_once('=')?;
        key.trim()
            .eq_ignore_ascii_case("charset")
            .then(|| value.trim().trim_matches('"'))
    });
    let encoding = message
        .system_property(property_name::CONTENT_ENCODING)
        .or(charset)?;
    encoding_from_name(encoding.trim())
}

fn encoding_from_name(name: &str) -> Option<BodyEncoding> {
    let mut buf = [0u8; 8];
    let mut len = 0;
    for b in name.bytes().filter(|b| *b != b'-' && *b != b'_') {
        *buf.get_mut(len)? = b.to_ascii_lowercase();
        len += 1;
    }
    Some(match &buf[..len] {
        b"utf8" => BodyEncoding::Utf8,
        // .NET's "utf-16" (Encoding.Unicode) is little-endian; a byte order mark overrides.
        b"utf16" | b"utf16le" => BodyEncoding::Utf16Le,
        b"utf16be" => BodyEncoding::Utf16Be,
        b"utf32" | b"utf32le" => BodyEncoding::Utf32Le,
        b"utf32be" => BodyEncoding::Utf32Be,
        _ => return None,
    })
}

/// Writes `body` as UTF-8 into `out` (cleared first), dropping a byte order mark. `false` when
/// the bytes are not valid in that encoding.
pub fn decode_body(body: &[u8], encoding: BodyEncoding, out: &mut Vec<u8>) -> bool {
    out.clear();
    let mut push = |c: char| {
        let mut utf8 = [0u8; 4];
        out.extend_from_slice(c.encode_utf8(&mut utf8).as_bytes());
    };
    match encoding {
        BodyEncoding::Utf8 => {
            let body = body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body);
            out.extend_from_slice(body);
            // simd-json validates UTF-8 itself.
            true
        }
        BodyEncoding::Utf16Le | BodyEncoding::Utf16Be => {
            let (body, little) = match body {
                [0xFF, 0xFE, rest @ ..] => (rest, true),
                [0xFE, 0xFF, rest @ ..] => (rest, false),
                _ => (body, encoding == BodyEncoding::Utf16Le),
            };
            if body.len() % 2 != 0 {
                return false;
            }
            let units = body.chunks_exact(2).map(|u| {
                let u = [u[0], u[1]];
                if little {
                    u16::from_le_bytes(u)
                } else {
                    u16::from_be_bytes(u)
                }
            });
            for c in char::decode_utf16(units) {
                match c {
                    Ok(c) => push(c),
                    Err(_) => return false,
                }
            }
            true
        }
        BodyEncoding::Utf32Le | BodyEncoding::Utf32Be => {
            let (body, little) = match body {
                [0xFF, 0xFE, 0, 0, rest @ ..] => (rest, true),
                [0, 0, 0xFE, 0xFF, rest @ ..] => (rest, false),
                _ => (body, encoding == BodyEncoding::Utf32Le),
            };
            if body.len() % 4 != 0 {
                return false;
            }
            for u in body.chunks_exact(4) {
                let u = [u[0], u[1], u[2], u[3]];
                let unit = if little {
                    u32::from_le_bytes(u)
                } else {
                    u32::from_be_bytes(u)
                };
                match char::from_u32(unit) {
                    Some(c) => push(c),
                    None => return false,
                }
            }
            true
        }
    }
}
