//! Merge patches and wholesale replacement, keeping the `$metadata` tree in step.
//!
//! The metadata tree mirrors the objects of a section: every object level and every leaf has a
//! node holding `$lastUpdated` (and `$lastUpdatedVersion` in desired properties), and an object's
//! node also holds its children's nodes under the children's names. Arrays are leaves.

use serde_json::{Map, Value};

pub(crate) const LAST_UPDATED: &str = "$lastUpdated";
pub(crate) const LAST_UPDATED_VERSION: &str = "$lastUpdatedVersion";

/// What an update writes into the metadata of every level it touches.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Stamp<'a> {
    pub now: &'a str,
    /// The section's new `$version`, for desired properties only.
    pub version: Option<u64>,
}

impl Stamp<'_> {
    /// Marks one metadata node as updated now, keeping its children.
    pub fn apply(&self, node: &mut Map<String, Value>) {
        node.insert(LAST_UPDATED.into(), self.now.into());
        if let Some(version) = self.version {
            node.insert(LAST_UPDATED_VERSION.into(), version.into());
        }
    }

    /// A metadata node for a newly written value, with nodes for everything inside it.
    pub fn fresh(&self, value: &Value) -> Value {
        let mut node = Map::new();
        self.apply(&mut node);
        if let Value::Object(object) = value {
            for (key, child) in object {
                node.insert(key.clone(), self.fresh(child));
            }
        }
        Value::Object(node)
    }
}

/// The metadata node of `key` inside `node`, made an object if it is missing or malformed
/// (so always `Some`).
fn child_node<'m>(
    node: &'m mut Map<String, Value>,
    key: &str,
) -> Option<&'m mut Map<String, Value>> {
    let entry = node
        .entry(key.to_string())
        .or_insert_with(|| Value::Object(Map::new()));
    if !entry.is_object() {
        *entry = Value::Object(Map::new());
    }
    entry.as_object_mut()
}

/// A value with the `null` members of its objects removed, at every level: what a merge patch
/// writes where the target has no object to merge into (RFC 7386). Arrays are kept as they are.
pub(crate) fn without_nulls(value: &Value) -> Value {
    match value {
        Value::Object(object) => Value::Object(
            object
                .iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), without_nulls(v)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// Applies a JSON merge patch (RFC 7386) to `target`: `null` deletes, objects merge into objects
/// recursively, anything else replaces. With `meta`, every member of the patch is a touched
/// level: its node is stamped (a replaced value gets a fresh node tree, a deleted one loses its
/// node). The caller stamps the root.
pub(crate) fn merge(
    target: &mut Map<String, Value>,
    mut meta: Option<(&mut Map<String, Value>, Stamp<'_>)>,
    patch: &Map<String, Value>,
) {
    for (key, patched) in patch {
        if patched.is_null() {
            target.remove(key);
            if let Some((node, _)) = meta.as_mut() {
                node.remove(key);
            }
            continue;
        }
        if let (Some(Value::Object(inner)), Value::Object(inner_patch)) =
            (target.get_mut(key), patched)
        {
            let inner_meta = match meta.as_mut() {
                Some((node, stamp)) => child_node(node, key).map(|child| {
                    stamp.apply(child);
                    (child, *stamp)
                }),
                None => None,
            };
            merge(inner, inner_meta, inner_patch);
            continue;
        }
        let value = without_nulls(patched);
        if let Some((node, stamp)) = meta.as_mut() {
            node.insert(key.clone(), stamp.fresh(&value));
        }
        target.insert(key.clone(), value);
    }
}

/// Makes `target` equal to `new`, touching only what differs: members missing from `new` are
/// deleted with their metadata, changed or added members get fresh metadata, objects present on
/// both sides are compared member by member, and every object level containing a change is
/// stamped. Returns whether anything changed; the caller stamps the root.
pub(crate) fn replace(
    target: &mut Map<String, Value>,
    meta: &mut Map<String, Value>,
    new: &Map<String, Value>,
    stamp: Stamp<'_>,
) -> bool {
    let mut changed = false;
    let gone: Vec<String> = target
        .keys()
        .filter(|key| !new.contains_key(*key))
        .cloned()
        .collect();
    for key in gone {
        target.remove(&key);
        meta.remove(&key);
        changed = true;
    }
    for (key, value) in new {
        match (target.get_mut(key), value) {
            (Some(Value::Object(inner)), Value::Object(inner_new)) => {
                let mut scratch = Map::new();
                let child = child_node(meta, key).unwrap_or(&mut scratch);
                if replace(inner, child, inner_new, stamp) {
                    stamp.apply(child);
                    changed = true;
                }
            }
            (Some(old), _) if old == value => {}
            _ => {
                meta.insert(key.clone(), stamp.fresh(value));
                target.insert(key.clone(), value.clone());
                changed = true;
            }
        }
    }
    changed
}
