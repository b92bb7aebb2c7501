//! Device and module twins: the document, its update rules and its two views.
//!
//! A [`TwinDoc`] holds what a twin stores beyond the identity: `tags`, desired and reported
//! properties (each with its `$metadata` tree and `$version`), the twin `version` and the etag
//! counter. It is pure data: the caller loads and stores it (as compact JSON) and supplies the
//! identity fields when rendering the REST view ([`TwinDoc::to_rest`]). The rules are those of
//! azure-protocol.md 2.5, 3.3 and 6.3; an update that breaks one returns a [`TwinError`] and
//! leaves the document unchanged.
//!
//! [`query`] evaluates the IoT Hub query language over rendered twins.

mod error;
mod merge;
pub mod query;
mod validate;

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub use error::{Section, TwinError};
use merge::{Stamp, LAST_UPDATED};

const METADATA: &str = "$metadata";
const VERSION: &str = "$version";

/// Parses a twin request body (an MQTT reported patch, a REST twin). Empty or blank bodies
/// are `InvalidJson`, like any other unparsable body.
pub fn parse_json(body: &[u8]) -> Result<Value, TwinError> {
    serde_json::from_slice(body).map_err(|e| TwinError::InvalidJson(e.to_string()))
}

/// One properties section: the user's properties, their metadata tree and the `$version`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Properties {
    properties: Map<String, Value>,
    metadata: Map<String, Value>,
    version: u64,
}

impl Properties {
    fn new(now: &str) -> Self {
        let mut metadata = Map::new();
        metadata.insert(LAST_UPDATED.into(), now.into());
        Self {
            properties: Map::new(),
            metadata,
            version: 1,
        }
    }

    /// The properties plus `$version` (the device's view and notification shape).
    fn with_version(&self) -> Value {
        let mut object = self.properties.clone();
        object.insert(VERSION.into(), self.version.into());
        Value::Object(object)
    }

    /// The properties plus `$metadata` and `$version` (the REST view).
    fn with_metadata(&self) -> Value {
        let mut object = self.properties.clone();
        object.insert(METADATA.into(), Value::Object(self.metadata.clone()));
        object.insert(VERSION.into(), self.version.into());
        Value::Object(object)
    }
}

/// The twin document. See the module documentation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TwinDoc {
    tags: Map<String, Value>,
    desired: Properties,
    reported: Properties,
    version: u64,
    etag: u64,
}

/// The identity fields of the REST twin (azure-protocol.md 6.3), which the registry owns.
/// [`TwinIdentity::new`] fills in what a new, never-connected device has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TwinIdentity<'a> {
    pub device_id: &'a str,
    /// `Some` for module twins.
    pub module_id: Option<&'a str>,
    /// The identity's etag, rendered as `deviceEtag`.
    pub device_etag: &'a str,
    /// `"enabled"` or `"disabled"`.
    pub status: &'a str,
    pub status_reason: Option<&'a str>,
    pub status_update_time: &'a str,
    /// `"Connected"` or `"Disconnected"`.
    pub connection_state: &'a str,
    pub last_activity_time: &'a str,
    pub cloud_to_device_message_count: u64,
    /// `"sas"`, `"selfSigned"`, `"certificateAuthority"` or `"none"`.
    pub authentication_type: &'a str,
    pub primary_thumbprint: Option<&'a str>,
    pub secondary_thumbprint: Option<&'a str>,
    /// Rendered as `""` when `None`, as the hub does for devices without a model.
    pub model_id: Option<&'a str>,
    /// Rendered as `capabilities.iotEdge` when `Some` (device twins).
    pub iot_edge: Option<bool>,
    pub device_scope: Option<&'a str>,
    pub parent_scopes: Option<&'a [String]>,
}

/// The timestamp Azure renders for "never".
pub const NEVER: &str = "0001-01-01T00:00:00Z";

impl<'a> TwinIdentity<'a> {
    /// An enabled, disconnected SAS device that has never been active, without model, edge
    /// capability or scopes; set the fields that differ.
    pub fn new(device_id: &'a str, device_etag: &'a str) -> Self {
        Self {
            device_id,
            module_id: None,
            device_etag,
            status: "enabled",
            status_reason: None,
            status_update_time: NEVER,
            connection_state: "Disconnected",
            last_activity_time: NEVER,
            cloud_to_device_message_count: 0,
            authentication_type: "sas",
            primary_thumbprint: None,
            secondary_thumbprint: None,
            model_id: None,
            iot_edge: None,
            device_scope: None,
            parent_scopes: None,
        }
    }
}

/// The object at `body[key]`: `None` when absent or `null`, an error when something else.
fn optional_object<'v>(
    body: &'v Map<String, Value>,
    key: &str,
    what: &'static str,
) -> Result<Option<&'v Map<String, Value>>, TwinError> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(object)) => Ok(Some(object)),
        Some(_) => Err(TwinError::NotAnObject { what }),
    }
}

/// A properties patch or document without the root `$metadata` and `$version`, which a client
/// sends back when it round-trips a twin it read; they are the hub's to maintain.
fn without_system_keys(object: &Map<String, Value>) -> Map<String, Value> {
    object
        .iter()
        .filter(|(key, _)| key.as_str() != METADATA && key.as_str() != VERSION)
        .map(|(key, value)| (key.clone(), value.clone()))
        .collect()
}

/// The `tags` and `properties.desired` of a service request body.
struct ServiceBody<'v> {
    tags: Option<&'v Map<String, Value>>,
    desired: Option<Map<String, Value>>,
}

impl<'v> ServiceBody<'v> {
    /// Splits and validates the body. `reported_allowed` says whether `properties.reported` is
    /// ignored (a PUT round-tripping a twin it read) or refused (a PATCH).
    fn parse(body: &'v Value, reported_allowed: bool) -> Result<Self, TwinError> {
        let body = body
            .as_object()
            .ok_or(TwinError::NotAnObject { what: "twin" })?;
        let tags = optional_object(body, "tags", "tags")?;
        let properties = optional_object(body, "properties", "properties")?;
        let mut desired = None;
        if let Some(properties) = properties {
            if !reported_allowed && properties.get("reported").is_some_and(|r| !r.is_null()) {
                return Err(TwinError::ReportedNotAllowed);
            }
            desired = optional_object(properties, "desired", "properties.desired")?
                .map(without_system_keys);
        }
        if let Some(tags) = tags {
            validate::check_object(tags, Section::Tags.name())?;
        }
        if let Some(desired) = &desired {
            validate::check_object(desired, Section::Desired.name())?;
        }
        Ok(Self { tags, desired })
    }
}

impl TwinDoc {
    /// A new twin: no tags, desired and reported `{"$metadata":{"$lastUpdated":now},
    /// "$version":1}`, twin version 1, etag counter 1.
    pub fn new(now: &str) -> Self {
        Self {
            tags: Map::new(),
            desired: Properties::new(now),
            reported: Properties::new(now),
            version: 1,
            etag: 1,
        }
    }

    /// A new twin version and etag, after any change.
    fn bump(&mut self) {
        self.version += 1;
        self.etag += 1;
    }

    /// Applies the device's reported-properties merge patch (`$iothub/twin/PATCH/properties/
    /// reported/`): `null` deletes, objects merge recursively. A root `$version`/`$metadata` is
    /// ignored. Every patch, even `{}`, is an update: reported `$version`, twin version and etag
    /// go up, and `$lastUpdated` is set at the root and at every level the patch names. Returns
    /// the new reported `$version` (the `$version` of the MQTT 204 response).
    pub fn patch_reported(&mut self, patch: &Value, now: &str) -> Result<u64, TwinError> {
        let patch = patch.as_object().ok_or(TwinError::NotAnObject {
            what: "properties.reported",
        })?;
        let patch = without_system_keys(patch);
        validate::check_object(&patch, Section::Reported.name())?;
        let mut next = self.reported.clone();
        let stamp = Stamp { now, version: None };
        merge::merge(
            &mut next.properties,
            Some((&mut next.metadata, stamp)),
            &patch,
        );
        validate::check_section(&next.properties, Section::Reported)?;
        stamp.apply(&mut next.metadata);
        next.version += 1;
        self.reported = next;
        self.bump();
        Ok(self.reported.version)
    }

    /// Applies a service `PATCH /twins/{id}` body: merge patches of `tags` and
    /// `properties.desired`. Other root members (`deviceId`, `etag`, `version`, ...) are ignored,
    /// as are `$metadata`/`$version` at the root of desired; a non-null `properties.reported` is
    /// [`TwinError::ReportedNotAllowed`].
    ///
    /// Desired counts as changed when its patch has at least one member (a member set to its
    /// current value is still an update, as in Azure); then desired `$version` goes up, the
    /// touched levels get `$lastUpdated` and `$lastUpdatedVersion`, and the result is the
    /// notification for the device: the desired patch as sent plus the new `$version`. Twin
    /// version and etag go up when tags or desired changed.
    pub fn patch_service(&mut self, body: &Value, now: &str) -> Result<Option<Value>, TwinError> {
        let body = ServiceBody::parse(body, false)?;
        let tags_patch = body.tags.filter(|tags| !tags.is_empty());
        let desired_patch = body.desired.filter(|desired| !desired.is_empty());

        let mut tags = None;
        if let Some(patch) = tags_patch {
            let mut next = self.tags.clone();
            merge::merge(&mut next, None, patch);
            validate::check_section(&next, Section::Tags)?;
            tags = Some(next);
        }
        let mut desired = None;
        if let Some(patch) = &desired_patch {
            let mut next = self.desired.clone();
            next.version += 1;
            let stamp = Stamp {
                now,
                version: Some(next.version),
            };
            merge::merge(
                &mut next.properties,
                Some((&mut next.metadata, stamp)),
                patch,
            );
            validate::check_section(&next.properties, Section::Desired)?;
            stamp.apply(&mut next.metadata);
            desired = Some(next);
        }

        if tags.is_none() && desired.is_none() {
            return Ok(None);
        }
        if let Some(tags) = tags {
            self.tags = tags;
        }
        self.bump();
        let Some(desired) = desired else {
            return Ok(None);
        };
        self.desired = desired;
        let mut notification = desired_patch.unwrap_or_default();
        notification.insert(VERSION.into(), self.desired.version.into());
        Ok(Some(Value::Object(notification)))
    }

    /// Applies a service `PUT /twins/{id}` body: `tags` and `properties.desired` replace the
    /// current ones wholesale (absent or `null` means empty; `null` members are dropped);
    /// `properties.reported`, identity fields and `$metadata`/`$version` at the root of desired
    /// are ignored, so a twin read with GET can be sent back as it is.
    ///
    /// Desired changes when its content differs; then desired `$version` goes up, changed
    /// members and the levels containing them get new metadata (unchanged members keep theirs)
    /// and the result is the notification for the device: the whole new desired document plus
    /// `$version`. Twin version and etag go up when tags or desired changed.
    pub fn replace_service(&mut self, body: &Value, now: &str) -> Result<Option<Value>, TwinError> {
        let body = ServiceBody::parse(body, true)?;
        let new_tags = match body.tags {
            Some(tags) => merge::without_nulls(&Value::Object(tags.clone())),
            None => Value::Object(Map::new()),
        };
        let new_tags = match new_tags {
            Value::Object(tags) => tags,
            _ => Map::new(),
        };
        let new_desired = match body.desired {
            Some(desired) => match merge::without_nulls(&Value::Object(desired)) {
                Value::Object(desired) => desired,
                _ => Map::new(),
            },
            None => Map::new(),
        };
        validate::check_section(&new_tags, Section::Tags)?;
        validate::check_section(&new_desired, Section::Desired)?;

        let tags_changed = new_tags != self.tags;
        let mut next = self.desired.clone();
        next.version += 1;
        let stamp = Stamp {
            now,
            version: Some(next.version),
        };
        let desired_changed = merge::replace(
            &mut next.properties,
            &mut next.metadata,
            &new_desired,
            stamp,
        );

        if !tags_changed && !desired_changed {
            return Ok(None);
        }
        self.tags = new_tags;
        self.bump();
        if !desired_changed {
            return Ok(None);
        }
        stamp.apply(&mut next.metadata);
        self.desired = next;
        Ok(Some(self.desired.with_version()))
    }

    /// The body of the MQTT twin GET response: `{"desired":{...,"$version":n},
    /// "reported":{...,"$version":m}}`, without `$metadata` and tags.
    pub fn device_view(&self) -> Value {
        let mut view = Map::new();
        view.insert("desired".into(), self.desired.with_version());
        view.insert("reported".into(), self.reported.with_version());
        Value::Object(view)
    }

    /// `{"desired": {..., "$metadata", "$version"}, "reported": {...}}`, as the REST twin's
    /// `properties`.
    pub fn properties_with_metadata(&self) -> Value {
        let mut properties = Map::new();
        properties.insert("desired".into(), self.desired.with_metadata());
        properties.insert("reported".into(), self.reported.with_metadata());
        Value::Object(properties)
    }

    /// The twin as route conditions read it (`$twin.tags.*`, `$twin.properties.desired.*`,
    /// `$twin.properties.reported.*`): tags and both property sections with `$version`.
    pub fn routing_view(&self) -> Value {
        let mut properties = Map::new();
        properties.insert("desired".into(), self.desired.with_version());
        properties.insert("reported".into(), self.reported.with_version());
        let mut view = Map::new();
        view.insert("tags".into(), Value::Object(self.tags.clone()));
        view.insert("properties".into(), Value::Object(properties));
        Value::Object(view)
    }

    /// The REST twin (azure-protocol.md 6.3): the identity fields, `etag`, `version`, `tags`
    /// (only when there are any, as the hub renders a new twin) and both property sections with
    /// `$metadata` and `$version`.
    pub fn to_rest(&self, identity: &TwinIdentity<'_>) -> Value {
        fn opt(value: Option<&str>) -> Value {
            value.map_or(Value::Null, Value::from)
        }
        let mut twin = Map::new();
        twin.insert("deviceId".into(), identity.device_id.into());
        if let Some(module_id) = identity.module_id {
            twin.insert("moduleId".into(), module_id.into());
        }
        twin.insert("etag".into(), self.etag().into());
        twin.insert("deviceEtag".into(), identity.device_etag.into());
        twin.insert("status".into(), identity.status.into());
        twin.insert("statusReason".into(), opt(identity.status_reason));
        twin.insert(
            "statusUpdateTime".into(),
            identity.status_update_time.into(),
        );
        twin.insert("connectionState".into(), identity.connection_state.into());
        twin.insert(
            "lastActivityTime".into(),
            identity.last_activity_time.into(),
        );
        twin.insert(
            "cloudToDeviceMessageCount".into(),
            identity.cloud_to_device_message_count.into(),
        );
        twin.insert(
            "authenticationType".into(),
            identity.authentication_type.into(),
        );
        let mut thumbprint = Map::new();
        thumbprint.insert("primaryThumbprint".into(), opt(identity.primary_thumbprint));
        thumbprint.insert(
            "secondaryThumbprint".into(),
            opt(identity.secondary_thumbprint),
        );
        twin.insert("x509Thumbprint".into(), Value::Object(thumbprint));
        twin.insert(
            "modelId".into(),
            identity.model_id.unwrap_or_default().into(),
        );
        twin.insert("version".into(), self.version.into());
        if !self.tags.is_empty() {
            twin.insert("tags".into(), Value::Object(self.tags.clone()));
        }
        let mut properties = Map::new();
        properties.insert("desired".into(), self.desired.with_metadata());
        properties.insert("reported".into(), self.reported.with_metadata());
        twin.insert("properties".into(), Value::Object(properties));
        if let Some(iot_edge) = identity.iot_edge {
            let mut capabilities = Map::new();
            capabilities.insert("iotEdge".into(), iot_edge.into());
            twin.insert("capabilities".into(), Value::Object(capabilities));
        }
        if let Some(scope) = identity.device_scope {
            twin.insert("deviceScope".into(), scope.into());
        }
        if let Some(scopes) = identity.parent_scopes {
            twin.insert("parentScopes".into(), scopes.into());
        }
        Value::Object(twin)
    }

    /// The twin etag: base64 of the 8-byte big-endian counter (`AAAAAAAAAAE=` for 1).
    pub fn etag(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.etag.to_be_bytes())
    }

    /// The twin `version`, which goes up with every change.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// `properties.desired.$version`.
    pub fn desired_version(&self) -> u64 {
        self.desired.version
    }

    /// `properties.reported.$version`.
    pub fn reported_version(&self) -> u64 {
        self.reported.version
    }

    /// The tags.
    pub fn tags(&self) -> &Map<String, Value> {
        &self.tags
    }

    /// The desired properties, without `$metadata` and `$version`.
    pub fn desired(&self) -> &Map<String, Value> {
        &self.desired.properties
    }

    /// The reported properties, without `$metadata` and `$version`.
    pub fn reported(&self) -> &Map<String, Value> {
        &self.reported.properties
    }
}

#[cfg(test)]
mod tests;
