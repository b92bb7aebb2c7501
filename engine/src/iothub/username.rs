//! Who a CONNECT claims to be: the IoT Hub username and the client id (azure-protocol.md 2.1).
//!
//! The parser is deliberately tolerant, because every SDK generation spells the username
//! differently (`/?api-version`, `?api-version`, `/api-version` without `?`, or no query at
//! all); what it is strict about is the identity, which must be valid ids and must agree with the
//! client id. The host is returned but not checked: gateways connect with another name, and the
//! SAS token's `sr` is what binds a token to the hub. Ids are compared as sent: the hub never
//! percent-decodes them.

use std::borrow::Cow;

use super::property_bag::PropertyBag;
use super::Identity;
use crate::id;
use crate::mqtt::ConnectReturnCode;

/// A parsed username: `{host}/{deviceId}[/{moduleId}]/?{query}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Username<'a> {
    pub host: &'a str,
    pub identity: Identity<'a>,
    /// The query without `?`, undecoded; empty when absent.
    pub query: &'a str,
}

/// Why a CONNECT's identity is refused; every variant is a device fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// The CONNECT has no username. CONNACK 5.
    #[error("no username")]
    UsernameMissing,
    /// The username has fewer than two or more than three path segments. CONNACK 5.
    #[error("username is not {{host}}/{{deviceId}}[/{{moduleId}}]/?{{query}}")]
    UsernameMalformed,
    /// The device id breaks Azure's id rules. CONNACK 5.
    #[error("invalid device id")]
    DeviceIdInvalid,
    /// The module id breaks Azure's id rules. CONNACK 5.
    #[error("invalid module id")]
    ModuleIdInvalid,
    /// The client id is not `deviceId` (or `deviceId/moduleId`) of the username. CONNACK 2.
    #[error("client id does not match the username's identity")]
    ClientIdMismatch,
}

impl IdentityError {
    /// The CONNACK to answer with before closing. Identity problems are authentication
    /// failures for the SDKs (5, not retried), except a client id that disagrees with the
    /// username, which MQTT calls an identifier rejection (2).
    pub fn connack_code(self) -> ConnectReturnCode {
        match self {
            Self::ClientIdMismatch => ConnectReturnCode::IdentifierRejected,
            _ => ConnectReturnCode::NotAuthorized,
        }
    }
}

impl<'a> Username<'a> {
    /// Parses the username as azure-protocol.md 2.1 recommends: split off the query at the first
    /// `?`; without a `?`, a third or fourth segment containing `=` starts the query; empty
    /// segments are dropped. (So a module id containing `=` needs the `?` form.)
    pub fn parse(username: &'a str) -> Result<Self, IdentityError> {
        let (mut path, mut query) = match username.split_once('?') {
            Some((path, query)) => (path, Some(query)),
            None => (username, None),
        };
        let host = next_segment(&mut path).ok_or(IdentityError::UsernameMalformed)?;
        let device_id = next_segment(&mut path).ok_or(IdentityError::UsernameMalformed)?;
        let mut module_id = None;
        for _ in 0..2 {
            let rest = path.trim_start_matches('/');
            if rest.is_empty() {
                break;
            }
            let segment = rest.split('/').next().unwrap_or(rest);
            if query.is_none() && segment.contains('=') {
                query = Some(rest);
                path = "";
                break;
            }
            if module_id.is_some() {
                return Err(IdentityError::UsernameMalformed);
            }
            module_id = next_segment(&mut path);
        }
        if !path.trim_matches('/').is_empty() {
            return Err(IdentityError::UsernameMalformed);
        }
        id::validate(device_id).map_err(|_| IdentityError::DeviceIdInvalid)?;
        if let Some(module_id) = module_id {
            id::validate(module_id).map_err(|_| IdentityError::ModuleIdInvalid)?;
        }
        Ok(Self {
            host,
            identity: Identity {
                device_id,
                module_id,
            },
            query: query.unwrap_or(""),
        })
    }

    /// The username of a CONNECT, checked against its client id.
    pub fn parse_connect(
        username: Option<&'a str>,
        client_id: &str,
    ) -> Result<Self, IdentityError> {
        let username = Self::parse(username.ok_or(IdentityError::UsernameMissing)?)?;
        if !username.identity.is_client_id(client_id) {
            return Err(IdentityError::ClientIdMismatch);
        }
        Ok(username)
    }

    /// A query parameter, percent-decoded (`api-version`, `DeviceClientType`, `model-id`).
    pub fn query_value(&self, key: &str) -> Option<Cow<'a, str>> {
        PropertyBag::new(self.query)
            .raw_pairs()
            .find(|pair| pair.decoded_key() == key)
            .and_then(|pair| pair.decoded_value())
    }

    pub fn api_version(&self) -> Option<Cow<'a, str>> {
        self.query_value("api-version")
    }

    /// The PnP model id, stamped on telemetry as `dt-dataschema`.
    pub fn model_id(&self) -> Option<Cow<'a, str>> {
        self.query_value("model-id")
    }

    pub fn device_client_type(&self) -> Option<Cow<'a, str>> {
        self.query_value("DeviceClientType")
    }
}

/// The next non-empty `/`-separated segment, advancing `path` past it.
fn next_segment<'a>(path: &mut &'a str) -> Option<&'a str> {
    let rest = path.trim_start_matches('/');
    if rest.is_empty() {
        *path = rest;
        return None;
    }
    let (segment, tail) = rest.split_once('/').unwrap_or((rest, ""));
    *path = tail;
    Some(segment)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PY_QUERY: &str = "api-version=2019-10-01&DeviceClientType=azure-iot-device-iothub-py%2F\
                            2.14.0%283.11.4%3BLinux%20%231%20SMP%20PREEMPT_DYNAMIC%3Bx86_64%29";

    #[test]
    #[allow(clippy::type_complexity)] // The row type reads best spelled out.
    fn parses_every_username_form_in_the_wild() {
        let py = format!("myhub.azure-devices.net/dev1/?{PY_QUERY}");
        let py_module = "myhub.azure-devices.net/dev1/mod1/?api-version=2020-09-30\
                         &DeviceClientType=azure-iot-device-iothub-py%2F2.14.0%28...%29\
                         &model-id=dtmi%3Acom%3Aexample%3AThermostat%3B1";
        let table: &[(
            &str,
            Result<(&str, &str, Option<&str>, &str), IdentityError>,
        )] = &[
            (&py, Ok(("myhub.azure-devices.net", "dev1", None, PY_QUERY))),
            (
                py_module,
                Ok((
                    "myhub.azure-devices.net",
                    "dev1",
                    Some("mod1"),
                    "api-version=2020-09-30&DeviceClientType=azure-iot-device-iothub-py%2F2.14.0\
                     %28...%29&model-id=dtmi%3Acom%3Aexample%3AThermostat%3B1",
                )),
            ),
            // edgeHub doc: no `/` before `?`.
            (
                "h/dev1?api-version=1",
                Ok(("h", "dev1", None, "api-version=1")),
            ),
            // Old C SDK: no `?` at all.
            (
                "h/dev1/api-version=2016-11-14&DeviceClientType=iothubclient/1.1.0",
                Ok((
                    "h",
                    "dev1",
                    None,
                    "api-version=2016-11-14&DeviceClientType=iothubclient/1.1.0",
                )),
            ),
            (
                "h/dev1/mod1/api-version=1",
                Ok(("h", "dev1", Some("mod1"), "api-version=1")),
            ),
            // SAS doc: bare.
            ("h/dev1", Ok(("h", "dev1", None, ""))),
            ("h/dev1/", Ok(("h", "dev1", None, ""))),
            ("h//dev1//mod1/?", Ok(("h", "dev1", Some("mod1"), ""))),
            // Ids are taken as sent, `%` included, never decoded.
            ("h/dev%201/?a=b", Ok(("h", "dev%201", None, "a=b"))),
            ("h/a=b/?x=1", Ok(("h", "a=b", None, "x=1"))),
            ("", Err(IdentityError::UsernameMalformed)),
            ("h", Err(IdentityError::UsernameMalformed)),
            ("h/?api-version=1", Err(IdentityError::UsernameMalformed)),
            ("h/d/m/x/?a=1", Err(IdentityError::UsernameMalformed)),
            ("h/d/m/x", Err(IdentityError::UsernameMalformed)),
            ("h/d\u{e9}v/?a=1", Err(IdentityError::DeviceIdInvalid)),
            ("h/dev/m d/?a=1", Err(IdentityError::ModuleIdInvalid)),
        ];
        for (username, expected) in table {
            let actual = Username::parse(username)
                .map(|u| (u.host, u.identity.device_id, u.identity.module_id, u.query));
            assert_eq!(&actual, expected, "{username:?}");
        }
    }

    #[test]
    fn query_values_are_percent_decoded() {
        let username = "myhub.azure-devices.net/dev1/mod1/?api-version=2020-09-30\
                        &DeviceClientType=azure-iot-device-iothub-py%2F2.14.0\
                        &model-id=dtmi%3Acom%3Aexample%3AThermostat%3B1";
        let username = Username::parse(username).expect("parses");
        assert_eq!(username.api_version().as_deref(), Some("2020-09-30"));
        assert_eq!(
            username.model_id().as_deref(),
            Some("dtmi:com:example:Thermostat;1")
        );
        assert_eq!(
            username.device_client_type().as_deref(),
            Some("azure-iot-device-iothub-py/2.14.0")
        );
        assert_eq!(username.query_value("missing"), None);
    }

    #[test]
    fn client_id_must_match_the_identity() {
        let table: &[(Option<&str>, &str, Result<(), IdentityError>)] = &[
            (Some("h/dev1/?api-version=1"), "dev1", Ok(())),
            (Some("h/dev1/mod1/?api-version=1"), "dev1/mod1", Ok(())),
            (
                Some("h/dev1/?api-version=1"),
                "dev2",
                Err(IdentityError::ClientIdMismatch),
            ),
            (
                Some("h/dev1/?api-version=1"),
                "dev1/mod1",
                Err(IdentityError::ClientIdMismatch),
            ),
            (
                Some("h/dev1/mod1/?api-version=1"),
                "dev1",
                Err(IdentityError::ClientIdMismatch),
            ),
            (
                Some("h/dev1/mod1/?api-version=1"),
                "dev1/mod2",
                Err(IdentityError::ClientIdMismatch),
            ),
            (
                Some("h/dev1/mod1/?api-version=1"),
                "dev1mod1",
                Err(IdentityError::ClientIdMismatch),
            ),
            (None, "dev1", Err(IdentityError::UsernameMissing)),
        ];
        for &(username, client_id, expected) in table {
            let actual = Username::parse_connect(username, client_id).map(|_| ());
            assert_eq!(actual, expected, "{username:?} {client_id:?}");
        }
        assert_eq!(
            IdentityError::ClientIdMismatch.connack_code(),
            ConnectReturnCode::IdentifierRejected
        );
        assert_eq!(
            IdentityError::UsernameMalformed.connack_code(),
            ConnectReturnCode::NotAuthorized
        );
    }
}
