//! Twin documents, in the registry's database beside their identities.
//!
//! A twin is created with its identity's first read or write and deleted with it. Reported
//! patches from devices arrive in batches and are committed in one transaction (one fsync for
//! many devices); a device hears `204` only after that commit.

use redb::ReadableTable;

use super::{decode, encode, now_rfc3339, IfMatch, Registry, RegistryError, TWINS};
use crate::twin::{TwinDoc, TwinError};

/// The module part of a twin's key: "" for the device's own twin.
fn module_key(module_id: Option<&str>) -> &str {
    module_id.unwrap_or("")
}

impl Registry {
    /// The identity's twin, or a fresh one when it was never written. Fails when the identity
    /// does not exist.
    pub fn twin(&self, device_id: &str, module_id: Option<&str>) -> Result<TwinDoc, RegistryError> {
        let txn = self.db.begin_read()?;
        let twins = txn.open_table(TWINS)?;
        if let Some(g) = twins.get((device_id, module_key(module_id)))? {
            return decode(g.value());
        }
        drop(twins);
        drop(txn);
        self.identity_exists(device_id, module_id)?;
        Ok(TwinDoc::new(&now_rfc3339()))
    }

    fn identity_exists(
        &self,
        device_id: &str,
        module_id: Option<&str>,
    ) -> Result<(), RegistryError> {
        match module_id {
            None => self
                .device(device_id)?
                .map(drop)
                .ok_or(RegistryError::DeviceNotFound),
            Some(module_id) => match self.module(device_id, module_id)? {
                Some(_) => Ok(()),
                None if self.device(device_id)?.is_some() => Err(RegistryError::ModuleNotFound),
                None => Err(RegistryError::DeviceNotFound),
            },
        }
    }

    /// Reads, changes and writes one twin in one transaction, after checking `if_match` against
    /// its etag.
    pub fn update_twin<T>(
        &self,
        device_id: &str,
        module_id: Option<&str>,
        if_match: &IfMatch,
        change: impl FnOnce(&mut TwinDoc, &str) -> Result<T, TwinError>,
    ) -> Result<(TwinDoc, T), RegistryError> {
        self.write(|t| {
            let exists = match module_id {
                None => t.0.get(device_id)?.is_some(),
                Some(module_id) => t.1.get((device_id, module_id))?.is_some(),
            };
            if !exists {
                return Err(match module_id {
                    Some(_) if t.0.get(device_id)?.is_some() => RegistryError::ModuleNotFound,
                    _ => RegistryError::DeviceNotFound,
                });
            }
            let now = now_rfc3339();
            let key = (device_id, module_key(module_id));
            let mut twin: TwinDoc = match t.3.get(key)? {
                Some(g) => decode(g.value())?,
                None => TwinDoc::new(&now),
            };
            if_match.check(&twin.etag())?;
            let out = change(&mut twin, &now).map_err(RegistryError::Twin)?;
            t.3.insert(key, encode(&twin).as_slice())?;
            Ok((twin, out))
        })
    }

    /// Applies devices' reported patches in one transaction. Each gets its own result: the new
    /// reported `$version`, or why the patch was refused (an invalid patch changes nothing).
    pub fn patch_reported_batch(
        &self,
        patches: &[(String, Option<String>, serde_json::Value)],
    ) -> Result<Vec<Result<u64, RegistryError>>, RegistryError> {
        self.write(|t| {
            let now = now_rfc3339();
            let mut results = Vec::with_capacity(patches.len());
            for (device_id, module_id, patch) in patches {
                let key = (device_id.as_str(), module_key(module_id.as_deref()));
                let exists = match module_id {
                    None => t.0.get(device_id.as_str())?.is_some(),
                    Some(module_id) => t.1.get((device_id.as_str(), module_id.as_str()))?.is_some(),
                };
                if !exists {
                    results.push(Err(RegistryError::DeviceNotFound));
                    continue;
                }
                let mut twin: TwinDoc = match t.3.get(key)? {
                    Some(g) => decode(g.value())?,
                    None => TwinDoc::new(&now),
                };
                match twin.patch_reported(patch, &now) {
                    Ok(version) => {
                        t.3.insert(key, encode(&twin).as_slice())?;
                        results.push(Ok(version));
                    }
                    Err(e) => results.push(Err(RegistryError::Twin(e))),
                }
            }
            Ok(results)
        })
    }

    /// Every twin of one kind (device twins, or module twins) with its identity, in key order:
    /// the rows of a twin query. Identities whose twin was never written get a fresh one.
    pub fn twins_for_query(&self, modules: bool) -> Result<Vec<TwinRow>, RegistryError> {
        let txn = self.db.begin_read()?;
        let twins = txn.open_table(TWINS)?;
        let devices = txn.open_table(super::DEVICES)?;
        let queues = txn.open_table(super::C2D)?;
        let now = now_rfc3339();
        let stored = |device: &str, module: &str| -> Result<TwinDoc, RegistryError> {
            match twins.get((device, module))? {
                Some(g) => decode(g.value()),
                None => Ok(TwinDoc::new(&now)),
            }
        };
        let mut rows = Vec::new();
        if modules {
            let table = txn.open_table(super::MODULES)?;
            for entry in table.range::<(&str, &str)>(..)? {
                let (key, value) = entry?;
                let (device_id, module_id) = key.value();
                let Some(device) = devices.get(device_id)? else {
                    continue;
                };
                rows.push(TwinRow {
                    device: decode(device.value())?,
                    module: Some(decode(value.value())?),
                    twin: stored(device_id, module_id)?,
                    c2d_count: 0,
                });
            }
        } else {
            for entry in devices.range::<&str>(..)? {
                let (key, value) = entry?;
                rows.push(TwinRow {
                    device: decode(value.value())?,
                    module: None,
                    twin: stored(key.value(), "")?,
                    c2d_count: super::c2d::lock_tokens(&queues, key.value())?.len() as u64,
                });
            }
        }
        Ok(rows)
    }
}

/// A twin with its identity records.
#[derive(Debug, Clone)]
pub struct TwinRow {
    pub device: super::Device,
    pub module: Option<super::Module>,
    pub twin: TwinDoc,
    /// Messages in the device's C2D queue (0 for a module), read in the same transaction.
    pub c2d_count: u64,
}
