//! The HTTPS control plane: the Azure IoT Hub service REST API (api-version 2021-04-12).
//!
//! hyper 1.x serves HTTP/1.1 over rustls on tokio. Every request is authorized by a SAS token of
//! a shared access policy whose permission covers the operation, and every error uses Azure's
//! envelope. Registry calls are blocking redb transactions (one fsync per commit), so they run on
//! tokio's blocking pool and never stall the accept loop.
//!
//! Bounds: at most `http.connections_max` connections (more wait in the kernel's accept queue),
//! `http.body_bytes_max` per body (413 before the excess is read), and timeouts on the TLS
//! handshake and on reading request headers, so a slow or half-open client costs a slot for a
//! bounded time only.

mod certificate_routes;
mod error;
mod registry_routes;
mod routing_routes;
mod service_routes;
pub mod wire;

use std::net::SocketAddr;
use std::sync::Arc;

use serde_json::Value;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

use ingot_engine::auth::sas::{self, SasToken};

pub use certificate_routes::authorities_der;
pub use error::ApiError;

use crate::config::HttpConfig;
use crate::policy::{Permission, Policies};
use crate::registry::Registry;

/// What every request handler may use.
#[derive(Debug)]
pub struct AppState {
    pub registry: Arc<Registry>,
    pub policies: Policies,
    pub hostname: String,
    pub http: HttpConfig,
    /// The data plane, told about every registry change so that it can disconnect an identity
    /// that was disabled, deleted or re-keyed. `None` when no data plane runs.
    pub engine: Option<Arc<ingot_engine::shard::Engine>>,
    /// Live devices: presence, twins pushed to devices, method calls, C2D delivery. `None`
    /// when no data plane runs.
    pub devices: Option<Arc<crate::devices::Devices>>,
    /// The route table in force.
    pub routing: Arc<crate::routing::RoutingState>,
    /// Changes routes and endpoints at run time. `None` when no data plane runs.
    pub routing_manager: Option<Arc<crate::routing::RoutingManager>>,
    /// Lifecycle and twin-change events. `None` when no data plane runs.
    pub system_events: Option<Arc<crate::system_events::SystemEvents>>,
}

impl AppState {
    pub fn authorities_changed(&self) {
        if let Some(engine) = &self.engine {
            engine.certificate_authorities_changed();
        }
    }

    /// A lifecycle event for an identity just created, with its new twin.
    pub fn identity_created(&self, device_id: &str, module_id: Option<&str>) {
        if let Some(events) = &self.system_events {
            events.lifecycle(
                crate::system_events::Lifecycle::Created,
                device_id,
                module_id,
                || self.twin_body(device_id, module_id),
            );
        }
    }

    /// The twin of an identity about to be deleted, when a route reads lifecycle events (the
    /// deletion event carries it).
    pub fn twin_before_delete(&self, device_id: &str, module_id: Option<&str>) -> Option<Value> {
        let events = self.system_events.as_ref()?;
        events
            .wants_lifecycle()
            .then(|| self.twin_body(device_id, module_id))
            .flatten()
    }

    /// A lifecycle event for a deleted identity.
    pub fn identity_deleted(&self, device_id: &str, module_id: Option<&str>, twin: Option<Value>) {
        if let Some(events) = &self.system_events {
            events.lifecycle(
                crate::system_events::Lifecycle::Deleted,
                device_id,
                module_id,
                || twin,
            );
        }
    }

    fn twin_body(&self, device_id: &str, module_id: Option<&str>) -> Option<Value> {
        let twin = self.registry.twin(device_id, module_id).ok()?;
        Some(crate::system_events::twin_body(device_id, module_id, &twin))
    }

    pub fn identity_changed(&self, device_id: &str, module_id: Option<&str>) {
        if let Some(engine) = &self.engine {
            engine.identity_changed(device_id, module_id);
        }
    }
}

pub type ApiResponse = Response<Full<Bytes>>;

/// Serves the API on `listener` until `shutdown` resolves, then lets in-flight requests finish
/// (for at most `drain`).
pub async fn serve(
    listener: TcpListener,
    tls: rustls::ServerConfig,
    state: Arc<AppState>,
    shutdown: impl std::future::Future<Output = ()>,
    drain: Duration,
) {
    let acceptor = TlsAcceptor::from(Arc::new(tls));
    let slots = Arc::new(Semaphore::new(state.http.connections_max));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        // Take a connection slot before accepting: when all are busy, new clients wait in the
        // kernel's backlog instead of in our memory.
        let permit = tokio::select! {
            permit = slots.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!("failed to accept an HTTPS connection: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let acceptor = acceptor.clone();
        let state = state.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let _permit = permit;
            let handshake_timeout = Duration::from_millis(state.http.handshake_timeout_ms);
            let tls = match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, "TLS handshake failed: {e}");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let header_timeout = Duration::from_millis(state.http.idle_timeout_ms);
            let service = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, std::convert::Infallible>(handle(&state, req, peer).await) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(TokioIo::new(tls), service);
            if let Err(e) = watcher.watch(connection).await {
                tracing::debug!(%peer, "HTTPS connection ended: {e}");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("in-flight HTTPS requests did not finish within {drain:?}");
    }
}

async fn handle(state: &AppState, req: Request<Incoming>, peer: SocketAddr) -> ApiResponse {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let response = match route(state, req).await {
        Ok(response) => response,
        Err(error) => error_response(&error),
    };
    tracing::debug!(%peer, %method, %path, status = response.status().as_u16(), "request");
    response
}

pub fn error_response(error: &ApiError) -> ApiResponse {
    let mut response = json_response(error.status, error.body());
    if let Ok(name) = HeaderValue::from_str(error.name) {
        response.headers_mut().insert("iothub-errorcode", name);
    }
    response
}

pub fn json_response(status: StatusCode, body: String) -> ApiResponse {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    response
}

pub fn empty_response(status: StatusCode) -> ApiResponse {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = status;
    response
}

/// A request as the handlers see it: decoded path segments, query, headers and a bounded body.
#[derive(Debug)]
pub struct ApiRequest {
    pub method: hyper::Method,
    pub segments: Vec<String>,
    pub query: Vec<(String, String)>,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
}

impl ApiRequest {
    pub fn query(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

async fn route(state: &AppState, req: Request<Incoming>) -> Result<ApiResponse, ApiError> {
    let (parts, body) = req.into_parts();
    // msrest quotes path segments with safe="", so every segment is percent-decoded on its own.
    let segments = parts
        .uri
        .path()
        .split('/')
        .filter(|s| !s.is_empty())
        .map(|s| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8()
                .map(|s| s.into_owned())
                .map_err(|_| ApiError::argument_invalid("A path segment is not UTF-8."))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let query = parts
        .uri
        .query()
        .map(|q| {
            q.split('&')
                .filter(|p| !p.is_empty())
                .map(|pair| {
                    let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                    let decode = |s: &str| {
                        percent_encoding::percent_decode_str(&s.replace('+', " "))
                            .decode_utf8_lossy()
                            .into_owned()
                    };
                    (decode(k), decode(v))
                })
                .collect()
        })
        .unwrap_or_default();

    let service = service_routes::permissions_for(&parts.method, &segments);
    let registry_permission;
    let permissions = match service {
        Some(permissions) => permissions,
        None => {
            registry_permission = [registry_routes::permission_for(&parts.method, &segments)?];
            &registry_permission[..]
        }
    };
    authorize(state, &parts.headers, &segments, permissions)?;

    let limit = state.http.body_bytes_max;
    let body = match Limited::new(body, limit).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            return Err(ApiError::too_large(limit));
        }
        Err(e) => {
            return Err(ApiError::argument_invalid(format!(
                "Failed to read the body: {e}"
            )))
        }
    };
    let request = ApiRequest {
        method: parts.method,
        segments,
        query,
        headers: parts.headers,
        body,
    };
    if service.is_some() {
        service_routes::dispatch(state, request).await
    } else {
        registry_routes::dispatch(state, request).await
    }
}

/// Checks the `Authorization` header: a SAS token of a shared access policy that grants
/// `permission`, unexpired, signed with one of the policy's keys, and scoped to this hub.
fn authorize(
    state: &AppState,
    headers: &hyper::HeaderMap,
    segments: &[String],
    permissions: &[Permission],
) -> Result<(), ApiError> {
    // Two Authorization headers are ambiguous; which one a proxy or the hub reads must not
    // decide whether a request is authorized.
    let mut values = headers.get_all(AUTHORIZATION).iter();
    let (first, second) = (values.next(), values.next());
    if second.is_some() {
        return Err(ApiError::unauthorized(
            "The request has more than one Authorization header.",
        ));
    }
    let header = first.and_then(|v| v.to_str().ok()).ok_or_else(|| {
        ApiError::unauthorized("The request has no SharedAccessSignature authorization.")
    })?;
    let token = SasToken::parse(header)
        .map_err(|e| ApiError::unauthorized(format!("Invalid SharedAccessSignature: {e}.")))?;
    let policy_name = token.skn.as_deref().ok_or_else(|| {
        ApiError::unauthorized("The token is not signed by a shared access policy (no skn).")
    })?;
    let policy = state.policies.find(policy_name).ok_or_else(|| {
        ApiError::unauthorized(format!("Unknown shared access policy '{policy_name}'."))
    })?;
    let keys = policy.keys();
    let key_refs: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
    token
        .verify(&key_refs, now_secs())
        .map_err(|e| ApiError::unauthorized(format!("Unauthorized: {e}.")))?;
    let audience = token
        .audience()
        .map_err(|e| ApiError::unauthorized(format!("Invalid SharedAccessSignature: {e}.")))?;
    let target = format!("{}/{}", state.hostname, segments.join("/"));
    if !sas::covers(&audience, &target) {
        return Err(ApiError::unauthorized(format!(
            "The token's audience '{audience}' does not cover this hub."
        )));
    }
    if !permissions.iter().any(|p| policy.grants(*p)) {
        let names: Vec<&str> = permissions.iter().map(|p| p.name()).collect();
        return Err(ApiError::unauthorized(format!(
            "The policy '{policy_name}' does not grant {}.",
            names.join(" or ")
        )));
    }
    Ok(())
}

pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
