use serde_json::json;

use super::*;

const T0: &str = "2024-01-01T00:00:00.0000000Z";
const T1: &str = "2024-01-01T00:00:01.0000000Z";
const T2: &str = "2024-01-01T00:00:02.0000000Z";

fn reported_metadata(doc: &TwinDoc) -> Value {
    doc.to_rest(&TwinIdentity::new("d", "e"))["properties"]["reported"]["$metadata"].clone()
}

fn desired_metadata(doc: &TwinDoc) -> Value {
    doc.to_rest(&TwinIdentity::new("d", "e"))["properties"]["desired"]["$metadata"].clone()
}

fn code(error: &TwinError) -> u32 {
    error.code().1
}

// --- New twin, views, etag -------------------------------------------------------------------

#[test]
fn new_twin_has_version_one_and_empty_sections() {
    let doc = TwinDoc::new(T0);
    assert_eq!(doc.version(), 1);
    assert_eq!(doc.desired_version(), 1);
    assert_eq!(doc.reported_version(), 1);
    assert_eq!(doc.etag(), "AAAAAAAAAAE=");
    let rest = doc.to_rest(&TwinIdentity::new("dev1", "MzE4NzUxOTU1"));
    assert_eq!(
        rest["properties"],
        json!({
            "desired": {"$metadata": {"$lastUpdated": T0}, "$version": 1},
            "reported": {"$metadata": {"$lastUpdated": T0}, "$version": 1},
        })
    );
}

#[test]
fn device_view_is_the_exact_mqtt_get_body() {
    let mut doc = TwinDoc::new(T0);
    doc.patch_reported(&json!({"battery": 55}), T1).unwrap();
    doc.patch_service(
        &json!({"tags": {"a": "b"}, "properties": {"desired": {"rate": 5}}}),
        T1,
    )
    .unwrap();
    assert_eq!(
        doc.device_view(),
        json!({"desired": {"rate": 5, "$version": 2}, "reported": {"battery": 55, "$version": 2}})
    );
    assert_eq!(
        TwinDoc::new(T0).device_view(),
        json!({"desired": {"$version": 1}, "reported": {"$version": 1}})
    );
}

#[test]
fn etag_is_base64_of_the_big_endian_counter() {
    let mut doc = TwinDoc::new(T0);
    assert_eq!(doc.etag(), "AAAAAAAAAAE=");
    doc.patch_reported(&json!({"a": 1}), T1).unwrap();
    assert_eq!(doc.etag(), "AAAAAAAAAAI=");
    for _ in 0..255 {
        doc.patch_reported(&json!({}), T1).unwrap();
    }
    // 257 = 0x0101
    assert_eq!(doc.etag(), "AAAAAAAAAQE=");
}

#[test]
fn rest_view_has_the_identity_fields() {
    let mut doc = TwinDoc::new(T0);
    doc.patch_service(&json!({"tags": {"location": {"region": "us"}}}), T1)
        .unwrap();
    let scopes = vec!["ms-azure-iot-edge://parent-1".to_string()];
    let identity = TwinIdentity {
        module_id: Some("mod1"),
        status_reason: Some("maintenance"),
        connection_state: "Connected",
        cloud_to_device_message_count: 3,
        authentication_type: "selfSigned",
        primary_thumbprint: Some("AB"),
        model_id: Some("dtmi:com:example:Thermostat;1"),
        iot_edge: Some(true),
        device_scope: Some("ms-azure-iot-edge://dev1-1"),
        parent_scopes: Some(&scopes),
        ..TwinIdentity::new("dev1", "NTk0ODUyODgx")
    };
    let rest = doc.to_rest(&identity);
    let mut without_properties = rest.clone();
    without_properties
        .as_object_mut()
        .unwrap()
        .remove("properties");
    assert_eq!(
        without_properties,
        json!({
            "deviceId": "dev1",
            "moduleId": "mod1",
            "etag": "AAAAAAAAAAI=",
            "deviceEtag": "NTk0ODUyODgx",
            "status": "enabled",
            "statusReason": "maintenance",
            "statusUpdateTime": "0001-01-01T00:00:00Z",
            "connectionState": "Connected",
            "lastActivityTime": "0001-01-01T00:00:00Z",
            "cloudToDeviceMessageCount": 3,
            "authenticationType": "selfSigned",
            "x509Thumbprint": {"primaryThumbprint": "AB", "secondaryThumbprint": null},
            "modelId": "dtmi:com:example:Thermostat;1",
            "version": 2,
            "tags": {"location": {"region": "us"}},
            "capabilities": {"iotEdge": true},
            "deviceScope": "ms-azure-iot-edge://dev1-1",
            "parentScopes": ["ms-azure-iot-edge://parent-1"],
        })
    );
}

#[test]
fn rest_view_of_a_plain_device_omits_optional_fields() {
    let rest = TwinDoc::new(T0).to_rest(&TwinIdentity::new("dev1", "e"));
    let object = rest.as_object().unwrap();
    for absent in [
        "moduleId",
        "tags",
        "capabilities",
        "deviceScope",
        "parentScopes",
    ] {
        assert!(!object.contains_key(absent), "{absent}");
    }
    assert_eq!(rest["statusReason"], Value::Null);
    assert_eq!(rest["modelId"], "");
    assert_eq!(rest["connectionState"], "Disconnected");
    assert_eq!(rest["authenticationType"], "sas");
}

#[test]
fn document_round_trips_through_compact_json() {
    let mut doc = TwinDoc::new(T0);
    doc.patch_reported(&json!({"a": {"b": [1, 2, {"c": "x"}]}}), T1)
        .unwrap();
    doc.patch_service(
        &json!({"tags": {"t": true}, "properties": {"desired": {"d": 1.5}}}),
        T2,
    )
    .unwrap();
    let bytes = serde_json::to_vec(&doc).unwrap();
    assert!(!bytes.contains(&b'\n'));
    let back: TwinDoc = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(back, doc);
}

// --- Reported patches ------------------------------------------------------------------------

#[test]
fn reported_patch_merges_deletes_and_bumps_versions() {
    let mut doc = TwinDoc::new(T0);
    let v = doc
        .patch_reported(
            &json!({"fw": "1.0", "net": {"ip": "10.0.0.1", "rssi": -60}}),
            T1,
        )
        .unwrap();
    assert_eq!(v, 2);
    assert_eq!(doc.version(), 2);
    let v = doc
        .patch_reported(
            &json!({"fw": null, "net": {"rssi": null, "ssid": "home"}}),
            T2,
        )
        .unwrap();
    assert_eq!(v, 3);
    assert_eq!(doc.reported_version(), 3);
    assert_eq!(doc.version(), 3);
    assert_eq!(doc.etag(), "AAAAAAAAAAM=");
    assert_eq!(
        Value::Object(doc.reported().clone()),
        json!({"net": {"ip": "10.0.0.1", "ssid": "home"}})
    );
    // Desired untouched.
    assert_eq!(doc.desired_version(), 1);
}

#[test]
fn reported_metadata_tracks_every_touched_level() {
    let mut doc = TwinDoc::new(T0);
    doc.patch_reported(
        &json!({"fw": "1.0", "net": {"ip": "10.0.0.1", "rssi": -60}}),
        T1,
    )
    .unwrap();
    assert_eq!(
        reported_metadata(&doc),
        json!({
            "$lastUpdated": T1,
            "fw": {"$lastUpdated": T1},
            "net": {"$lastUpdated": T1, "ip": {"$lastUpdated": T1}, "rssi": {"$lastUpdated": T1}},
        })
    );
    doc.patch_reported(&json!({"net": {"rssi": -50, "ip": null}}), T2)
        .unwrap();
    assert_eq!(
        reported_metadata(&doc),
        json!({
            "$lastUpdated": T2,
            "fw": {"$lastUpdated": T1},
            "net": {"$lastUpdated": T2, "rssi": {"$lastUpdated": T2}},
        })
    );
}

#[test]
fn replacing_an_object_with_a_leaf_and_back_rebuilds_metadata() {
    let mut doc = TwinDoc::new(T0);
    doc.patch_reported(&json!({"a": {"b": 1}}), T1).unwrap();
    doc.patch_reported(&json!({"a": 5}), T2).unwrap();
    assert_eq!(reported_metadata(&doc)["a"], json!({"$lastUpdated": T2}));
    doc.patch_reported(&json!({"a": {"c": {"d": true, "gone": null}}}), T2)
        .unwrap();
    // Nulls inside a new object are dropped (RFC 7386).
    assert_eq!(doc.reported()["a"], json!({"c": {"d": true}}));
    assert_eq!(
        reported_metadata(&doc)["a"],
        json!({"$lastUpdated": T2, "c": {"$lastUpdated": T2, "d": {"$lastUpdated": T2}}})
    );
}

#[test]
fn arrays_are_leaves() {
    let mut doc = TwinDoc::new(T0);
    doc.patch_reported(&json!({"list": [1, {"a": 2}]}), T1)
        .unwrap();
    doc.patch_reported(&json!({"list": [3]}), T2).unwrap();
    assert_eq!(doc.reported()["list"], json!([3]));
    assert_eq!(reported_metadata(&doc)["list"], json!({"$lastUpdated": T2}));
}

#[test]
fn reported_patch_that_deletes_everything_is_fine() {
    let mut doc = TwinDoc::new(T0);
    doc.patch_reported(&json!({"a": 1, "b": {"c": 2}}), T1)
        .unwrap();
    doc.patch_reported(&json!({"a": null, "b": null, "never": null}), T2)
        .unwrap();
    assert!(doc.reported().is_empty());
    assert_eq!(reported_metadata(&doc), json!({"$lastUpdated": T2}));
    assert_eq!(doc.reported_version(), 3);
}

#[test]
fn reported_patch_ignores_root_system_keys() {
    let mut doc = TwinDoc::new(T0);
    doc.patch_reported(&json!({"a": 1, "$version": 99, "$metadata": {"x": 1}}), T1)
        .unwrap();
    assert_eq!(Value::Object(doc.reported().clone()), json!({"a": 1}));
    assert_eq!(doc.reported_version(), 2);
}

#[test]
fn reported_patch_must_be_an_object() {
    let mut doc = TwinDoc::new(T0);
    for bad in [json!(1), json!("x"), json!([{"a": 1}]), json!(null)] {
        let error = doc.patch_reported(&bad, T1).unwrap_err();
        assert!(matches!(error, TwinError::NotAnObject { .. }), "{bad}");
        assert_eq!(error.code(), (400, 400004, "ArgumentInvalid"));
    }
    assert_eq!(doc, TwinDoc::new(T0));
}

// --- Validation ------------------------------------------------------------------------------

#[test]
fn invalid_keys_are_rejected_anywhere() {
    let long = "k".repeat(1025);
    let cases = [
        json!({"a.b": 1}),
        json!({"$a": 1}),
        json!({"a b": 1}),
        json!({"": 1}),
        json!({"tab\there": 1}),
        json!({"c1\u{85}": 1}),
        json!({ long.clone(): 1 }),
        json!({"ok": {"nested.dot": 1}}),
        json!({"ok": [{"in array": 1}]}),
        json!({"ok": {"$version": 1}}),
    ];
    for patch in cases {
        let mut doc = TwinDoc::new(T0);
        let error = doc.patch_reported(&patch, T1).unwrap_err();
        assert!(
            matches!(error, TwinError::InvalidKey { .. }),
            "{patch}: {error:?}"
        );
        assert_eq!(code(&error), 400004);
        assert_eq!(doc, TwinDoc::new(T0), "unchanged after {patch}");
    }
}

#[test]
fn valid_keys_are_accepted() {
    let longest = "k".repeat(1024);
    let mut doc = TwinDoc::new(T0);
    doc.patch_reported(
        &json!({ longest: 1, "Upper": 1, "upper": 2, "ünïcødé-_#@!": 3, "日本": 4 }),
        T1,
    )
    .unwrap();
    assert_eq!(doc.reported().len(), 5);
}

#[test]
fn error_messages_shorten_long_keys() {
    let key = format!("{}.", "x".repeat(5000));
    let error = TwinDoc::new(T0)
        .patch_reported(&json!({ key: 1 }), T1)
        .unwrap_err();
    assert!(error.to_string().len() < 300, "{error}");
}

#[test]
fn strings_are_limited_to_4_kb() {
    let mut doc = TwinDoc::new(T0);
    doc.patch_reported(&json!({"s": "x".repeat(4096)}), T1)
        .unwrap();
    let error = doc
        .patch_reported(&json!({"s": "x".repeat(4097)}), T1)
        .unwrap_err();
    assert!(matches!(error, TwinError::InvalidValue { .. }));
    let error = doc
        .patch_reported(&json!({"list": ["x".repeat(4097)]}), T1)
        .unwrap_err();
    assert!(matches!(error, TwinError::InvalidValue { .. }));
    // 4096 bytes of UTF-8 is fewer characters.
    let error = doc
        .patch_reported(&json!({"s": "é".repeat(2049)}), T1)
        .unwrap_err();
    assert!(matches!(error, TwinError::InvalidValue { .. }));
}

#[test]
fn integers_must_be_within_53_bits() {
    let mut doc = TwinDoc::new(T0);
    doc.patch_reported(
        &json!({"max": 4503599627370495_i64, "min": -4503599627370496_i64}),
        T1,
    )
    .unwrap();
    for bad in [
        json!({"n": 4503599627370496_i64}),
        json!({"n": -4503599627370497_i64}),
        json!({"n": u64::MAX}),
        json!({"n": {"deep": [4503599627370496_i64]}}),
    ] {
        let error = doc.patch_reported(&bad, T1).unwrap_err();
        assert!(matches!(error, TwinError::ValueOutOfRange { .. }), "{bad}");
        assert_eq!(code(&error), 400004);
    }
    // Fractional numbers are not range-checked.
    doc.patch_reported(&json!({"f": 1e300}), T1).unwrap();
}

fn nested(levels: usize) -> Value {
    let mut value = json!({"leaf": "value"});
    for i in (0..levels - 1).rev() {
        value = json!({ format!("l{i}"): value });
    }
    value
}

#[test]
fn depth_is_limited_to_ten_levels() {
    // Azure's example: ten nested objects below the root, the innermost holding a value.
    let ok = json!({ "root": nested(10) });
    assert_eq!(validate::depth(ok.as_object().unwrap()), 10);
    let mut doc = TwinDoc::new(T0);
    doc.patch_reported(&ok, T1).unwrap();
    let too_deep = json!({ "root": nested(11) });
    let error = doc.patch_reported(&too_deep, T1).unwrap_err();
    assert_eq!(
        error,
        TwinError::TooDeep {
            section: Section::Reported,
            max: 10
        }
    );
    // Depth counts the merged result, not just the patch.
    let mut doc = TwinDoc::new(T0);
    doc.patch_reported(&json!({ "root": nested(9) }), T1)
        .unwrap();
    let path_to_leaf = {
        let mut value = json!({"leaf": {"x": {"y": 1}}});
        for i in (0..8).rev() {
            value = json!({ format!("l{i}"): value });
        }
        json!({ "root": value })
    };
    assert!(matches!(
        doc.patch_reported(&path_to_leaf, T1),
        Err(TwinError::TooDeep { .. })
    ));
}

#[test]
fn size_counts_keys_strings_numbers_and_booleans() {
    let object = json!({"ab": "xyz", "n": 1, "b": true, "o": {"k": [1, "é"]}});
    // ab:2+3, n:1+8, b:1+4, o:1 + (k:1 + 8 + 2)
    assert_eq!(validate::size(object.as_object().unwrap()), 5 + 9 + 5 + 12);
}

#[test]
fn reported_is_limited_to_32_kb() {
    let mut doc = TwinDoc::new(T0);
    // Eight 4 KB strings under 1-byte keys: 8 * 4097 = 32776 > 32768.
    for (i, key) in ["a", "b", "c", "d", "e", "f", "g"].iter().enumerate() {
        doc.patch_reported(&json!({ *key: "x".repeat(4096) }), T1)
            .unwrap_or_else(|e| panic!("{i}: {e}"));
    }
    let before = doc.clone();
    let error = doc
        .patch_reported(&json!({"h": "x".repeat(4096)}), T1)
        .unwrap_err();
    assert_eq!(
        error,
        TwinError::TooLarge {
            section: Section::Reported,
            size: 8 * 4097,
            max: 32 * 1024
        }
    );
    assert_eq!(doc, before);
    // Replacing a value does not count it twice, and metadata does not count at all.
    doc.patch_reported(&json!({"a": "y".repeat(4096), "h": "x".repeat(4000)}), T2)
        .unwrap();
}

#[test]
fn tags_are_limited_to_8_kb_and_desired_to_32_kb() {
    let mut doc = TwinDoc::new(T0);
    let error = doc
        .patch_service(
            &json!({"tags": {"a": "x".repeat(4096), "b": "x".repeat(4096)}}),
            T1,
        )
        .unwrap_err();
    assert!(matches!(
        error,
        TwinError::TooLarge {
            section: Section::Tags,
            ..
        }
    ));
    doc.patch_service(
        &json!({"tags": {"a": "x".repeat(4096), "b": "x".repeat(4000)}}),
        T1,
    )
    .unwrap();
    let big: Map<String, Value> = (0..9)
        .map(|i| (format!("k{i}"), Value::from("x".repeat(4000))))
        .collect();
    let error = doc
        .patch_service(&json!({"properties": {"desired": big}}), T1)
        .unwrap_err();
    assert!(matches!(
        error,
        TwinError::TooLarge {
            section: Section::Desired,
            ..
        }
    ));
    let error = doc
        .replace_service(&json!({"properties": {"desired": big}}), T1)
        .unwrap_err();
    assert!(matches!(
        error,
        TwinError::TooLarge {
            section: Section::Desired,
            ..
        }
    ));
}

#[test]
fn parse_json_reports_deserialization_errors() {
    assert_eq!(parse_json(br#"{"a":1}"#).unwrap(), json!({"a": 1}));
    for bad in [&b""[..], b" ", b"{", b"nope"] {
        let error = parse_json(bad).unwrap_err();
        assert_eq!(error.code(), (400, 400012, "DeserializationError"));
    }
}

// --- Service PATCH ---------------------------------------------------------------------------

#[test]
fn service_patch_merges_tags_and_desired_and_returns_the_notification() {
    let mut doc = TwinDoc::new(T0);
    let body = json!({
        "deviceId": "ignored", "etag": "ignored", "version": 42,
        "tags": {"location": {"region": "US"}},
        "properties": {"desired": {"telemetryInterval": 5, "old": null}},
    });
    let notification = doc.patch_service(&body, T1).unwrap();
    assert_eq!(
        notification,
        Some(json!({"telemetryInterval": 5, "old": null, "$version": 2}))
    );
    assert_eq!(doc.desired_version(), 2);
    assert_eq!(doc.version(), 2);
    assert_eq!(doc.etag(), "AAAAAAAAAAI=");
    assert_eq!(
        Value::Object(doc.tags().clone()),
        json!({"location": {"region": "US"}})
    );
    assert_eq!(
        Value::Object(doc.desired().clone()),
        json!({"telemetryInterval": 5})
    );
    assert_eq!(
        desired_metadata(&doc),
        json!({
            "$lastUpdated": T1, "$lastUpdatedVersion": 2,
            "telemetryInterval": {"$lastUpdated": T1, "$lastUpdatedVersion": 2},
        })
    );

    let notification = doc
        .patch_service(
            &json!({"properties": {"desired": {"cfg": {"a": 1}, "telemetryInterval": null}}}),
            T2,
        )
        .unwrap();
    assert_eq!(
        notification,
        Some(json!({"cfg": {"a": 1}, "telemetryInterval": null, "$version": 3}))
    );
    assert_eq!(
        desired_metadata(&doc),
        json!({
            "$lastUpdated": T2, "$lastUpdatedVersion": 3,
            "cfg": {"$lastUpdated": T2, "$lastUpdatedVersion": 3,
                    "a": {"$lastUpdated": T2, "$lastUpdatedVersion": 3}},
        })
    );
}

#[test]
fn service_patch_of_tags_only_does_not_touch_desired() {
    let mut doc = TwinDoc::new(T0);
    let notification = doc
        .patch_service(&json!({"tags": {"env": "prod"}}), T1)
        .unwrap();
    assert_eq!(notification, None);
    assert_eq!(doc.desired_version(), 1);
    assert_eq!(desired_metadata(&doc), json!({"$lastUpdated": T0}));
    assert_eq!(doc.version(), 2);
    // Tag merge: null deletes, objects merge.
    doc.patch_service(&json!({"tags": {"env": null, "loc": {"b": "43"}}}), T1)
        .unwrap();
    doc.patch_service(&json!({"tags": {"loc": {"f": "1"}}}), T1)
        .unwrap();
    assert_eq!(
        Value::Object(doc.tags().clone()),
        json!({"loc": {"b": "43", "f": "1"}})
    );
}

#[test]
fn empty_service_patch_changes_nothing() {
    let mut doc = TwinDoc::new(T0);
    for body in [
        json!({}),
        json!({"tags": {}, "properties": {"desired": {}}}),
        json!({"tags": null, "properties": null}),
        json!({"properties": {"desired": {"$version": 5, "$metadata": {}}}}),
        json!({"deviceId": "x", "etag": "AAAAAAAAAAE="}),
    ] {
        assert_eq!(doc.patch_service(&body, T1).unwrap(), None, "{body}");
    }
    assert_eq!(doc, TwinDoc::new(T0));
}

#[test]
fn service_patch_may_round_trip_desired_metadata() {
    let mut doc = TwinDoc::new(T0);
    doc.patch_service(&json!({"properties": {"desired": {"a": 1}}}), T1)
        .unwrap();
    let mut read = doc.to_rest(&TwinIdentity::new("d", "e"));
    read["properties"]
        .as_object_mut()
        .unwrap()
        .remove("reported");
    read["properties"]["desired"]["b"] = json!(2);
    let notification = doc.patch_service(&read, T2).unwrap().unwrap();
    assert_eq!(notification, json!({"a": 1, "b": 2, "$version": 3}));
    assert_eq!(
        Value::Object(doc.desired().clone()),
        json!({"a": 1, "b": 2})
    );
}

#[test]
fn service_patch_setting_the_same_value_is_still_an_update() {
    let mut doc = TwinDoc::new(T0);
    doc.patch_service(&json!({"properties": {"desired": {"a": 1}}}), T1)
        .unwrap();
    let notification = doc
        .patch_service(&json!({"properties": {"desired": {"a": 1}}}), T2)
        .unwrap();
    assert_eq!(notification, Some(json!({"a": 1, "$version": 3})));
    assert_eq!(desired_metadata(&doc)["a"]["$lastUpdatedVersion"], 3);
}

#[test]
fn service_patch_rejects_reported_and_bad_shapes() {
    let mut doc = TwinDoc::new(T0);
    let error = doc
        .patch_service(&json!({"properties": {"reported": {"a": 1}}}), T1)
        .unwrap_err();
    assert_eq!(error, TwinError::ReportedNotAllowed);
    assert_eq!(error.code(), (400, 400004, "ArgumentInvalid"));
    // A null reported section is not an update of it.
    doc.patch_service(&json!({"properties": {"reported": null}}), T1)
        .unwrap();
    for bad in [
        json!([]),
        json!("twin"),
        json!({"tags": 1}),
        json!({"tags": []}),
        json!({"properties": "x"}),
        json!({"properties": {"desired": 5}}),
    ] {
        assert!(
            matches!(
                doc.patch_service(&bad, T1),
                Err(TwinError::NotAnObject { .. })
            ),
            "{bad}"
        );
    }
    assert!(matches!(
        doc.patch_service(&json!({"tags": {"a.b": 1}}), T1),
        Err(TwinError::InvalidKey { .. })
    ));
    assert!(matches!(
        doc.patch_service(&json!({"tags": {"$version": 1}}), T1),
        Err(TwinError::InvalidKey { .. })
    ));
    assert_eq!(doc, TwinDoc::new(T0));
}

#[test]
fn failed_service_patch_changes_nothing() {
    let mut doc = TwinDoc::new(T0);
    let too_big: Map<String, Value> = (0..3)
        .map(|i| (format!("k{i}"), Value::from("x".repeat(4000))))
        .collect();
    // Desired is fine, tags too large: neither is applied.
    let error = doc
        .patch_service(
            &json!({"tags": too_big, "properties": {"desired": {"a": 1}}}),
            T1,
        )
        .unwrap_err();
    assert!(matches!(error, TwinError::TooLarge { .. }));
    assert_eq!(doc, TwinDoc::new(T0));
}

// --- Service PUT -----------------------------------------------------------------------------

#[test]
fn service_put_replaces_tags_and_desired_wholesale() {
    let mut doc = TwinDoc::new(T0);
    doc.patch_reported(&json!({"r": 1}), T1).unwrap();
    doc.patch_service(
        &json!({"tags": {"a": 1, "b": 2}, "properties": {"desired": {"x": 1, "y": {"z": 2}}}}),
        T1,
    )
    .unwrap();
    let version = doc.version();
    let notification = doc
        .replace_service(
            &json!({"tags": {"c": 3}, "properties": {"desired": {"y": {"z": 2}, "w": 4}}}),
            T2,
        )
        .unwrap();
    assert_eq!(
        notification,
        Some(json!({"y": {"z": 2}, "w": 4, "$version": 3}))
    );
    assert_eq!(Value::Object(doc.tags().clone()), json!({"c": 3}));
    assert_eq!(
        Value::Object(doc.desired().clone()),
        json!({"y": {"z": 2}, "w": 4})
    );
    assert_eq!(Value::Object(doc.reported().clone()), json!({"r": 1}));
    assert_eq!(doc.reported_version(), 2);
    assert_eq!(doc.version(), version + 1);
    // Unchanged members keep their metadata; the root and new members are stamped.
    assert_eq!(
        desired_metadata(&doc),
        json!({
            "$lastUpdated": T2, "$lastUpdatedVersion": 3,
            "y": {"$lastUpdated": T1, "$lastUpdatedVersion": 2,
                  "z": {"$lastUpdated": T1, "$lastUpdatedVersion": 2}},
            "w": {"$lastUpdated": T2, "$lastUpdatedVersion": 3},
        })
    );
}

#[test]
fn service_put_stamps_levels_containing_a_change() {
    let mut doc = TwinDoc::new(T0);
    doc.replace_service(
        &json!({"properties": {"desired": {"y": {"z": 1, "k": 1}}}}),
        T1,
    )
    .unwrap();
    doc.replace_service(
        &json!({"properties": {"desired": {"y": {"z": 2, "k": 1}}}}),
        T2,
    )
    .unwrap();
    assert_eq!(
        desired_metadata(&doc),
        json!({
            "$lastUpdated": T2, "$lastUpdatedVersion": 3,
            "y": {"$lastUpdated": T2, "$lastUpdatedVersion": 3,
                  "z": {"$lastUpdated": T2, "$lastUpdatedVersion": 3},
                  "k": {"$lastUpdated": T1, "$lastUpdatedVersion": 2}},
        })
    );
}

#[test]
fn service_put_of_the_same_desired_does_not_notify() {
    let mut doc = TwinDoc::new(T0);
    doc.patch_service(&json!({"properties": {"desired": {"a": 1}}}), T1)
        .unwrap();
    // A GET result sent back with new tags: desired (with its $metadata/$version) unchanged,
    // reported ignored.
    let mut read = doc.to_rest(&TwinIdentity::new("d", "e"));
    read["tags"] = json!({"t": 1});
    let before = doc.desired_version();
    assert_eq!(doc.replace_service(&read, T2).unwrap(), None);
    assert_eq!(doc.desired_version(), before);
    assert_eq!(Value::Object(doc.tags().clone()), json!({"t": 1}));
    assert_eq!(doc.version(), 3);
    // Sending exactly the same again changes nothing at all.
    let read = doc.to_rest(&TwinIdentity::new("d", "e"));
    let snapshot = doc.clone();
    assert_eq!(doc.replace_service(&read, T2).unwrap(), None);
    assert_eq!(doc, snapshot);
}

#[test]
fn service_put_without_sections_clears_them() {
    let mut doc = TwinDoc::new(T0);
    doc.patch_service(
        &json!({"tags": {"a": 1}, "properties": {"desired": {"b": 2}}}),
        T1,
    )
    .unwrap();
    let notification = doc.replace_service(&json!({}), T2).unwrap();
    assert_eq!(notification, Some(json!({"$version": 3})));
    assert!(doc.tags().is_empty());
    assert!(doc.desired().is_empty());
    assert_eq!(
        desired_metadata(&doc),
        json!({"$lastUpdated": T2, "$lastUpdatedVersion": 3})
    );
}

#[test]
fn service_put_drops_nulls_and_validates() {
    let mut doc = TwinDoc::new(T0);
    doc.replace_service(
        &json!({"tags": {"a": null, "b": 1}, "properties": {"desired": {"c": {"d": null}}}}),
        T1,
    )
    .unwrap();
    assert_eq!(Value::Object(doc.tags().clone()), json!({"b": 1}));
    assert_eq!(Value::Object(doc.desired().clone()), json!({"c": {}}));
    let snapshot = doc.clone();
    for bad in [
        json!({"properties": {"desired": {"a b": 1}}}),
        json!({"tags": {"x": "y".repeat(5000)}}),
        json!({"tags": 3}),
        json!(null),
    ] {
        assert!(doc.replace_service(&bad, T2).is_err(), "{bad}");
    }
    assert_eq!(doc, snapshot);
}
