//! Data-driven tests of the codec: hex fixtures, every truncation point, round trips and
//! seeded random input. Fixtures are written out by hand from the MQTT 3.1.1 byte layouts, so
//! they check the encoders as much as the decoder.

use super::*;

/// Largest packet the tests allow through [`frame`].
const PACKET_BYTES_MAX: usize = 4 * 1024 * 1024;

fn hex(text: &str) -> Vec<u8> {
    text.split_whitespace()
        .map(|byte| u8::from_str_radix(byte, 16).expect("fixture is hex"))
        .collect()
}

fn id(value: u16) -> PacketId {
    PacketId::new(value).expect("non-zero id")
}

/// Valid client packets and what they decode to.
fn client_fixtures() -> Vec<(&'static str, Vec<u8>, Packet<'static>)> {
    vec![
        (
            "connect, clean session, client id c",
            hex("10 0d 00 04 4d 51 54 54 04 02 00 3c 00 01 63"),
            Packet::Connect(Connect {
                clean_session: true,
                keep_alive_secs: 60,
                client_id: "c",
                will: None,
                username: None,
                password: None,
            }),
        ),
        (
            "connect, empty client id with clean session",
            hex("10 0c 00 04 4d 51 54 54 04 02 00 00 00 00"),
            Packet::Connect(Connect {
                clean_session: true,
                keep_alive_secs: 0,
                client_id: "",
                will: None,
                username: None,
                password: None,
            }),
        ),
        (
            "connect with will, username and binary password",
            hex(
                "10 21 00 04 4d 51 54 54 04 ec 00 3c 00 04 64 65 76 31 00 03 77 2f 74 \
                 00 03 62 79 65 00 01 75 00 02 70 00",
            ),
            Packet::Connect(Connect {
                clean_session: false,
                keep_alive_secs: 60,
                client_id: "dev1",
                will: Some(Will {
                    topic: "w/t",
                    payload: b"bye",
                    qos: QoS::AtLeastOnce,
                    retain: true,
                }),
                username: Some("u"),
                password: Some(b"p\x00"),
            }),
        ),
        (
            "publish qos 0",
            hex("30 07 00 03 61 2f 62 68 69"),
            Packet::Publish(Publish {
                dup: false,
                qos: PublishQos::AtMostOnce,
                retain: false,
                topic: "a/b",
                payload: b"hi",
            }),
        ),
        (
            "publish qos 1, dup, retain, empty payload",
            hex("3b 05 00 01 74 00 0a"),
            Packet::Publish(Publish {
                dup: true,
                qos: PublishQos::AtLeastOnce(id(10)),
                retain: true,
                topic: "t",
                payload: b"",
            }),
        ),
        (
            "publish qos 2 decodes so the caller can refuse it",
            hex("34 05 00 01 74 00 01"),
            Packet::Publish(Publish {
                dup: false,
                qos: PublishQos::ExactlyOnce(id(1)),
                retain: false,
                topic: "t",
                payload: b"",
            }),
        ),
        (
            "publish with a multi-byte utf-8 topic",
            hex("30 07 00 04 63 61 c3 a9 78"),
            Packet::Publish(Publish {
                dup: false,
                qos: PublishQos::AtMostOnce,
                retain: false,
                topic: "ca\u{e9}",
                payload: b"x",
            }),
        ),
        ("puback", hex("40 02 00 01"), Packet::Puback(id(1))),
        ("pubrec", hex("50 02 12 34"), Packet::Pubrec(id(0x1234))),
        ("pubrel", hex("62 02 00 07"), Packet::Pubrel(id(7))),
        ("pubcomp", hex("70 02 ff ff"), Packet::Pubcomp(id(0xffff))),
        ("pingreq", hex("c0 00"), Packet::Pingreq),
        ("disconnect", hex("e0 00"), Packet::Disconnect),
    ]
}

/// Valid SUBSCRIBE and UNSUBSCRIBE packets with their id and (filter, qos) list.
#[allow(clippy::type_complexity)] // The row type reads best spelled out.
fn subscribe_fixtures() -> Vec<(&'static str, Vec<u8>, u16, Vec<(&'static str, QoS)>)> {
    vec![
        (
            "subscribe two filters",
            hex("82 0c 00 01 00 03 61 2f 23 01 00 01 2b 02"),
            1,
            vec![("a/#", QoS::AtLeastOnce), ("+", QoS::ExactlyOnce)],
        ),
        (
            "subscribe python twin responses",
            hex("82 17 00 05 00 12 24 69 6f 74 68 75 62 2f 74 77 69 6e 2f 72 65 73 2f 23 01"),
            5,
            vec![("$iothub/twin/res/#", QoS::AtLeastOnce)],
        ),
    ]
}

fn unsubscribe_fixture() -> Vec<u8> {
    hex("a2 07 00 02 00 03 61 2f 23")
}

/// Every valid client packet of the fixtures, as bytes.
fn all_valid_client_packets() -> Vec<Vec<u8>> {
    let mut packets: Vec<Vec<u8>> = client_fixtures().into_iter().map(|f| f.1).collect();
    packets.extend(subscribe_fixtures().into_iter().map(|f| f.1));
    packets.push(unsubscribe_fixture());
    // A PUBLISH with a two-byte remaining length exercises the variable-length integer.
    let mut long = Vec::new();
    let publish = Publish {
        dup: false,
        qos: PublishQos::AtLeastOnce(id(3)),
        retain: false,
        topic: "devices/d/messages/events/a=1",
        payload: &[7; 200],
    };
    encode_publish(&mut long, &publish).expect("encodes");
    packets.push(long);
    packets
}

#[test]
fn decodes_valid_client_packets() {
    for (name, bytes, expected) in client_fixtures() {
        assert_eq!(
            frame(&bytes, PACKET_BYTES_MAX),
            Ok(Some(bytes.len())),
            "{name}"
        );
        assert_eq!(decode(&bytes), Ok(expected), "{name}");
    }
}

#[test]
fn decodes_subscribe_and_unsubscribe() {
    for (name, bytes, packet_id, filters) in subscribe_fixtures() {
        let Ok(Packet::Subscribe(subscribe)) = decode(&bytes) else {
            panic!("{name}: not a SUBSCRIBE: {:?}", decode(&bytes));
        };
        assert_eq!(subscribe.packet_id, id(packet_id), "{name}");
        assert_eq!(subscribe.filter_count(), filters.len(), "{name}");
        assert_eq!(subscribe.filters().collect::<Vec<_>>(), filters, "{name}");
    }
    let bytes = unsubscribe_fixture();
    let Ok(Packet::Unsubscribe(unsubscribe)) = decode(&bytes) else {
        panic!("not an UNSUBSCRIBE: {:?}", decode(&bytes));
    };
    assert_eq!(unsubscribe.packet_id, id(2));
    assert_eq!(unsubscribe.filter_count(), 1);
    assert_eq!(unsubscribe.filters().collect::<Vec<_>>(), vec!["a/#"]);
}

#[test]
fn refuses_malformed_client_packets() {
    use DecodeError::*;
    let table: &[(&str, &str, DecodeError)] = &[
        // Fixed header.
        ("packet type 0", "00 00", PacketTypeInvalid),
        ("packet type 15", "f0 00", PacketTypeInvalid),
        ("connack from a client", "20 02 00 00", PacketTypeInvalid),
        ("suback from a client", "90 03 00 01 00", PacketTypeInvalid),
        ("unsuback from a client", "b0 02 00 01", PacketTypeInvalid),
        ("pingresp from a client", "d0 00", PacketTypeInvalid),
        (
            "remaining length of 5 bytes",
            "30 ff ff ff ff 01",
            RemainingLengthMalformed,
        ),
        ("only a first byte", "30", Truncated),
        ("body shorter than announced", "30 05 00", Truncated),
        ("bytes after the frame", "c0 00 00", TrailingBytes),
        // Reserved flags [MQTT-2.2.2-2].
        ("pingreq flags", "c1 00", FlagsInvalid),
        ("disconnect flags", "e2 00", FlagsInvalid),
        ("puback flags", "42 02 00 01", FlagsInvalid),
        ("pubrec flags", "51 02 00 01", FlagsInvalid),
        ("pubrel flags 0", "60 02 00 01", FlagsInvalid),
        ("pubcomp flags", "72 02 00 01", FlagsInvalid),
        ("subscribe flags 0", "80 06 00 01 00 01 61 00", FlagsInvalid),
        ("unsubscribe flags 0", "a0 05 00 01 00 01 61", FlagsInvalid),
        (
            "connect flags",
            "11 0d 00 04 4d 51 54 54 04 02 00 3c 00 01 63",
            FlagsInvalid,
        ),
        // Bodies of fixed size.
        ("disconnect with a body", "e0 01 00", TrailingBytes),
        ("pingreq with a body", "c0 01 00", TrailingBytes),
        ("puback with extra byte", "40 03 00 01 00", TrailingBytes),
        ("puback id 0", "40 02 00 00", PacketIdZero),
        ("pubrel id 0", "62 02 00 00", PacketIdZero),
        ("puback short", "40 01 00", Truncated),
        // PUBLISH.
        ("publish qos 3", "36 05 00 01 74 00 01", QosInvalid),
        ("publish dup with qos 0", "38 03 00 01 74", FlagsInvalid),
        ("publish topic +", "30 03 00 01 2b", TopicInvalid),
        ("publish topic with #", "30 05 00 03 61 2f 23", TopicInvalid),
        ("publish empty topic", "30 02 00 00", TopicInvalid),
        ("publish topic with U+0000", "30 03 00 01 00", StringInvalid),
        (
            "publish topic not utf-8",
            "30 04 00 02 c3 28",
            StringInvalid,
        ),
        (
            "publish topic with a surrogate",
            "30 05 00 03 ed a0 80",
            StringInvalid,
        ),
        (
            "publish topic overlong utf-8",
            "30 04 00 02 c0 af",
            StringInvalid,
        ),
        (
            "publish qos 1 without packet id",
            "32 03 00 01 74",
            Truncated,
        ),
        ("publish qos 1 id 0", "32 05 00 01 74 00 00", PacketIdZero),
        ("publish qos 2 id 0", "34 05 00 01 74 00 00", PacketIdZero),
        ("publish topic past the end", "30 03 00 05 61", Truncated),
        // SUBSCRIBE / UNSUBSCRIBE.
        ("subscribe without filters", "82 02 00 01", FiltersEmpty),
        ("subscribe id 0", "82 06 00 00 00 01 61 00", PacketIdZero),
        ("subscribe qos 3", "82 06 00 01 00 01 61 03", QosInvalid),
        (
            "subscribe reserved qos bits",
            "82 06 00 01 00 01 61 04",
            RequestedQosInvalid,
        ),
        (
            "subscribe filter a#",
            "82 07 00 01 00 02 61 23 00",
            TopicFilterInvalid,
        ),
        (
            "subscribe filter #/a",
            "82 08 00 01 00 03 23 2f 61 00",
            TopicFilterInvalid,
        ),
        (
            "subscribe filter a+",
            "82 07 00 01 00 02 61 2b 00",
            TopicFilterInvalid,
        ),
        (
            "subscribe empty filter",
            "82 05 00 01 00 00 00",
            TopicFilterInvalid,
        ),
        (
            "subscribe filter with U+0000",
            "82 06 00 01 00 01 00 00",
            StringInvalid,
        ),
        (
            "subscribe without qos byte",
            "82 05 00 01 00 01 61",
            Truncated,
        ),
        (
            "subscribe second filter cut",
            "82 08 00 01 00 01 61 00 00 05",
            Truncated,
        ),
        ("unsubscribe without filters", "a2 02 00 01", FiltersEmpty),
        ("unsubscribe id 0", "a2 05 00 00 00 01 61", PacketIdZero),
        (
            "unsubscribe bad filter",
            "a2 06 00 01 00 02 23 61",
            TopicFilterInvalid,
        ),
        // CONNECT.
        (
            "protocol name MQTX",
            "10 0d 00 04 4d 51 54 58 04 02 00 3c 00 01 63",
            ProtocolNameInvalid,
        ),
        (
            "mqtt 3.1 MQIsdp level 3",
            "10 0f 00 06 4d 51 49 73 64 70 03 02 00 3c 00 01 63",
            ProtocolLevelUnsupported,
        ),
        (
            "mqtt 5",
            "10 0d 00 04 4d 51 54 54 05 02 00 3c 00 01 63",
            ProtocolLevelUnsupported,
        ),
        (
            "mqtt level 3",
            "10 0d 00 04 4d 51 54 54 03 02 00 3c 00 01 63",
            ProtocolLevelUnsupported,
        ),
        (
            "reserved connect flag",
            "10 0d 00 04 4d 51 54 54 04 03 00 3c 00 01 63",
            ConnectFlagsInvalid,
        ),
        (
            "will qos without will",
            "10 0d 00 04 4d 51 54 54 04 0a 00 3c 00 01 63",
            ConnectFlagsInvalid,
        ),
        (
            "will retain without will",
            "10 0d 00 04 4d 51 54 54 04 22 00 3c 00 01 63",
            ConnectFlagsInvalid,
        ),
        (
            "password without username",
            "10 0d 00 04 4d 51 54 54 04 42 00 3c 00 01 63",
            ConnectFlagsInvalid,
        ),
        (
            "will qos 3",
            "10 12 00 04 4d 51 54 54 04 1e 00 3c 00 01 63 00 01 74 00 00",
            ConnectFlagsInvalid,
        ),
        (
            "will topic with a wildcard",
            "10 12 00 04 4d 51 54 54 04 06 00 3c 00 01 63 00 01 23 00 00",
            TopicInvalid,
        ),
        (
            "username not utf-8",
            "10 11 00 04 4d 51 54 54 04 82 00 3c 00 01 63 00 02 c3 28",
            StringInvalid,
        ),
        (
            "client id with U+0000",
            "10 0d 00 04 4d 51 54 54 04 02 00 3c 00 01 00",
            StringInvalid,
        ),
        (
            "empty client id, clean 0",
            "10 0c 00 04 4d 51 54 54 04 00 00 3c 00 00",
            ClientIdRejected,
        ),
        (
            "username flag, no username",
            "10 0d 00 04 4d 51 54 54 04 82 00 3c 00 01 63",
            Truncated,
        ),
        (
            "connect trailing byte",
            "10 0e 00 04 4d 51 54 54 04 02 00 3c 00 01 63 00",
            TrailingBytes,
        ),
        (
            "connect cut after level",
            "10 07 00 04 4d 51 54 54 04",
            Truncated,
        ),
    ];
    for &(name, bytes, expected) in table {
        assert_eq!(decode(&hex(bytes)), Err(expected), "{name}");
    }
}

#[test]
fn connect_errors_say_which_connack_to_send() {
    let table: &[(DecodeError, Option<ConnectReturnCode>)] = &[
        (
            DecodeError::ProtocolLevelUnsupported,
            Some(ConnectReturnCode::UnacceptableProtocolVersion),
        ),
        (
            DecodeError::ClientIdRejected,
            Some(ConnectReturnCode::IdentifierRejected),
        ),
        (DecodeError::ProtocolNameInvalid, None),
        (DecodeError::ConnectFlagsInvalid, None),
        (DecodeError::Truncated, None),
    ];
    for &(error, code) in table {
        assert_eq!(error.connack_code(), code, "{error:?}");
    }
}

#[test]
#[allow(clippy::type_complexity)] // The row type reads best spelled out.
fn frames_by_fixed_header() {
    let table: &[(&str, usize, Result<Option<usize>, DecodeError>)] = &[
        ("", 100, Ok(None)),
        ("30", 100, Ok(None)),
        ("30 80", 100, Ok(None)),
        ("30 80 80 80", 1 << 30, Ok(None)),
        (
            "30 80 80 80 80",
            1 << 30,
            Err(DecodeError::RemainingLengthMalformed),
        ),
        ("30 02 00", 100, Ok(None)),
        ("30 02 00 01", 100, Ok(Some(4))),
        ("30 02 00 01 ff", 100, Ok(Some(4))),
        ("c0 00", 2, Ok(Some(2))),
        ("c0 00 c0 00", 2, Ok(Some(2))),
        // Refused from the header alone: the body has not arrived.
        ("30 ff ff ff 7f", 1000, Err(DecodeError::PacketTooLarge)),
        ("30 80 01", 100, Err(DecodeError::PacketTooLarge)),
        // The limit counts the fixed header too: 2 + 127 bytes.
        ("30 7f", 129, Ok(None)),
        ("30 7f", 128, Err(DecodeError::PacketTooLarge)),
        ("c0 00", 1, Err(DecodeError::PacketTooLarge)),
    ];
    for &(bytes, max, expected) in table {
        assert_eq!(frame(&hex(bytes), max), expected, "{bytes:?} max {max}");
    }
}

#[test]
fn every_truncation_is_incomplete_never_a_panic() {
    for bytes in all_valid_client_packets() {
        assert!(decode(&bytes).is_ok(), "{bytes:02x?}");
        for len in 0..bytes.len() {
            let prefix = bytes.get(..len).expect("len < bytes.len()");
            assert_eq!(frame(prefix, PACKET_BYTES_MAX), Ok(None), "{prefix:02x?}");
            assert!(decode(prefix).is_err(), "{prefix:02x?}");
            // A client decoding a cut frame must fail the same way.
            assert!(decode_from_server(prefix).is_err(), "{prefix:02x?}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(decode(&longer), Err(DecodeError::TrailingBytes));
    }
    for bytes in all_valid_server_packets() {
        assert!(decode_from_server(&bytes).is_ok(), "{bytes:02x?}");
        for len in 0..bytes.len() {
            let prefix = bytes.get(..len).expect("len < bytes.len()");
            assert_eq!(frame(prefix, PACKET_BYTES_MAX), Ok(None), "{prefix:02x?}");
            assert!(decode_from_server(prefix).is_err(), "{prefix:02x?}");
        }
    }
}

/// Encodes a decoded client packet with the client-side encoders.
fn encode_client_packet(packet: &Packet<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    match packet {
        Packet::Connect(connect) => encode_connect(&mut out, connect).expect("encodes"),
        Packet::Publish(publish) => encode_publish(&mut out, publish).expect("encodes"),
        Packet::Puback(id) => encode_puback(&mut out, *id),
        Packet::Pubrec(id) => encode_pubrec(&mut out, *id),
        Packet::Pubrel(id) => encode_pubrel(&mut out, *id),
        Packet::Pubcomp(id) => encode_pubcomp(&mut out, *id),
        Packet::Subscribe(subscribe) => {
            let filters: Vec<_> = subscribe.filters().collect();
            encode_subscribe(&mut out, subscribe.packet_id, &filters).expect("encodes");
        }
        Packet::Unsubscribe(unsubscribe) => {
            let filters: Vec<_> = unsubscribe.filters().collect();
            encode_unsubscribe(&mut out, unsubscribe.packet_id, &filters).expect("encodes");
        }
        Packet::Pingreq => encode_pingreq(&mut out),
        Packet::Disconnect => encode_disconnect(&mut out),
    }
    out
}

#[test]
fn client_packets_round_trip_byte_for_byte() {
    // The fixtures use the minimal remaining-length encoding, so re-encoding is exact.
    for bytes in all_valid_client_packets() {
        let packet = decode(&bytes).expect("fixture decodes");
        assert_eq!(encode_client_packet(&packet), bytes, "{packet:?}");
    }
}

fn all_valid_server_packets() -> Vec<Vec<u8>> {
    let mut packets = Vec::new();
    let mut push = |encode: &dyn Fn(&mut Vec<u8>)| {
        let mut out = Vec::new();
        encode(&mut out);
        packets.push(out);
    };
    push(&|out| encode_connack(out, true, ConnectReturnCode::Accepted));
    push(&|out| encode_connack(out, false, ConnectReturnCode::NotAuthorized));
    push(&|out| encode_puback(out, id(9)));
    push(&|out| encode_pubrec(out, id(9)));
    push(&|out| encode_pubrel(out, id(9)));
    push(&|out| encode_pubcomp(out, id(9)));
    push(&|out| encode_unsuback(out, id(9)));
    push(&|out| encode_pingresp(out));
    push(&|out| {
        let codes = [
            SubackCode::Granted(QoS::AtMostOnce),
            SubackCode::Granted(QoS::AtLeastOnce),
            SubackCode::Failure,
        ];
        encode_suback(out, id(4), &codes).expect("encodes");
    });
    push(&|out| {
        let publish = Publish {
            dup: false,
            qos: PublishQos::AtLeastOnce(id(77)),
            retain: false,
            topic: "devices/dev1/messages/devicebound/%24.mid=m1&color=red",
            payload: b"hello",
        };
        encode_publish(out, &publish).expect("encodes");
    });
    push(&|out| {
        let publish = Publish {
            dup: false,
            qos: PublishQos::AtMostOnce,
            retain: false,
            topic: "$iothub/twin/res/200/?$rid=1",
            payload: b"{}",
        };
        encode_publish(out, &publish).expect("encodes");
    });
    packets
}

#[test]
fn server_encoders_match_the_spec_bytes() {
    let table: &[(&str, Vec<u8>)] = &[
        ("20 02 01 00", {
            let mut out = Vec::new();
            encode_connack(&mut out, true, ConnectReturnCode::Accepted);
            out
        }),
        // Session present is never sent with a refusal [MQTT-3.2.2-4].
        ("20 02 00 05", {
            let mut out = Vec::new();
            encode_connack(&mut out, true, ConnectReturnCode::NotAuthorized);
            out
        }),
        ("20 02 00 01", {
            let mut out = Vec::new();
            encode_connack(
                &mut out,
                false,
                ConnectReturnCode::UnacceptableProtocolVersion,
            );
            out
        }),
        ("40 02 01 02", {
            let mut out = Vec::new();
            encode_puback(&mut out, id(0x0102));
            out
        }),
        ("90 05 00 04 01 00 80", {
            let mut out = Vec::new();
            let codes = [
                SubackCode::Granted(QoS::AtLeastOnce),
                SubackCode::Granted(QoS::AtMostOnce),
                SubackCode::Failure,
            ];
            encode_suback(&mut out, id(4), &codes).expect("encodes");
            out
        }),
        ("b0 02 00 09", {
            let mut out = Vec::new();
            encode_unsuback(&mut out, id(9));
            out
        }),
        ("d0 00", {
            let mut out = Vec::new();
            encode_pingresp(&mut out);
            out
        }),
        ("32 07 00 01 74 00 2a 68 69", {
            let mut out = bytes::BytesMut::new();
            let publish = Publish {
                dup: false,
                qos: PublishQos::AtLeastOnce(id(42)),
                retain: false,
                topic: "t",
                payload: b"hi",
            };
            encode_publish(&mut out, &publish).expect("encodes");
            out.to_vec()
        }),
    ];
    for (expected, actual) in table {
        assert_eq!(actual, &hex(expected), "{expected}");
    }
}

#[test]
fn server_packets_round_trip() {
    let expected = [
        ServerPacket::Connack {
            session_present: true,
            code: ConnectReturnCode::Accepted,
        },
        ServerPacket::Connack {
            session_present: false,
            code: ConnectReturnCode::NotAuthorized,
        },
        ServerPacket::Puback(id(9)),
        ServerPacket::Pubrec(id(9)),
        ServerPacket::Pubrel(id(9)),
        ServerPacket::Pubcomp(id(9)),
        ServerPacket::Unsuback(id(9)),
        ServerPacket::Pingresp,
    ];
    let packets = all_valid_server_packets();
    for (bytes, expected) in packets.iter().zip(expected) {
        assert_eq!(decode_from_server(bytes), Ok(expected));
    }
    let suback = packets.get(8).expect("suback fixture");
    let Ok(ServerPacket::Suback(suback)) = decode_from_server(suback) else {
        panic!("not a SUBACK");
    };
    assert_eq!(suback.packet_id, id(4));
    assert_eq!(
        suback.return_codes().collect::<Vec<_>>(),
        [
            SubackCode::Granted(QoS::AtMostOnce),
            SubackCode::Granted(QoS::AtLeastOnce),
            SubackCode::Failure
        ]
    );
    let c2d = packets.get(9).expect("publish fixture");
    let Ok(ServerPacket::Publish(publish)) = decode_from_server(c2d) else {
        panic!("not a PUBLISH");
    };
    assert_eq!(
        publish.topic,
        "devices/dev1/messages/devicebound/%24.mid=m1&color=red"
    );
    assert_eq!(publish.qos, PublishQos::AtLeastOnce(id(77)));
    assert_eq!(publish.payload, b"hello");
}

#[test]
fn client_side_decode_refuses_what_a_server_must_not_send() {
    let table: &[(&str, DecodeError)] = &[
        ("20 02 02 00", DecodeError::FlagsInvalid),
        ("20 02 00 06", DecodeError::ReturnCodeInvalid),
        ("90 03 00 01 03", DecodeError::ReturnCodeInvalid),
        ("90 02 00 01", DecodeError::FiltersEmpty),
        ("10 00", DecodeError::PacketTypeInvalid),
        ("c0 00", DecodeError::PacketTypeInvalid),
        ("d0 01 00", DecodeError::TrailingBytes),
    ];
    for &(bytes, expected) in table {
        assert_eq!(decode_from_server(&hex(bytes)), Err(expected), "{bytes}");
    }
}

#[test]
fn large_publish_uses_a_four_byte_remaining_length() {
    let payload = vec![0x5a; 2 * 1024 * 1024];
    let publish = Publish {
        dup: false,
        qos: PublishQos::AtMostOnce,
        retain: false,
        topic: "t",
        payload: &payload,
    };
    let mut out = Vec::new();
    encode_publish(&mut out, &publish).expect("encodes");
    assert_eq!(out.get(..5), Some(&[0x30, 0x83, 0x80, 0x80, 0x01][..]));
    assert_eq!(frame(&out, PACKET_BYTES_MAX), Ok(Some(out.len())));
    assert_eq!(frame(&out, out.len() - 1), Err(DecodeError::PacketTooLarge));
    assert_eq!(decode(&out), Ok(Packet::Publish(publish)));
}

#[test]
fn encoders_refuse_fields_that_do_not_fit() {
    let topic = "t".repeat(STRING_LEN_MAX + 1);
    let publish = Publish {
        dup: false,
        qos: PublishQos::AtMostOnce,
        retain: false,
        topic: &topic,
        payload: b"",
    };
    let mut out = Vec::new();
    assert_eq!(
        encode_publish(&mut out, &publish),
        Err(EncodeError::FieldTooLong)
    );
    assert_eq!(
        encode_subscribe(&mut out, id(1), &[]),
        Err(EncodeError::FiltersEmpty)
    );
    assert_eq!(
        encode_unsubscribe(&mut out, id(1), &[]),
        Err(EncodeError::FiltersEmpty)
    );
    assert_eq!(
        encode_suback(&mut out, id(1), &[]),
        Err(EncodeError::FiltersEmpty)
    );
    assert!(out.is_empty(), "a failed encode writes nothing");
    let topic = "t".repeat(STRING_LEN_MAX);
    let publish = Publish {
        topic: &topic,
        ..publish
    };
    assert_eq!(encode_publish(&mut out, &publish), Ok(()));
}

/// xorshift64*: deterministic, seedable and good enough to shake a parser.
struct Prng(u64);

impl Prng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, bound: usize) -> usize {
        (self.next() % bound as u64) as usize
    }
}

/// Decodes random bytes and randomly mutated valid packets: no input may panic, and whatever
/// decodes must survive encode-then-decode unchanged (the property the fuzz target checks).
#[test]
fn random_and_mutated_input_never_panics() {
    let seed = 0x1d07_5eed_u64;
    let mut prng = Prng(seed);
    let valid = all_valid_client_packets();
    let mut decoded_count = 0usize;
    for round in 0..200_000 {
        let mut bytes = if round % 2 == 0 {
            let len = prng.below(40);
            (0..len).map(|_| prng.next() as u8).collect::<Vec<u8>>()
        } else {
            valid
                .get(prng.below(valid.len()))
                .expect("index below len")
                .clone()
        };
        for _ in 0..=prng.below(3) {
            let at = prng.below(bytes.len().max(1));
            if let Some(byte) = bytes.get_mut(at) {
                *byte ^= 1 << prng.below(8);
            }
        }
        if let Ok(Some(len)) = frame(&bytes, PACKET_BYTES_MAX) {
            let packet_bytes = bytes.get(..len).expect("frame returns a prefix length");
            if let Ok(packet) = decode(packet_bytes) {
                decoded_count += 1;
                let again = encode_client_packet(&packet);
                assert_eq!(decode(&again), Ok(packet), "seed {seed:#x} round {round}");
            }
            let _ = decode_from_server(packet_bytes);
        }
        let _ = decode(&bytes);
    }
    // Mutations of valid packets often stay valid; if none did, the test would prove nothing.
    assert!(decoded_count > 1000, "only {decoded_count} inputs decoded");
}
