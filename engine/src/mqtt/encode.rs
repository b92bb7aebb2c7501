//! Encoders for MQTT 3.1.1 packets, into any `bytes::BufMut` (`Vec<u8>`, `BytesMut`).
//!
//! The caller owns the output buffer, so a shard can append many packets to one write buffer and
//! send them in one syscall. Sizes are computed before the first byte is written, so an encoder
//! that fails ([`EncodeError`]) leaves the buffer untouched. Encoders do not re-validate the
//! contents of strings (a server-built topic is well-formed by construction); they check only
//! what the caller cannot express in a type, lengths.

use bytes::BufMut;

use super::{
    Connect, ConnectReturnCode, EncodeError, PacketId, Publish, PublishQos, QoS, SubackCode,
    REMAINING_LEN_MAX, STRING_LEN_MAX,
};

/// CONNACK. `session_present` is sent only with [`ConnectReturnCode::Accepted`]; MQTT requires
/// 0 with any refusal [MQTT-3.2.2-4].
pub fn encode_connack(out: &mut impl BufMut, session_present: bool, code: ConnectReturnCode) {
    let session_present = session_present && code == ConnectReturnCode::Accepted;
    out.put_slice(&[0x20, 0x02, u8::from(session_present), code as u8]);
}

pub fn encode_puback(out: &mut impl BufMut, packet_id: PacketId) {
    encode_id_only(out, 0x40, packet_id);
}

pub fn encode_pubrec(out: &mut impl BufMut, packet_id: PacketId) {
    encode_id_only(out, 0x50, packet_id);
}

pub fn encode_pubrel(out: &mut impl BufMut, packet_id: PacketId) {
    encode_id_only(out, 0x62, packet_id);
}

pub fn encode_pubcomp(out: &mut impl BufMut, packet_id: PacketId) {
    encode_id_only(out, 0x70, packet_id);
}

pub fn encode_unsuback(out: &mut impl BufMut, packet_id: PacketId) {
    encode_id_only(out, 0xb0, packet_id);
}

pub fn encode_pingreq(out: &mut impl BufMut) {
    out.put_slice(&[0xc0, 0x00]);
}

pub fn encode_pingresp(out: &mut impl BufMut) {
    out.put_slice(&[0xd0, 0x00]);
}

pub fn encode_disconnect(out: &mut impl BufMut) {
    out.put_slice(&[0xe0, 0x00]);
}

/// SUBACK with one return code per filter of the SUBSCRIBE, in order [MQTT-3.9.3-1].
pub fn encode_suback(
    out: &mut impl BufMut,
    packet_id: PacketId,
    codes: &[SubackCode],
) -> Result<(), EncodeError> {
    if codes.is_empty() {
        return Err(EncodeError::FiltersEmpty);
    }
    let remaining = checked_remaining(2usize.saturating_add(codes.len()))?;
    put_fixed_header(out, 0x90, remaining);
    out.put_u16(packet_id.get());
    for code in codes {
        out.put_u8(code.to_byte());
    }
    Ok(())
}

/// PUBLISH, in either direction (server to device: C2D, twin responses, method requests).
pub fn encode_publish(out: &mut impl BufMut, publish: &Publish<'_>) -> Result<(), EncodeError> {
    let topic = field_len(publish.topic.as_bytes())?;
    let id_len = if publish.qos.packet_id().is_some() {
        2
    } else {
        0
    };
    let remaining = checked_remaining(
        topic
            .saturating_add(id_len)
            .saturating_add(publish.payload.len()),
    )?;
    let first = 0x30
        | (u8::from(publish.dup) << 3)
        | ((publish.qos.qos() as u8) << 1)
        | u8::from(publish.retain);
    put_fixed_header(out, first, remaining);
    put_field(out, publish.topic.as_bytes());
    match publish.qos {
        PublishQos::AtMostOnce => {}
        PublishQos::AtLeastOnce(id) | PublishQos::ExactlyOnce(id) => out.put_u16(id.get()),
    }
    out.put_slice(publish.payload);
    Ok(())
}

/// CONNECT as an MQTT 3.1.1 client sends it (protocol name `MQTT`, level 4).
pub fn encode_connect(out: &mut impl BufMut, connect: &Connect<'_>) -> Result<(), EncodeError> {
    // Protocol name (2 + 4), level, flags, keepalive.
    let mut len = 10usize;
    len = len.saturating_add(field_len(connect.client_id.as_bytes())?);
    let mut flags = 0u8;
    if connect.clean_session {
        flags |= 0x02;
    }
    if let Some(will) = &connect.will {
        flags |= 0x04 | ((will.qos as u8) << 3) | (u8::from(will.retain) << 5);
        len = len.saturating_add(field_len(will.topic.as_bytes())?);
        len = len.saturating_add(field_len(will.payload)?);
    }
    if let Some(username) = connect.username {
        flags |= 0x80;
        len = len.saturating_add(field_len(username.as_bytes())?);
    }
    if let Some(password) = connect.password {
        flags |= 0x40;
        len = len.saturating_add(field_len(password)?);
    }
    let remaining = checked_remaining(len)?;
    put_fixed_header(out, 0x10, remaining);
    put_field(out, b"MQTT");
    out.put_u8(super::PROTOCOL_LEVEL_3_1_1);
    out.put_u8(flags);
    out.put_u16(connect.keep_alive_secs);
    put_field(out, connect.client_id.as_bytes());
    if let Some(will) = &connect.will {
        put_field(out, will.topic.as_bytes());
        put_field(out, will.payload);
    }
    if let Some(username) = connect.username {
        put_field(out, username.as_bytes());
    }
    if let Some(password) = connect.password {
        put_field(out, password);
    }
    Ok(())
}

/// SUBSCRIBE with one (filter, requested QoS) per entry.
pub fn encode_subscribe(
    out: &mut impl BufMut,
    packet_id: PacketId,
    filters: &[(&str, QoS)],
) -> Result<(), EncodeError> {
    if filters.is_empty() {
        return Err(EncodeError::FiltersEmpty);
    }
    let mut len = 2usize;
    for (filter, _) in filters {
        len = len
            .saturating_add(field_len(filter.as_bytes())?)
            .saturating_add(1);
    }
    let remaining = checked_remaining(len)?;
    put_fixed_header(out, 0x82, remaining);
    out.put_u16(packet_id.get());
    for (filter, qos) in filters {
        put_field(out, filter.as_bytes());
        out.put_u8(*qos as u8);
    }
    Ok(())
}

pub fn encode_unsubscribe(
    out: &mut impl BufMut,
    packet_id: PacketId,
    filters: &[&str],
) -> Result<(), EncodeError> {
    if filters.is_empty() {
        return Err(EncodeError::FiltersEmpty);
    }
    let mut len = 2usize;
    for filter in filters {
        len = len.saturating_add(field_len(filter.as_bytes())?);
    }
    let remaining = checked_remaining(len)?;
    put_fixed_header(out, 0xa2, remaining);
    out.put_u16(packet_id.get());
    for filter in filters {
        put_field(out, filter.as_bytes());
    }
    Ok(())
}

fn encode_id_only(out: &mut impl BufMut, first: u8, packet_id: PacketId) {
    let [high, low] = packet_id.get().to_be_bytes();
    out.put_slice(&[first, 0x02, high, low]);
}

/// Bytes a length-prefixed field takes, or an error if it is too long for its `u16` prefix.
fn field_len(field: &[u8]) -> Result<usize, EncodeError> {
    if field.len() > STRING_LEN_MAX {
        return Err(EncodeError::FieldTooLong);
    }
    Ok(2 + field.len())
}

fn checked_remaining(len: usize) -> Result<usize, EncodeError> {
    if len > REMAINING_LEN_MAX {
        return Err(EncodeError::PacketTooLarge);
    }
    Ok(len)
}

/// Only called with a length `field_len` accepted, so the cast cannot truncate.
fn put_field(out: &mut impl BufMut, field: &[u8]) {
    debug_assert!(field.len() <= STRING_LEN_MAX);
    out.put_u16(u16::try_from(field.len()).unwrap_or(u16::MAX));
    out.put_slice(field);
}

/// Only called with a length `checked_remaining` accepted, so it fits in 4 bytes.
fn put_fixed_header(out: &mut impl BufMut, first: u8, remaining: usize) {
    debug_assert!(remaining <= REMAINING_LEN_MAX);
    out.put_u8(first);
    let mut value = remaining;
    loop {
        let low = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.put_u8(low);
            break;
        }
        out.put_u8(low | 0x80);
    }
}
