//! Who the simulated devices are: their MQTT client ids, usernames, passwords and topics.
//!
//! For Ingot the devices are registered through the registry API in bulk (100 per request, the
//! API's limit), each with a symmetric key derived from its id, so that the generator can sign
//! its SAS token without reading every device back (one request per 100 devices instead of one
//! per device). `createOrUpdate` makes a rerun against the same hub reuse its devices. The keys
//! are predictable: this is for load tests, never for a hub that holds real devices.

use std::path::PathBuf;

use anyhow::{bail, Context as _};
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use ingot_control_plane::client::{ServiceClient, ServiceConnectionString};
use ingot_control_plane::local;

use crate::cli::{Target, TargetArgs};
use crate::template::expand;

/// Bulk registry requests take at most this many devices.
const BULK_DEVICES_MAX: usize = 100;
/// Device tokens outlive any run.
const TOKEN_TTL_SECS: u64 = 24 * 3600;

/// One simulated device's MQTT identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    pub client_id: String,
    pub username: Option<String>,
    pub password: Option<String>,
    pub topic: String,
}

/// The devices of a run and how to reach the broker over TLS.
#[derive(Debug)]
pub struct Fleet {
    pub devices: Vec<Device>,
    /// The TLS server name to present (SNI) and verify.
    pub server_name: String,
    /// The CA to trust for TLS.
    pub ca: Option<PathBuf>,
}

/// Prepares the fleet of `args`: templates for `--target mqtt`, registry devices for ingot.
pub fn prepare(args: &TargetArgs) -> anyhow::Result<Fleet> {
    match args.target {
        Target::Mqtt => Ok(Fleet {
            devices: mqtt_devices(args),
            server_name: args
                .server_name
                .clone()
                .unwrap_or_else(|| "localhost".to_owned()),
            ca: args.ca.clone(),
        }),
        Target::Ingot => ingot_devices(args),
    }
}

/// Devices from the client id, username, password and topic templates.
pub fn mqtt_devices(args: &TargetArgs) -> Vec<Device> {
    (0..args.devices)
        .map(|i| Device {
            client_id: expand(&args.client_id, i),
            username: args.username.as_deref().map(|t| expand(t, i)),
            password: args.password.as_deref().map(|t| expand(t, i)),
            topic: expand(&args.topic, i),
        })
        .collect()
}

/// The device id of index `i`.
pub fn device_id(prefix: &str, i: usize) -> String {
    format!("{prefix}{i}")
}

/// The symmetric key a load device gets: 32 bytes derived from its id, so that the generator
/// knows it without asking the registry.
pub fn device_key(id: &str) -> [u8; 32] {
    let mut key = *b"ingot-load-device-key-0123456789";
    for (k, (byte, salt)) in key
        .iter_mut()
        .zip(id.bytes().cycle().zip((0u8..).step_by(7)))
    {
        *k ^= byte.rotate_left(u32::from(salt % 8)) ^ salt;
    }
    key
}

fn ingot_devices(args: &TargetArgs) -> anyhow::Result<Fleet> {
    let connection_string = match (&args.connection_string, &args.data_dir) {
        (Some(cs), _) => cs.clone(),
        (None, Some(dir)) => local::service_connection_string(dir, "iothubowner")?,
        (None, None) => bail!("--target ingot needs --data-dir or --connection-string"),
    };
    let connection: ServiceConnectionString = connection_string.parse()?;
    let ca = args
        .ca
        .clone()
        .or_else(|| args.data_dir.as_deref().and_then(local::dev_ca));
    let hostname = connection.hostname().to_owned();
    let client = ServiceClient::new(connection, ca.as_deref())?;

    let ids: Vec<String> = (0..args.devices)
        .map(|i| device_id(&args.device_prefix, i))
        .collect();
    for chunk in ids.chunks(BULK_DEVICES_MAX) {
        let body: Vec<serde_json::Value> = chunk
            .iter()
            .map(|id| {
                let key = BASE64.encode(device_key(id));
                serde_json::json!({
                    "id": id,
                    "importMode": "createOrUpdate",
                    "authentication": {
                        "type": "sas",
                        "symmetricKey": { "primaryKey": key, "secondaryKey": key },
                    },
                })
            })
            .collect();
        client
            .request(
                hyper::Method::POST,
                "/devices",
                &[],
                Some(&serde_json::Value::Array(body)),
            )
            .context("create devices in bulk")?
            .success()
            .context("create devices in bulk")?;
    }

    let expiry = unix_now_secs().saturating_add(TOKEN_TTL_SECS);
    let devices = ids
        .iter()
        .map(|id| {
            let token = ingot_engine::auth::sas::generate(
                &format!("{hostname}/devices/{id}"),
                &device_key(id),
                expiry,
                None,
            );
            Device {
                client_id: id.clone(),
                username: Some(format!("{hostname}/{id}/?api-version=2021-04-12")),
                password: Some(token),
                topic: format!(
                    "devices/{id}/messages/events/{}",
                    args.properties.as_deref().unwrap_or_default()
                ),
            }
        })
        .collect();
    Ok(Fleet {
        devices,
        server_name: args.server_name.clone().unwrap_or(hostname),
        ca,
    })
}

fn unix_now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_keys_differ_per_device_and_are_stable() {
        assert_eq!(device_key("load-1"), device_key("load-1"));
        assert_ne!(device_key("load-1"), device_key("load-2"));
        assert_ne!(device_key("load-1"), device_key("load-10"));
        assert_eq!(device_id("load-", 12), "load-12");
    }
}
