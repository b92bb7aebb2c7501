//! MQTT 3.1.1 codec, sans-IO: byte slices in, borrowed views and bytes out.
//!
//! The trade-off: decoding hands out views that borrow the connection's read buffer
//! (`Publish<'a>` holds `&'a str` and `&'a [u8]`), so a PUBLISH costs no allocation and no copy,
//! but the caller must finish with a packet before it reuses the buffer. Everything a server must
//! check on a client packet (MQTT 3.1.1 "MUST"s: reserved flag bits, non-zero packet ids, UTF-8
//! without U+0000, wildcard rules, QoS 3) is checked here, once, so a `Packet` that decoded is
//! well-formed and the connection state machine only decides policy (refuse QoS 2, first packet
//! must be CONNECT, ...). Nothing here does IO, reads a clock or knows a runtime.
//!
//! Use:
//! 1. [`frame`] on the bytes buffered so far: `Ok(None)` means read more, `Ok(Some(len))` means
//!    the first `len` bytes are one packet. An oversize packet is refused from its fixed header
//!    alone, before the body is buffered.
//! 2. [`decode`] on exactly those `len` bytes.
//! 3. On `Err(e)`, [`DecodeError::connack_code`] says whether to send a CONNACK before closing.
//!
//! Every read of untrusted bytes goes through the checked [`Reader`]; indexing is denied in this
//! module so a malformed packet can only ever produce a [`DecodeError`], never a panic.

#![deny(clippy::indexing_slicing)]

mod decode;
mod encode;
mod reader;
#[cfg(test)]
mod tests;

pub use decode::{decode, decode_from_server, frame};
pub use encode::{
    encode_connack, encode_connect, encode_disconnect, encode_pingreq, encode_pingresp,
    encode_puback, encode_pubcomp, encode_publish, encode_pubrec, encode_pubrel, encode_suback,
    encode_subscribe, encode_unsuback, encode_unsubscribe,
};
pub use reader::Reader;

use std::num::NonZeroU16;

/// Largest remaining length the 4-byte variable-length encoding can express (MQTT 3.1.1 2.2.3).
pub const REMAINING_LEN_MAX: usize = 268_435_455;
/// Longest MQTT string or binary field: its length prefix is a `u16`.
pub const STRING_LEN_MAX: usize = u16::MAX as usize;
/// The only protocol level this server speaks: MQTT 3.1.1.
pub const PROTOCOL_LEVEL_3_1_1: u8 = 4;

/// Quality of service of a PUBLISH or a subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum QoS {
    AtMostOnce = 0,
    AtLeastOnce = 1,
    /// Decoded so the caller can refuse it: IoT Hub closes a connection that publishes at QoS 2
    /// and grants QoS 1 to a subscription that asks for it.
    ExactlyOnce = 2,
}

impl QoS {
    /// The QoS for the two low bits `bits`; `None` for 3, which MQTT reserves.
    pub fn from_bits(bits: u8) -> Option<Self> {
        match bits {
            0 => Some(Self::AtMostOnce),
            1 => Some(Self::AtLeastOnce),
            2 => Some(Self::ExactlyOnce),
            _ => None,
        }
    }
}

/// A packet identifier. MQTT forbids 0 [MQTT-2.3.1-1], so the type does too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PacketId(NonZeroU16);

impl PacketId {
    /// `None` for 0.
    pub fn new(id: u16) -> Option<Self> {
        NonZeroU16::new(id).map(Self)
    }

    pub fn get(self) -> u16 {
        self.0.get()
    }
}

/// The QoS of a PUBLISH together with its packet id, which exists exactly when QoS > 0.
/// One enum instead of two fields makes a QoS 1 PUBLISH without an id unrepresentable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PublishQos {
    AtMostOnce,
    AtLeastOnce(PacketId),
    ExactlyOnce(PacketId),
}

impl PublishQos {
    pub fn qos(self) -> QoS {
        match self {
            Self::AtMostOnce => QoS::AtMostOnce,
            Self::AtLeastOnce(_) => QoS::AtLeastOnce,
            Self::ExactlyOnce(_) => QoS::ExactlyOnce,
        }
    }

    pub fn packet_id(self) -> Option<PacketId> {
        match self {
            Self::AtMostOnce => None,
            Self::AtLeastOnce(id) | Self::ExactlyOnce(id) => Some(id),
        }
    }
}

/// CONNACK return codes (MQTT 3.1.1 table 3.1). IoT Hub uses 5 for every authentication
/// failure and 3 for "try again later" (azure-protocol.md 1.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConnectReturnCode {
    Accepted = 0x00,
    UnacceptableProtocolVersion = 0x01,
    IdentifierRejected = 0x02,
    ServerUnavailable = 0x03,
    BadUsernameOrPassword = 0x04,
    NotAuthorized = 0x05,
}

impl ConnectReturnCode {
    pub fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            0x00 => Some(Self::Accepted),
            0x01 => Some(Self::UnacceptableProtocolVersion),
            0x02 => Some(Self::IdentifierRejected),
            0x03 => Some(Self::ServerUnavailable),
            0x04 => Some(Self::BadUsernameOrPassword),
            0x05 => Some(Self::NotAuthorized),
            _ => None,
        }
    }
}

/// One return code of a SUBACK.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SubackCode {
    Granted(QoS),
    /// 0x80: the subscription is refused (IoT Hub: a filter it does not support).
    Failure,
}

impl SubackCode {
    pub const FAILURE_BYTE: u8 = 0x80;

    pub fn to_byte(self) -> u8 {
        match self {
            Self::Granted(qos) => qos as u8,
            Self::Failure => Self::FAILURE_BYTE,
        }
    }

    pub fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            Self::FAILURE_BYTE => Some(Self::Failure),
            bits => QoS::from_bits(bits).map(Self::Granted),
        }
    }
}

/// A packet a client sends to the server, as [`decode`] returns it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Packet<'a> {
    Connect(Connect<'a>),
    Publish(Publish<'a>),
    Puback(PacketId),
    /// QoS 2 flow packets are decoded only so the caller can refuse QoS 2 by closing.
    Pubrec(PacketId),
    Pubrel(PacketId),
    Pubcomp(PacketId),
    Subscribe(Subscribe<'a>),
    Unsubscribe(Unsubscribe<'a>),
    Pingreq,
    Disconnect,
}

/// A packet the server sends to a client, as [`decode_from_server`] returns it (for the load
/// generator and tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerPacket<'a> {
    Connack {
        session_present: bool,
        code: ConnectReturnCode,
    },
    Publish(Publish<'a>),
    Puback(PacketId),
    Pubrec(PacketId),
    Pubrel(PacketId),
    Pubcomp(PacketId),
    Suback(Suback<'a>),
    Unsuback(PacketId),
    Pingresp,
}

/// A CONNECT. Only MQTT 3.1.1 (protocol name `MQTT`, level 4) decodes; other levels are
/// [`DecodeError::ProtocolLevelUnsupported`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Connect<'a> {
    pub clean_session: bool,
    /// 0 disables the keepalive; the hub closes after 1.5 x this without a packet.
    pub keep_alive_secs: u16,
    /// May be empty only with `clean_session` (otherwise [`DecodeError::ClientIdRejected`]).
    pub client_id: &'a str,
    pub will: Option<Will<'a>>,
    pub username: Option<&'a str>,
    /// Binary in MQTT 3.1.1; IoT Hub puts a SAS token here.
    pub password: Option<&'a [u8]>,
}

/// The last-will message of a CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Will<'a> {
    /// Validated like a PUBLISH topic: UTF-8, non-empty, no wildcards.
    pub topic: &'a str,
    pub payload: &'a [u8],
    pub qos: QoS,
    pub retain: bool,
}

/// A PUBLISH, in either direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Publish<'a> {
    pub dup: bool,
    pub qos: PublishQos,
    pub retain: bool,
    /// Non-empty UTF-8 without U+0000 and without `+` or `#`.
    pub topic: &'a str,
    pub payload: &'a [u8],
}

/// A SUBSCRIBE: at least one (filter, requested QoS), all validated during decode.
///
/// The filters stay in the packet's bytes and [`Subscribe::filters`] walks them, so a SUBSCRIBE
/// with any number of filters decodes without a heap allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subscribe<'a> {
    pub packet_id: PacketId,
    /// The payload: repeated (u16 length, filter, requested QoS byte), already validated.
    payload: &'a [u8],
    filter_count: usize,
}

impl<'a> Subscribe<'a> {
    pub fn filters(&self) -> SubscribeFilters<'a> {
        SubscribeFilters {
            reader: Reader::new(self.payload),
        }
    }

    /// Number of filters, at least 1; a SUBACK carries this many return codes.
    pub fn filter_count(&self) -> usize {
        self.filter_count
    }
}

/// Iterator over the (filter, requested QoS) pairs of a [`Subscribe`].
#[derive(Debug, Clone)]
pub struct SubscribeFilters<'a> {
    reader: Reader<'a>,
}

impl<'a> Iterator for SubscribeFilters<'a> {
    type Item = (&'a str, QoS);

    fn next(&mut self) -> Option<Self::Item> {
        // The payload was validated by decode, so every step succeeds; `?` only ends the walk.
        let filter = decode::read_str(&mut self.reader).ok()?;
        let qos = QoS::from_bits(self.reader.u8()?)?;
        Some((filter, qos))
    }
}

/// An UNSUBSCRIBE: at least one filter, all validated during decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unsubscribe<'a> {
    pub packet_id: PacketId,
    payload: &'a [u8],
    filter_count: usize,
}

impl<'a> Unsubscribe<'a> {
    pub fn filters(&self) -> UnsubscribeFilters<'a> {
        UnsubscribeFilters {
            reader: Reader::new(self.payload),
        }
    }

    pub fn filter_count(&self) -> usize {
        self.filter_count
    }
}

/// Iterator over the filters of an [`Unsubscribe`].
#[derive(Debug, Clone)]
pub struct UnsubscribeFilters<'a> {
    reader: Reader<'a>,
}

impl<'a> Iterator for UnsubscribeFilters<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<Self::Item> {
        decode::read_str(&mut self.reader).ok()
    }
}

/// A SUBACK as a client sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Suback<'a> {
    pub packet_id: PacketId,
    /// Validated: each byte is 0, 1, 2 or 0x80.
    return_codes: &'a [u8],
}

impl Suback<'_> {
    pub fn return_codes(&self) -> impl Iterator<Item = SubackCode> + '_ {
        self.return_codes
            .iter()
            .filter_map(|&b| SubackCode::from_byte(b))
    }
}

/// Why a client's bytes are not an acceptable MQTT 3.1.1 packet. Every variant is a device
/// fault: the server closes that connection (after a CONNACK where
/// [`DecodeError::connack_code`] says so), counts it, and carries on with the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The remaining length uses more than 4 bytes [MQTT-2.2.3]. Close.
    #[error("remaining length encoded in more than 4 bytes")]
    RemainingLengthMalformed,
    /// The packet is larger than the configured maximum; found from the fixed header, before
    /// the body is buffered. Close.
    #[error("packet larger than the limit")]
    PacketTooLarge,
    /// A field runs past the end of the packet, or the frame given to decode is shorter than
    /// its remaining length. Close.
    #[error("packet truncated")]
    Truncated,
    /// Bytes left after the last field of the packet. Close.
    #[error("trailing bytes after the packet")]
    TrailingBytes,
    /// Packet type 0 or 15, or a type only a server sends (CONNACK, SUBACK, ...). Close.
    #[error("packet type not acceptable from a client")]
    PacketTypeInvalid,
    /// Reserved fixed-header flag bits are wrong [MQTT-2.2.2-2], or DUP is set on a QoS 0
    /// PUBLISH [MQTT-3.3.1-2]. Close.
    #[error("reserved flag bits are wrong")]
    FlagsInvalid,
    /// QoS 3 in a PUBLISH, a will or a subscription [MQTT-3.3.1-4]. Close.
    #[error("QoS 3 is not a valid QoS")]
    QosInvalid,
    /// A packet id of 0 [MQTT-2.3.1-1]. Close.
    #[error("packet id 0")]
    PacketIdZero,
    /// A string field is not valid UTF-8 or contains U+0000 [MQTT-1.5.3-1, MQTT-1.5.3-2]. Close.
    #[error("string is not valid UTF-8 or contains U+0000")]
    StringInvalid,
    /// A PUBLISH or will topic is empty or contains `+` or `#` [MQTT-3.3.2-2, MQTT-4.7.3-1].
    /// Close.
    #[error("topic name is empty or contains a wildcard")]
    TopicInvalid,
    /// A topic filter is empty or breaks the wildcard rules [MQTT-4.7.1-2, MQTT-4.7.1-3]. Close.
    #[error("topic filter is empty or misuses a wildcard")]
    TopicFilterInvalid,
    /// A SUBSCRIBE or UNSUBSCRIBE without any filter [MQTT-3.8.3-3, MQTT-3.10.3-2]. Close.
    #[error("SUBSCRIBE or UNSUBSCRIBE without a filter")]
    FiltersEmpty,
    /// A requested QoS byte with reserved bits set [MQTT-3.8.3-4]. Close.
    #[error("reserved bits set in a requested QoS")]
    RequestedQosInvalid,
    /// The CONNECT protocol name is neither `MQTT` nor `MQIsdp` [MQTT-3.1.2-1]. Close without
    /// a CONNACK.
    #[error("unknown protocol name")]
    ProtocolNameInvalid,
    /// An MQTT version other than 3.1.1 (3.1 as `MQIsdp`/3, 5.0 as level 5) [MQTT-3.1.2-2].
    /// CONNACK 0x01, then close.
    #[error("protocol level other than MQTT 3.1.1")]
    ProtocolLevelUnsupported,
    /// The CONNECT flags break a rule: reserved bit set [MQTT-3.1.2-3], will QoS or retain
    /// without a will [MQTT-3.1.2-13, -15], will QoS 3 [MQTT-3.1.2-14], password without
    /// username [MQTT-3.1.2-22]. Close.
    #[error("invalid CONNECT flags")]
    ConnectFlagsInvalid,
    /// An empty client id with clean session 0 [MQTT-3.1.3-8]. CONNACK 0x02, then close.
    #[error("empty client id without clean session")]
    ClientIdRejected,
    /// A CONNACK or SUBACK return code outside the table (client-side decoding only). Close.
    #[error("unknown return code")]
    ReturnCodeInvalid,
}

impl DecodeError {
    /// The CONNACK return code to send before closing, for the CONNECT problems MQTT answers
    /// with one; `None` means close without a CONNACK.
    pub fn connack_code(self) -> Option<ConnectReturnCode> {
        match self {
            Self::ProtocolLevelUnsupported => Some(ConnectReturnCode::UnacceptableProtocolVersion),
            Self::ClientIdRejected => Some(ConnectReturnCode::IdentifierRejected),
            _ => None,
        }
    }
}

/// Why a packet cannot be encoded. These are caller mistakes the caller can foresee (a C2D
/// property bag longer than a topic may be), so they are values, not panics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// A string or binary field longer than 65,535 bytes.
    #[error("string or binary field longer than 65535 bytes")]
    FieldTooLong,
    /// The packet would exceed the largest remaining length MQTT can express.
    #[error("packet longer than MQTT allows")]
    PacketTooLarge,
    /// A SUBSCRIBE or UNSUBSCRIBE without filters, which no server accepts.
    #[error("no filters")]
    FiltersEmpty,
}
