//! The twin rules of azure-protocol.md 6.3: property names, values, nesting and section sizes.

use ingot_engine::limits::{
    TWIN_DEPTH_MAX, TWIN_INT_MAX, TWIN_INT_MIN, TWIN_KEY_BYTES_MAX, TWIN_STRING_BYTES_MAX,
};
use serde_json::{Map, Value};

use super::error::{shorten, Section, TwinError};

/// Checks a property name: UTF-8 (given), case-sensitive (nothing to do), 1 to 1024 bytes, no
/// C0/C1 control characters, no `.`, `$` or space.
pub(crate) fn check_key(key: &str) -> Result<(), TwinError> {
    let reason = if key.is_empty() {
        "names must not be empty"
    } else if key.len() > TWIN_KEY_BYTES_MAX {
        "names are limited to 1024 bytes"
    } else if key.chars().any(char::is_control) {
        "names must not contain control characters"
    } else if key.contains(['.', '$', ' ']) {
        "names must not contain '.', '$' or ' '"
    } else {
        return Ok(());
    };
    Err(TwinError::InvalidKey {
        key: shorten(key),
        reason,
    })
}

/// Checks every name and value of an object (a patch, or a whole section), `path` naming the
/// object in messages. `null` is accepted anywhere: in a patch it deletes.
pub(crate) fn check_object(object: &Map<String, Value>, path: &str) -> Result<(), TwinError> {
    for (key, value) in object {
        check_key(key)?;
        check_value(value, &format!("{path}.{key}"))?;
    }
    Ok(())
}

fn check_value(value: &Value, path: &str) -> Result<(), TwinError> {
    match value {
        Value::String(s) if s.len() > TWIN_STRING_BYTES_MAX => Err(TwinError::InvalidValue {
            path: shorten(path),
            reason: "strings are limited to 4096 bytes",
        }),
        Value::Number(n) => {
            let in_range = match (n.as_i64(), n.as_u64()) {
                (Some(i), _) => (TWIN_INT_MIN..=TWIN_INT_MAX).contains(&i),
                (None, Some(_)) => false,
                // Fractional numbers have no documented range.
                (None, None) => true,
            };
            if in_range {
                Ok(())
            } else {
                Err(TwinError::ValueOutOfRange {
                    path: shorten(path),
                })
            }
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                check_value(item, &format!("{path}[{i}]"))?;
            }
            Ok(())
        }
        Value::Object(object) => check_object(object, path),
        Value::Null | Value::Bool(_) | Value::String(_) => Ok(()),
    }
}

/// A section's size as Azure counts it: the sum of the key lengths and value sizes, strings by
/// their UTF-8 length, numbers as 8 bytes, booleans (and nulls inside arrays) as 4.
pub(crate) fn size(object: &Map<String, Value>) -> usize {
    object.iter().map(|(k, v)| k.len() + value_size(v)).sum()
}

fn value_size(value: &Value) -> usize {
    match value {
        Value::Null | Value::Bool(_) => 4,
        Value::Number(_) => 8,
        Value::String(s) => s.len(),
        Value::Array(items) => items.iter().map(value_size).sum(),
        Value::Object(object) => size(object),
    }
}

/// Levels of objects below a section's root: `{"a":1}` is 0, `{"a":{"b":1}}` is 1. Arrays do
/// not add a level of their own; objects inside them do.
pub(crate) fn depth(object: &Map<String, Value>) -> usize {
    object.values().map(value_depth).max().unwrap_or(0)
}

fn value_depth(value: &Value) -> usize {
    match value {
        Value::Object(object) => 1 + depth(object),
        Value::Array(items) => items.iter().map(value_depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// Checks a section's content after an update: nesting and size.
pub(crate) fn check_section(
    object: &Map<String, Value>,
    section: Section,
) -> Result<(), TwinError> {
    if depth(object) > TWIN_DEPTH_MAX {
        return Err(TwinError::TooDeep {
            section,
            max: TWIN_DEPTH_MAX,
        });
    }
    let size = size(object);
    let max = section.max_bytes();
    if size > max {
        return Err(TwinError::TooLarge { section, size, max });
    }
    Ok(())
}
