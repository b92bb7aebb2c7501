//! Sequential reads of a partition: open a reader at the start and visit every record
//! in place (checksum, archive validation, body borrowed from the mapping).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ingot_engine::store::{
    Fsync, MessageRef, PartitionId, PropertyRef, Reader, StartAt, Store, StoreConfig,
};

const LOG_BYTES: usize = 64 << 20;

fn bench_read(c: &mut Criterion) {
    let mut group = c.benchmark_group("store_read");
    for body_bytes in [100usize, 1024, 16 * 1024] {
        let dir = tempfile::tempdir().expect("temporary directory");
        let mut config = StoreConfig::new(1);
        config.segment_bytes_max = 16 << 20;
        config.fsync = Fsync::Never;
        let mut store = Store::open(dir.path(), config).expect("store opens");
        let body = vec![0x5au8; body_bytes];
        let system = [PropertyRef {
            name: "iothub-connection-device-id",
            value: "device-0001",
        }];
        let message = MessageRef {
            system_properties: &system,
            application_properties: &[],
            body: &body,
        };
        let records = LOG_BYTES / body_bytes;
        for _ in 0..records / 64 {
            store
                .append_batch(PartitionId(0), &[message; 64], 1_700_000_000_000)
                .expect("append");
        }
        drop(store);
        let reader = Reader::open(dir.path()).expect("reader opens");
        group.throughput(Throughput::Bytes(((records / 64) * 64 * body_bytes) as u64));
        group.bench_function(BenchmarkId::new("sequential", body_bytes), |b| {
            b.iter(|| {
                let mut partition = reader
                    .partition(PartitionId(0), StartAt::Start)
                    .expect("partition");
                let mut bytes = 0usize;
                while let Some(record) = partition.next().expect("no damage") {
                    bytes += record.message.body().len();
                }
                std::hint::black_box(bytes)
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_read);
criterion_main!(benches);
