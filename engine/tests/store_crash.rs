//! Crash test of the segment store: a child process appends with `fsync = always` and prints
//! every offset range `append_batch` acknowledged; the parent kills it with SIGKILL at random
//! moments, reopens the store (recovery), and checks that every acknowledged record is there,
//! intact, in order, exactly once. The child is this same test binary, started with
//! `INGOT_CRASH_CHILD` set, so no extra target is needed.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ingot_engine::store::{
    Fsync, MessageRef, Offset, PartitionId, PropertyRef, Reader, StartAt, Store, StoreConfig,
};
use rand::{Rng, SeedableRng};

const CHILD_ENV: &str = "INGOT_CRASH_CHILD";
const TEST_NAME: &str = "acknowledged_records_survive_sigkill";

fn config() -> StoreConfig {
    let mut config = StoreConfig::new(2);
    // Small segments, so that kills also land in rolls and in segment preparation.
    config.segment_bytes_max = 128 * 1024;
    config.index_interval_bytes = 1024;
    config.fsync = Fsync::Always;
    config
}

/// The body of the record at `offset` of `partition`: the parent recomputes it to check content.
fn body(partition: u32, offset: u64) -> Vec<u8> {
    let len = (offset.wrapping_mul(2_654_435_761) % 700) as usize;
    let mut body = format!("p{partition}-o{offset}-").into_bytes();
    body.extend((0..len).map(|i| (offset as usize + i) as u8));
    body
}

fn child(data_dir: &Path) {
    let mut store = Store::open(data_dir, config()).expect("the child opens the store");
    let mut rng = rand::rngs::StdRng::from_entropy();
    let mut stdout = std::io::stdout().lock();
    let props = [PropertyRef {
        name: "iothub-connection-device-id",
        value: "crash",
    }];
    loop {
        let partition = PartitionId(rng.gen_range(0..2));
        let log = store.partition_mut(partition).expect("partition exists");
        let next = log.next_offset().0;
        let count = rng.gen_range(1..=24u64);
        let bodies: Vec<Vec<u8>> = (next..next + count).map(|o| body(partition.0, o)).collect();
        let batch: Vec<MessageRef<'_>> = bodies
            .iter()
            .map(|b| MessageRef {
                system_properties: &props,
                application_properties: &[],
                body: b,
            })
            .collect();
        let range = log
            .append_batch(&batch, 1_700_000_000_000)
            .expect("append succeeds");
        assert_eq!(range.start.0, next);
        writeln!(
            stdout,
            "ACK {} {} {}",
            partition.0, range.start.0, range.end.0
        )
        .expect("stdout");
        stdout.flush().expect("stdout");
    }
}

#[test]
fn acknowledged_records_survive_sigkill() {
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        child(Path::new(&dir));
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let seed: u64 = rand::random();
    println!("seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut acked = [0u64; 2];
    let started = Instant::now();
    let mut rounds = 0;
    // Bounded by time as well as count, so a slow machine still finishes in about a minute.
    while rounds < 60 && started.elapsed() < Duration::from_secs(30) {
        rounds += 1;
        let mut child = Command::new(&exe)
            .args(["--exact", TEST_NAME, "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Sometimes kill during start-up and recovery, mostly while appending.
        let delay_ms = if rng.gen_bool(0.15) {
            rng.gen_range(0..15)
        } else {
            rng.gen_range(15..250)
        };
        std::thread::sleep(Duration::from_millis(delay_ms));
        child.kill().unwrap(); // SIGKILL on Unix
        child.wait().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        for line in stdout.lines() {
            let line = line.unwrap();
            let Some(rest) = line.strip_prefix("ACK ") else {
                continue;
            };
            let fields: Vec<u64> = rest.split(' ').map(|f| f.parse().unwrap()).collect();
            let [partition, start, end] = fields[..] else {
                panic!("bad line {line}")
            };
            let partition = partition as usize;
            // Acknowledged ranges are dense: each starts where the last acknowledged one ended
            // (or later, never earlier: unacknowledged records may survive a kill, acked ones
            // are never handed out again).
            assert!(
                start >= acked[partition],
                "offset {start} acknowledged twice (seed {seed})"
            );
            acked[partition] = end;
        }
        check(dir.path(), acked, seed);
    }
    assert!(
        acked.iter().sum::<u64>() > 0,
        "no append was acknowledged in {rounds} rounds"
    );
    println!(
        "{rounds} kills, {acked:?} records acknowledged, {:?}",
        started.elapsed()
    );
}

/// Reopens the store (running recovery) and reads every partition from the start.
fn check(data_dir: &Path, acked: [u64; 2], seed: u64) {
    let store = Store::open(data_dir, config()).expect("recovery opens the store");
    let reader = Reader::open(data_dir).expect("the reader opens");
    for partition in 0..2u32 {
        let mut records = reader
            .partition(PartitionId(partition), StartAt::Start)
            .expect("the partition opens");
        let mut expected = 0u64;
        while let Some(record) = records.next().expect("no damage") {
            assert_eq!(
                record.offset,
                Offset(expected),
                "gap or duplicate (seed {seed})"
            );
            assert_eq!(
                record.message.body(),
                &body(partition, expected)[..],
                "seed {seed}"
            );
            expected += 1;
        }
        assert!(
            expected >= acked[partition as usize],
            "partition {partition}: {expected} records, {} acknowledged (seed {seed})",
            acked[partition as usize]
        );
    }
    drop(store);
}
