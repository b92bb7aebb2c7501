//! Azure's JSON documents for identities (azure-protocol.md 6.1, 6.2, 3.3) and their validation.
//!
//! Input is parsed leniently where the SDKs differ (unknown fields are ignored, enum values are
//! matched case-insensitively) and validated strictly where Azure is strict (ids, key sizes,
//! thumbprints, status reasons). Output follows the real hub's documents field for field,
//! including the `0001-01-01T00:00:00` of timestamps that were never set.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{json, Value};

use ingot_engine::id;
use ingot_engine::limits::{
    STATUS_REASON_LEN_MAX, SYMMETRIC_KEY_BYTES_MAX, SYMMETRIC_KEY_BYTES_MIN,
};

use super::error::ApiError;
use crate::policy::random_key;
use crate::registry::{Authentication, Device, DeviceSpec, Module, ModuleSpec, Status};

/// What the real hub reports for a timestamp that was never set.
pub const UNSET_TIME: &str = "0001-01-01T00:00:00";

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceIn {
    pub device_id: Option<String>,
    pub status: Option<String>,
    pub status_reason: Option<String>,
    pub authentication: Option<AuthIn>,
    pub capabilities: Option<CapabilitiesIn>,
    pub parent_scopes: Option<Vec<String>>,
    pub etag: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthIn {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub symmetric_key: Option<SymmetricKeyIn>,
    pub x509_thumbprint: Option<ThumbprintIn>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SymmetricKeyIn {
    pub primary_key: Option<String>,
    pub secondary_key: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ThumbprintIn {
    pub primary_thumbprint: Option<String>,
    pub secondary_thumbprint: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CapabilitiesIn {
    pub iot_edge: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ModuleIn {
    pub module_id: Option<String>,
    pub device_id: Option<String>,
    pub managed_by: Option<String>,
    pub authentication: Option<AuthIn>,
}

/// One entry of `POST /devices` (Azure's `ExportImportDevice`).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImportDeviceIn {
    pub id: Option<String>,
    pub module_id: Option<String>,
    #[serde(rename = "eTag")]
    pub etag: Option<String>,
    pub import_mode: Option<String>,
    pub status: Option<String>,
    pub status_reason: Option<String>,
    pub authentication: Option<AuthIn>,
    pub capabilities: Option<CapabilitiesIn>,
    pub parent_scopes: Option<Vec<String>>,
}

pub fn parse_json<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::deserialization(format!("The request body is not valid: {e}")))
}

pub fn check_id(kind: &str, value: &str) -> Result<(), ApiError> {
    id::validate(value)
        .map_err(|e| ApiError::argument_invalid(format!("Invalid {kind} '{value}': {e}.")))
}

pub fn parse_status(status: Option<&str>) -> Result<Status, ApiError> {
    match status.map(str::to_ascii_lowercase).as_deref() {
        None | Some("enabled") => Ok(Status::Enabled),
        Some("disabled") => Ok(Status::Disabled),
        Some(other) => Err(ApiError::argument_invalid(format!(
            "Invalid status '{other}': expected 'enabled' or 'disabled'."
        ))),
    }
}

fn check_status_reason(reason: &Option<String>) -> Result<(), ApiError> {
    match reason {
        Some(r) if r.chars().count() > STATUS_REASON_LEN_MAX => Err(ApiError::argument_invalid(
            "statusReason is longer than 128 characters.",
        )),
        _ => Ok(()),
    }
}

fn key_or_new(key: Option<String>, which: &str) -> Result<String, ApiError> {
    let Some(key) = key.filter(|k| !k.is_empty()) else {
        return Ok(random_key());
    };
    match BASE64.decode(&key) {
        Ok(bytes) if (SYMMETRIC_KEY_BYTES_MIN..=SYMMETRIC_KEY_BYTES_MAX).contains(&bytes.len()) => {
            Ok(key)
        }
        _ => Err(ApiError::argument_invalid(format!(
            "The {which} key must be base64 of 16 to 64 bytes."
        ))),
    }
}

fn thumbprint(value: Option<String>, which: &str) -> Result<Option<String>, ApiError> {
    let Some(value) = value.filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    let hex = value.replace(':', "");
    if (hex.len() == 40 || hex.len() == 64) && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(Some(hex.to_ascii_uppercase()))
    } else {
        Err(ApiError::argument_invalid(format!(
            "The {which} thumbprint must be a SHA-1 (40) or SHA-256 (64) hex digest."
        )))
    }
}

/// Turns the `authentication` object into a registry value, generating SAS keys when absent.
pub fn parse_auth(auth: Option<AuthIn>) -> Result<Authentication, ApiError> {
    let auth = auth.unwrap_or_default();
    let thumbprints = auth.x509_thumbprint.unwrap_or_default();
    let kind = match auth.kind {
        Some(kind) => kind.to_ascii_lowercase(),
        None if thumbprints.primary_thumbprint.is_some() => "selfsigned".to_owned(),
        None => "sas".to_owned(),
    };
    match kind.as_str() {
        "sas" => {
            let keys = auth.symmetric_key.unwrap_or_default();
            Ok(Authentication::Sas {
                primary_key: key_or_new(keys.primary_key, "primary")?,
                secondary_key: key_or_new(keys.secondary_key, "secondary")?,
            })
        }
        "selfsigned" => {
            let primary = thumbprint(thumbprints.primary_thumbprint, "primary")?
                .ok_or_else(|| ApiError::argument_null("selfSigned authentication needs a primaryThumbprint."))?;
            Ok(Authentication::SelfSigned {
                primary_thumbprint: primary,
                secondary_thumbprint: thumbprint(thumbprints.secondary_thumbprint, "secondary")?,
            })
        }
        "certificateauthority" => Ok(Authentication::CertificateAuthority),
        "none" => Ok(Authentication::None),
        other => Err(ApiError::argument_invalid(format!(
            "Invalid authentication type '{other}': expected sas, selfSigned, certificateAuthority or none."
        ))),
    }
}

/// Validates a device document for `PUT /devices/{path_id}`.
pub fn device_spec(path_id: &str, body: DeviceIn) -> Result<DeviceSpec, ApiError> {
    check_id("deviceId", path_id)?;
    if let Some(body_id) = &body.device_id {
        if body_id != path_id {
            return Err(ApiError::argument_invalid(format!(
                "The deviceId '{body_id}' in the body does not match '{path_id}' in the path."
            )));
        }
    }
    check_status_reason(&body.status_reason)?;
    Ok(DeviceSpec {
        device_id: path_id.to_owned(),
        status: parse_status(body.status.as_deref())?,
        status_reason: body.status_reason,
        authentication: parse_auth(body.authentication)?,
        iot_edge: body.capabilities.and_then(|c| c.iot_edge).unwrap_or(false),
        parent_scopes: body.parent_scopes.unwrap_or_default(),
    })
}

pub fn import_spec(item: ImportDeviceIn) -> Result<DeviceSpec, ApiError> {
    let id = item
        .id
        .ok_or_else(|| ApiError::argument_null("A bulk entry has no id."))?;
    check_id("deviceId", &id)?;
    check_status_reason(&item.status_reason)?;
    Ok(DeviceSpec {
        device_id: id,
        status: parse_status(item.status.as_deref())?,
        status_reason: item.status_reason,
        authentication: parse_auth(item.authentication)?,
        iot_edge: item.capabilities.and_then(|c| c.iot_edge).unwrap_or(false),
        parent_scopes: item.parent_scopes.unwrap_or_default(),
    })
}

pub fn module_spec(
    device_id: &str,
    module_id: &str,
    body: ModuleIn,
) -> Result<ModuleSpec, ApiError> {
    check_id("deviceId", device_id)?;
    check_id("moduleId", module_id)?;
    for (field, value, expected) in [
        ("moduleId", &body.module_id, module_id),
        ("deviceId", &body.device_id, device_id),
    ] {
        if let Some(value) = value {
            if value != expected {
                return Err(ApiError::argument_invalid(format!(
                    "The {field} '{value}' in the body does not match '{expected}' in the path."
                )));
            }
        }
    }
    Ok(ModuleSpec {
        device_id: device_id.to_owned(),
        module_id: module_id.to_owned(),
        managed_by: body.managed_by,
        authentication: parse_auth(body.authentication)?,
    })
}

fn auth_json(auth: &Authentication) -> Value {
    let (primary_key, secondary_key, primary_thumbprint, secondary_thumbprint, kind) = match auth {
        Authentication::Sas {
            primary_key,
            secondary_key,
        } => (Some(primary_key), Some(secondary_key), None, None, "sas"),
        Authentication::SelfSigned {
            primary_thumbprint,
            secondary_thumbprint,
        } => (
            None,
            None,
            Some(primary_thumbprint),
            secondary_thumbprint.as_ref(),
            "selfSigned",
        ),
        Authentication::CertificateAuthority => (None, None, None, None, "certificateAuthority"),
        Authentication::None => (None, None, None, None, "none"),
    };
    json!({
        "symmetricKey": { "primaryKey": primary_key, "secondaryKey": secondary_key },
        "x509Thumbprint": {
            "primaryThumbprint": primary_thumbprint,
            "secondaryThumbprint": secondary_thumbprint,
        },
        "type": kind,
    })
}

pub fn device_json(device: &Device) -> Value {
    json!({
        "deviceId": device.device_id,
        "generationId": device.generation_id,
        "etag": device.etag,
        // The API fills in the live state (`registry_routes::live`).
        "connectionState": "Disconnected",
        "status": match device.status { Status::Enabled => "enabled", Status::Disabled => "disabled" },
        "statusReason": device.status_reason,
        "connectionStateUpdatedTime": UNSET_TIME,
        "statusUpdatedTime": device.status_updated_time.as_deref().unwrap_or(UNSET_TIME),
        "lastActivityTime": UNSET_TIME,
        "cloudToDeviceMessageCount": 0,
        "authentication": auth_json(&device.authentication),
        "capabilities": { "iotEdge": device.iot_edge },
        "deviceScope": device.device_scope,
        "parentScopes": device.parent_scopes,
    })
}

pub fn module_json(module: &Module) -> Value {
    json!({
        "moduleId": module.module_id,
        "managedBy": module.managed_by,
        "deviceId": module.device_id,
        "generationId": module.generation_id,
        "etag": module.etag,
        "connectionState": "Disconnected",
        "connectionStateUpdatedTime": UNSET_TIME,
        "lastActivityTime": UNSET_TIME,
        "cloudToDeviceMessageCount": 0,
        "authentication": auth_json(&module.authentication),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_keys_are_generated() {
        let body: DeviceIn = parse_json(
            br#"{"deviceId":"dev1","status":"enabled","authentication":{"symmetricKey":{},"type":"sas"},"capabilities":{"iotEdge":false}}"#,
        )
        .unwrap();
        let spec = device_spec("dev1", body).unwrap();
        let Authentication::Sas {
            primary_key,
            secondary_key,
        } = &spec.authentication
        else {
            panic!("expected sas");
        };
        assert_eq!(primary_key.len(), 44);
        assert_ne!(primary_key, secondary_key);
    }

    #[test]
    fn validation_matches_azure() {
        let parse = |json: &str| device_spec("dev1", parse_json(json.as_bytes()).unwrap());
        assert!(parse(r#"{"deviceId":"other"}"#).is_err());
        assert!(parse(r#"{"status":"paused"}"#).is_err());
        assert!(parse(r#"{"authentication":{"symmetricKey":{"primaryKey":"c2hvcnQ="}}}"#).is_err());
        assert!(parse(r#"{"authentication":{"type":"selfSigned","x509Thumbprint":{}}}"#).is_err());
        assert!(parse(r#"{"authentication":{"type":"selfSigned","x509Thumbprint":{"primaryThumbprint":"XYZ"}}}"#).is_err());
        assert!(parse(&format!(r#"{{"statusReason":"{}"}}"#, "r".repeat(129))).is_err());
        let spec = parse(r#"{"status":"Disabled","authentication":{"type":"selfSigned","x509Thumbprint":{"primaryThumbprint":"aa:bb:cc:dd:ee:ff:00:11:22:33:44:55:66:77:88:99:aa:bb:cc:dd"}}}"#).unwrap();
        assert_eq!(spec.status, Status::Disabled);
        assert_eq!(
            spec.authentication,
            Authentication::SelfSigned {
                primary_thumbprint: "AABBCCDDEEFF00112233445566778899AABBCCDD".into(),
                secondary_thumbprint: None
            }
        );
        assert!(device_spec("bad/id", DeviceIn::default()).is_err());
    }

    #[test]
    fn device_document_has_every_field_the_sdk_reads() {
        let device = Device {
            device_id: "d".into(),
            generation_id: "1".into(),
            etag: "MQ".into(),
            status: Status::Enabled,
            status_reason: None,
            status_updated_time: None,
            authentication: Authentication::CertificateAuthority,
            iot_edge: false,
            device_scope: None,
            parent_scopes: vec![],
        };
        let json = device_json(&device);
        for field in [
            "deviceId",
            "generationId",
            "etag",
            "connectionState",
            "status",
            "statusReason",
            "connectionStateUpdatedTime",
            "statusUpdatedTime",
            "lastActivityTime",
            "cloudToDeviceMessageCount",
            "authentication",
            "capabilities",
            "deviceScope",
            "parentScopes",
        ] {
            assert!(json.get(field).is_some(), "{field}");
        }
        assert_eq!(json["authentication"]["type"], "certificateAuthority");
        assert_eq!(json["statusUpdatedTime"], UNSET_TIME);
    }
}
