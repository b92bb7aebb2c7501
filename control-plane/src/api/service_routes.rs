//! The service-facing API: twins, direct methods, twin queries, cloud-to-device messages and
//! their feedback, and service statistics. Every call needs `ServiceConnect` (queries and
//! statistics also accept `RegistryRead`).

use std::time::Duration;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use hyper::header::HeaderValue;
use hyper::{Method, StatusCode};
use serde::Deserialize;
use serde_json::{json, Value};

use ingot_engine::limits::{
    C2D_MESSAGE_BYTES_MAX, METHOD_CONNECT_TIMEOUT_SECS_MAX, METHOD_PAYLOAD_BYTES_MAX,
    METHOD_RESPONSE_TIMEOUT_SECS, QUERY_PAGE_DEFAULT, QUERY_PAGE_MAX,
};
use ingot_engine::services::{IdentityKey, MethodOutcome};

use super::registry_routes::{blocking, if_match};
use super::{empty_response, json_response, wire, ApiError, ApiRequest, ApiResponse, AppState};
use crate::devices;
use crate::policy::Permission;
use crate::registry::{
    AckMode, C2dSpec, Device, IfMatch, Module, Registry, RegistryError, TwinRow,
};
use crate::twin::{self, TwinDoc, TwinIdentity};

const SERVICE: &[Permission] = &[Permission::ServiceConnect];
const SERVICE_OR_READ: &[Permission] = &[Permission::ServiceConnect, Permission::RegistryRead];

/// The permissions that may call a service route, or `None` when the path is not one.
pub fn permissions_for(method: &Method, segments: &[String]) -> Option<&'static [Permission]> {
    let s: Vec<&str> = segments.iter().map(String::as_str).collect();
    match (method, s.as_slice()) {
        (_, ["twins", ..]) => Some(SERVICE),
        (&Method::POST, ["devices", "query"]) => Some(SERVICE_OR_READ),
        (_, ["devices", _, "messages", bound]) if bound.eq_ignore_ascii_case("devicebound") => {
            Some(SERVICE)
        }
        (_, ["devices", _, "commands"]) => Some(SERVICE),
        (_, ["messages", "serviceBound" | "servicebound", ..]) => Some(SERVICE),
        (_, ["statistics", "service"]) => Some(SERVICE_OR_READ),
        _ => None,
    }
}

pub async fn dispatch(state: &AppState, req: ApiRequest) -> Result<ApiResponse, ApiError> {
    let segments: Vec<&str> = req.segments.iter().map(String::as_str).collect();
    match (&req.method, segments.as_slice()) {
        (&Method::GET, ["twins", id]) => get_twin(state, id, None).await,
        (&Method::GET, ["twins", id, "modules", mid]) => get_twin(state, id, Some(mid)).await,
        (&Method::PATCH | &Method::PUT, ["twins", id]) => update_twin(state, id, None, &req).await,
        (&Method::PATCH | &Method::PUT, ["twins", id, "modules", mid]) => {
            update_twin(state, id, Some(mid), &req).await
        }
        (&Method::POST, ["twins", id, "methods"]) => invoke(state, id, None, &req).await,
        (&Method::POST, ["twins", id, "modules", mid, "methods"]) => {
            invoke(state, id, Some(mid), &req).await
        }
        (&Method::POST, ["devices", "query"]) => query(state, &req).await,
        (&Method::POST, ["devices", id, "messages", _]) => send_c2d(state, id, &req).await,
        (&Method::DELETE, ["devices", id, "commands"]) => purge(state, id).await,
        (&Method::GET, ["messages", _, "feedback"]) => feedback(state).await,
        (&Method::DELETE, ["messages", _, "feedback", lock]) => {
            complete_feedback(state, lock).await
        }
        (&Method::POST, ["messages", _, "feedback", lock, "abandon"]) => {
            // Feedback stays visible until completed; abandoning only checks the token.
            parse_lock(lock)?;
            Ok(empty_response(StatusCode::NO_CONTENT))
        }
        (&Method::GET, ["statistics", "service"]) => {
            let count = state
                .devices
                .as_ref()
                .map_or(0, |d| d.connected_device_count());
            let body = json!({ "connectedDeviceCount": count }).to_string();
            Ok(json_response(StatusCode::OK, body))
        }
        (&Method::GET, ["twins", ..] | ["messages", ..] | ["statistics", ..])
        | (_, ["twins", ..] | ["devices", ..] | ["messages", ..] | ["statistics", ..]) => {
            Err(ApiError::method_not_allowed())
        }
        _ => Err(ApiError::not_found("No such resource.")),
    }
}

fn check_identity(device_id: &str, module_id: Option<&str>) -> Result<(), ApiError> {
    wire::check_id("deviceId", device_id)?;
    if let Some(module_id) = module_id {
        wire::check_id("moduleId", module_id)?;
    }
    Ok(())
}

/// The REST twin document of an identity (azure-protocol.md 6.3).
fn twin_json(
    state: &AppState,
    device: &Device,
    module: Option<&Module>,
    twin: &TwinDoc,
    c2d_count: u64,
) -> Value {
    let module_id = module.map(|m| m.module_id.as_str());
    let connected = state
        .devices
        .as_ref()
        .is_some_and(|d| d.is_connected(&device.device_id, module_id));
    let authentication = module.map_or(&device.authentication, |m| &m.authentication);
    let (auth_type, primary, secondary) = match authentication {
        crate::registry::Authentication::Sas { .. } => ("sas", None, None),
        crate::registry::Authentication::SelfSigned {
            primary_thumbprint,
            secondary_thumbprint,
        } => (
            "selfSigned",
            Some(primary_thumbprint.as_str()),
            secondary_thumbprint.as_deref(),
        ),
        crate::registry::Authentication::CertificateAuthority => {
            ("certificateAuthority", None, None)
        }
        crate::registry::Authentication::None => ("none", None, None),
    };
    let status = match device.status {
        crate::registry::Status::Enabled => "enabled",
        crate::registry::Status::Disabled => "disabled",
    };
    let identity = TwinIdentity {
        device_id: &device.device_id,
        module_id,
        device_etag: module.map_or(&device.etag, |m| &m.etag),
        status,
        status_reason: device.status_reason.as_deref(),
        status_update_time: device.status_updated_time.as_deref().unwrap_or(twin::NEVER),
        connection_state: if connected {
            "Connected"
        } else {
            "Disconnected"
        },
        last_activity_time: twin::NEVER,
        cloud_to_device_message_count: c2d_count,
        authentication_type: auth_type,
        primary_thumbprint: primary,
        secondary_thumbprint: secondary,
        model_id: None,
        iot_edge: module.is_none().then_some(device.iot_edge),
        device_scope: device.device_scope.as_deref(),
        parent_scopes: module.is_none().then_some(device.parent_scopes.as_slice()),
    };
    twin.to_rest(&identity)
}

/// The records of one identity: its device and, for a module, the module.
fn identity_records(
    r: &Registry,
    device_id: &str,
    module_id: Option<&str>,
) -> Result<(Device, Option<Module>), RegistryError> {
    let device = r.device(device_id)?.ok_or(RegistryError::DeviceNotFound)?;
    let module = match module_id {
        Some(m) => Some(
            r.module(device_id, m)?
                .ok_or(RegistryError::ModuleNotFound)?,
        ),
        None => None,
    };
    Ok((device, module))
}

/// The C2D queue length a twin shows (modules have no queue).
fn c2d_count(r: &Registry, device_id: &str, module_id: Option<&str>) -> Result<u64, RegistryError> {
    match module_id {
        Some(_) => Ok(0),
        None => r.c2d_count(device_id),
    }
}

async fn get_twin(
    state: &AppState,
    device_id: &str,
    module_id: Option<&str>,
) -> Result<ApiResponse, ApiError> {
    check_identity(device_id, module_id)?;
    let (d, m) = (device_id.to_owned(), module_id.map(str::to_owned));
    let (device, module, twin, c2d) = blocking(state, move |r| {
        let (device, module) = identity_records(r, &d, m.as_deref())?;
        let twin = r.twin(&d, m.as_deref())?;
        Ok((device, module, twin, c2d_count(r, &d, m.as_deref())?))
    })
    .await?;
    let body = twin_json(state, &device, module.as_ref(), &twin, c2d).to_string();
    Ok(with_etag(json_response(StatusCode::OK, body), &twin.etag()))
}

/// `PATCH` merges tags and desired properties; `PUT` replaces them. Both need `If-Match` (the
/// SDK sends `"*"` by default), answer the whole twin and push a desired change to the device.
async fn update_twin(
    state: &AppState,
    device_id: &str,
    module_id: Option<&str>,
    req: &ApiRequest,
) -> Result<ApiResponse, ApiError> {
    check_identity(device_id, module_id)?;
    let body: Value = wire::parse_json(&req.body)?;
    let m = if_match(req).unwrap_or(IfMatch::Any);
    let replace = req.method == Method::PUT;
    let (d, mid) = (device_id.to_owned(), module_id.map(str::to_owned));
    // The body comes back for the twin-change event, which reports what the patch changed.
    let (twin, desired, (device, module), c2d, patch) = blocking(state, move |r| {
        let (twin, desired) = r.update_twin(&d, mid.as_deref(), &m, |twin, now| {
            if replace {
                twin.replace_service(&body, now)
            } else {
                twin.patch_service(&body, now)
            }
        })?;
        let records = identity_records(r, &d, mid.as_deref())?;
        let c2d = c2d_count(r, &d, mid.as_deref())?;
        Ok((twin, desired, records, c2d, body))
    })
    .await?;
    if let Some(events) = &state.system_events {
        events.twin_changed(replace, device_id, module_id, || {
            if replace {
                return crate::system_events::twin_body(device_id, module_id, &twin);
            }
            // What the patch changed, with the new versions.
            let mut change = serde_json::Map::new();
            change.insert("version".into(), twin.version().into());
            if let Some(tags) = patch.get("tags").filter(|t| t.is_object()) {
                change.insert("tags".into(), tags.clone());
            }
            if let Some(mut desired) = patch
                .get("properties")
                .and_then(|p| p.get("desired"))
                .filter(|d| d.is_object())
                .cloned()
            {
                if let Some(object) = desired.as_object_mut() {
                    object.insert("$version".into(), twin.desired_version().into());
                }
                change.insert("properties".into(), json!({ "desired": desired }));
            }
            Value::Object(change)
        });
    }
    if let Some(devices) = &state.devices {
        if let Some(desired) = desired {
            devices.push_desired(device_id, module_id, desired);
        }
        devices.push_twin(&ingot_engine::services::IdentityKey::new(
            device_id, module_id,
        ));
    }
    let body = twin_json(state, &device, module.as_ref(), &twin, c2d).to_string();
    Ok(with_etag(json_response(StatusCode::OK, body), &twin.etag()))
}

fn with_etag(mut response: ApiResponse, etag: &str) -> ApiResponse {
    if let Ok(value) = HeaderValue::from_str(&format!("\"{etag}\"")) {
        response.headers_mut().insert(hyper::header::ETAG, value);
    }
    response
}

/// `CloudToDeviceMethod`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct MethodIn {
    method_name: Option<String>,
    #[serde(default)]
    payload: Option<Value>,
    response_timeout_in_seconds: Option<u64>,
    connect_timeout_in_seconds: Option<u64>,
}

fn device_not_online(connect_timeout: u64) -> ApiError {
    let mut error = ApiError::new(
        StatusCode::NOT_FOUND,
        404103,
        "DeviceNotOnline",
        "The operation failed because the requested device isn't online or hasn't registered \
         the direct method callback.",
    );
    error.message = format!(
        "{} (waited {connect_timeout} s for it to connect)",
        error.message
    );
    error
}

/// `POST /twins/{id}[/modules/{mid}]/methods`: sends the call to the identity's connection and
/// answers with the device's `{status, payload}`; waits up to `connectTimeoutInSeconds` for the
/// device to connect and subscribe, then up to `responseTimeoutInSeconds` for its answer.
async fn invoke(
    state: &AppState,
    device_id: &str,
    module_id: Option<&str>,
    req: &ApiRequest,
) -> Result<ApiResponse, ApiError> {
    check_identity(device_id, module_id)?;
    let body: MethodIn = wire::parse_json(&req.body)?;
    let name = body
        .method_name
        .filter(|n| !n.is_empty())
        .ok_or_else(|| ApiError::argument_null("methodName is required."))?;
    if name.len() > 128 {
        return Err(ApiError::argument_invalid(
            "methodName is longer than 128 characters.",
        ));
    }
    let (min, max, default) = METHOD_RESPONSE_TIMEOUT_SECS;
    let response_timeout = body.response_timeout_in_seconds.unwrap_or(default);
    if !(min..=max).contains(&response_timeout) {
        return Err(ApiError::argument_invalid(format!(
            "responseTimeoutInSeconds must be between {min} and {max}."
        )));
    }
    let connect_timeout = body.connect_timeout_in_seconds.unwrap_or(0);
    if connect_timeout > METHOD_CONNECT_TIMEOUT_SECS_MAX {
        return Err(ApiError::argument_invalid(format!(
            "connectTimeoutInSeconds must be between 0 and {METHOD_CONNECT_TIMEOUT_SECS_MAX}."
        )));
    }
    let payload = serde_json::to_vec(&body.payload.unwrap_or(Value::Null)).unwrap_or_default();
    if payload.len() > METHOD_PAYLOAD_BYTES_MAX {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            413001,
            "MessageTooLarge",
            format!("The method payload is larger than {METHOD_PAYLOAD_BYTES_MAX} bytes."),
        ));
    }
    // The identity must exist (404001 / 404010 rather than "not online").
    let (d, m) = (device_id.to_owned(), module_id.map(str::to_owned));
    blocking(state, move |r| {
        identity_records(r, &d, m.as_deref()).map(drop)
    })
    .await?;
    let Some(devices) = &state.devices else {
        return Err(device_not_online(connect_timeout));
    };
    let identity = IdentityKey::new(device_id, module_id);
    let connect_deadline = tokio::time::Instant::now() + Duration::from_secs(connect_timeout);
    let outcome = loop {
        let call = devices
            .engine()
            .invoke_method(identity.clone(), name.clone(), payload.clone());
        match tokio::time::timeout(Duration::from_secs(response_timeout), call).await {
            Err(_) => {
                return Err(ApiError::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    504101,
                    "GatewayTimeout",
                    format!(
                    "Timed out waiting for the response from the device ({response_timeout} s)."
                ),
                ))
            }
            Ok(MethodOutcome::NotOnline) if tokio::time::Instant::now() < connect_deadline => {
                // Not connected or not subscribed yet: look again shortly.
                let wait = connect_deadline - tokio::time::Instant::now();
                tokio::time::sleep(wait.min(Duration::from_millis(200))).await;
            }
            Ok(outcome) => break outcome,
        }
    };
    match outcome {
        MethodOutcome::Response { status, payload } => {
            if payload.len() > METHOD_PAYLOAD_BYTES_MAX {
                return Err(ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    502001,
                    "DeviceResponseTooLarge",
                    "The device's answer is larger than 128 KB.",
                ));
            }
            let payload = if payload.iter().all(u8::is_ascii_whitespace) {
                Value::Null
            } else {
                serde_json::from_slice(&payload)
                    .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&payload).into()))
            };
            let body = json!({ "status": status, "payload": payload }).to_string();
            Ok(json_response(StatusCode::OK, body))
        }
        MethodOutcome::NotOnline => Err(device_not_online(connect_timeout)),
        MethodOutcome::Busy => Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            429001,
            "ThrottlingException",
            "The device has too many method calls in flight.",
        )),
    }
}

#[derive(Debug, Deserialize)]
struct QueryIn {
    query: Option<String>,
}

/// `POST /devices/query`: the IoT Hub query language over device or module twins, in pages of
/// `x-ms-max-item-count` (default 100, at most 1000) with `x-ms-continuation` tokens.
async fn query(state: &AppState, req: &ApiRequest) -> Result<ApiResponse, ApiError> {
    let body: QueryIn = wire::parse_json(&req.body)?;
    let text = body
        .query
        .ok_or_else(|| ApiError::argument_null("query is required."))?;
    let parsed = twin::query::parse(&text).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            400006,
            "IotHubFormatError",
            format!("Invalid query: {e}"),
        )
    })?;
    let page = match req.header("x-ms-max-item-count") {
        Some(n) => n
            .trim()
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=QUERY_PAGE_MAX).contains(n))
            .ok_or_else(|| {
                ApiError::argument_invalid(format!(
                    "x-ms-max-item-count must be between 1 and {QUERY_PAGE_MAX}."
                ))
            })?,
        None => QUERY_PAGE_DEFAULT,
    };
    let offset = match req.header("x-ms-continuation").filter(|c| !c.is_empty()) {
        Some(token) => BASE64
            .decode(token)
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .and_then(|s| s.strip_prefix("offset:").and_then(|n| n.parse().ok()))
            .ok_or_else(|| ApiError::argument_invalid("Invalid continuation token."))?,
        None => 0usize,
    };
    let modules = parsed.collection() == twin::query::Collection::Modules;
    let rows: Vec<TwinRow> = blocking(state, move |r| r.twins_for_query(modules)).await?;
    let json_rows = rows.iter().map(|row| {
        twin_json(
            state,
            &row.device,
            row.module.as_ref(),
            &row.twin,
            row.c2d_count,
        )
    });
    let output = parsed.run(json_rows);
    let total = output.items.len();
    let items: Vec<Value> = output.items.into_iter().skip(offset).take(page).collect();
    let next = offset + items.len();
    let mut response = json_response(StatusCode::OK, Value::Array(items).to_string());
    let item_type = match output.item_type {
        twin::query::ItemType::Twin => "twin",
        twin::query::ItemType::Raw => "raw",
    };
    response
        .headers_mut()
        .insert("x-ms-item-type", HeaderValue::from_static(item_type));
    if next < total {
        let token = BASE64.encode(format!("offset:{next}"));
        if let Ok(value) = HeaderValue::from_str(&token) {
            response.headers_mut().insert("x-ms-continuation", value);
        }
    }
    Ok(response)
}

/// `POST /devices/{id}/messages/deviceBound`: Ingot's HTTPS way to send a C2D message (Azure's
/// service SDKs use AMQP for this). The body is the message; headers carry its properties:
/// `iothub-messageid`, `iothub-correlationid`, `iothub-userid`, `iothub-ack`
/// (none|positive|negative|full), `iothub-expiry` (RFC 3339) or `iothub-ttl` (seconds),
/// `content-type`, `content-encoding`, and `iothub-app-{name}` for application properties.
async fn send_c2d(
    state: &AppState,
    device_id: &str,
    req: &ApiRequest,
) -> Result<ApiResponse, ApiError> {
    wire::check_id("deviceId", device_id)?;
    if req.body.len() > C2D_MESSAGE_BYTES_MAX {
        return Err(ApiError::too_large(C2D_MESSAGE_BYTES_MAX));
    }
    let settings = state.devices.as_ref().map(|d| d.c2d).unwrap_or_default();
    let header = |name: &str| req.header(name).map(str::to_owned);
    let ack = match req.header("iothub-ack") {
        Some(text) => AckMode::parse(text).ok_or_else(|| {
            ApiError::argument_invalid("iothub-ack must be none, positive, negative or full.")
        })?,
        None => AckMode::None,
    };
    let now_ms = devices::now_ms();
    let expiry_ms = match (req.header("iothub-expiry"), req.header("iothub-ttl")) {
        (Some(expiry), _) => chrono::DateTime::parse_from_rfc3339(expiry)
            .map(|t| t.timestamp_millis().max(0) as u64)
            .map_err(|_| ApiError::argument_invalid("iothub-expiry must be an RFC 3339 time."))?,
        (None, Some(ttl)) => {
            let secs: u64 = ttl
                .parse()
                .ok()
                .filter(|s| (1..=48 * 3600).contains(s))
                .ok_or_else(|| {
                    ApiError::argument_invalid("iothub-ttl must be 1 to 172800 seconds.")
                })?;
            now_ms + secs * 1000
        }
        (None, None) => now_ms + settings.default_ttl.as_millis() as u64,
    };
    let mut properties = Vec::new();
    for (name, value) in &req.headers {
        if let Some(app) = name.as_str().strip_prefix("iothub-app-") {
            let value = value
                .to_str()
                .map_err(|_| ApiError::argument_invalid("Property values must be ASCII."))?;
            properties.push((app.to_owned(), value.to_owned()));
        }
    }
    let message_id = header("iothub-messageid").unwrap_or_else(new_message_id);
    if message_id.len() > 128 {
        return Err(ApiError::argument_invalid(
            "iothub-messageid is longer than 128 characters.",
        ));
    }
    let spec = C2dSpec {
        message_id,
        correlation_id: header("iothub-correlationid"),
        user_id: header("iothub-userid"),
        content_type: header("content-type"),
        content_encoding: header("content-encoding"),
        ack,
        expiry_ms,
        properties,
        body: req.body.to_vec(),
    };
    let device = device_id.to_owned();
    let depth = settings.queue_depth;
    let message = blocking(state, move |r| r.c2d_enqueue(&device, spec, depth, now_ms)).await?;
    if let Some(devices) = &state.devices {
        devices.c2d_enqueued(&message);
    }
    let expiry = chrono::DateTime::from_timestamp_millis(message.content.expiry_ms as i64)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true));
    let body = json!({
        "messageId": message.content.message_id,
        "deviceId": message.device_id,
        "lockToken": message.lock_token.to_string(),
        "expiryTimeUtc": expiry,
        "ack": message.content.ack.as_str(),
    });
    Ok(json_response(StatusCode::OK, body.to_string()))
}

fn new_message_id() -> String {
    let n: u128 = rand::random();
    let hex = format!("{n:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// `DELETE /devices/{id}/commands`.
async fn purge(state: &AppState, device_id: &str) -> Result<ApiResponse, ApiError> {
    wire::check_id("deviceId", device_id)?;
    let device = device_id.to_owned();
    let purged = blocking(state, move |r| r.c2d_purge(&device)).await?;
    let body = json!({
        "totalMessagesPurged": purged,
        "deviceId": device_id,
        "moduleId": null,
    });
    Ok(json_response(StatusCode::OK, body.to_string()))
}

/// `GET /messages/serviceBound/feedback`: the oldest feedback records (at most 100) and, in the
/// `ETag` and `iothub-lock-token` headers, the token that completes them; 204 when there are
/// none.
async fn feedback(state: &AppState) -> Result<ApiResponse, ApiError> {
    let batch = blocking(state, |r| r.feedback_batch(100)).await?;
    let Some(lock_token) = batch.lock_token else {
        return Ok(empty_response(StatusCode::NO_CONTENT));
    };
    let body = serde_json::to_string(&batch.records).unwrap_or_default();
    let mut response = json_response(StatusCode::OK, body);
    let token = lock_token.to_string();
    if let Ok(value) = HeaderValue::from_str(&format!("\"{token}\"")) {
        response.headers_mut().insert(hyper::header::ETAG, value);
    }
    if let Ok(value) = HeaderValue::from_str(&token) {
        response.headers_mut().insert("iothub-lock-token", value);
    }
    Ok(response)
}

fn parse_lock(lock: &str) -> Result<u64, ApiError> {
    lock.trim_matches('"')
        .parse()
        .map_err(|_| ApiError::argument_invalid("Invalid lock token."))
}

async fn complete_feedback(state: &AppState, lock: &str) -> Result<ApiResponse, ApiError> {
    let lock = parse_lock(lock)?;
    let removed = blocking(state, move |r| r.feedback_complete(lock)).await?;
    if !removed {
        return Err(ApiError::new(
            StatusCode::PRECONDITION_FAILED,
            412002,
            "DeviceMessageLockLost",
            "No feedback is held by this lock token.",
        ));
    }
    Ok(empty_response(StatusCode::NO_CONTENT))
}
