//! The registry as the data plane sees it: the engine's `IdentityLookup`, answered from redb
//! (one MVCC read transaction per CONNECT, never per message) and the policy file.

use std::sync::Arc;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;

use ingot_engine::auth::device::{Credential, IdentityLookup, Secret};

use crate::policy::{Permission, Policies};
use crate::registry::{Authentication, Registry, Status};

#[derive(Debug)]
pub struct RegistryIdentities {
    pub registry: Arc<Registry>,
    pub policies: Policies,
}

fn secret(auth: &Authentication) -> Secret {
    match auth {
        Authentication::Sas {
            primary_key,
            secondary_key,
        } => Secret::Sas {
            keys: [primary_key, secondary_key]
                .iter()
                .filter_map(|k| BASE64.decode(k).ok())
                .collect(),
        },
        Authentication::SelfSigned {
            primary_thumbprint,
            secondary_thumbprint,
        } => Secret::SelfSigned {
            thumbprints: std::iter::once(primary_thumbprint)
                .chain(secondary_thumbprint)
                .cloned()
                .collect(),
        },
        Authentication::CertificateAuthority => Secret::CertificateAuthority,
        Authentication::None => Secret::None,
    }
}

impl IdentityLookup for RegistryIdentities {
    fn credential(&self, device_id: &str, module_id: Option<&str>) -> Option<Credential> {
        let device = match self.registry.device(device_id) {
            Ok(device) => device?,
            Err(e) => {
                tracing::error!("failed to read the registry at CONNECT: {e}");
                return None;
            }
        };
        let enabled = device.status == Status::Enabled;
        match module_id {
            None => Some(Credential {
                enabled,
                generation_id: device.generation_id,
                secret: secret(&device.authentication),
            }),
            // A module connects only while its device is enabled.
            Some(module_id) => match self.registry.module(device_id, module_id) {
                Ok(module) => module.map(|m| Credential {
                    enabled,
                    generation_id: m.generation_id,
                    secret: secret(&m.authentication),
                }),
                Err(e) => {
                    tracing::error!("failed to read the registry at CONNECT: {e}");
                    None
                }
            },
        }
    }

    fn certificate_authorities(&self) -> Vec<Vec<u8>> {
        match self.registry.certificates() {
            Ok(certificates) => crate::api::authorities_der(&certificates),
            Err(e) => {
                tracing::error!("failed to read the CA certificates at CONNECT: {e}");
                Vec::new()
            }
        }
    }

    fn device_connect_policy(&self, policy: &str) -> Option<Vec<Vec<u8>>> {
        let policy = self.policies.find(policy)?;
        policy
            .grants(Permission::DeviceConnect)
            .then(|| policy.keys())
    }
}
