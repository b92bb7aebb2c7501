//! The identity registry: devices and modules, stored in redb.
//!
//! redb is an embedded, pure-Rust, copy-on-write B-tree with ACID transactions: a commit
//! returns only after its pages and the new root are fsynced, and a kill -9 at any moment leaves
//! the last committed state (docs/ARCHITECTURE.md says why it was chosen). Its MVCC read
//! transactions never block the writer, which is what the data plane's credential look-ups will
//! need. Every operation is one transaction, so a 200 from the API means the change is on disk.
//!
//! Registry statistics are counters kept in the same transactions as the changes they count, so
//! `GET /statistics/devices` is O(1) however large the registry grows, and listing is paged by
//! key so that nothing ever loads the whole registry.
//!
//! Architecture Invariant: this module knows nothing of HTTP or JSON wire shapes; the API layer
//! validates input and converts records to Azure's documents.

use std::path::Path;

use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};

use ingot_engine::limits::{IDENTITIES_MAX, MODULES_PER_DEVICE_MAX};

const DEVICES: TableDefinition<&str, &[u8]> = TableDefinition::new("devices");
const MODULES: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("modules");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const CERTIFICATES: TableDefinition<&str, &[u8]> = TableDefinition::new("certificates");
/// Twin documents by (device, module); the device's own twin has module "".
const TWINS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("twins");
/// C2D queues: (device, lock token) -> message. Lock tokens grow hub-wide, so a device's queue
/// is in enqueue order.
const C2D: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("c2d");

mod c2d;
mod sessions;
mod twins;

pub use c2d::{AckMode, C2dMessage, C2dSpec, Feedback, FeedbackBatch};
pub use twins::TwinRow;

const META_ETAG: &str = "etag_counter";
const META_GENERATION: &str = "generation_ticks";
const META_DEVICES_TOTAL: &str = "devices_total";
const META_DEVICES_ENABLED: &str = "devices_enabled";
const META_MODULES_TOTAL: &str = "modules_total";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Enabled,
    Disabled,
}

/// How an identity authenticates. SAS keys are kept as the base64 text the API exchanges.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum Authentication {
    Sas {
        primary_key: String,
        secondary_key: String,
    },
    SelfSigned {
        primary_thumbprint: String,
        secondary_thumbprint: Option<String>,
    },
    CertificateAuthority,
    None,
}

/// What a caller asks for when creating or updating a device; the registry adds the etag,
/// generation id and timestamps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSpec {
    pub device_id: String,
    pub status: Status,
    pub status_reason: Option<String>,
    pub authentication: Authentication,
    pub iot_edge: bool,
    pub parent_scopes: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    pub device_id: String,
    pub generation_id: String,
    pub etag: String,
    pub status: Status,
    pub status_reason: Option<String>,
    /// RFC 3339; absent until the status first changes.
    pub status_updated_time: Option<String>,
    pub authentication: Authentication,
    pub iot_edge: bool,
    pub device_scope: Option<String>,
    pub parent_scopes: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleSpec {
    pub device_id: String,
    pub module_id: String,
    pub managed_by: Option<String>,
    pub authentication: Authentication,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Module {
    pub device_id: String,
    pub module_id: String,
    pub generation_id: String,
    pub etag: String,
    pub managed_by: Option<String>,
    pub authentication: Authentication,
}

/// An `If-Match` precondition: `*` or a specific etag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IfMatch {
    Any,
    Etag(String),
}

impl IfMatch {
    fn check(&self, etag: &str) -> Result<(), RegistryError> {
        match self {
            IfMatch::Any => Ok(()),
            IfMatch::Etag(wanted) if wanted == etag => Ok(()),
            IfMatch::Etag(_) => Err(RegistryError::PreconditionFailed),
        }
    }
}

/// A CA certificate registered for `certificateAuthority` devices.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaCertificate {
    pub name: String,
    pub etag: String,
    pub pem: String,
    /// RFC 3339.
    pub created: String,
    pub updated: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Statistics {
    pub total_devices: u64,
    pub enabled_devices: u64,
    pub total_modules: u64,
}

/// One entry of a bulk request, applied in one transaction with the others.
#[derive(Debug, Clone)]
pub enum BulkOp {
    Create(DeviceSpec),
    /// Creates the device when absent, else replaces it (Azure's `update` import mode).
    Upsert(DeviceSpec),
    UpdateIfMatch(DeviceSpec, IfMatch),
    Delete(String, IfMatch),
}

/// What a bulk operation did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BulkDone {
    Created,
    Updated,
    Deleted,
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("the device does not exist")]
    DeviceNotFound,
    #[error("a device with this id already exists")]
    DeviceAlreadyExists,
    #[error("the module does not exist")]
    ModuleNotFound,
    #[error("a module with this id already exists on the device")]
    ModuleAlreadyExists,
    #[error("the etag does not match")]
    PreconditionFailed,
    #[error("the certificate does not exist")]
    CertificateNotFound,
    #[error("the device has the maximum number of modules")]
    TooManyModules,
    #[error("the registry holds the maximum number of identities")]
    TooManyIdentities,
    /// Boxed: redb's error is large, and this one is rare.
    #[error("registry storage failed: {0}")]
    Storage(Box<redb::Error>),
    #[error("a registry record is damaged: {0}")]
    Corrupt(String),
    #[error("the device's cloud-to-device queue holds the maximum number of messages")]
    QueueFull,
    #[error("{0}")]
    Twin(crate::twin::TwinError),
}

macro_rules! storage_from {
    ($($t:ty),*) => {$(
        impl From<$t> for RegistryError {
            fn from(e: $t) -> Self {
                RegistryError::Storage(Box::new(e.into()))
            }
        }
    )*};
}
storage_from!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

#[derive(Debug)]
pub struct Registry {
    db: Database,
}

type Tables<'t> = (
    redb::Table<'t, &'static str, &'static [u8]>,
    redb::Table<'t, (&'static str, &'static str), &'static [u8]>,
    redb::Table<'t, &'static str, u64>,
    redb::Table<'t, (&'static str, &'static str), &'static [u8]>,
    redb::Table<'t, (&'static str, u64), &'static [u8]>,
);

impl Registry {
    /// Opens (or creates) the registry database. Fails with a clear error when another process
    /// holds it, since redb takes an exclusive lock on the file.
    pub fn open(path: &Path) -> Result<Self, RegistryError> {
        let db = Database::create(path)?;
        let txn = db.begin_write()?;
        txn.open_table(DEVICES)?;
        txn.open_table(MODULES)?;
        txn.open_table(META)?;
        txn.open_table(CERTIFICATES)?;
        txn.open_table(TWINS)?;
        txn.open_table(C2D)?;
        txn.open_table(c2d::FEEDBACK)?;
        txn.open_table(sessions::SESSIONS)?;
        txn.commit()?;
        Ok(Self { db })
    }

    fn write<T>(
        &self,
        f: impl FnOnce(&mut Tables<'_>) -> Result<T, RegistryError>,
    ) -> Result<T, RegistryError> {
        let txn = self.db.begin_write()?;
        let out = {
            let mut tables = (
                txn.open_table(DEVICES)?,
                txn.open_table(MODULES)?,
                txn.open_table(META)?,
                txn.open_table(TWINS)?,
                txn.open_table(C2D)?,
            );
            f(&mut tables)?
        };
        txn.commit()?;
        Ok(out)
    }

    /// One record of a string-keyed table, decoded, in its own read transaction.
    fn record<T: for<'de> Deserialize<'de>>(
        &self,
        table: TableDefinition<&str, &[u8]>,
        key: &str,
    ) -> Result<Option<T>, RegistryError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(table)?;
        let guard = table.get(key)?;
        guard.map(|g| decode(g.value())).transpose()
    }

    pub fn device(&self, id: &str) -> Result<Option<Device>, RegistryError> {
        self.record(DEVICES, id)
    }

    pub fn create_device(&self, spec: DeviceSpec) -> Result<Device, RegistryError> {
        self.write(|t| create_device(t, spec))
    }

    pub fn update_device(
        &self,
        spec: DeviceSpec,
        if_match: &IfMatch,
    ) -> Result<Device, RegistryError> {
        self.write(|t| update_device(t, spec, if_match))
    }

    pub fn delete_device(&self, id: &str, if_match: &IfMatch) -> Result<(), RegistryError> {
        self.write(|t| delete_device(t, id, if_match))
    }

    /// Applies every operation in one transaction; each gets its own result, and the ones that
    /// succeed are committed together even when others fail (as Azure's bulk API does).
    pub fn bulk(
        &self,
        ops: Vec<BulkOp>,
    ) -> Result<Vec<Result<BulkDone, RegistryError>>, RegistryError> {
        self.write(|t| {
            let mut results = Vec::with_capacity(ops.len());
            for op in ops {
                let created = |_| BulkDone::Created;
                let updated = |_| BulkDone::Updated;
                let result = match op {
                    BulkOp::Create(spec) => create_device(t, spec).map(created),
                    BulkOp::Upsert(spec) => match exists(&t.0, &spec.device_id)? {
                        true => update_device(t, spec, &IfMatch::Any).map(updated),
                        false => create_device(t, spec).map(created),
                    },
                    BulkOp::UpdateIfMatch(spec, m) => update_device(t, spec, &m).map(updated),
                    BulkOp::Delete(id, m) => delete_device(t, &id, &m).map(|()| BulkDone::Deleted),
                };
                // A storage error aborts the whole transaction; the others are per item.
                if let Err(e @ (RegistryError::Storage(_) | RegistryError::Corrupt(_))) = result {
                    return Err(e);
                }
                results.push(result);
            }
            Ok(results)
        })
    }

    /// Up to `top` devices in id order, starting after `after`; the second value is the id to
    /// continue after when more devices follow.
    pub fn list_devices(
        &self,
        after: Option<&str>,
        top: usize,
    ) -> Result<(Vec<Device>, Option<String>), RegistryError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(DEVICES)?;
        let range = match after {
            Some(after) => table
                .range::<&str>((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded))?,
            None => table.range::<&str>(..)?,
        };
        let mut devices = Vec::with_capacity(top.min(1024));
        let mut more = false;
        for entry in range {
            let (_, value) = entry?;
            if devices.len() == top {
                more = true;
                break;
            }
            devices.push(decode::<Device>(value.value())?);
        }
        let next = if more {
            devices.last().map(|d| d.device_id.clone())
        } else {
            None
        };
        Ok((devices, next))
    }

    pub fn statistics(&self) -> Result<Statistics, RegistryError> {
        let txn = self.db.begin_read()?;
        let meta = txn.open_table(META)?;
        let read = |key| -> Result<u64, RegistryError> {
            Ok(meta.get(key)?.map(|g| g.value()).unwrap_or(0))
        };
        Ok(Statistics {
            total_devices: read(META_DEVICES_TOTAL)?,
            enabled_devices: read(META_DEVICES_ENABLED)?,
            total_modules: read(META_MODULES_TOTAL)?,
        })
    }

    /// Number of device records, counted the slow way; tests compare it with the counters.
    pub fn count_devices(&self) -> Result<u64, RegistryError> {
        let txn = self.db.begin_read()?;
        Ok(txn.open_table(DEVICES)?.len()?)
    }

    pub fn module(
        &self,
        device_id: &str,
        module_id: &str,
    ) -> Result<Option<Module>, RegistryError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(MODULES)?;
        let guard = table.get((device_id, module_id))?;
        guard.map(|g| decode(g.value())).transpose()
    }

    pub fn modules(&self, device_id: &str) -> Result<Vec<Module>, RegistryError> {
        let txn = self.db.begin_read()?;
        if !exists(&txn.open_table(DEVICES)?, device_id)? {
            return Err(RegistryError::DeviceNotFound);
        }
        let table = txn.open_table(MODULES)?;
        let mut modules = Vec::new();
        for entry in table.range((device_id, "")..)? {
            let (key, value) = entry?;
            if key.value().0 != device_id {
                break;
            }
            modules.push(decode(value.value())?);
        }
        Ok(modules)
    }

    pub fn create_module(&self, spec: ModuleSpec) -> Result<Module, RegistryError> {
        self.write(|t| {
            if !exists(&t.0, &spec.device_id)? {
                return Err(RegistryError::DeviceNotFound);
            }
            let key = (spec.device_id.as_str(), spec.module_id.as_str());
            if t.1.get(key)?.is_some() {
                return Err(RegistryError::ModuleAlreadyExists);
            }
            if module_count(&t.1, &spec.device_id)? >= MODULES_PER_DEVICE_MAX {
                return Err(RegistryError::TooManyModules);
            }
            let module = Module {
                generation_id: next_generation(&mut t.2)?,
                etag: next_etag(&mut t.2)?,
                device_id: spec.device_id,
                module_id: spec.module_id,
                managed_by: spec.managed_by,
                authentication: spec.authentication,
            };
            t.1.insert(
                (module.device_id.as_str(), module.module_id.as_str()),
                encode(&module).as_slice(),
            )?;
            bump(&mut t.2, META_MODULES_TOTAL, 1)?;
            Ok(module)
        })
    }

    pub fn update_module(
        &self,
        spec: ModuleSpec,
        if_match: &IfMatch,
    ) -> Result<Module, RegistryError> {
        self.write(|t| {
            let key = (spec.device_id.as_str(), spec.module_id.as_str());
            let old: Module = match t.1.get(key)? {
                Some(g) => decode(g.value())?,
                None if exists(&t.0, &spec.device_id)? => {
                    return Err(RegistryError::ModuleNotFound)
                }
                None => return Err(RegistryError::DeviceNotFound),
            };
            if_match.check(&old.etag)?;
            let module = Module {
                etag: next_etag(&mut t.2)?,
                managed_by: spec.managed_by,
                authentication: spec.authentication,
                ..old
            };
            t.1.insert(key, encode(&module).as_slice())?;
            Ok(module)
        })
    }

    pub fn delete_module(
        &self,
        device_id: &str,
        module_id: &str,
        if_match: &IfMatch,
    ) -> Result<(), RegistryError> {
        self.write(|t| {
            let old: Module = match t.1.get((device_id, module_id))? {
                Some(g) => decode(g.value())?,
                None if exists(&t.0, device_id)? => return Err(RegistryError::ModuleNotFound),
                None => return Err(RegistryError::DeviceNotFound),
            };
            if_match.check(&old.etag)?;
            t.1.remove((device_id, module_id))?;
            t.3.remove((device_id, module_id))?;
            bump(&mut t.2, META_MODULES_TOTAL, -1)?;
            Ok(())
        })
    }
}

impl Registry {
    /// Creates or replaces a CA certificate (with `If-Match` when given).
    pub fn put_certificate(
        &self,
        name: &str,
        pem: &str,
        if_match: Option<&IfMatch>,
    ) -> Result<(CaCertificate, bool), RegistryError> {
        let txn = self.db.begin_write()?;
        let result = {
            let mut table = txn.open_table(CERTIFICATES)?;
            let mut meta = txn.open_table(META)?;
            let old: Option<CaCertificate> =
                table.get(name)?.map(|g| decode(g.value())).transpose()?;
            match (&old, if_match) {
                (Some(old), Some(m)) => m.check(&old.etag)?,
                (None, Some(IfMatch::Etag(_))) => return Err(RegistryError::CertificateNotFound),
                _ => {}
            }
            let now = now_rfc3339();
            let certificate = CaCertificate {
                name: name.to_owned(),
                etag: next_etag(&mut meta)?,
                pem: pem.to_owned(),
                created: old
                    .as_ref()
                    .map(|o| o.created.clone())
                    .unwrap_or_else(|| now.clone()),
                updated: now,
            };
            table.insert(name, encode(&certificate).as_slice())?;
            (certificate, old.is_none())
        };
        txn.commit()?;
        Ok(result)
    }

    pub fn certificate(&self, name: &str) -> Result<Option<CaCertificate>, RegistryError> {
        self.record(CERTIFICATES, name)
    }

    pub fn certificates(&self) -> Result<Vec<CaCertificate>, RegistryError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(CERTIFICATES)?;
        let mut all = Vec::new();
        for entry in table.range::<&str>(..)? {
            let (_, value) = entry?;
            all.push(decode(value.value())?);
        }
        Ok(all)
    }

    pub fn delete_certificate(&self, name: &str, if_match: &IfMatch) -> Result<(), RegistryError> {
        let txn = self.db.begin_write()?;
        {
            let mut table = txn.open_table(CERTIFICATES)?;
            let old: CaCertificate = match table.get(name)? {
                Some(g) => decode(g.value())?,
                None => return Err(RegistryError::CertificateNotFound),
            };
            if_match.check(&old.etag)?;
            table.remove(name)?;
        }
        txn.commit()?;
        Ok(())
    }
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Serializing plain records to JSON cannot fail (no maps with non-string keys).
    serde_json::to_vec(value).unwrap_or_default()
}

fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, RegistryError> {
    serde_json::from_slice(bytes).map_err(|e| RegistryError::Corrupt(e.to_string()))
}

fn exists(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    id: &str,
) -> Result<bool, RegistryError> {
    Ok(table.get(id)?.is_some())
}

fn module_count(
    table: &impl ReadableTable<(&'static str, &'static str), &'static [u8]>,
    device_id: &str,
) -> Result<usize, RegistryError> {
    let mut n = 0;
    for entry in table.range((device_id, "")..)? {
        let (key, _) = entry?;
        if key.value().0 != device_id {
            break;
        }
        n += 1;
    }
    Ok(n)
}

fn meta_value(meta: &redb::Table<'_, &'static str, u64>, key: &str) -> Result<u64, RegistryError> {
    Ok(meta.get(key)?.map(|g| g.value()).unwrap_or(0))
}

fn bump(
    meta: &mut redb::Table<'_, &'static str, u64>,
    key: &str,
    delta: i64,
) -> Result<(), RegistryError> {
    let value = meta_value(meta, key)?.saturating_add_signed(delta);
    meta.insert(key, value)?;
    Ok(())
}

/// Etags are base64 of a decimal counter, the form the real hub uses (`MzE4NzUxOTU1`).
fn next_etag(meta: &mut redb::Table<'_, &'static str, u64>) -> Result<String, RegistryError> {
    use base64::Engine as _;
    let n = meta_value(meta, META_ETAG)? + 1;
    meta.insert(META_ETAG, n)?;
    Ok(base64::engine::general_purpose::STANDARD
        .encode(n.to_string())
        .trim_end_matches('=')
        .to_owned())
}

/// Generation ids are .NET ticks (100 ns since 0001-01-01), as the real hub's are, kept strictly
/// increasing so that a re-created device never reuses one.
fn next_generation(meta: &mut redb::Table<'_, &'static str, u64>) -> Result<String, RegistryError> {
    const UNIX_EPOCH_TICKS: u64 = 621_355_968_000_000_000;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() / 100)
        .unwrap_or(0);
    let now = UNIX_EPOCH_TICKS + u64::try_from(now).unwrap_or(u64::MAX - UNIX_EPOCH_TICKS);
    let ticks = now.max(meta_value(meta, META_GENERATION)? + 1);
    meta.insert(META_GENERATION, ticks)?;
    Ok(ticks.to_string())
}

fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

fn put_device(t: &mut Tables<'_>, device: &Device) -> Result<(), RegistryError> {
    t.0.insert(device.device_id.as_str(), encode(device).as_slice())?;
    Ok(())
}

fn create_device(t: &mut Tables<'_>, spec: DeviceSpec) -> Result<Device, RegistryError> {
    if exists(&t.0, &spec.device_id)? {
        return Err(RegistryError::DeviceAlreadyExists);
    }
    let identities = meta_value(&t.2, META_DEVICES_TOTAL)? + meta_value(&t.2, META_MODULES_TOTAL)?;
    if identities >= IDENTITIES_MAX {
        return Err(RegistryError::TooManyIdentities);
    }
    let generation_id = next_generation(&mut t.2)?;
    let device_scope = spec
        .iot_edge
        .then(|| format!("ms-azure-iot-edge://{}-{generation_id}", spec.device_id));
    let device = Device {
        etag: next_etag(&mut t.2)?,
        generation_id,
        status_updated_time: None,
        device_scope,
        device_id: spec.device_id,
        status: spec.status,
        status_reason: spec.status_reason,
        authentication: spec.authentication,
        iot_edge: spec.iot_edge,
        parent_scopes: spec.parent_scopes,
    };
    put_device(t, &device)?;
    bump(&mut t.2, META_DEVICES_TOTAL, 1)?;
    if device.status == Status::Enabled {
        bump(&mut t.2, META_DEVICES_ENABLED, 1)?;
    }
    Ok(device)
}

fn update_device(
    t: &mut Tables<'_>,
    spec: DeviceSpec,
    if_match: &IfMatch,
) -> Result<Device, RegistryError> {
    let old: Device = match t.0.get(spec.device_id.as_str())? {
        Some(g) => decode(g.value())?,
        None => return Err(RegistryError::DeviceNotFound),
    };
    if_match.check(&old.etag)?;
    let status_changed = old.status != spec.status;
    if status_changed {
        bump(
            &mut t.2,
            META_DEVICES_ENABLED,
            if spec.status == Status::Enabled {
                1
            } else {
                -1
            },
        )?;
    }
    let device_scope = match (spec.iot_edge, old.device_scope) {
        (true, Some(scope)) => Some(scope),
        (true, None) => Some(format!(
            "ms-azure-iot-edge://{}-{}",
            spec.device_id, old.generation_id
        )),
        (false, _) => None,
    };
    let device = Device {
        etag: next_etag(&mut t.2)?,
        status_updated_time: if status_changed {
            Some(now_rfc3339())
        } else {
            old.status_updated_time
        },
        device_scope,
        generation_id: old.generation_id,
        device_id: spec.device_id,
        status: spec.status,
        status_reason: spec.status_reason,
        authentication: spec.authentication,
        iot_edge: spec.iot_edge,
        parent_scopes: spec.parent_scopes,
    };
    put_device(t, &device)?;
    Ok(device)
}

fn delete_device(t: &mut Tables<'_>, id: &str, if_match: &IfMatch) -> Result<(), RegistryError> {
    let old: Device = match t.0.get(id)? {
        Some(g) => decode(g.value())?,
        None => return Err(RegistryError::DeviceNotFound),
    };
    if_match.check(&old.etag)?;
    t.0.remove(id)?;
    bump(&mut t.2, META_DEVICES_TOTAL, -1)?;
    if old.status == Status::Enabled {
        bump(&mut t.2, META_DEVICES_ENABLED, -1)?;
    }
    // A device's modules go with it.
    let mut module_ids = Vec::new();
    for entry in t.1.range((id, "")..)? {
        let (key, _) = entry?;
        let (device_id, module_id) = key.value();
        if device_id != id {
            break;
        }
        module_ids.push(module_id.to_owned());
    }
    for module_id in &module_ids {
        t.1.remove((id, module_id.as_str()))?;
    }
    bump(&mut t.2, META_MODULES_TOTAL, -(module_ids.len() as i64))?;
    // And its twins and its C2D queue (a device created again later starts afresh).
    let twin_keys = keys_of_device(&t.3, id)?;
    for module_id in &twin_keys {
        t.3.remove((id, module_id.as_str()))?;
    }
    let lock_tokens = c2d::lock_tokens(&t.4, id)?;
    for lock_token in lock_tokens {
        t.4.remove((id, lock_token))?;
    }
    Ok(())
}

/// The second halves of the keys of `device_id` in a (device, string) table.
fn keys_of_device(
    table: &impl ReadableTable<(&'static str, &'static str), &'static [u8]>,
    device_id: &str,
) -> Result<Vec<String>, RegistryError> {
    let mut keys = Vec::new();
    for entry in table.range((device_id, "")..)? {
        let (key, _) = entry?;
        let (device, second) = key.value();
        if device != device_id {
            break;
        }
        keys.push(second.to_owned());
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(id: &str) -> DeviceSpec {
        DeviceSpec {
            device_id: id.to_owned(),
            status: Status::Enabled,
            status_reason: None,
            authentication: Authentication::Sas {
                primary_key: "a".into(),
                secondary_key: "b".into(),
            },
            iot_edge: false,
            parent_scopes: vec![],
        }
    }

    fn open() -> (tempfile::TempDir, Registry) {
        let dir = tempfile::tempdir().unwrap();
        let registry = Registry::open(&dir.path().join("registry.redb")).unwrap();
        (dir, registry)
    }

    #[test]
    fn create_read_update_delete() {
        let (_dir, r) = open();
        let created = r.create_device(spec("d1")).unwrap();
        assert_eq!(r.device("d1").unwrap(), Some(created.clone()));
        assert!(matches!(
            r.create_device(spec("d1")),
            Err(RegistryError::DeviceAlreadyExists)
        ));

        let mut disabled = spec("d1");
        disabled.status = Status::Disabled;
        let stale = IfMatch::Etag("nope".into());
        assert!(matches!(
            r.update_device(disabled.clone(), &stale),
            Err(RegistryError::PreconditionFailed)
        ));
        let updated = r
            .update_device(disabled, &IfMatch::Etag(created.etag.clone()))
            .unwrap();
        assert_ne!(updated.etag, created.etag);
        assert_eq!(updated.generation_id, created.generation_id);
        assert!(updated.status_updated_time.is_some());

        assert!(matches!(
            r.delete_device("d1", &IfMatch::Etag(created.etag)),
            Err(RegistryError::PreconditionFailed)
        ));
        r.delete_device("d1", &IfMatch::Any).unwrap();
        assert_eq!(r.device("d1").unwrap(), None);
        assert!(matches!(
            r.delete_device("d1", &IfMatch::Any),
            Err(RegistryError::DeviceNotFound)
        ));

        let again = r.create_device(spec("d1")).unwrap();
        assert!(
            again.generation_id > created.generation_id,
            "generation ids are never reused"
        );
    }

    #[test]
    fn statistics_follow_every_change() {
        let (_dir, r) = open();
        for i in 0..5 {
            r.create_device(spec(&format!("d{i}"))).unwrap();
        }
        let mut disabled = spec("d0");
        disabled.status = Status::Disabled;
        r.update_device(disabled, &IfMatch::Any).unwrap();
        r.delete_device("d1", &IfMatch::Any).unwrap();
        let stats = r.statistics().unwrap();
        assert_eq!(stats.total_devices, 4);
        assert_eq!(stats.enabled_devices, 3);
        assert_eq!(r.count_devices().unwrap(), 4);
    }

    #[test]
    fn listing_is_paged_in_id_order() {
        let (_dir, r) = open();
        for i in (0..25).rev() {
            r.create_device(spec(&format!("d{i:02}"))).unwrap();
        }
        let mut seen = Vec::new();
        let mut after = None;
        loop {
            let (page, next) = r.list_devices(after.as_deref(), 10).unwrap();
            assert!(page.len() <= 10);
            seen.extend(page.into_iter().map(|d| d.device_id));
            match next {
                Some(n) => after = Some(n),
                None => break,
            }
        }
        let expected: Vec<String> = (0..25).map(|i| format!("d{i:02}")).collect();
        assert_eq!(seen, expected);
    }

    #[test]
    fn modules_belong_to_their_device() {
        let (_dir, r) = open();
        let module = |d: &str, m: &str| ModuleSpec {
            device_id: d.into(),
            module_id: m.into(),
            managed_by: None,
            authentication: Authentication::None,
        };
        assert!(matches!(
            r.create_module(module("d1", "m1")),
            Err(RegistryError::DeviceNotFound)
        ));
        r.create_device(spec("d1")).unwrap();
        r.create_device(spec("d10")).unwrap();
        r.create_module(module("d1", "m1")).unwrap();
        r.create_module(module("d1", "m2")).unwrap();
        r.create_module(module("d10", "m1")).unwrap();
        assert!(matches!(
            r.create_module(module("d1", "m1")),
            Err(RegistryError::ModuleAlreadyExists)
        ));
        let ids: Vec<_> = r
            .modules("d1")
            .unwrap()
            .into_iter()
            .map(|m| m.module_id)
            .collect();
        assert_eq!(ids, ["m1", "m2"]);
        r.delete_device("d1", &IfMatch::Any).unwrap();
        assert_eq!(r.module("d1", "m1").unwrap(), None);
        assert!(r.module("d10", "m1").unwrap().is_some());
        assert_eq!(r.statistics().unwrap().total_modules, 1);
    }

    #[test]
    fn bulk_commits_the_items_that_succeed() {
        let (_dir, r) = open();
        r.create_device(spec("taken")).unwrap();
        let results = r
            .bulk(vec![
                BulkOp::Create(spec("new")),
                BulkOp::Create(spec("taken")),
                BulkOp::Delete("absent".into(), IfMatch::Any),
                BulkOp::Upsert(spec("taken")),
            ])
            .unwrap();
        assert!(results[0].is_ok());
        assert!(matches!(
            results[1],
            Err(RegistryError::DeviceAlreadyExists)
        ));
        assert!(matches!(results[2], Err(RegistryError::DeviceNotFound)));
        assert!(results[3].is_ok());
        assert!(r.device("new").unwrap().is_some());
        assert_eq!(r.statistics().unwrap().total_devices, 2);
    }

    #[test]
    fn survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("registry.redb");
        let created = Registry::open(&path)
            .unwrap()
            .create_device(spec("d1"))
            .unwrap();
        let reopened = Registry::open(&path).unwrap();
        assert_eq!(reopened.device("d1").unwrap(), Some(created));
    }
}
