//! What routes cost on ingest: a batch of 64 device messages (100 B) appended to a partition as
//! a shard does, without routes and with 20 routes whose conditions do not match (each message
//! evaluates all 20, then the fallback sends it to `events`), the shape `perf/route-bench.sh`
//! measures end to end. The routing step is the shard's: each message through
//! `RouteTable::matches`, the ones for `events` gathered, then one append.

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ingot_engine::route::{
    EndpointSet, Evaluator, FallbackRoute, RouteMessage, RouteSource, RouteSpec, RouteTable,
};
use ingot_engine::store::format::property_name;
use ingot_engine::store::{Fsync, MessageRef, PartitionId, PropertyRef, Store, StoreConfig};

const BATCH: usize = 64;

fn table() -> RouteTable {
    let specs: Vec<RouteSpec> = (0..20)
        .map(|i| RouteSpec {
            name: format!("r{i}"),
            source: RouteSource::DeviceMessages,
            condition: Some(format!(
                "level = 'critical-{i}' AND $connectionDeviceId = 'load-{i}'"
            )),
            endpoint_names: vec!["alerts".to_owned()],
            is_enabled: true,
        })
        .collect();
    RouteTable::compile(&specs, FallbackRoute { enabled: true }).expect("compiles")
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("route_ingest");
    group.throughput(Throughput::Elements(BATCH as u64));
    let system = [
        PropertyRef {
            name: property_name::CONNECTION_DEVICE_ID,
            value: "load-42",
        },
        PropertyRef {
            name: property_name::CONNECTION_AUTH_GENERATION_ID,
            value: "638000000000000000",
        },
        PropertyRef {
            name: property_name::CONNECTION_AUTH_METHOD,
            value: r#"{"scope":"device","type":"sas","issuer":"iothub"}"#,
        },
        PropertyRef {
            name: property_name::MESSAGE_ID,
            value: "4f1c5d3e-2a9b-4e61-8a57-0d2b1e9f3c70",
        },
    ];
    let body = vec![0x5au8; 100];
    let message = MessageRef {
        system_properties: &system,
        application_properties: &[],
        body: &body,
    };
    let batch = [message; BATCH];
    let table = table();
    for routes in [false, true] {
        let dir = tempfile::tempdir().expect("temporary directory");
        let mut config = StoreConfig::new(1);
        config.segment_bytes_max = 64 << 20;
        config.fsync = Fsync::Never;
        config.retention_bytes_max = 512 << 20;
        let mut store = Store::open(dir.path(), config).expect("store opens");
        let mut evaluator = Evaluator::new();
        let mut events: Vec<MessageRef<'_>> = Vec::with_capacity(BATCH);
        let mut matched = EndpointSet::new();
        let name = if routes { "routes_20" } else { "no_routes" };
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut timed = Duration::ZERO;
                for i in 0..iters {
                    if i % 64 == 0 {
                        store.enforce_retention(u64::MAX / 2).expect("retention");
                    }
                    let start = Instant::now();
                    let appended = if routes {
                        events.clear();
                        for message in &batch {
                            let view = RouteMessage {
                                message: *message,
                                twin: None,
                            };
                            table.matches(
                                RouteSource::DeviceMessages,
                                &view,
                                &mut evaluator,
                                &mut matched,
                            );
                            if matched.contains(0) {
                                events.push(*message);
                            }
                        }
                        store.append_batch(PartitionId(0), &events, 1_700_000_000_000)
                    } else {
                        store.append_batch(PartitionId(0), &batch, 1_700_000_000_000)
                    };
                    timed += start.elapsed();
                    std::hint::black_box(appended.expect("append"));
                }
                timed
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
