//! Proves the telemetry hot path allocates nothing: frame, decode, topic parse and a walk of a
//! property bag without escapes, counted by a global allocator.
//!
//! The trade-off: a counting allocator needs `unsafe impl GlobalAlloc`, which the workspace
//! denies; it is allowed in this test binary only, where it forwards to the system allocator and
//! adds a thread-local counter. The counter is per thread, so other tests of this binary running
//! in parallel cannot disturb the count.

#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use ingot_engine::iothub::{Identity, PropertyName, PublishTopic};
use ingot_engine::mqtt::{self, Packet, PacketId, Publish, PublishQos};

struct CountingAllocator;

thread_local! {
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, so it upholds
// `GlobalAlloc`'s contract exactly as `System` does; the counter touches no allocated memory.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|count| count.set(count.get() + 1));
        // SAFETY: forwarded from our caller, who upholds `alloc`'s contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` through this allocator with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|count| count.set(count.get() + 1));
        // SAFETY: forwarded from our caller, who upholds `realloc`'s contract.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

fn allocations() -> usize {
    ALLOCATIONS.with(Cell::get)
}

fn telemetry_packet(topic: &str) -> Vec<u8> {
    let mut packet = Vec::new();
    let publish = Publish {
        dup: false,
        qos: PublishQos::AtLeastOnce(PacketId::new(1).expect("non-zero")),
        retain: false,
        topic,
        payload: &[0x42; 100],
    };
    mqtt::encode_publish(&mut packet, &publish).expect("encodes");
    packet
}

/// Runs the shard's per-PUBLISH work and returns how many allocations it made.
fn hot_path_allocations(packet: &[u8]) -> usize {
    let identity = Identity {
        device_id: "dev1",
        module_id: None,
    };
    let before = allocations();
    let len = mqtt::frame(packet, 300 * 1024)
        .expect("valid")
        .expect("complete");
    let Ok(Packet::Publish(publish)) = mqtt::decode(&packet[..len]) else {
        panic!("not a PUBLISH");
    };
    let PublishTopic::Telemetry { properties } = PublishTopic::parse(publish.topic, identity)
    else {
        panic!("not telemetry");
    };
    let mut seen = 0usize;
    for property in properties.iter() {
        if let PropertyName::Application(name) = &property.name {
            seen += name.len();
        }
        seen += property.value.as_ref().map_or(0, |value| value.len());
    }
    let system = properties.system();
    seen += system.message_id.as_ref().map_or(0, |value| value.len());
    let after = allocations();
    assert!(seen > 0, "the bag was walked");
    assert_eq!(publish.payload.len(), 100);
    after - before
}

#[test]
fn telemetry_publish_without_escapes_allocates_nothing() {
    let packet = telemetry_packet("devices/dev1/messages/events/$.mid=m1&$.ct=json&color=red&n");
    assert_eq!(hot_path_allocations(&packet), 0);
}

/// The counter is real: an escaped value must allocate, or the test above proves nothing.
#[test]
fn escaped_property_values_are_counted() {
    let packet = telemetry_packet("devices/dev1/messages/events/%24.ct=application%2Fjson");
    assert!(hot_path_allocations(&packet) > 0);
}
