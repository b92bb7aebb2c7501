//! Shared access policies: named key pairs with permissions, as in Azure IoT Hub.
//!
//! The first start creates Azure's five default policies with random keys in
//! `data_dir/policies.json` (mode 0600). The file is read by the hub at start-up and by a local
//! `ingot connection-string`, which is why it lives outside the registry database (the running
//! hub holds that database's lock).

use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use rand::RngCore;
use serde::{Deserialize, Serialize};

use crate::fsutil;

/// The permissions a policy grants (azure-protocol.md 1.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permission {
    RegistryRead,
    RegistryWrite,
    ServiceConnect,
    DeviceConnect,
}

impl Permission {
    const ALL: [Permission; 4] = [
        Permission::RegistryRead,
        Permission::RegistryWrite,
        Permission::ServiceConnect,
        Permission::DeviceConnect,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Permission::RegistryRead => "RegistryRead",
            Permission::RegistryWrite => "RegistryWrite",
            Permission::ServiceConnect => "ServiceConnect",
            Permission::DeviceConnect => "DeviceConnect",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Policy {
    pub key_name: String,
    pub primary_key: String,
    pub secondary_key: String,
    /// Azure's form: permission names separated by commas, `"RegistryRead, RegistryWrite"`.
    pub rights: String,
}

impl Policy {
    /// RegistryWrite implies RegistryRead, as in Azure.
    pub fn grants(&self, wanted: Permission) -> bool {
        let has = |p: Permission| self.rights.split(',').any(|r| r.trim() == p.name());
        has(wanted) || (wanted == Permission::RegistryRead && has(Permission::RegistryWrite))
    }

    /// The decoded keys, primary first. A key that is not base64 is skipped (it can never
    /// verify a token); `load` refuses such files anyway.
    pub fn keys(&self) -> Vec<Vec<u8>> {
        [&self.primary_key, &self.secondary_key]
            .into_iter()
            .filter_map(|k| BASE64.decode(k).ok())
            .collect()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("failed to {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a valid policy file: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

#[derive(Debug, Clone)]
pub struct Policies {
    policies: Vec<Policy>,
}

pub fn policies_path(data_dir: &Path) -> PathBuf {
    data_dir.join("policies.json")
}

impl Policies {
    /// Reads the policy file, creating the default policies on first start.
    pub fn load_or_create(data_dir: &Path) -> Result<Self, PolicyError> {
        let path = policies_path(data_dir);
        if !path.exists() {
            let policies = Self::defaults();
            let json = serde_json::to_vec_pretty(&policies.policies).unwrap_or_default();
            fsutil::write_atomic(&path, &json, true).map_err(|source| PolicyError::Io {
                action: "write",
                path: path.clone(),
                source,
            })?;
            tracing::info!(path = %path.display(), "created the default shared access policies");
            return Ok(policies);
        }
        Self::load(data_dir)
    }

    pub fn load(data_dir: &Path) -> Result<Self, PolicyError> {
        let path = policies_path(data_dir);
        let bytes = std::fs::read(&path).map_err(|source| PolicyError::Io {
            action: "read",
            path: path.clone(),
            source,
        })?;
        let invalid = |reason: String| PolicyError::Invalid {
            path: path.clone(),
            reason,
        };
        let policies: Vec<Policy> =
            serde_json::from_slice(&bytes).map_err(|e| invalid(e.to_string()))?;
        for policy in &policies {
            if policy.keys().len() != 2 {
                return Err(invalid(format!(
                    "policy {} has a key that is not base64",
                    policy.key_name
                )));
            }
            for right in policy.rights.split(',').map(str::trim) {
                if !Permission::ALL.iter().any(|p| p.name() == right) {
                    return Err(invalid(format!("unknown right {right:?}")));
                }
            }
        }
        Ok(Self { policies })
    }

    fn defaults() -> Self {
        let all = "RegistryRead, RegistryWrite, ServiceConnect, DeviceConnect";
        let defaults = [
            ("iothubowner", all),
            ("service", "ServiceConnect"),
            ("device", "DeviceConnect"),
            ("registryRead", "RegistryRead"),
            ("registryReadWrite", "RegistryRead, RegistryWrite"),
        ];
        let policies = defaults
            .into_iter()
            .map(|(name, rights)| Policy {
                key_name: name.to_owned(),
                primary_key: random_key(),
                secondary_key: random_key(),
                rights: rights.to_owned(),
            })
            .collect();
        Self { policies }
    }

    pub fn find(&self, name: &str) -> Option<&Policy> {
        self.policies.iter().find(|p| p.key_name == name)
    }
}

/// A new symmetric key: 32 random bytes in base64, like the keys Azure generates.
pub fn random_key() -> String {
    let mut bytes = [0u8; ingot_engine::limits::SYMMETRIC_KEY_BYTES_GENERATED];
    rand::thread_rng().fill_bytes(&mut bytes);
    BASE64.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_created_once_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let first = Policies::load_or_create(dir.path()).unwrap();
        let again = Policies::load_or_create(dir.path()).unwrap();
        let owner = first.find("iothubowner").unwrap();
        assert_eq!(
            owner.primary_key,
            again.find("iothubowner").unwrap().primary_key
        );
        assert_ne!(owner.primary_key, owner.secondary_key);
        assert_eq!(BASE64.decode(&owner.primary_key).unwrap().len(), 32);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(policies_path(dir.path()))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn rights_match_azure_defaults() {
        let policies = Policies::defaults();
        let grants = |name: &str, p| policies.find(name).unwrap().grants(p);
        assert!(grants("iothubowner", Permission::RegistryWrite));
        assert!(grants("iothubowner", Permission::DeviceConnect));
        assert!(grants("registryReadWrite", Permission::RegistryRead));
        assert!(grants("registryRead", Permission::RegistryRead));
        assert!(!grants("registryRead", Permission::RegistryWrite));
        assert!(!grants("service", Permission::RegistryRead));
        assert!(grants("service", Permission::ServiceConnect));
        assert!(!grants("device", Permission::ServiceConnect));
        assert!(policies.find("nobody").is_none());
    }

    #[test]
    fn refuses_a_broken_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = policies_path(dir.path());
        std::fs::write(
            &path,
            r#"[{"keyName":"x","primaryKey":"!","secondaryKey":"AA==","rights":"RegistryRead"}]"#,
        )
        .unwrap();
        assert!(Policies::load(dir.path()).is_err());
        std::fs::write(
            &path,
            r#"[{"keyName":"x","primaryKey":"AA==","secondaryKey":"AA==","rights":"Everything"}]"#,
        )
        .unwrap();
        assert!(Policies::load(dir.path()).is_err());
    }
}
