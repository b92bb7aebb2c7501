//! MQTT decode: what every telemetry PUBLISH pays before it reaches the store.
//!
//! The input is a QoS 1 telemetry PUBLISH with a 100-byte payload, encoded once up front:
//! - `publish_decode`: `mqtt::decode` alone;
//! - `telemetry_python_bag`: frame + decode + topic parse + a full property-bag walk, with the
//!   Python SDK's bag (every system value percent-escaped, so some values allocate);
//! - `telemetry_plain_bag`: the same with a bag without escapes (the allocation-free path).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ingot_engine::iothub::{Identity, PropertyName, PublishTopic};
use ingot_engine::mqtt::{self, Packet, PacketId, Publish, PublishQos};

const PYTHON_TOPIC: &str = "devices/dev1/messages/events/%24.mid=id%201&%24.cid=c%2F1\
                            &%24.ct=application%2Fjson&%24.ce=utf-8&temp%20alert=a%26b%3Dc&z=1";
const PLAIN_TOPIC: &str =
    "devices/dev1/messages/events/$.mid=id1&$.cid=c1&$.ct=json&$.ce=utf-8&alert=ab&z=1";
const PACKET_BYTES_MAX: usize = 300 * 1024;

fn telemetry_packet(topic: &str) -> Vec<u8> {
    let payload = [0x42u8; 100];
    let publish = Publish {
        dup: false,
        qos: PublishQos::AtLeastOnce(PacketId::new(7).expect("non-zero")),
        retain: false,
        topic,
        payload: &payload,
    };
    let mut packet = Vec::new();
    mqtt::encode_publish(&mut packet, &publish).expect("encodes");
    packet
}

/// The shard's per-PUBLISH parsing; returns a value derived from everything it looked at so
/// the optimiser cannot skip any of it.
fn telemetry_hot_path(buf: &[u8]) -> usize {
    let identity = Identity {
        device_id: "dev1",
        module_id: None,
    };
    let len = mqtt::frame(buf, PACKET_BYTES_MAX)
        .expect("valid")
        .expect("complete");
    let Ok(Packet::Publish(publish)) = mqtt::decode(buf.get(..len).expect("framed")) else {
        panic!("not a PUBLISH");
    };
    let PublishTopic::Telemetry { properties } = PublishTopic::parse(publish.topic, identity)
    else {
        panic!("not telemetry");
    };
    let mut sum = publish.payload.len();
    for property in properties.iter() {
        if let PropertyName::Application(name) = &property.name {
            sum += name.len();
        }
        sum += property.value.as_ref().map_or(0, |value| value.len());
    }
    sum
}

fn bench(c: &mut Criterion) {
    let python = telemetry_packet(PYTHON_TOPIC);
    let plain = telemetry_packet(PLAIN_TOPIC);
    let mut group = c.benchmark_group("mqtt_decode");
    group.throughput(Throughput::Elements(1));
    group.bench_function("publish_decode", |b| {
        b.iter(|| mqtt::decode(black_box(&python)).expect("decodes"))
    });
    group.bench_function("telemetry_python_bag", |b| {
        b.iter(|| telemetry_hot_path(black_box(&python)))
    });
    group.bench_function("telemetry_plain_bag", |b| {
        b.iter(|| telemetry_hot_path(black_box(&plain)))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
