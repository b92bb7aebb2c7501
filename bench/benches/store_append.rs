//! Segment store appends: what every device message pays on its way to PUBACK.
//!
//! Batches of 64 messages (one group commit each) of 100 B, 1 KiB and 16 KiB bodies, for each
//! fsync policy, into 64 MiB segments that the helper thread prepares (sparse, write-faulted) and,
//! once sealed, writes back and drops from the page cache. Run it pinned to one CPU (as
//! bench/regress does) to charge that helper work to the appends, as on a hub core. Beside
//! them, `memcpy` of the same bytes into a prefaulted buffer: the ceiling an append through a
//! mapping can approach.

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ingot_engine::store::{Fsync, MessageRef, PartitionId, PropertyRef, Store, StoreConfig};

const BATCH: usize = 64;
const BODY_SIZES: [usize; 3] = [100, 1024, 16 * 1024];

fn config(fsync: Fsync) -> StoreConfig {
    let mut config = StoreConfig::new(1);
    config.segment_bytes_max = 64 << 20;
    config.fsync = fsync;
    // Keeps the bench's disk use bounded; retention runs outside the timed part.
    config.retention_bytes_max = 512 << 20;
    config
}

fn bench_append(c: &mut Criterion) {
    let mut group = c.benchmark_group("store_append");
    for fsync in [Fsync::Never, Fsync::Interval(100), Fsync::Always] {
        for body_bytes in BODY_SIZES {
            let dir = tempfile::tempdir().expect("temporary directory");
            let mut store = Store::open(dir.path(), config(fsync)).expect("store opens");
            let body = vec![0x5au8; body_bytes];
            let system = [
                PropertyRef {
                    name: "iothub-connection-device-id",
                    value: "device-0001",
                },
                PropertyRef {
                    name: "content-type",
                    value: "application/json",
                },
            ];
            let app = [PropertyRef {
                name: "temperatureAlert",
                value: "false",
            }];
            let message = MessageRef {
                system_properties: &system,
                application_properties: &app,
                body: &body,
            };
            let batch = [message; BATCH];
            group.throughput(Throughput::Bytes((body_bytes * BATCH) as u64));
            let name = format!("{fsync:?}").to_lowercase().replace(['(', ')'], "");
            group.bench_function(BenchmarkId::new(name, body_bytes), |b| {
                b.iter_custom(|iters| {
                    let mut timed = Duration::ZERO;
                    for i in 0..iters {
                        if i % 64 == 0 {
                            store.enforce_retention(u64::MAX / 2).expect("retention");
                        }
                        let start = Instant::now();
                        let range = store
                            .append_batch(PartitionId(0), &batch, 1_700_000_000_000)
                            .expect("append");
                        timed += start.elapsed();
                        std::hint::black_box(range);
                    }
                    timed
                })
            });
        }
    }
    group.finish();
}

fn bench_memcpy(c: &mut Criterion) {
    let mut group = c.benchmark_group("memcpy_ceiling");
    let mut target = vec![1u8; 64 << 20];
    for body_bytes in BODY_SIZES {
        let source = vec![0x5au8; body_bytes * BATCH];
        group.throughput(Throughput::Bytes(source.len() as u64));
        let mut position = 0;
        group.bench_function(BenchmarkId::from_parameter(body_bytes), |b| {
            b.iter(|| {
                if position + source.len() > target.len() {
                    position = 0;
                }
                target[position..position + source.len()].copy_from_slice(&source);
                position += source.len();
                std::hint::black_box(&target[position - 1]);
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_append, bench_memcpy);
criterion_main!(benches);
