//! What a local `ingot` command learns from a hub's data directory: the host name and HTTPS
//! port the hub last started with (`hub.json`), its policies and its development CA. This is
//! how `ingot device create d1` works next to `ingot serve` with no flags at all.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::service_host;
use crate::fsutil;
use crate::policy::Policies;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HubInfo {
    pub hostname: String,
    pub https_port: u16,
}

pub fn hub_info_path(data_dir: &Path) -> PathBuf {
    data_dir.join("hub.json")
}

impl HubInfo {
    pub fn write(&self, data_dir: &Path) -> std::io::Result<()> {
        let json = serde_json::to_vec_pretty(self).unwrap_or_default();
        fsutil::write_atomic(&hub_info_path(data_dir), &json, false)
    }

    pub fn read(data_dir: &Path) -> anyhow::Result<Self> {
        let path = hub_info_path(data_dir);
        let bytes = std::fs::read(&path).map_err(|e| {
            anyhow::anyhow!(
                "no hub has run with data directory {} ({}: {e}); start one with `ingot serve` \
                 or pass --connection-string",
                data_dir.display(),
                path.display()
            )
        })?;
        Ok(serde_json::from_slice(&bytes)?)
    }

    pub fn service_host(&self) -> String {
        service_host(&self.hostname, self.https_port)
    }
}

/// The service connection string of `policy` for the hub that uses `data_dir`.
pub fn service_connection_string(data_dir: &Path, policy: &str) -> anyhow::Result<String> {
    let info = HubInfo::read(data_dir)?;
    let policies = Policies::load(data_dir)?;
    let policy = policies
        .find(policy)
        .ok_or_else(|| anyhow::anyhow!("the hub has no shared access policy named {policy:?}"))?;
    Ok(format!(
        "HostName={};SharedAccessKeyName={};SharedAccessKey={}",
        info.service_host(),
        policy.key_name,
        policy.primary_key
    ))
}

/// The development CA of a local hub, when it made one.
pub fn dev_ca(data_dir: &Path) -> Option<PathBuf> {
    let path = crate::tls::tls_dir(data_dir).join("ca.pem");
    path.is_file().then_some(path)
}
