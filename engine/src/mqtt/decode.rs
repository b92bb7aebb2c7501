//! Framing and decoding of MQTT 3.1.1 packets.
//!
//! Decoding validates everything in one forward pass and keeps only borrowed slices, so a packet
//! that decoded needs no second look: SUBSCRIBE and UNSUBSCRIBE keep their validated payload and
//! re-walk it on demand instead of collecting filters into a heap list. Errors are plain `Copy`
//! values; nothing here allocates, logs or panics.

use super::{
    Connect, ConnectReturnCode, DecodeError, Packet, PacketId, Publish, PublishQos, QoS, Reader,
    ServerPacket, Suback, SubackCode, Subscribe, Unsubscribe, Will,
};

const CONNECT: u8 = 1;
const CONNACK: u8 = 2;
const PUBLISH: u8 = 3;
const PUBACK: u8 = 4;
const PUBREC: u8 = 5;
const PUBREL: u8 = 6;
const PUBCOMP: u8 = 7;
const SUBSCRIBE: u8 = 8;
const SUBACK: u8 = 9;
const UNSUBSCRIBE: u8 = 10;
const UNSUBACK: u8 = 11;
const PINGREQ: u8 = 12;
const PINGRESP: u8 = 13;
const DISCONNECT: u8 = 14;

/// Says whether `buf` starts with a complete packet.
///
/// `Ok(Some(len))`: the first `len` bytes (fixed header and body) are one packet, ready for
/// [`decode`]. `Ok(None)`: read more bytes. `Err`: close the connection. A packet whose total
/// size (fixed header plus remaining length) exceeds `packet_bytes_max` is refused as soon as
/// its fixed header is complete, so the caller never buffers an oversize body; a remaining
/// length whose fourth byte still has the continuation bit is refused without waiting for a
/// fifth.
pub fn frame(buf: &[u8], packet_bytes_max: usize) -> Result<Option<usize>, DecodeError> {
    let mut reader = Reader::new(buf);
    if reader.u8().is_none() {
        return Ok(None);
    }
    let Some(remaining) = remaining_length(&mut reader)? else {
        return Ok(None);
    };
    let header_len = buf.len().saturating_sub(reader.left());
    let total = header_len.saturating_add(remaining);
    if total > packet_bytes_max {
        return Err(DecodeError::PacketTooLarge);
    }
    if buf.len() < total {
        return Ok(None);
    }
    Ok(Some(total))
}

/// Decodes one packet sent by a client. `frame` must be exactly one packet, as [`frame`]
/// delimited it; a shorter slice is [`DecodeError::Truncated`], a longer one
/// [`DecodeError::TrailingBytes`].
pub fn decode(frame: &[u8]) -> Result<Packet<'_>, DecodeError> {
    let (first, mut body) = fixed_header(frame)?;
    let flags = first & 0x0f;
    let packet = match first >> 4 {
        CONNECT => {
            expect_flags(flags, 0)?;
            Packet::Connect(connect(&mut body)?)
        }
        PUBLISH => Packet::Publish(publish(flags, &mut body)?),
        PUBACK => {
            expect_flags(flags, 0)?;
            Packet::Puback(packet_id(&mut body)?)
        }
        PUBREC => {
            expect_flags(flags, 0)?;
            Packet::Pubrec(packet_id(&mut body)?)
        }
        PUBREL => {
            expect_flags(flags, 0b0010)?;
            Packet::Pubrel(packet_id(&mut body)?)
        }
        PUBCOMP => {
            expect_flags(flags, 0)?;
            Packet::Pubcomp(packet_id(&mut body)?)
        }
        SUBSCRIBE => {
            expect_flags(flags, 0b0010)?;
            Packet::Subscribe(subscribe(&mut body)?)
        }
        UNSUBSCRIBE => {
            expect_flags(flags, 0b0010)?;
            Packet::Unsubscribe(unsubscribe(&mut body)?)
        }
        PINGREQ => {
            expect_flags(flags, 0)?;
            Packet::Pingreq
        }
        DISCONNECT => {
            expect_flags(flags, 0)?;
            Packet::Disconnect
        }
        _ => return Err(DecodeError::PacketTypeInvalid),
    };
    if !body.is_empty() {
        return Err(DecodeError::TrailingBytes);
    }
    Ok(packet)
}

/// Decodes one packet sent by a server: what a client (the load generator, tests) receives.
pub fn decode_from_server(frame: &[u8]) -> Result<ServerPacket<'_>, DecodeError> {
    let (first, mut body) = fixed_header(frame)?;
    let flags = first & 0x0f;
    let packet = match first >> 4 {
        CONNACK => {
            expect_flags(flags, 0)?;
            let ack_flags = body.u8().ok_or(DecodeError::Truncated)?;
            if ack_flags & 0xfe != 0 {
                return Err(DecodeError::FlagsInvalid);
            }
            let code = body.u8().ok_or(DecodeError::Truncated)?;
            let code = ConnectReturnCode::from_byte(code).ok_or(DecodeError::ReturnCodeInvalid)?;
            ServerPacket::Connack {
                session_present: ack_flags == 1,
                code,
            }
        }
        PUBLISH => ServerPacket::Publish(publish(flags, &mut body)?),
        PUBACK => {
            expect_flags(flags, 0)?;
            ServerPacket::Puback(packet_id(&mut body)?)
        }
        PUBREC => {
            expect_flags(flags, 0)?;
            ServerPacket::Pubrec(packet_id(&mut body)?)
        }
        PUBREL => {
            expect_flags(flags, 0b0010)?;
            ServerPacket::Pubrel(packet_id(&mut body)?)
        }
        PUBCOMP => {
            expect_flags(flags, 0)?;
            ServerPacket::Pubcomp(packet_id(&mut body)?)
        }
        SUBACK => {
            expect_flags(flags, 0)?;
            let packet_id = packet_id(&mut body)?;
            let return_codes = body.rest();
            if return_codes.is_empty() {
                return Err(DecodeError::FiltersEmpty);
            }
            if return_codes
                .iter()
                .any(|&b| SubackCode::from_byte(b).is_none())
            {
                return Err(DecodeError::ReturnCodeInvalid);
            }
            ServerPacket::Suback(Suback {
                packet_id,
                return_codes,
            })
        }
        UNSUBACK => {
            expect_flags(flags, 0)?;
            ServerPacket::Unsuback(packet_id(&mut body)?)
        }
        PINGRESP => {
            expect_flags(flags, 0)?;
            ServerPacket::Pingresp
        }
        _ => return Err(DecodeError::PacketTypeInvalid),
    };
    if !body.is_empty() {
        return Err(DecodeError::TrailingBytes);
    }
    Ok(packet)
}

/// The first byte and a reader over exactly the body that the remaining length announces.
fn fixed_header(frame: &[u8]) -> Result<(u8, Reader<'_>), DecodeError> {
    let mut reader = Reader::new(frame);
    let first = reader.u8().ok_or(DecodeError::Truncated)?;
    let remaining = remaining_length(&mut reader)?.ok_or(DecodeError::Truncated)?;
    let body = reader.sub(remaining).ok_or(DecodeError::Truncated)?;
    if !reader.is_empty() {
        return Err(DecodeError::TrailingBytes);
    }
    Ok((first, body))
}

/// The variable-length remaining length (MQTT 3.1.1 2.2.3): `Ok(None)` if it is incomplete.
fn remaining_length(reader: &mut Reader<'_>) -> Result<Option<usize>, DecodeError> {
    let mut value = 0usize;
    for shift in [0, 7, 14, 21] {
        let Some(byte) = reader.u8() else {
            return Ok(None);
        };
        value |= usize::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(Some(value));
        }
    }
    Err(DecodeError::RemainingLengthMalformed)
}

fn expect_flags(flags: u8, expected: u8) -> Result<(), DecodeError> {
    if flags == expected {
        Ok(())
    } else {
        Err(DecodeError::FlagsInvalid)
    }
}

fn packet_id(reader: &mut Reader<'_>) -> Result<PacketId, DecodeError> {
    let id = reader.u16().ok_or(DecodeError::Truncated)?;
    PacketId::new(id).ok_or(DecodeError::PacketIdZero)
}

/// A length-prefixed binary field.
fn read_binary<'a>(reader: &mut Reader<'a>) -> Result<&'a [u8], DecodeError> {
    let len = reader.u16().ok_or(DecodeError::Truncated)?;
    reader.take(usize::from(len)).ok_or(DecodeError::Truncated)
}

/// A length-prefixed UTF-8 string without U+0000 [MQTT-1.5.3-1, MQTT-1.5.3-2]. Surrogates,
/// which MQTT also forbids, are already invalid UTF-8 for `str::from_utf8`.
pub(super) fn read_str<'a>(reader: &mut Reader<'a>) -> Result<&'a str, DecodeError> {
    let bytes = read_binary(reader)?;
    if bytes.contains(&0) {
        return Err(DecodeError::StringInvalid);
    }
    std::str::from_utf8(bytes).map_err(|_| DecodeError::StringInvalid)
}

/// A topic name: a string that is not empty and has no wildcard [MQTT-3.3.2-2, MQTT-4.7.3-1].
///
/// This is the per-PUBLISH cost of decoding, so the three forbidden bytes are found in one pass
/// that does not exit early, which the compiler can vectorise.
fn read_topic<'a>(reader: &mut Reader<'a>) -> Result<&'a str, DecodeError> {
    let bytes = read_binary(reader)?;
    let forbidden = bytes
        .iter()
        .fold(false, |found, &b| found | matches!(b, 0 | b'+' | b'#'));
    if forbidden && bytes.contains(&0) {
        return Err(DecodeError::StringInvalid);
    }
    let topic = std::str::from_utf8(bytes).map_err(|_| DecodeError::StringInvalid)?;
    if forbidden || topic.is_empty() {
        return Err(DecodeError::TopicInvalid);
    }
    Ok(topic)
}

/// A topic filter: not empty; `#` only as the whole last level; `+` only as a whole level
/// [MQTT-4.7.1-2, MQTT-4.7.1-3, MQTT-4.7.3-1].
fn validate_filter(filter: &str) -> Result<(), DecodeError> {
    if filter.is_empty() {
        return Err(DecodeError::TopicFilterInvalid);
    }
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        let valid = match level {
            "#" => levels.peek().is_none(),
            "+" => true,
            _ => !level.bytes().any(|b| b == b'+' || b == b'#'),
        };
        if !valid {
            return Err(DecodeError::TopicFilterInvalid);
        }
    }
    Ok(())
}

fn connect<'a>(body: &mut Reader<'a>) -> Result<Connect<'a>, DecodeError> {
    let protocol_name = read_binary(body)?;
    let level = body.u8().ok_or(DecodeError::Truncated)?;
    // MQTT 3.1 calls itself `MQIsdp`; it gets CONNACK 1 like MQTT 5 does, since a 3.1 client
    // understands that answer. Any other name may be closed without a CONNACK [MQTT-3.1.2-1].
    if protocol_name != b"MQTT" && protocol_name != b"MQIsdp" {
        return Err(DecodeError::ProtocolNameInvalid);
    }
    if protocol_name != b"MQTT" || level != super::PROTOCOL_LEVEL_3_1_1 {
        return Err(DecodeError::ProtocolLevelUnsupported);
    }
    let flags = body.u8().ok_or(DecodeError::Truncated)?;
    let keep_alive_secs = body.u16().ok_or(DecodeError::Truncated)?;

    let clean_session = flags & 0x02 != 0;
    let will_flag = flags & 0x04 != 0;
    let will_qos_bits = (flags >> 3) & 0x03;
    let will_retain = flags & 0x20 != 0;
    let password_flag = flags & 0x40 != 0;
    let username_flag = flags & 0x80 != 0;
    let reserved_set = flags & 0x01 != 0;
    let will_bits_without_will = !will_flag && (will_qos_bits != 0 || will_retain);
    if reserved_set || will_bits_without_will || (password_flag && !username_flag) {
        return Err(DecodeError::ConnectFlagsInvalid);
    }
    let will_qos = QoS::from_bits(will_qos_bits).ok_or(DecodeError::ConnectFlagsInvalid)?;

    let client_id = read_str(body)?;
    let will = if will_flag {
        let topic = read_topic(body)?;
        let payload = read_binary(body)?;
        Some(Will {
            topic,
            payload,
            qos: will_qos,
            retain: will_retain,
        })
    } else {
        None
    };
    let username = if username_flag {
        Some(read_str(body)?)
    } else {
        None
    };
    let password = if password_flag {
        Some(read_binary(body)?)
    } else {
        None
    };
    // Checked last so that a malformed CONNECT is closed rather than answered.
    if client_id.is_empty() && !clean_session {
        return Err(DecodeError::ClientIdRejected);
    }
    Ok(Connect {
        clean_session,
        keep_alive_secs,
        client_id,
        will,
        username,
        password,
    })
}

fn publish<'a>(flags: u8, body: &mut Reader<'a>) -> Result<Publish<'a>, DecodeError> {
    let dup = flags & 0x08 != 0;
    let retain = flags & 0x01 != 0;
    let qos = QoS::from_bits((flags >> 1) & 0x03).ok_or(DecodeError::QosInvalid)?;
    let topic = read_topic(body)?;
    let qos = match qos {
        QoS::AtMostOnce if dup => return Err(DecodeError::FlagsInvalid),
        QoS::AtMostOnce => PublishQos::AtMostOnce,
        QoS::AtLeastOnce => PublishQos::AtLeastOnce(packet_id(body)?),
        QoS::ExactlyOnce => PublishQos::ExactlyOnce(packet_id(body)?),
    };
    let payload = body.rest();
    Ok(Publish {
        dup,
        qos,
        retain,
        topic,
        payload,
    })
}

fn subscribe<'a>(body: &mut Reader<'a>) -> Result<Subscribe<'a>, DecodeError> {
    let packet_id = packet_id(body)?;
    let payload = body.rest();
    let mut reader = Reader::new(payload);
    let mut filter_count = 0;
    while !reader.is_empty() {
        validate_filter(read_str(&mut reader)?)?;
        let requested = reader.u8().ok_or(DecodeError::Truncated)?;
        if requested & 0xfc != 0 {
            return Err(DecodeError::RequestedQosInvalid);
        }
        QoS::from_bits(requested).ok_or(DecodeError::QosInvalid)?;
        filter_count += 1;
    }
    if filter_count == 0 {
        return Err(DecodeError::FiltersEmpty);
    }
    Ok(Subscribe {
        packet_id,
        payload,
        filter_count,
    })
}

fn unsubscribe<'a>(body: &mut Reader<'a>) -> Result<Unsubscribe<'a>, DecodeError> {
    let packet_id = packet_id(body)?;
    let payload = body.rest();
    let mut reader = Reader::new(payload);
    let mut filter_count = 0;
    while !reader.is_empty() {
        validate_filter(read_str(&mut reader)?)?;
        filter_count += 1;
    }
    if filter_count == 0 {
        return Err(DecodeError::FiltersEmpty);
    }
    Ok(Unsubscribe {
        packet_id,
        payload,
        filter_count,
    })
}

#[cfg(test)]
mod tests {
    use super::validate_filter;
    use crate::mqtt::DecodeError;

    #[test]
    fn filter_wildcard_rules() {
        let table: &[(&str, bool)] = &[
            ("#", true),
            ("+", true),
            ("/", true),
            ("a/#", true),
            ("a/+/b", true),
            ("+/+", true),
            ("/+", true),
            ("$iothub/twin/res/#", true),
            ("devices/d/messages/devicebound/#", true),
            ("", false),
            ("a#", false),
            ("a/#/b", false),
            ("#/", false),
            ("a+", false),
            ("a/b+/c", false),
            ("++", false),
            ("a/##", false),
        ];
        for &(filter, valid) in table {
            let expected = if valid {
                Ok(())
            } else {
                Err(DecodeError::TopicFilterInvalid)
            };
            assert_eq!(validate_filter(filter), expected, "{filter:?}");
        }
    }
}
