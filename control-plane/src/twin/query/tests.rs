use serde_json::json;

use super::*;
use crate::twin::{TwinDoc, TwinIdentity};

const T0: &str = "2024-01-01T00:00:00Z";

/// A device twin rendered as the REST API renders it.
fn device(id: &str, tags: Value, reported: Value) -> Value {
    let mut doc = TwinDoc::new(T0);
    doc.patch_service(&json!({"tags": tags}), T0).unwrap();
    doc.patch_reported(&reported, T0).unwrap();
    doc.to_rest(&TwinIdentity::new(id, "etag"))
}

fn module(device_id: &str, module_id: &str, reported: Value) -> Value {
    let mut doc = TwinDoc::new(T0);
    doc.patch_reported(&reported, T0).unwrap();
    doc.to_rest(&TwinIdentity {
        module_id: Some(module_id),
        ..TwinIdentity::new(device_id, "etag")
    })
}

fn fleet() -> Vec<Value> {
    vec![
        device(
            "d1",
            json!({"location": {"region": "us", "plant": "redmond43"}}),
            json!({"fw": 2, "telemetryConfig": {"status": "Success"}, "name": "alpha"}),
        ),
        device(
            "d2",
            json!({"location": {"region": "us"}}),
            json!({"fw": 3.5, "telemetryConfig": {"status": "Pending"}, "name": "beta"}),
        ),
        device(
            "d3",
            json!({"location": {"region": "eu"}}),
            json!({"fw": 1, "telemetryConfig": {"status": "Success"}, "name": "Alphabet"}),
        ),
        device(
            "d4",
            json!({}),
            json!({"fw": "2", "connectivity": {"type": "cellular"}}),
        ),
    ]
}

fn run(text: &str) -> QueryOutput {
    parse(text)
        .unwrap_or_else(|e| panic!("{text}: {e}"))
        .run(fleet().into_iter())
}

fn ids(text: &str) -> Vec<String> {
    let output = run(text);
    assert_eq!(output.item_type, ItemType::Twin, "{text}");
    output
        .items
        .iter()
        .map(|item| item["deviceId"].as_str().unwrap().to_string())
        .collect()
}

fn parse_error(text: &str) -> QueryError {
    match parse(text) {
        Ok(query) => panic!("{text} parsed as {query:?}"),
        Err(error) => error,
    }
}

// --- The documented examples -----------------------------------------------------------------

#[test]
fn select_star_with_and_and_a_numeric_comparison() {
    assert_eq!(
        ids("SELECT * FROM devices WHERE tags.location.region = 'us' AND properties.reported.fw < 3"),
        ["d1"]
    );
    let output = run("SELECT * FROM devices");
    assert_eq!(output.items, fleet());
    assert_eq!(output.item_type.as_str(), "twin");
}

#[test]
fn count_all() {
    let output = run("SELECT COUNT() AS n FROM devices");
    assert_eq!(output.items, [json!({"n": 4})]);
    assert_eq!(output.item_type, ItemType::Raw);
    assert_eq!(output.item_type.as_str(), "raw");
    // An aggregate over no rows is still one row.
    assert_eq!(
        run("SELECT COUNT() AS n FROM devices WHERE deviceId = 'none'").items,
        [json!({"n": 0})]
    );
    // Unnamed aggregates are named $1, $2, ...
    assert_eq!(
        run("select count(), count() as c, count() from devices").items,
        [json!({"$1": 4, "c": 4, "$2": 4})]
    );
}

#[test]
fn group_by_with_count() {
    let output = run(
        "SELECT properties.reported.telemetryConfig.status AS status, COUNT() AS numberOfDevices \
         FROM devices GROUP BY properties.reported.telemetryConfig.status",
    );
    assert_eq!(
        output.items,
        [
            json!({"status": "Success", "numberOfDevices": 2}),
            json!({"status": "Pending", "numberOfDevices": 1}),
            // Devices without the property form their own group, without the key.
            json!({"numberOfDevices": 1}),
        ]
    );
    assert_eq!(output.item_type, ItemType::Raw);
}

#[test]
fn group_by_several_fields_and_other_aggregates() {
    let output = run(
        "SELECT tags.location.region, properties.reported.telemetryConfig.status AS s, \
         COUNT() AS n, SUM(properties.reported.fw) AS total, MAX(properties.reported.fw) AS top, \
         MIN(properties.reported.name) AS first, AVG(properties.reported.fw) AS mean \
         FROM devices WHERE IS_DEFINED(tags.location) \
         GROUP BY tags.location.region, properties.reported.telemetryConfig.status",
    );
    assert_eq!(
        output.items,
        [
            json!({"region": "us", "s": "Success", "n": 1, "total": 2, "top": 2, "first": "alpha", "mean": 2.0}),
            json!({"region": "us", "s": "Pending", "n": 1, "total": 3.5, "top": 3.5, "first": "beta", "mean": 3.5}),
            json!({"region": "eu", "s": "Success", "n": 1, "total": 1, "top": 1, "first": "Alphabet", "mean": 1.0}),
        ]
    );
    let output = run(
        "SELECT tags.location.region AS r, COUNT() AS n, SUM(properties.reported.fw) AS total \
         FROM devices GROUP BY tags.location.region",
    );
    assert_eq!(
        output.items,
        [
            json!({"r": "us", "n": 2, "total": 5.5}),
            json!({"r": "eu", "n": 1, "total": 1}),
            // d4's fw is a string: not summed.
            json!({"n": 1, "total": 0}),
        ]
    );
}

#[test]
fn is_defined() {
    assert_eq!(
        ids("SELECT * FROM devices WHERE IS_DEFINED(properties.reported.connectivity)"),
        ["d4"]
    );
    assert_eq!(
        ids("SELECT * FROM devices WHERE NOT is_defined(tags.location)"),
        ["d4"]
    );
    assert_eq!(
        ids("SELECT * FROM devices WHERE IS_DEFINED(tags)"),
        ["d1", "d2", "d3"]
    );
}

#[test]
fn top() {
    assert_eq!(ids("SELECT TOP 2 * FROM devices"), ["d1", "d2"]);
    assert_eq!(ids("SELECT TOP 0 * FROM devices"), Vec::<String>::new());
    assert_eq!(
        ids("SELECT TOP 10 * FROM devices WHERE tags.location.region = 'us'"),
        ["d1", "d2"]
    );
    assert_eq!(
        run("select top 1 deviceId from devices").items,
        [json!({"deviceId": "d1"})]
    );
    let query = parse("SELECT TOP 3 * FROM devices").unwrap();
    assert_eq!(query.top(), Some(3));
    assert_eq!(
        run("SELECT TOP 1 tags.location.region AS r, COUNT() AS n FROM devices GROUP BY tags.location.region").items,
        [json!({"r": "us", "n": 2})]
    );
}

// --- Projections -----------------------------------------------------------------------------

#[test]
fn projections_use_the_last_segment_or_the_alias() {
    let output =
        run("SELECT deviceId, tags.location.region AS region, properties.reported.fw FROM devices");
    assert_eq!(output.item_type, ItemType::Raw);
    assert_eq!(
        output.items,
        [
            json!({"deviceId": "d1", "region": "us", "fw": 2}),
            json!({"deviceId": "d2", "region": "us", "fw": 3.5}),
            json!({"deviceId": "d3", "region": "eu", "fw": 1}),
            // Undefined projections are left out.
            json!({"deviceId": "d4", "fw": "2"}),
        ]
    );
    assert_eq!(
        run("SELECT properties.reported.telemetryConfig FROM devices WHERE deviceId = 'd1'").items,
        [json!({"telemetryConfig": {"status": "Success"}})]
    );
    assert_eq!(
        run("SELECT properties.reported['telemetryConfig'].status FROM devices WHERE deviceId = 'd2'").items,
        [json!({"status": "Pending"})]
    );
}

#[test]
fn projection_of_metadata_and_versions() {
    let output = run(
        "SELECT properties.reported.$metadata.$lastUpdated AS t, properties.reported.$version AS v \
         FROM devices WHERE deviceId = 'd1'",
    );
    assert_eq!(output.items, [json!({"t": T0, "v": 2})]);
}

// --- Conditions ------------------------------------------------------------------------------

#[test]
fn comparison_operators() {
    assert_eq!(
        ids("SELECT * FROM devices WHERE properties.reported.fw = 2"),
        ["d1"]
    );
    assert_eq!(
        ids("SELECT * FROM devices WHERE properties.reported.fw = 2.0"),
        ["d1"]
    );
    assert_eq!(
        ids("SELECT * FROM devices WHERE properties.reported.fw != 2"),
        ["d2", "d3"]
    );
    assert_eq!(
        ids("SELECT * FROM devices WHERE properties.reported.fw <> 2"),
        ["d2", "d3"]
    );
    assert_eq!(
        ids("SELECT * FROM devices WHERE properties.reported.fw > 2"),
        ["d2"]
    );
    assert_eq!(
        ids("SELECT * FROM devices WHERE properties.reported.fw >= 2"),
        ["d1", "d2"]
    );
    assert_eq!(
        ids("SELECT * FROM devices WHERE properties.reported.fw <= 2"),
        ["d1", "d3"]
    );
    assert_eq!(
        ids("SELECT * FROM devices WHERE properties.reported.fw < -1"),
        Vec::<String>::new()
    );
    assert_eq!(
        ids("SELECT * FROM devices WHERE properties.reported.fw = '2'"),
        ["d4"]
    );
    assert_eq!(
        ids("SELECT * FROM devices WHERE deviceId >= 'd3'"),
        ["d3", "d4"]
    );
    assert_eq!(
        ids("SELECT * FROM devices WHERE 2 = properties.reported.fw"),
        ["d1"]
    );
    assert_eq!(
        ids("SELECT * FROM devices WHERE version >= 1e0"),
        ["d1", "d2", "d3", "d4"]
    );
}

#[test]
fn different_types_and_undefined_never_match() {
    // d4's fw is a string: neither = nor != a number matches it.
    assert_eq!(
        ids("SELECT * FROM devices WHERE properties.reported.fw != 1"),
        ["d1", "d2"]
    );
    // Undefined compares as nothing, and NOT of undefined is still undefined.
    assert_eq!(
        ids("SELECT * FROM devices WHERE tags.location.region != 'us'"),
        ["d3"]
    );
    assert_eq!(
        ids("SELECT * FROM devices WHERE NOT (tags.location.region = 'us')"),
        ["d3"]
    );
    // Booleans and strings do not order.
    assert_eq!(
        ids("SELECT * FROM devices WHERE tags.location < true"),
        Vec::<String>::new()
    );
    // But true OR undefined is true, and false AND undefined is false.
    assert_eq!(
        ids("SELECT * FROM devices WHERE tags.missing = 1 OR deviceId = 'd4'"),
        ["d4"]
    );
    assert_eq!(
        ids("SELECT * FROM devices WHERE NOT (tags.missing = 1 AND deviceId = 'zz')"),
        ["d1", "d2", "d3", "d4"]
    );
}

#[test]
fn null_comparisons() {
    let rows = vec![
        json!({"deviceId": "a", "properties": {"reported": {"x": null}}}),
        json!({"deviceId": "b", "properties": {"reported": {"x": 1}}}),
        json!({"deviceId": "c", "properties": {"reported": {}}}),
    ];
    let query = parse("SELECT deviceId FROM devices WHERE properties.reported.x = null").unwrap();
    assert_eq!(
        query.run(rows.clone().into_iter()).items,
        [json!({"deviceId": "a"})]
    );
    let query = parse("SELECT deviceId FROM devices WHERE IS_NULL(properties.reported.x)").unwrap();
    assert_eq!(
        query.run(rows.into_iter()).items,
        [json!({"deviceId": "a"})]
    );
}

#[test]
fn and_or_not_and_parentheses() {
    assert_eq!(
        ids("SELECT * FROM devices WHERE tags.location.region = 'eu' OR properties.reported.fw = '2'"),
        ["d3", "d4"]
    );
    // AND binds tighter than OR.
    assert_eq!(
        ids("SELECT * FROM devices WHERE deviceId = 'd4' OR tags.location.region = 'us' AND properties.reported.fw > 3"),
        ["d2", "d4"]
    );
    assert_eq!(
        ids("SELECT * FROM devices WHERE (deviceId = 'd4' OR tags.location.region = 'us') AND properties.reported.fw > 3"),
        ["d2"]
    );
    assert_eq!(
        ids("SELECT * FROM devices WHERE NOT NOT deviceId = 'd1'"),
        ["d1"]
    );
    assert_eq!(
        ids("SELECT * FROM devices WHERE not (deviceId = 'd1' or deviceId = 'd2') and is_defined(tags.location)"),
        ["d3"]
    );
}

#[test]
fn in_and_nin() {
    assert_eq!(
        ids("SELECT * FROM devices WHERE deviceId IN ['d1', 'd3', 'zz']"),
        ["d1", "d3"]
    );
    assert_eq!(
        ids("SELECT * FROM devices WHERE deviceId NIN ['d1', 'd3']"),
        ["d2", "d4"]
    );
    assert_eq!(
        ids("SELECT * FROM devices WHERE deviceId NOT IN ['d1', 'd3']"),
        ["d2", "d4"]
    );
    assert_eq!(
        ids("SELECT * FROM devices WHERE properties.reported.fw IN [1, 2]"),
        ["d1", "d3"]
    );
    // Undefined is neither in nor not in a list.
    assert_eq!(
        ids("SELECT * FROM devices WHERE tags.location.region NIN ['us']"),
        ["d3"]
    );
    assert_eq!(
        ids("SELECT * FROM devices WHERE deviceId IN []"),
        Vec::<String>::new()
    );
}

#[test]
fn string_functions() {
    assert_eq!(
        ids("SELECT * FROM devices WHERE STARTSWITH(properties.reported.name, 'alpha')"),
        ["d1"]
    );
    assert_eq!(
        ids("SELECT * FROM devices WHERE starts_with(properties.reported.name, 'Alpha')"),
        ["d3"]
    );
    assert_eq!(
        ids("SELECT * FROM devices WHERE ENDSWITH(tags.location.plant, '43')"),
        ["d1"]
    );
    assert_eq!(
        ids("SELECT * FROM devices WHERE CONTAINS(properties.reported.name, 'eta')"),
        ["d2"]
    );
    assert_eq!(
        ids("SELECT * FROM devices WHERE STARTSWITH(LOWER(properties.reported.name), 'alpha')"),
        ["d1", "d3"]
    );
    assert_eq!(
        ids("SELECT * FROM devices WHERE UPPER(tags.location.region) = 'EU'"),
        ["d3"]
    );
    assert_eq!(
        ids("SELECT * FROM devices WHERE LENGTH(properties.reported.name) = 8"),
        ["d3"]
    );
    // A function over a non-string is undefined.
    assert_eq!(
        ids("SELECT * FROM devices WHERE STARTSWITH(properties.reported.fw, '2')"),
        ["d4"]
    );
    assert_eq!(
        ids("SELECT * FROM devices WHERE NOT STARTSWITH(properties.reported.fw, '2')"),
        Vec::<String>::new()
    );
}

#[test]
fn type_functions() {
    assert_eq!(
        ids("SELECT * FROM devices WHERE IS_STRING(properties.reported.fw)"),
        ["d4"]
    );
    assert_eq!(
        ids("SELECT * FROM devices WHERE IS_NUMBER(properties.reported.fw)"),
        ["d1", "d2", "d3"]
    );
    assert_eq!(
        ids("SELECT * FROM devices WHERE IS_OBJECT(tags.location)"),
        ["d1", "d2", "d3"]
    );
    assert_eq!(
        ids("SELECT * FROM devices WHERE IS_BOOL(properties.reported.fw)"),
        Vec::<String>::new()
    );
    assert_eq!(
        ids("SELECT * FROM devices WHERE IS_PRIMITIVE(properties.reported.name)"),
        ["d1", "d2", "d3"]
    );
    assert_eq!(
        ids("SELECT * FROM devices WHERE IS_ARRAY(parentScopes)"),
        Vec::<String>::new()
    );
}

#[test]
fn identity_fields_and_literals() {
    assert_eq!(
        ids(
            "SELECT * FROM devices WHERE status = 'enabled' AND connectionState = \"Disconnected\""
        ),
        ["d1", "d2", "d3", "d4"]
    );
    assert_eq!(
        ids("SELECT * FROM devices WHERE statusReason = null AND deviceId = 'd2'"),
        ["d2"]
    );
    let rows = vec![
        json!({"deviceId": "a", "capabilities": {"iotEdge": true}}),
        json!({"deviceId": "b", "capabilities": {"iotEdge": false}}),
    ];
    let query = parse("SELECT * FROM devices WHERE capabilities.iotEdge = TRUE").unwrap();
    assert_eq!(query.run(rows.clone().into_iter()).items, [rows[0].clone()]);
    let query = parse("SELECT * FROM devices WHERE capabilities.iotEdge != true").unwrap();
    assert_eq!(query.run(rows.clone().into_iter()).items, [rows[1].clone()]);
}

#[test]
fn string_escapes() {
    let rows = vec![json!({"deviceId": "it's \"q\" \\ é"})];
    for text in [
        r#"SELECT * FROM devices WHERE deviceId = 'it\'s "q" \\ \u00e9'"#,
        r#"SELECT * FROM devices WHERE deviceId = "it's \"q\" \\ é""#,
    ] {
        assert_eq!(
            parse(text)
                .unwrap()
                .run(rows.clone().into_iter())
                .items
                .len(),
            1,
            "{text}"
        );
    }
}

#[test]
fn bracket_paths_and_array_indexes() {
    let rows = vec![json!({
        "deviceId": "a",
        "tags": {"odd-name": {"x y": 1}, "list": [10, {"k": "v"}]},
    })];
    for text in [
        "SELECT * FROM devices WHERE tags['odd-name']['x y'] = 1",
        "SELECT * FROM devices WHERE tags.list[0] = 10",
        "SELECT * FROM devices WHERE tags.list[1].k = 'v'",
        "SELECT * FROM devices WHERE devices.tags.list[1].k = 'v'",
    ] {
        assert_eq!(
            parse(text)
                .unwrap()
                .run(rows.clone().into_iter())
                .items
                .len(),
            1,
            "{text}"
        );
    }
    let query = parse("SELECT * FROM devices WHERE IS_DEFINED(tags.list[2])").unwrap();
    assert!(query.run(rows.into_iter()).items.is_empty());
}

#[test]
fn keywords_are_case_insensitive_and_paths_are_not() {
    assert_eq!(ids("select * from devices where deviceId = 'd1'"), ["d1"]);
    assert_eq!(ids("SeLeCt * FrOm DEVICES wHeRe deviceId = 'd1'"), ["d1"]);
    assert_eq!(
        ids("SELECT * FROM devices WHERE DeviceId = 'd1'"),
        Vec::<String>::new()
    );
    assert_eq!(
        ids("SELECT * FROM devices WHERE tags.location.Region = 'us'"),
        Vec::<String>::new()
    );
}

// --- Modules ---------------------------------------------------------------------------------

#[test]
fn module_twins() {
    let query = parse("SELECT * FROM devices.modules WHERE moduleId = 'm2'").unwrap();
    assert_eq!(query.collection(), Collection::Modules);
    assert_eq!(
        parse("SELECT * FROM devices").unwrap().collection(),
        Collection::Devices
    );
    let rows = vec![
        module("d1", "m1", json!({"status": "scanning"})),
        module("d1", "m2", json!({"status": "idle"})),
        module("d2", "m2", json!({"status": "scanning"})),
    ];
    let output = query.run(rows.clone().into_iter());
    assert_eq!(output.item_type, ItemType::Twin);
    assert_eq!(output.items, [rows[1].clone(), rows[2].clone()]);
    let output = parse(
        "SELECT deviceId, moduleId FROM devices.modules \
         WHERE properties.reported.status = 'scanning' AND deviceId IN ['d1', 'd3']",
    )
    .unwrap()
    .run(rows.clone().into_iter());
    assert_eq!(output.items, [json!({"deviceId": "d1", "moduleId": "m1"})]);
    let output = parse("SELECT * FROM devices.modules WHERE devices.modules.moduleId = 'm1'")
        .unwrap()
        .run(rows.clone().into_iter());
    assert_eq!(output.items, [rows[0].clone()]);
}

// --- Conditions on their own -----------------------------------------------------------------

#[test]
fn bare_conditions() {
    let condition =
        parse_condition("tags.location.region = 'us' AND properties.reported.fw < 3").unwrap();
    let fleet = fleet();
    let matched: Vec<bool> = fleet.iter().map(|row| condition.matches(row)).collect();
    assert_eq!(matched, [true, false, false, false]);
    assert!(parse_condition("deviceId IN ['d1']")
        .unwrap()
        .matches(&fleet[0]));
    assert!(parse_condition("deviceId = 'd1' extra").is_err());
    assert!(parse_condition("").is_err());
}

// --- Errors ----------------------------------------------------------------------------------

#[test]
fn malformed_queries_are_rejected() {
    for text in [
        "",
        "SELECT",
        "SELECT *",
        "SELECT * FROM",
        "SELECT * FROM things",
        "SELECT * FROM devices.jobs",
        "SELECT * FROM devices.others",
        "SELECT * FROM devices WHERE",
        "SELECT * FROM devices WHERE deviceId =",
        "SELECT * FROM devices WHERE deviceId = 'unterminated",
        "SELECT * FROM devices WHERE deviceId = 'bad escape \\q'",
        "SELECT * FROM devices WHERE (deviceId = 'a'",
        "SELECT * FROM devices WHERE deviceId = 'a')",
        "SELECT * FROM devices WHERE deviceId IN ('a', 'b')",
        "SELECT * FROM devices WHERE deviceId IN 'a'",
        "SELECT * FROM devices WHERE UNKNOWN_FN(deviceId)",
        "SELECT * FROM devices WHERE IS_DEFINED(a, b)",
        "SELECT * FROM devices WHERE STARTSWITH(deviceId)",
        "SELECT * FROM devices WHERE deviceId # 1",
        "SELECT * FROM devices WHERE deviceId ! 1",
        "SELECT * FROM devices GROUP BY tags.x",
        "SELECT deviceId, COUNT() FROM devices",
        "SELECT deviceId, COUNT() FROM devices GROUP BY tags.x",
        "SELECT TOP * FROM devices",
        "SELECT TOP -1 * FROM devices",
        "SELECT TOP 1.5 * FROM devices",
        "SELECT LOWER(deviceId) FROM devices",
        "SELECT deviceId AS FROM devices",
        "SELECT * FROM devices WHERE tags.[0] = 1",
        "SELECT * FROM devices WHERE tags[-1] = 1",
        "SELECT * FROM devices ORDER BY deviceId",
        "DELETE FROM devices",
    ] {
        let error = parse_error(text);
        assert_eq!(error.code(), (400, 400006, "IotHubFormatError"), "{text}");
        assert!(
            error.to_string().starts_with("The query is invalid"),
            "{text}"
        );
    }
}

#[test]
fn error_messages_point_at_the_problem() {
    assert_eq!(
        parse_error("SELECT * FROM devices WHERE deviceId = 'a' )").message,
        "expected the end of the query but found ')'"
    );
    assert_eq!(
        parse_error("SELECT * FROM widgets").message,
        "expected 'devices' or 'devices.modules' but found 'widgets'"
    );
}

#[test]
fn deep_nesting_is_refused_without_overflowing() {
    let deep = format!(
        "SELECT * FROM devices WHERE {}deviceId = 'a'{}",
        "(".repeat(10_000),
        ")".repeat(10_000)
    );
    assert!(parse_error(&deep).message.contains("nested too deeply"));
    let nots = format!(
        "SELECT * FROM devices WHERE {} deviceId = 'a'",
        "NOT ".repeat(10_000)
    );
    assert!(parse_error(&nots).message.contains("nested too deeply"));
    let ok = format!(
        "SELECT * FROM devices WHERE {}deviceId = 'd1'{}",
        "(".repeat(50),
        ")".repeat(50)
    );
    assert_eq!(parse(&ok).unwrap().run(fleet().into_iter()).items.len(), 1);
}

#[test]
fn long_chains_of_conditions_stay_flat() {
    let chain = vec!["deviceId != 'x'"; 20_000].join(" AND ");
    let query = parse(&format!("SELECT * FROM devices WHERE {chain}")).unwrap();
    assert_eq!(query.run(fleet().into_iter()).items.len(), 4);
    let chain = vec!["deviceId = 'x'"; 20_000].join(" OR ");
    let query = parse(&format!(
        "SELECT * FROM devices WHERE {chain} OR deviceId = 'd2'"
    ))
    .unwrap();
    assert_eq!(query.run(fleet().into_iter()).items.len(), 1);
}
