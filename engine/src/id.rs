//! Device and module identifiers.
//!
//! Azure IoT Hub ids are case-sensitive, at most 128 characters, drawn from ASCII alphanumerics
//! and ``- . + % _ # * ? ! ( ) , = @ $ '``. Validating once, at the boundary, lets the rest of the
//! hub treat an id as an opaque, safe string (it never contains `/`, so it can be a topic or path
//! segment as is).

use crate::limits::ID_LEN_MAX;

/// Why a string is not a valid device or module id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("the id is empty")]
    Empty,
    #[error("the id is longer than 128 characters")]
    TooLong,
    #[error("the id contains the character {0:?}, which is not allowed")]
    BadCharacter(char),
}

/// Checks a device or module id against Azure's rules.
pub fn validate(id: &str) -> Result<(), IdError> {
    if id.is_empty() {
        return Err(IdError::Empty);
    }
    if id.len() > ID_LEN_MAX {
        return Err(IdError::TooLong);
    }
    match id.chars().find(|&c| !is_id_char(c)) {
        Some(c) => Err(IdError::BadCharacter(c)),
        None => Ok(()),
    }
}

fn is_id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "-.+%_#*?!(),=@$'".contains(c)
}

/// A validated device id.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DeviceId(String);

impl DeviceId {
    pub fn parse(id: &str) -> Result<Self, IdError> {
        validate(id)?;
        Ok(Self(id.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for DeviceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_every_allowed_character() {
        assert_eq!(validate("aZ09-.+%_#*?!(),=@$'"), Ok(()));
        assert_eq!(validate(&"x".repeat(128)), Ok(()));
    }

    #[test]
    fn refuses_what_azure_refuses() {
        assert_eq!(validate(""), Err(IdError::Empty));
        assert_eq!(validate(&"x".repeat(129)), Err(IdError::TooLong));
        assert_eq!(validate("a/b"), Err(IdError::BadCharacter('/')));
        assert_eq!(validate("a b"), Err(IdError::BadCharacter(' ')));
        assert_eq!(validate("caf\u{e9}"), Err(IdError::BadCharacter('\u{e9}')));
        assert_eq!(validate("a&b"), Err(IdError::BadCharacter('&')));
    }
}
