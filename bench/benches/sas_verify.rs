//! SAS verification: what every device CONNECT and every REST call pays.

use base64::Engine as _;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ingot_engine::auth::sas::{self, SasToken};

fn bench(c: &mut Criterion) {
    let key = base64::engine::general_purpose::STANDARD
        .decode("MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=")
        .expect("valid base64");
    let token = sas::generate(
        "myhub.azure-devices.net/devices/dev1",
        &key,
        1_700_000_000,
        None,
    );
    let mut group = c.benchmark_group("sas");
    group.throughput(Throughput::Elements(1));
    group.bench_function("parse_and_verify", |b| {
        b.iter(|| {
            let parsed = SasToken::parse(std::hint::black_box(&token)).expect("parses");
            parsed.verify(&[&key], 1_700_000_000).expect("verifies");
        })
    });
    group.bench_function("generate", |b| {
        b.iter(|| {
            sas::generate(
                "myhub.azure-devices.net/devices/dev1",
                &key,
                1_700_000_000,
                None,
            )
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
