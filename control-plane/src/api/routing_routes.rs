//! Routes and endpoints at run time (Ingot's own API; Azure changes a hub's `routing` through
//! its resource manager). Field names are Azure's (`name`, `source`, `condition`,
//! `endpointNames`, `isEnabled`); reads need RegistryRead, changes RegistryWrite. Endpoints and
//! routes of the configuration file are listed with `"origin": "configFile"` and cannot be
//! changed here.

use hyper::{Method, StatusCode};
use serde_json::{json, Value};

use super::{empty_response, json_response, wire, ApiError, ApiRequest, ApiResponse, AppState};
use crate::config::{EndpointConfig, EnrichmentConfig, RouteConfig};
use crate::routing::{ChangeError, Origin, RoutingManager};

impl From<ChangeError> for ApiError {
    fn from(error: ChangeError) -> Self {
        match error {
            ChangeError::Invalid(m) => ApiError::argument_invalid(m),
            ChangeError::NotFound(m) => ApiError::not_found(m),
            ChangeError::Conflict(m) => ApiError::new(StatusCode::CONFLICT, 409000, "Conflict", m),
            ChangeError::Unavailable(m) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                503000,
                "ServiceUnavailable",
                m,
            ),
        }
    }
}

fn with_origin<T: serde::Serialize>(item: &T, origin: Origin) -> Value {
    let mut value = serde_json::to_value(item).unwrap_or(Value::Null);
    if let Some(object) = value.as_object_mut() {
        object.insert("origin".to_owned(), json!(origin.as_str()));
    }
    value
}

/// The body of a PUT with the name taken from the path (a name in the body must agree).
fn named_body<T: serde::de::DeserializeOwned>(req: &ApiRequest, name: &str) -> Result<T, ApiError> {
    let mut value: Value = wire::parse_json(&req.body)?;
    let object = value
        .as_object_mut()
        .ok_or_else(|| ApiError::deserialization("The request body must be a JSON object."))?;
    object.remove("origin");
    match object.get("name") {
        Some(Value::String(given)) if given != name => {
            return Err(ApiError::argument_invalid(format!(
                "The body names '{given}' but the path names '{name}'."
            )))
        }
        _ => {
            object.insert("name".to_owned(), json!(name));
        }
    }
    serde_json::from_value(value)
        .map_err(|e| ApiError::deserialization(format!("The request body is not valid: {e}")))
}

fn manager(state: &AppState) -> Result<&RoutingManager, ApiError> {
    state.routing_manager.as_deref().ok_or_else(|| {
        ApiError::from(ChangeError::Unavailable(
            "The data plane is not running.".to_owned(),
        ))
    })
}

fn created_or_ok(created: bool) -> StatusCode {
    if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    }
}

pub async fn dispatch(state: &AppState, req: &ApiRequest) -> Result<ApiResponse, ApiError> {
    let manager = manager(state)?;
    let segments: Vec<&str> = req.segments.iter().map(String::as_str).collect();
    let (routing, origins) = manager.current().await;
    let endpoints = || -> Vec<Value> {
        let status = manager.delivery_status();
        routing
            .endpoints
            .iter()
            .zip(&origins.endpoints)
            .map(|(e, o)| {
                let mut value = with_origin(e, *o);
                // Delivery counters of `files` and `webhook` endpoints.
                if let Some(s) = status.iter().find(|s| s.name == e.name) {
                    value["delivery"] = json!({
                        "delivered": s.delivered,
                        "retries": s.retries,
                        "deadLettered": s.dead_lettered,
                        "lag": s.lag,
                    });
                }
                value
            })
            .collect()
    };
    let routes = || -> Vec<Value> {
        routing
            .routes
            .iter()
            .zip(&origins.routes)
            .map(|(r, o)| with_origin(r, *o))
            .collect()
    };
    let enrichments = || -> Vec<Value> {
        routing
            .enrichments
            .iter()
            .zip(&origins.enrichments)
            .map(|(e, o)| with_origin(e, *o))
            .collect()
    };
    let ok = |value: Value| Ok(json_response(StatusCode::OK, value.to_string()));
    let fallback = |enabled: bool| {
        json!({
            "name": "$fallback",
            "source": "DeviceMessages",
            "condition": "true",
            "endpointNames": ["events"],
            "isEnabled": enabled,
        })
    };
    match (&req.method, segments.as_slice()) {
        (&Method::GET, ["routing"]) => ok(json!({
            "endpoints": endpoints(),
            "routes": routes(),
            "enrichments": enrichments(),
            "fallbackRoute": fallback(routing.fallback),
        })),
        (&Method::GET, ["routing", "fallbackRoute"]) => ok(fallback(routing.fallback)),
        (&Method::PUT, ["routing", "fallbackRoute"]) => {
            let body: Value = wire::parse_json(&req.body)?;
            let enabled = body["isEnabled"].as_bool().ok_or_else(|| {
                ApiError::argument_invalid("The body needs isEnabled (true or false).")
            })?;
            manager.set_fallback(enabled).await?;
            ok(fallback(enabled))
        }
        (&Method::GET, ["routing", "endpoints"]) => ok(json!({ "value": endpoints() })),
        (&Method::GET, ["routing", "routes"]) => ok(json!({ "value": routes() })),
        (&Method::GET, ["routing", "enrichments"]) => ok(json!({ "value": enrichments() })),
        (&Method::GET, ["routing", "enrichments", key]) => enrichments()
            .into_iter()
            .find(|e| e["key"] == *key)
            .map_or_else(
                || Err(ApiError::not_found(format!("No enrichment '{key}'."))),
                ok,
            ),
        (&Method::PUT, ["routing", "enrichments", key]) => {
            let mut body: Value = wire::parse_json(&req.body)?;
            if let Some(object) = body.as_object_mut() {
                object.remove("origin");
                object.insert("key".to_owned(), json!(key));
            }
            let enrichment: EnrichmentConfig = serde_json::from_value(body).map_err(|e| {
                ApiError::deserialization(format!("The request body is not valid: {e}"))
            })?;
            let created = manager.put_enrichment(enrichment.clone()).await?;
            Ok(json_response(
                created_or_ok(created),
                with_origin(&enrichment, Origin::Api).to_string(),
            ))
        }
        (&Method::DELETE, ["routing", "enrichments", key]) => {
            manager.remove_enrichment(key).await?;
            Ok(empty_response(StatusCode::NO_CONTENT))
        }
        (&Method::GET, ["routing", "endpoints", name]) => endpoints()
            .into_iter()
            .find(|e| e["name"] == *name)
            .map_or_else(
                || Err(ApiError::not_found(format!("No endpoint '{name}'."))),
                ok,
            ),
        (&Method::GET, ["routing", "routes", name]) => routes()
            .into_iter()
            .find(|r| r["name"] == *name)
            .map_or_else(
                || Err(ApiError::not_found(format!("No route '{name}'."))),
                ok,
            ),
        (&Method::PUT, ["routing", "endpoints", name]) => {
            let endpoint: EndpointConfig = named_body(req, name)?;
            let created = manager.put_endpoint(endpoint.clone()).await?;
            Ok(json_response(
                created_or_ok(created),
                with_origin(&endpoint, Origin::Api).to_string(),
            ))
        }
        (&Method::PUT, ["routing", "routes", name]) => {
            let route: RouteConfig = named_body(req, name)?;
            let created = manager.put_route(route.clone()).await?;
            Ok(json_response(
                created_or_ok(created),
                with_origin(&route, Origin::Api).to_string(),
            ))
        }
        (&Method::DELETE, ["routing", "endpoints", name]) => {
            manager.remove_endpoint(name).await?;
            Ok(empty_response(StatusCode::NO_CONTENT))
        }
        (&Method::DELETE, ["routing", "routes", name]) => {
            manager.remove_route(name).await?;
            Ok(empty_response(StatusCode::NO_CONTENT))
        }
        (
            _,
            ["routing"] | ["routing", "endpoints" | "routes" | "enrichments" | "fallbackRoute", ..],
        ) => Err(ApiError::method_not_allowed()),
        _ => Err(ApiError::not_found("No such resource.")),
    }
}
