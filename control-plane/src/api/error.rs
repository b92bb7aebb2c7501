//! Errors in Azure IoT Hub's REST envelope.
//!
//! Every error carries the HTTP status, Azure's numeric code and its name; the body is the
//! current envelope (`Message` is a JSON string holding `errorCode`, `trackingId`, `message`,
//! `info`, `timestampUtc`) and the name is repeated in the `iothub-errorcode` header, which is
//! what the .NET SDK checks before trusting the code (azure-protocol.md 9.1).

use hyper::StatusCode;

use crate::registry::RegistryError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: u32,
    pub name: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(
        status: StatusCode,
        code: u32,
        name: &'static str,
        message: impl Into<String>,
    ) -> Self {
        Self {
            status,
            code,
            name,
            message: message.into(),
        }
    }

    pub fn argument_invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, 400004, "ArgumentInvalid", message)
    }

    pub fn argument_null(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, 400005, "ArgumentNull", message)
    }

    pub fn deserialization(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            400012,
            "DeserializationError",
            message,
        )
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            401002,
            "IotHubUnauthorizedAccess",
            message,
        )
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, 404000, "NotFound", message)
    }

    pub fn method_not_allowed() -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            405000,
            "MethodNotAllowed",
            "The method is not allowed on this resource.",
        )
    }

    pub fn too_large(limit: usize) -> Self {
        let message = format!("The request body is larger than {limit} bytes.");
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            413001,
            "MessageTooLarge",
            message,
        )
    }

    pub fn server(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            500001,
            "ServerError",
            message,
        )
    }

    /// The response body.
    pub fn body(&self) -> String {
        let now = chrono::Utc::now();
        let tracking_id = format!(
            "{:032x}-G:0-TimeStamp:{}",
            rand::random::<u128>(),
            now.format("%m/%d/%Y %H:%M:%S")
        );
        let inner = serde_json::json!({
            "errorCode": self.code,
            "trackingId": tracking_id,
            "message": self.message,
            "info": {},
            "timestampUtc": now.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        });
        serde_json::json!({ "Message": inner.to_string(), "ExceptionMessage": "" }).to_string()
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        use RegistryError::*;
        let message = e.to_string();
        match e {
            DeviceNotFound => Self::new(StatusCode::NOT_FOUND, 404001, "DeviceNotFound", message),
            ModuleNotFound => Self::new(StatusCode::NOT_FOUND, 404010, "ModuleNotFound", message),
            CertificateNotFound => Self::new(
                StatusCode::NOT_FOUND,
                404000,
                "CertificateNotFound",
                message,
            ),
            DeviceAlreadyExists => {
                Self::new(StatusCode::CONFLICT, 409001, "DeviceAlreadyExists", message)
            }
            ModuleAlreadyExists => Self::new(
                StatusCode::CONFLICT,
                409301,
                "ModuleAlreadyExistsOnDevice",
                message,
            ),
            PreconditionFailed => Self::new(
                StatusCode::PRECONDITION_FAILED,
                412001,
                "PreconditionFailed",
                message,
            ),
            TooManyModules => Self::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                413003,
                "TooManyModulesOnDevice",
                message,
            ),
            TooManyIdentities => Self::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                413002,
                "TooManyDevices",
                message,
            ),
            QueueFull => Self::new(
                StatusCode::FORBIDDEN,
                403004,
                "DeviceMaximumQueueDepthExceeded",
                message,
            ),
            Twin(e) => {
                let (status, code, name) = e.code();
                let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST);
                Self::new(status, code, name, e.to_string())
            }
            Storage(_) | Corrupt(_) => {
                // Operating errors are logged where they are handled: here.
                tracing::error!("registry operation failed: {message}");
                Self::server("The registry could not complete the operation.")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_is_the_current_azure_envelope() {
        let error = ApiError::from(RegistryError::DeviceNotFound);
        assert_eq!(error.status, StatusCode::NOT_FOUND);
        let outer: serde_json::Value = serde_json::from_str(&error.body()).unwrap();
        assert_eq!(outer["ExceptionMessage"], "");
        let inner: serde_json::Value =
            serde_json::from_str(outer["Message"].as_str().unwrap()).unwrap();
        assert_eq!(inner["errorCode"], 404001);
        assert!(inner["trackingId"]
            .as_str()
            .unwrap()
            .contains("-G:0-TimeStamp:"));
    }
}
