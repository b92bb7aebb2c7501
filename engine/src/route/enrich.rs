//! Message enrichments (Azure's `routing.enrichments`): application properties added to the
//! messages delivered to chosen endpoints, with a static value, the hub's name (`$iothubname`)
//! or a path in the sender's twin (`$twin.tags.*`, `$twin.properties.desired.*`,
//! `$twin.properties.reported.*`).
//!
//! An enrichment's value depends only on the sender, so it is worked out once per batch (a batch
//! is one connection's messages) and added to each message bound for its endpoints, replacing an
//! application property of the same name.

use std::borrow::Cow;

use super::parse::{self, Expr, PathSegment, TwinSection};
use super::EndpointSet;
use crate::store::{MessageRef, PropertyRef};

/// Azure's limit on enrichments per hub (paid tiers).
pub const ENRICHMENTS_MAX: usize = 10;
/// Longest enrichment key and value.
pub const ENRICHMENT_BYTES_MAX: usize = 256;

/// One enrichment as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnrichmentSpec {
    pub key: String,
    /// A static string, `$iothubname`, or a `$twin` path.
    pub value: String,
    pub endpoint_names: Vec<String>,
}

#[derive(Debug, Clone)]
pub(super) enum Source {
    Static(String),
    Twin {
        section: TwinSection,
        path: Box<[PathSegment]>,
        /// What the message gets when the twin has no such path: the reference as written.
        text: String,
    },
}

#[derive(Debug, Clone)]
pub(super) struct Enrichment {
    pub key: String,
    pub source: Source,
    pub endpoints: EndpointSet,
}

/// Why an enrichment is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EnrichmentError {
    #[error("too many enrichments: {count} (at most {ENRICHMENTS_MAX})")]
    TooMany { count: usize },
    #[error("invalid enrichment key '{key}': 1 to 256 printable characters, unique")]
    InvalidKey { key: String },
    #[error("enrichment '{key}': the value must be 1 to 256 characters")]
    InvalidValue { key: String },
    #[error("enrichment '{key}': invalid $twin path: {reason}")]
    TwinPath { key: String, reason: String },
    #[error("enrichment '{key}' names no endpoint")]
    NoEndpoint { key: String },
}

pub(super) fn compile(
    specs: &[EnrichmentSpec],
    hub_name: &str,
    endpoint_index: impl Fn(&str) -> Option<usize>,
) -> Result<Vec<Enrichment>, EnrichmentError> {
    if specs.len() > ENRICHMENTS_MAX {
        return Err(EnrichmentError::TooMany { count: specs.len() });
    }
    let mut compiled = Vec::with_capacity(specs.len());
    for (i, spec) in specs.iter().enumerate() {
        let key_ok = !spec.key.is_empty()
            && spec.key.len() <= ENRICHMENT_BYTES_MAX
            && !spec.key.chars().any(char::is_control)
            && !specs[..i].iter().any(|s| s.key == spec.key);
        if !key_ok {
            return Err(EnrichmentError::InvalidKey {
                key: spec.key.clone(),
            });
        }
        if spec.value.is_empty() || spec.value.len() > ENRICHMENT_BYTES_MAX {
            return Err(EnrichmentError::InvalidValue {
                key: spec.key.clone(),
            });
        }
        if spec.endpoint_names.is_empty() {
            return Err(EnrichmentError::NoEndpoint {
                key: spec.key.clone(),
            });
        }
        let value = spec.value.trim();
        let source = if value.eq_ignore_ascii_case("$iothubname") {
            Source::Static(hub_name.to_owned())
        } else if value.len() >= 5 && value[..5].eq_ignore_ascii_case("$twin") {
            let twin_path = |reason: String| EnrichmentError::TwinPath {
                key: spec.key.clone(),
                reason,
            };
            match parse::parse(value) {
                Ok(Expr::Twin(section, path)) => Source::Twin {
                    section,
                    path: path.into_boxed_slice(),
                    text: spec.value.clone(),
                },
                Ok(_) => return Err(twin_path("not a single $twin reference".to_owned())),
                Err(e) => return Err(twin_path(e.to_string())),
            }
        } else {
            Source::Static(spec.value.clone())
        };
        let mut endpoints = EndpointSet::new();
        for name in &spec.endpoint_names {
            // An endpoint that no route sends to never sees a message: nothing to enrich.
            if let Some(index) = endpoint_index(name) {
                endpoints.insert(index);
            }
        }
        compiled.push(Enrichment {
            key: spec.key.clone(),
            source,
            endpoints,
        });
    }
    Ok(compiled)
}

/// The value of each enrichment for one sender: borrowed from the table or the twin, except a
/// twin value that is not a string (a number, a boolean, an object), which is written as JSON.
pub(super) fn values<'a>(
    enrichments: &'a [Enrichment],
    twin: Option<&'a serde_json::Value>,
) -> Vec<Cow<'a, str>> {
    enrichments
        .iter()
        .map(|e| match &e.source {
            Source::Static(value) => Cow::Borrowed(value.as_str()),
            Source::Twin {
                section,
                path,
                text,
            } => match twin.and_then(|t| super::eval::twin_path(t, *section, path)) {
                Some(serde_json::Value::String(s)) => Cow::Borrowed(s.as_str()),
                Some(serde_json::Value::Null) | None => Cow::Borrowed(text.as_str()),
                Some(other) => Cow::Owned(other.to_string()),
            },
        })
        .collect()
}

/// Enriched copies of `messages` for endpoint `endpoint`: their application properties (without
/// those an enrichment replaces) then the enrichments for that endpoint, written to `storage`;
/// returns each message's range in `storage`, or `None` when no enrichment applies.
pub(super) fn properties<'a>(
    enrichments: &'a [Enrichment],
    values: &'a [Cow<'a, str>],
    endpoint: usize,
    messages: &[MessageRef<'a>],
    storage: &mut Vec<PropertyRef<'a>>,
) -> Option<Vec<std::ops::Range<usize>>> {
    if !enrichments.iter().any(|e| e.endpoints.contains(endpoint)) {
        return None;
    }
    let mut ranges = Vec::with_capacity(messages.len());
    for message in messages {
        let start = storage.len();
        for property in message.application_properties {
            let replaced = enrichments
                .iter()
                .any(|e| e.endpoints.contains(endpoint) && e.key == property.name);
            if !replaced {
                storage.push(*property);
            }
        }
        for (enrichment, value) in enrichments.iter().zip(values) {
            if enrichment.endpoints.contains(endpoint) {
                storage.push(PropertyRef {
                    name: enrichment.key.as_str(),
                    value: value.as_ref(),
                });
            }
        }
        ranges.push(start..storage.len());
    }
    Some(ranges)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn spec(key: &str, value: &str, endpoints: &[&str]) -> EnrichmentSpec {
        EnrichmentSpec {
            key: key.to_owned(),
            value: value.to_owned(),
            endpoint_names: endpoints.iter().map(|e| e.to_string()).collect(),
        }
    }

    fn index(name: &str) -> Option<usize> {
        ["events", "eu"].iter().position(|e| *e == name)
    }

    #[test]
    fn values_come_from_the_table_the_hub_and_the_twin() {
        let compiled = compile(
            &[
                spec("s", "static", &["events"]),
                spec("h", "$IoTHubName", &["eu"]),
                spec("r", "$twin.tags.region", &["eu"]),
                spec("n", "$twin.properties.reported.count", &["eu"]),
                spec("o", "$twin.tags.nested", &["eu"]),
                spec("m", "$twin.tags.missing", &["eu"]),
                spec("x", "v", &["not-routed"]),
            ],
            "myhub",
            index,
        )
        .unwrap();
        let twin = serde_json::json!({
            "tags": {"region": "eu", "nested": {"a": [1]}},
            "properties": {"desired": {}, "reported": {"count": 7}},
        });
        let values = values(&compiled, Some(&twin));
        assert_eq!(
            values,
            [
                "static",
                "myhub",
                "eu",
                "7",
                r#"{"a":[1]}"#,
                "$twin.tags.missing",
                "v"
            ]
        );
        let without = super::values(&compiled, None);
        assert_eq!(without[2], "$twin.tags.region");
        assert!(compiled[6].endpoints.is_empty());
    }

    #[test]
    fn properties_replace_same_named_ones_only_for_their_endpoints() {
        let compiled = compile(
            &[spec("k", "new", &["eu"]), spec("z", "z", &["events", "eu"])],
            "hub",
            index,
        )
        .unwrap();
        let values = values(&compiled, None);
        let props = [
            PropertyRef {
                name: "k",
                value: "old",
            },
            PropertyRef {
                name: "a",
                value: "1",
            },
        ];
        let message = MessageRef {
            system_properties: &[],
            application_properties: &props,
            body: b"",
        };
        let mut storage = Vec::new();
        let ranges = properties(&compiled, &values, 1, &[message], &mut storage).unwrap();
        let got: Vec<_> = storage[ranges[0].clone()]
            .iter()
            .map(|p| (p.name, p.value))
            .collect();
        assert_eq!(got, [("a", "1"), ("k", "new"), ("z", "z")]);
        let mut storage = Vec::new();
        let ranges = properties(&compiled, &values, 0, &[message], &mut storage).unwrap();
        let got: Vec<_> = storage[ranges[0].clone()]
            .iter()
            .map(|p| (p.name, p.value))
            .collect();
        assert_eq!(got, [("k", "old"), ("a", "1"), ("z", "z")]);
        let none = compile(&[spec("k", "v", &["eu"])], "hub", index).unwrap();
        assert!(properties(&none, &values, 0, &[message], &mut storage).is_none());
    }

    #[test]
    fn bad_enrichments_are_refused() {
        let too_many: Vec<_> = (0..11)
            .map(|i| spec(&format!("k{i}"), "v", &["eu"]))
            .collect();
        assert_eq!(
            compile(&too_many, "h", index).unwrap_err(),
            EnrichmentError::TooMany { count: 11 }
        );
        let duplicate = [spec("k", "v", &["eu"]), spec("k", "w", &["eu"])];
        assert!(matches!(
            compile(&duplicate, "h", index),
            Err(EnrichmentError::InvalidKey { .. })
        ));
        assert!(matches!(
            compile(&[spec("k", "", &["eu"])], "h", index),
            Err(EnrichmentError::InvalidValue { .. })
        ));
        assert!(matches!(
            compile(&[spec("k", "$twin.tags.", &["eu"])], "h", index),
            Err(EnrichmentError::TwinPath { .. })
        ));
        assert!(matches!(
            compile(&[spec("k", "$twin.tags.a = 1", &["eu"])], "h", index),
            Err(EnrichmentError::TwinPath { .. })
        ));
        assert!(matches!(
            compile(&[spec("k", "v", &[])], "h", index),
            Err(EnrichmentError::NoEndpoint { .. })
        ));
    }
}
