//! What can be wrong with a twin update, and the Azure error each case maps to.

use std::fmt;

/// The three documents of a twin that carry user data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    Tags,
    Desired,
    Reported,
}

impl Section {
    /// The section's path in the REST twin JSON.
    pub fn name(self) -> &'static str {
        match self {
            Section::Tags => "tags",
            Section::Desired => "properties.desired",
            Section::Reported => "properties.reported",
        }
    }

    /// The largest size of the section: the sum of key lengths and value sizes (strings by UTF-8
    /// length, numbers 8 bytes, booleans 4) without `$metadata` and `$version`.
    pub fn max_bytes(self) -> usize {
        use ingot_engine::limits::{
            TWIN_DESIRED_BYTES_MAX, TWIN_REPORTED_BYTES_MAX, TWIN_TAGS_BYTES_MAX,
        };
        match self {
            Section::Tags => TWIN_TAGS_BYTES_MAX,
            Section::Desired => TWIN_DESIRED_BYTES_MAX,
            Section::Reported => TWIN_REPORTED_BYTES_MAX,
        }
    }
}

impl fmt::Display for Section {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A rejected twin update. Every variant is the client's fault (HTTP 400 over REST, status 400
/// on `$iothub/twin/res/400/` over MQTT); the twin is unchanged when one is returned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TwinError {
    /// The body is not JSON at all (see [`super::parse_json`]).
    #[error("The twin document is not valid JSON: {0}")]
    InvalidJson(String),
    /// A document or section that must be an object is something else.
    #[error("'{what}' must be a JSON object.")]
    NotAnObject { what: &'static str },
    /// A property name breaks the key rules (empty, too long, control characters, `.`, `$`, space).
    #[error("Invalid property name '{key}': {reason}.")]
    InvalidKey { key: String, reason: &'static str },
    /// A value breaks the value rules (a string longer than 4 KB).
    #[error("Invalid value of '{path}': {reason}.")]
    InvalidValue { path: String, reason: &'static str },
    /// An integer outside -2^52 ..= 2^52 - 1.
    #[error(
        "Value of '{path}' is out of range: integers must be within -4503599627370496 and 4503599627370495."
    )]
    ValueOutOfRange { path: String },
    /// Objects nested deeper than 10 levels below the section's root.
    #[error("'{section}' is nested deeper than the maximum of {max} levels.")]
    TooDeep { section: Section, max: usize },
    /// The section would grow past its size limit.
    #[error("'{section}' size should be less than or equal to {max} bytes; the update would make it {size} bytes.")]
    TooLarge {
        section: Section,
        size: usize,
        max: usize,
    },
    /// A service update carries `properties.reported`, which only the device may write.
    #[error("Reported properties can only be updated by the device; remove 'properties.reported' from the request.")]
    ReportedNotAllowed,
}

impl TwinError {
    /// `(HTTP status, Azure errorCode, Azure error name)` for the REST envelope and the
    /// `iothub-errorcode` header (azure-protocol.md 9.2). Malformed JSON is Azure's
    /// `DeserializationError`; every rule violation is `ArgumentInvalid`, which is what the hub
    /// answers, for instance, for an invalid character in a twin property name.
    pub fn code(&self) -> (u16, u32, &'static str) {
        match self {
            TwinError::InvalidJson(_) => (400, 400012, "DeserializationError"),
            TwinError::NotAnObject { .. }
            | TwinError::InvalidKey { .. }
            | TwinError::InvalidValue { .. }
            | TwinError::ValueOutOfRange { .. }
            | TwinError::TooDeep { .. }
            | TwinError::TooLarge { .. }
            | TwinError::ReportedNotAllowed => (400, 400004, "ArgumentInvalid"),
        }
    }
}

/// Shortens what an error message echoes back (a key may be up to 1 KB, or far more when it is
/// the reason for the rejection).
pub(crate) fn shorten(text: &str) -> String {
    const SHOWN: usize = 128;
    match text.char_indices().nth(SHOWN) {
        Some((end, _)) => format!("{}...", &text[..end]),
        None => text.to_string(),
    }
}
