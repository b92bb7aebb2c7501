//! Route condition evaluation: what every ingested message pays per route.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ingot_engine::route::{
    Condition, EndpointSet, Evaluator, FallbackRoute, RouteMessage, RouteSource, RouteSpec,
    RouteTable,
};
use ingot_engine::store::format::{property_name, MessageRef, PropertyRef};

/// A telemetry body of about 1 KiB with the field the body condition reads near the front.
fn body_1k() -> Vec<u8> {
    let mut body = String::from(
        r#"{"Weather":{"Temperature":55.5,"Humidity":40,"HistoricalData":[{"Month":"Jan","Temperature":12.5},{"Month":"Feb","Temperature":14.25}]},"deviceId":"dev-1","readings":["#,
    );
    let mut i = 0;
    while body.len() < 1000 {
        body.push_str(&format!(r#"{{"t":{i}.5,"ok":true,"tag":"sensor-{i}"}},"#));
        i += 1;
    }
    body.push_str(r#"{"t":0}]}"#);
    body.into_bytes()
}

fn bench(c: &mut Criterion) {
    let system = [
        PropertyRef {
            name: property_name::CONNECTION_DEVICE_ID,
            value: "dev-1",
        },
        PropertyRef {
            name: property_name::CONNECTION_AUTH_GENERATION_ID,
            value: "638000000000000000",
        },
        PropertyRef {
            name: property_name::MESSAGE_ID,
            value: "4f1c5d3e-2a9b-4e61-8a57-0d2b1e9f3c70",
        },
        PropertyRef {
            name: property_name::CONTENT_TYPE,
            value: "application/json",
        },
        PropertyRef {
            name: property_name::CONTENT_ENCODING,
            value: "utf-8",
        },
    ];
    let application = [
        PropertyRef {
            name: "temperatureAlert",
            value: "false",
        },
        PropertyRef {
            name: "processingPath",
            value: "hot",
        },
        PropertyRef {
            name: "severity",
            value: "2",
        },
    ];
    let body = body_1k();
    assert!((1000..1100).contains(&body.len()));
    let message = RouteMessage {
        message: MessageRef {
            system_properties: &system,
            application_properties: &application,
            body: &body,
        },
        twin: None,
    };
    let mut evaluator = Evaluator::new();

    let mut group = c.benchmark_group("route");
    group.throughput(Throughput::Elements(1));

    let property = Condition::compile("processingPath = 'hot' AND $connectionDeviceId = 'dev-1'")
        .expect("compiles");
    group.bench_function("property_condition", |b| {
        b.iter(|| evaluator.evaluate(black_box(&property), black_box(&message)))
    });

    // The same condition as a route: ingest evaluates it in the simple shape (each property
    // looked up once per message, no stack machine).
    let one_route = RouteTable::compile(
        &[RouteSpec {
            name: "hot".to_owned(),
            source: RouteSource::DeviceMessages,
            condition: Some("processingPath = 'hot' AND $connectionDeviceId = 'dev-1'".to_owned()),
            endpoint_names: vec!["hot".to_owned()],
            is_enabled: true,
        }],
        FallbackRoute { enabled: true },
    )
    .expect("compiles");
    let mut one_out = EndpointSet::new();
    group.bench_function("property_condition_route", |b| {
        b.iter(|| {
            one_route.matches(
                RouteSource::DeviceMessages,
                black_box(&message),
                &mut evaluator,
                &mut one_out,
            )
        })
    });

    let body_condition = Condition::compile("$body.Weather.Temperature > 50").expect("compiles");
    group.bench_function("body_condition_1k", |b| {
        b.iter(|| evaluator.evaluate(black_box(&body_condition), black_box(&message)))
    });

    // 20 routes as a hub might have them: most on properties, a few on the body, several to
    // the same endpoint; the message matches three of them.
    let conditions = [
        "processingPath = 'cold'",
        "as_number(severity) >= 4",
        "$connectionDeviceId = 'dev-7'",
        "temperatureAlert = 'true'",
        "processingPath = 'hot' AND $connectionDeviceId = 'dev-1'",
        "STARTS_WITH($connectionDeviceId, 'building-2/')",
        "level = 'critical' OR level = 'error'",
        "$body.Weather.Temperature > 50",
        "$body.Weather.Humidity < 10",
        "is_defined(firmwareUpdate)",
        "$contentType = 'application/octet-stream'",
        "LOWER(region) = 'westeurope'",
        "as_number(severity) = 2",
        "$body.deviceId = 'dev-9'",
        "NOT (processingPath = 'hot')",
        "$messageId = 'probe'",
        "CONTAINS($connectionDeviceId, 'test')",
        "$body.Weather.HistoricalData[1].Month = 'Feb'",
        "batch = 'nightly'",
        "$connectionModuleId = 'edgeAgent'",
    ];
    let specs: Vec<RouteSpec> = conditions
        .iter()
        .enumerate()
        .map(|(i, condition)| RouteSpec {
            name: format!("route-{i}"),
            source: RouteSource::DeviceMessages,
            condition: Some((*condition).to_owned()),
            endpoint_names: vec![format!("endpoint-{}", i % 8)],
            is_enabled: true,
        })
        .collect();
    let table = RouteTable::compile(&specs, FallbackRoute { enabled: true }).expect("compiles");
    let mut out = EndpointSet::new();
    table.matches(
        RouteSource::DeviceMessages,
        &message,
        &mut evaluator,
        &mut out,
    );
    // Routes 4, 7, 12 and 17 match; 12 shares route 4's endpoint.
    assert_eq!(out.len(), 3);
    group.bench_function("table_20_routes", |b| {
        b.iter(|| {
            table.matches(
                RouteSource::DeviceMessages,
                black_box(&message),
                &mut evaluator,
                &mut out,
            )
        })
    });

    group.bench_function("compile_property_condition", |b| {
        b.iter(|| {
            Condition::compile(black_box(
                "processingPath = 'hot' AND $connectionDeviceId = 'dev-1'",
            ))
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
