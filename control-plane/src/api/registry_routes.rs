//! The identity registry's REST surface: devices, modules, bulk operations and statistics.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hyper::header::{HeaderValue, ETAG};
use hyper::{Method, StatusCode};
use serde_json::json;

use ingot_engine::limits::{BULK_DEVICES_MAX, LIST_TOP_MAX};

use super::wire::{self, DeviceIn, ImportDeviceIn, ModuleIn};
use super::{empty_response, json_response, ApiError, ApiRequest, ApiResponse, AppState};
use crate::policy::Permission;
use crate::registry::{BulkDone, BulkOp, IfMatch, Registry, RegistryError};

/// The permission an operation needs (azure-protocol.md 1.2): reads need RegistryRead, changes
/// RegistryWrite. Unknown paths are refused before authorization.
pub fn permission_for(method: &Method, segments: &[String]) -> Result<Permission, ApiError> {
    let known = match segments.first().map(String::as_str) {
        Some("devices") => segments.len() <= 4,
        Some("statistics") => segments.len() == 2 && segments[1] == "devices",
        Some("certificates") => segments.len() <= 2,
        Some("routing") => segments.len() <= 3,
        _ => false,
    };
    if !known {
        return Err(ApiError::not_found("No such resource."));
    }
    Ok(if method == Method::GET {
        Permission::RegistryRead
    } else {
        Permission::RegistryWrite
    })
}

pub async fn dispatch(state: &AppState, req: ApiRequest) -> Result<ApiResponse, ApiError> {
    let segments: Vec<&str> = req.segments.iter().map(String::as_str).collect();
    match (&req.method, segments.as_slice()) {
        (&Method::GET, ["devices"]) => list_devices(state, &req).await,
        (&Method::POST, ["devices"]) => bulk(state, &req).await,
        (&Method::GET, ["devices", id]) => get_device(state, id).await,
        (&Method::PUT, ["devices", id]) => put_device(state, id, &req).await,
        (&Method::DELETE, ["devices", id]) => delete_device(state, id, &req).await,
        (&Method::GET, ["devices", id, "modules"]) => list_modules(state, id).await,
        (&Method::GET, ["devices", id, "modules", mid]) => get_module(state, id, mid).await,
        (&Method::PUT, ["devices", id, "modules", mid]) => put_module(state, id, mid, &req).await,
        (&Method::DELETE, ["devices", id, "modules", mid]) => {
            delete_module(state, id, mid, &req).await
        }
        (&Method::GET, ["statistics", "devices"]) => statistics(state).await,
        (_, ["routing", ..]) => super::routing_routes::dispatch(state, &req).await,
        (_, ["certificates"]) => super::certificate_routes::dispatch(state, &req, None).await,
        (_, ["certificates", name]) => {
            super::certificate_routes::dispatch(state, &req, Some(name)).await
        }
        (
            _,
            ["devices"]
            | ["devices", _]
            | ["devices", _, "modules", ..]
            | ["statistics", "devices"],
        ) => Err(ApiError::method_not_allowed()),
        _ => Err(ApiError::not_found("No such resource.")),
    }
}

/// Runs a registry transaction on the blocking pool: redb commits fsync.
pub(super) async fn blocking<T: Send + 'static>(
    state: &AppState,
    f: impl FnOnce(&Registry) -> Result<T, RegistryError> + Send + 'static,
) -> Result<T, ApiError> {
    let registry = state.registry.clone();
    match tokio::task::spawn_blocking(move || f(&registry)).await {
        Ok(result) => result.map_err(ApiError::from),
        Err(e) => {
            tracing::error!("registry task failed: {e}");
            Err(ApiError::server("The registry task failed."))
        }
    }
}

/// `If-Match` as the SDKs send it: `"*"` or a quoted etag, maybe weak (`W/"..."`).
pub(super) fn if_match(req: &ApiRequest) -> Option<IfMatch> {
    let raw = req.header("if-match")?.trim();
    let raw = raw.strip_prefix("W/").unwrap_or(raw);
    let value = raw.trim_matches('"');
    match value {
        "" => None,
        "*" => Some(IfMatch::Any),
        etag => Some(IfMatch::Etag(etag.to_owned())),
    }
}

fn with_etag(mut response: ApiResponse, etag: &str) -> ApiResponse {
    if let Ok(value) = HeaderValue::from_str(&format!("\"{etag}\"")) {
        response.headers_mut().insert(ETAG, value);
    }
    response
}

async fn get_device(state: &AppState, id: &str) -> Result<ApiResponse, ApiError> {
    wire::check_id("deviceId", id)?;
    let owned = id.to_owned();
    let device = blocking(state, move |r| r.device(&owned))
        .await?
        .ok_or_else(|| ApiError::from(RegistryError::DeviceNotFound))?;
    let owned = id.to_owned();
    let c2d = blocking(state, move |r| r.c2d_count(&owned)).await?;
    let mut json = live(state, wire::device_json(&device), id, None);
    json["cloudToDeviceMessageCount"] = c2d.into();
    Ok(with_etag(
        json_response(StatusCode::OK, json.to_string()),
        &device.etag,
    ))
}

/// Fills in what only the data plane knows: whether the identity is connected now.
fn live(
    state: &AppState,
    mut json: serde_json::Value,
    device_id: &str,
    module_id: Option<&str>,
) -> serde_json::Value {
    if let Some(since) = state
        .devices
        .as_ref()
        .and_then(|d| d.connected_since(device_id, module_id))
    {
        json["connectionState"] = "Connected".into();
        json["connectionStateUpdatedTime"] = since.into();
    }
    json
}

/// `PUT /devices/{id}`: without `If-Match` it creates (409 if the id is taken), with it it
/// replaces (404 if absent, 412 on a stale etag). Both answer 200, which is all the Python SDK
/// accepts.
async fn put_device(state: &AppState, id: &str, req: &ApiRequest) -> Result<ApiResponse, ApiError> {
    let body: DeviceIn = wire::parse_json(&req.body)?;
    let spec = wire::device_spec(id, body)?;
    let device = match if_match(req) {
        None => {
            let device = blocking(state, move |r| r.create_device(spec)).await?;
            state.identity_created(&device.device_id, None);
            device
        }
        Some(m) => {
            let device = blocking(state, move |r| r.update_device(spec, &m)).await?;
            state.identity_changed(&device.device_id, None);
            device
        }
    };
    let body = wire::device_json(&device).to_string();
    Ok(with_etag(json_response(StatusCode::OK, body), &device.etag))
}

async fn delete_device(
    state: &AppState,
    id: &str,
    req: &ApiRequest,
) -> Result<ApiResponse, ApiError> {
    wire::check_id("deviceId", id)?;
    let m = if_match(req).unwrap_or(IfMatch::Any);
    let owned = id.to_owned();
    let twin = state.twin_before_delete(id, None);
    blocking(state, move |r| r.delete_device(&owned, &m)).await?;
    state.identity_changed(id, None);
    state.identity_deleted(id, None, twin);
    Ok(empty_response(StatusCode::NO_CONTENT))
}

/// `GET /devices?top=N`: one page in id order. Azure returns at most 1000 devices and no way
/// to continue; Ingot adds an `x-ms-continuation` response header when more follow, which a
/// client sends back as a request header (the convention of `POST /devices/query`).
async fn list_devices(state: &AppState, req: &ApiRequest) -> Result<ApiResponse, ApiError> {
    let top = req
        .query("top")
        .and_then(|t| t.parse::<usize>().ok())
        .filter(|t| (1..=LIST_TOP_MAX).contains(t))
        .unwrap_or(LIST_TOP_MAX);
    let after = match req.header("x-ms-continuation").filter(|c| !c.is_empty()) {
        Some(token) => Some(
            URL_SAFE_NO_PAD
                .decode(token)
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(|| ApiError::argument_invalid("Invalid continuation token."))?,
        ),
        None => None,
    };
    let (devices, next) = blocking(state, move |r| r.list_devices(after.as_deref(), top)).await?;
    let body = serde_json::Value::Array(
        devices
            .iter()
            .map(|d| live(state, wire::device_json(d), &d.device_id, None))
            .collect(),
    );
    let mut response = json_response(StatusCode::OK, body.to_string());
    if let Some(next) = next {
        if let Ok(value) = HeaderValue::from_str(&URL_SAFE_NO_PAD.encode(next)) {
            response.headers_mut().insert("x-ms-continuation", value);
        }
    }
    Ok(response)
}

async fn statistics(state: &AppState) -> Result<ApiResponse, ApiError> {
    let stats = blocking(state, |r| r.statistics()).await?;
    let body = json!({
        "totalDeviceCount": stats.total_devices,
        "enabledDeviceCount": stats.enabled_devices,
        "disabledDeviceCount": stats.total_devices.saturating_sub(stats.enabled_devices),
    });
    Ok(json_response(StatusCode::OK, body.to_string()))
}

/// `POST /devices`: up to 100 `ExportImportDevice` entries in one transaction. Entries that
/// fail are reported one by one and the others are committed; the status is 200 when all
/// succeeded and 400 otherwise, both with the same body shape, as the SDK expects.
async fn bulk(state: &AppState, req: &ApiRequest) -> Result<ApiResponse, ApiError> {
    let items: Vec<ImportDeviceIn> = wire::parse_json(&req.body)?;
    if items.is_empty() {
        return Err(ApiError::argument_null("The bulk request has no devices."));
    }
    if items.len() > BULK_DEVICES_MAX {
        return Err(ApiError::argument_invalid(format!(
            "A bulk request takes at most {BULK_DEVICES_MAX} devices, not {}.",
            items.len()
        )));
    }
    let mut seen = std::collections::HashSet::new();
    for item in &items {
        let key = (item.id.clone(), item.module_id.clone());
        if !seen.insert(key) {
            let id = item.id.clone().unwrap_or_default();
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                400011,
                "DeviceDefinedMultipleTimes",
                format!("The device '{id}' appears more than once."),
            ));
        }
    }

    // Entries that fail validation get their error now; the rest go to the registry.
    let mut outcomes: Vec<(String, String, Option<ApiError>)> = Vec::new();
    let mut ops = Vec::new();
    for item in items {
        let id = item.id.clone().unwrap_or_default();
        let mode = item
            .import_mode
            .clone()
            .unwrap_or_else(|| "createOrUpdate".to_owned());
        match bulk_op(item, &mode) {
            Ok(op) => {
                ops.push(op);
                outcomes.push((id, mode, None));
            }
            Err(e) => outcomes.push((id, mode, Some(e))),
        }
    }
    // Deletions carry the twin as it was: read those first, when a route wants them.
    let deleted_twins: Vec<Option<serde_json::Value>> = ops
        .iter()
        .map(|op| match op {
            BulkOp::Delete(id, _) => state.twin_before_delete(id, None),
            _ => None,
        })
        .collect();
    let ids: Vec<String> = ops.iter().map(bulk_op_id).collect();
    let done = blocking(state, move |r| r.bulk(ops)).await?;
    for ((result, id), twin) in done.iter().zip(&ids).zip(deleted_twins) {
        match result {
            Ok(BulkDone::Created) => state.identity_created(id, None),
            Ok(BulkDone::Deleted) => state.identity_deleted(id, None, twin),
            _ => {}
        }
    }
    let mut results = done.into_iter().map(|r| r.map(drop));
    for (id, _, invalid) in &outcomes {
        if invalid.is_none() {
            state.identity_changed(id, None);
        }
    }
    let mut errors = Vec::new();
    for (id, mode, outcome) in outcomes {
        let outcome = match outcome {
            Some(invalid) => Err(invalid),
            None => match results.next() {
                Some(result) => result.map_err(ApiError::from),
                None => Err(ApiError::server("The registry returned too few results.")),
            },
        };
        if let Err(e) = outcome {
            errors.push(json!({
                "deviceId": id,
                "errorCode": e.name,
                "errorStatus": e.message,
                "operation": mode,
            }));
        }
    }
    let ok = errors.is_empty();
    let body = json!({ "isSuccessful": ok, "errors": errors, "warnings": [] });
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::BAD_REQUEST
    };
    Ok(json_response(status, body.to_string()))
}

fn bulk_op_id(op: &BulkOp) -> String {
    match op {
        BulkOp::Create(spec) | BulkOp::Upsert(spec) | BulkOp::UpdateIfMatch(spec, _) => {
            spec.device_id.clone()
        }
        BulkOp::Delete(id, _) => id.clone(),
    }
}

fn bulk_op(item: ImportDeviceIn, mode: &str) -> Result<BulkOp, ApiError> {
    if item.module_id.is_some() {
        return Err(ApiError::argument_invalid(
            "Bulk operations on modules are not supported; use PUT /devices/{id}/modules/{mid}.",
        ));
    }
    let etag = item.etag.clone().map(|e| e.trim_matches('"').to_owned());
    let require_etag = || {
        etag.clone()
            .map(IfMatch::Etag)
            .ok_or_else(|| ApiError::argument_null("This import mode needs an eTag."))
    };
    let op = match mode.to_ascii_lowercase().as_str() {
        "create" => BulkOp::Create(wire::import_spec(item)?),
        "update" | "createorupdate" => BulkOp::Upsert(wire::import_spec(item)?),
        "updateifmatchetag" => {
            let m = require_etag()?;
            BulkOp::UpdateIfMatch(wire::import_spec(item)?, m)
        }
        "delete" | "deleteifmatchetag" => {
            let m = if mode.eq_ignore_ascii_case("delete") {
                IfMatch::Any
            } else {
                require_etag()?
            };
            let id = item
                .id
                .ok_or_else(|| ApiError::argument_null("A bulk entry has no id."))?;
            wire::check_id("deviceId", &id)?;
            BulkOp::Delete(id, m)
        }
        "updatetwin" | "updatetwinifmatchetag" => {
            return Err(ApiError::argument_invalid(
                "Twin import modes are not supported yet: twins arrive with issue #6.",
            ))
        }
        other => {
            return Err(ApiError::argument_invalid(format!(
                "Unknown importMode '{other}'."
            )))
        }
    };
    Ok(op)
}

async fn list_modules(state: &AppState, id: &str) -> Result<ApiResponse, ApiError> {
    wire::check_id("deviceId", id)?;
    let owned = id.to_owned();
    let modules = blocking(state, move |r| r.modules(&owned)).await?;
    let body = serde_json::Value::Array(
        modules
            .iter()
            .map(|m| {
                let json = wire::module_json(m);
                live(state, json, &m.device_id, Some(&m.module_id))
            })
            .collect(),
    );
    Ok(json_response(StatusCode::OK, body.to_string()))
}

async fn get_module(state: &AppState, id: &str, mid: &str) -> Result<ApiResponse, ApiError> {
    wire::check_id("deviceId", id)?;
    wire::check_id("moduleId", mid)?;
    let (d, m) = (id.to_owned(), mid.to_owned());
    let module = blocking(state, move |r| match r.module(&d, &m)? {
        Some(module) => Ok(module),
        None if r.device(&d)?.is_some() => Err(RegistryError::ModuleNotFound),
        None => Err(RegistryError::DeviceNotFound),
    })
    .await?;
    let body = wire::module_json(&module).to_string();
    Ok(with_etag(json_response(StatusCode::OK, body), &module.etag))
}

async fn put_module(
    state: &AppState,
    id: &str,
    mid: &str,
    req: &ApiRequest,
) -> Result<ApiResponse, ApiError> {
    let body: ModuleIn = wire::parse_json(&req.body)?;
    let spec = wire::module_spec(id, mid, body)?;
    let module = match if_match(req) {
        None => {
            let module = blocking(state, move |r| r.create_module(spec)).await?;
            state.identity_created(&module.device_id, Some(&module.module_id));
            module
        }
        Some(m) => {
            let module = blocking(state, move |r| r.update_module(spec, &m)).await?;
            state.identity_changed(&module.device_id, Some(&module.module_id));
            module
        }
    };
    let body = wire::module_json(&module).to_string();
    Ok(with_etag(json_response(StatusCode::OK, body), &module.etag))
}

async fn delete_module(
    state: &AppState,
    id: &str,
    mid: &str,
    req: &ApiRequest,
) -> Result<ApiResponse, ApiError> {
    wire::check_id("deviceId", id)?;
    wire::check_id("moduleId", mid)?;
    let m = if_match(req).unwrap_or(IfMatch::Any);
    let (d, mo) = (id.to_owned(), mid.to_owned());
    let twin = state.twin_before_delete(id, Some(mid));
    blocking(state, move |r| r.delete_module(&d, &mo, &m)).await?;
    state.identity_changed(id, Some(mid));
    state.identity_deleted(id, Some(mid), twin);
    Ok(empty_response(StatusCode::NO_CONTENT))
}
