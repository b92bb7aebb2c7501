//! CA certificates for `certificateAuthority` devices (Ingot's own API; Azure manages them
//! through its resource manager). A registered certificate is trusted at once: the operator who
//! holds a RegistryWrite key is who Azure's proof-of-possession step exists to establish.

use hyper::{Method, StatusCode};
use serde::Deserialize;
use serde_json::json;

use super::registry_routes::{blocking, if_match};
use super::{empty_response, json_response, wire, ApiError, ApiRequest, ApiResponse, AppState};
use crate::registry::{CaCertificate, IfMatch};

#[derive(Debug, Default, Deserialize)]
struct CertificateIn {
    certificate: Option<String>,
    properties: Option<Box<CertificateIn>>,
}

fn check_name(name: &str) -> Result<(), ApiError> {
    let valid = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b));
    if valid {
        Ok(())
    } else {
        Err(ApiError::argument_invalid(
            "A certificate name is 1 to 64 of A-Z a-z 0-9 - . _",
        ))
    }
}

fn der_of(pem: &str) -> Option<Vec<u8>> {
    let mut reader = pem.as_bytes();
    let cert = rustls_pemfile::certs(&mut reader).next()?.ok()?;
    Some(cert.to_vec())
}

/// The DER of every registered CA certificate.
pub fn authorities_der(certificates: &[CaCertificate]) -> Vec<Vec<u8>> {
    certificates.iter().filter_map(|c| der_of(&c.pem)).collect()
}

fn certificate_json(certificate: &CaCertificate) -> serde_json::Value {
    let described =
        der_of(&certificate.pem).and_then(|der| ingot_engine::auth::x509::describe_authority(&der));
    let (subject, thumbprint, expiry) = match described {
        Some((subject, thumbprint, expiry)) => {
            let expiry = chrono::DateTime::from_timestamp(expiry, 0)
                .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
            (Some(subject), Some(thumbprint), expiry)
        }
        None => (None, None, None),
    };
    json!({
        "name": certificate.name,
        "etag": certificate.etag,
        "type": "Microsoft.Devices/IotHubs/Certificates",
        "properties": {
            "subject": subject,
            "expiry": expiry,
            "thumbprint": thumbprint,
            "isVerified": true,
            "created": certificate.created,
            "updated": certificate.updated,
            "certificate": certificate.pem,
        },
    })
}

pub async fn dispatch(
    state: &AppState,
    req: &ApiRequest,
    name: Option<&str>,
) -> Result<ApiResponse, ApiError> {
    match (&req.method, name) {
        (&Method::GET, None) => {
            let all = blocking(state, |r| r.certificates()).await?;
            let value: Vec<_> = all.iter().map(certificate_json).collect();
            Ok(json_response(
                StatusCode::OK,
                json!({ "value": value }).to_string(),
            ))
        }
        (&Method::GET, Some(name)) => {
            check_name(name)?;
            let owned = name.to_owned();
            let certificate = blocking(state, move |r| r.certificate(&owned))
                .await?
                .ok_or_else(|| {
                    ApiError::from(crate::registry::RegistryError::CertificateNotFound)
                })?;
            Ok(json_response(
                StatusCode::OK,
                certificate_json(&certificate).to_string(),
            ))
        }
        (&Method::PUT, Some(name)) => {
            check_name(name)?;
            let body: CertificateIn = wire::parse_json(&req.body)?;
            let pem = body
                .certificate
                .or_else(|| body.properties.and_then(|p| p.certificate))
                .ok_or_else(|| {
                    ApiError::argument_null("The body needs properties.certificate (PEM).")
                })?;
            let der = der_of(&pem).ok_or_else(|| {
                ApiError::argument_invalid("The certificate is not a PEM certificate.")
            })?;
            if ingot_engine::auth::x509::describe_authority(&der).is_none() {
                return Err(ApiError::argument_invalid(
                    "The certificate is not a CA certificate.",
                ));
            }
            let (owned, m) = (name.to_owned(), if_match(req));
            let (certificate, created) =
                blocking(state, move |r| r.put_certificate(&owned, &pem, m.as_ref())).await?;
            state.authorities_changed();
            let status = if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            Ok(json_response(
                status,
                certificate_json(&certificate).to_string(),
            ))
        }
        (&Method::DELETE, Some(name)) => {
            check_name(name)?;
            let (owned, m) = (name.to_owned(), if_match(req).unwrap_or(IfMatch::Any));
            blocking(state, move |r| r.delete_certificate(&owned, &m)).await?;
            state.authorities_changed();
            Ok(empty_response(StatusCode::NO_CONTENT))
        }
        _ => Err(ApiError::method_not_allowed()),
    }
}
