//! Who the simulated devices are: their MQTT client ids, usernames, passwords and topics.
//!
//! For Ingot there are two sources. By default the devices are registered through the registry
//! API in bulk (100 per request, the API's limit), each with a symmetric key derived from its
//! id, so that the generator can sign its SAS token without reading every device back (one
//! request per 100 devices instead of one per device). `createOrUpdate` makes a rerun against
//! the same hub reuse its devices. Those keys are predictable: for test hubs only.
//!
//! The other source is a prepared fleet file (`--fleet`): device ids and primary keys, one
//! device a line, as `ingot-load fleet create` writes it (random keys, registered in bulk) or as
//! any other tool exports it. Then the run does no registry request at all, so a fleet of
//! 100 000 devices is registered once and reused by every run, and the hub can be one whose
//! registry the generator may not write.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use ingot_control_plane::client::{ServiceClient, ServiceConnectionString};
use ingot_control_plane::local;

use crate::cli::{FleetCommand, FleetCreateArgs, FleetFormat, Target, TargetArgs};
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

/// Prepares the fleet of `args`: templates for `--target mqtt`, a fleet file or registry
/// devices for ingot. `count` is how many devices; `None` means all of the `--fleet` file.
pub fn prepare(args: &TargetArgs, count: Option<usize>) -> anyhow::Result<Fleet> {
    match args.target {
        Target::Mqtt => {
            if args.fleet.is_some() {
                bail!("--fleet holds SAS devices of an Ingot hub: use it with --target ingot");
            }
            let Some(count) = count else {
                bail!("--devices max needs --fleet (all of its devices)");
            };
            Ok(Fleet {
                devices: mqtt_devices(args, count),
                server_name: args
                    .server_name
                    .clone()
                    .unwrap_or_else(|| "localhost".to_owned()),
                ca: args.ca.clone(),
            })
        }
        Target::Ingot => match &args.fleet {
            Some(path) => file_devices(args, path, count),
            None => match count {
                Some(count) => ingot_devices(args, count),
                None => bail!("--devices max needs --fleet (all of its devices)"),
            },
        },
    }
}

/// Devices from the client id, username, password and topic templates.
pub fn mqtt_devices(args: &TargetArgs, count: usize) -> Vec<Device> {
    (0..count)
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

/// The registry of the hub `args` names (`--connection-string` or `--data-dir`), the host name
/// devices use, and the CA to trust.
fn registry(
    connection_string: Option<&str>,
    data_dir: Option<&Path>,
    ca: Option<&Path>,
) -> anyhow::Result<(ServiceClient, String, Option<PathBuf>)> {
    let connection_string = match (connection_string, data_dir) {
        (Some(cs), _) => cs.to_owned(),
        (None, Some(dir)) => local::service_connection_string(dir, "iothubowner")?,
        (None, None) => bail!("--target ingot needs --data-dir or --connection-string"),
    };
    let connection: ServiceConnectionString = connection_string.parse()?;
    let ca = ca
        .map(Path::to_path_buf)
        .or_else(|| data_dir.and_then(local::dev_ca));
    let hostname = connection.hostname().to_owned();
    let client = ServiceClient::new(connection, ca.as_deref())?;
    Ok((client, hostname, ca))
}

/// Creates (or updates) SAS devices with the given base64 primary keys, 100 per request.
fn register_bulk(client: &ServiceClient, devices: &[(String, String)]) -> anyhow::Result<()> {
    for chunk in devices.chunks(BULK_DEVICES_MAX) {
        let body: Vec<serde_json::Value> = chunk
            .iter()
            .map(|(id, key)| {
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
    Ok(())
}

/// The MQTT identity of SAS device `id` of hub `hostname`.
fn sas_device(hostname: &str, id: &str, key: &[u8], properties: Option<&str>) -> Device {
    let expiry = unix_now_secs().saturating_add(TOKEN_TTL_SECS);
    let token =
        ingot_engine::auth::sas::generate(&format!("{hostname}/devices/{id}"), key, expiry, None);
    Device {
        client_id: id.to_owned(),
        username: Some(format!("{hostname}/{id}/?api-version=2021-04-12")),
        password: Some(token),
        topic: format!(
            "devices/{id}/messages/events/{}",
            properties.unwrap_or_default()
        ),
    }
}

fn ingot_devices(args: &TargetArgs, count: usize) -> anyhow::Result<Fleet> {
    let (client, hostname, ca) = registry(
        args.connection_string.as_deref(),
        args.data_dir.as_deref(),
        args.ca.as_deref(),
    )?;
    let devices: Vec<(String, String)> = (0..count)
        .map(|i| {
            let id = device_id(&args.device_prefix, i);
            let key = BASE64.encode(device_key(&id));
            (id, key)
        })
        .collect();
    register_bulk(&client, &devices)?;
    let devices = devices
        .iter()
        .map(|(id, _)| sas_device(&hostname, id, &device_key(id), args.properties.as_deref()))
        .collect();
    Ok(Fleet {
        devices,
        server_name: args.server_name.clone().unwrap_or(hostname),
        ca,
    })
}

/// One line of a fleet file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetEntry {
    pub device_id: String,
    /// Base64, as the registry shows it.
    pub primary_key: String,
    /// The hub's host name, as devices use it in their SAS tokens.
    pub host_name: Option<String>,
}

/// Parses a fleet file: JSON lines (`{"deviceId", "primaryKey", "hostName"?}`) or CSV
/// (`deviceId,primaryKey[,hostName]`, an optional header line starting with `deviceId`).
/// Blank lines and lines starting with `#` are skipped.
pub fn parse_fleet(text: &str) -> anyhow::Result<Vec<FleetEntry>> {
    let mut entries = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with("deviceId,") {
            continue;
        }
        let entry = if line.starts_with('{') {
            let value: serde_json::Value =
                serde_json::from_str(line).with_context(|| format!("line {}", n + 1))?;
            let field = |name: &str| value.get(name).and_then(|v| v.as_str()).map(str::to_owned);
            FleetEntry {
                device_id: field("deviceId")
                    .with_context(|| format!("line {}: no deviceId", n + 1))?,
                primary_key: field("primaryKey")
                    .with_context(|| format!("line {}: no primaryKey", n + 1))?,
                host_name: field("hostName"),
            }
        } else {
            let mut fields = line.split(',').map(str::trim);
            let (Some(id), Some(key)) = (fields.next(), fields.next()) else {
                bail!("line {}: expected deviceId,primaryKey[,hostName]", n + 1);
            };
            FleetEntry {
                device_id: id.to_owned(),
                primary_key: key.to_owned(),
                host_name: fields.next().filter(|h| !h.is_empty()).map(str::to_owned),
            }
        };
        if entry.device_id.is_empty() {
            bail!("line {}: empty deviceId", n + 1);
        }
        BASE64
            .decode(&entry.primary_key)
            .with_context(|| format!("line {}: the primaryKey is not base64", n + 1))?;
        entries.push(entry);
    }
    Ok(entries)
}

/// The fleet file as text.
pub fn format_fleet(entries: &[FleetEntry], format: FleetFormat) -> String {
    let mut out = String::new();
    if format == FleetFormat::Csv {
        out.push_str("deviceId,primaryKey,hostName\n");
    }
    for e in entries {
        match format {
            FleetFormat::Jsonl => {
                let mut line = serde_json::json!({
                    "deviceId": e.device_id,
                    "primaryKey": e.primary_key,
                });
                if let (Some(host), Some(map)) = (&e.host_name, line.as_object_mut()) {
                    map.insert("hostName".to_owned(), host.clone().into());
                }
                out.push_str(&line.to_string());
            }
            FleetFormat::Csv => {
                out.push_str(&e.device_id);
                out.push(',');
                out.push_str(&e.primary_key);
                out.push(',');
                out.push_str(e.host_name.as_deref().unwrap_or_default());
            }
        }
        out.push('\n');
    }
    out
}

fn file_devices(args: &TargetArgs, path: &Path, count: Option<usize>) -> anyhow::Result<Fleet> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    let mut entries = parse_fleet(&text).with_context(|| format!("parse {}", path.display()))?;
    if let Some(count) = count {
        if entries.len() < count {
            bail!(
                "{} holds {} devices, fewer than --devices {count}",
                path.display(),
                entries.len()
            );
        }
        entries.truncate(count);
    }
    if entries.is_empty() {
        bail!("{} holds no device", path.display());
    }
    // The host name comes from the file; without one there, from the hub's connection string
    // or data directory (read locally: no registry request).
    let fallback_host = if entries.iter().any(|e| e.host_name.is_none()) {
        let connection_string = match (&args.connection_string, &args.data_dir) {
            (Some(cs), _) => cs.clone(),
            (None, Some(dir)) => local::service_connection_string(dir, "iothubowner")?,
            (None, None) => bail!(
                "{} has lines without hostName: pass --data-dir or --connection-string",
                path.display()
            ),
        };
        let connection: ServiceConnectionString = connection_string.parse()?;
        Some(connection.hostname().to_owned())
    } else {
        None
    };
    let mut devices = Vec::with_capacity(entries.len());
    let mut first_host = None;
    for e in &entries {
        let host = e
            .host_name
            .as_deref()
            .or(fallback_host.as_deref())
            .unwrap_or_default();
        first_host.get_or_insert_with(|| host.to_owned());
        // parse_fleet checked that every key decodes.
        let key = BASE64.decode(&e.primary_key).unwrap_or_default();
        devices.push(sas_device(
            host,
            &e.device_id,
            &key,
            args.properties.as_deref(),
        ));
    }
    let ca = args
        .ca
        .clone()
        .or_else(|| args.data_dir.as_deref().and_then(local::dev_ca));
    Ok(Fleet {
        devices,
        server_name: args
            .server_name
            .clone()
            .or(first_host)
            .unwrap_or_else(|| "localhost".to_owned()),
        ca,
    })
}

/// `ingot-load fleet ...`.
pub fn fleet_command(args: &crate::cli::FleetArgs) -> anyhow::Result<()> {
    match &args.command {
        FleetCommand::Create(create) => create_fleet(create),
    }
}

/// `ingot-load fleet create`: random keys, registered in bulk, written to `--out`.
fn create_fleet(args: &FleetCreateArgs) -> anyhow::Result<()> {
    if args.devices == 0 {
        bail!("--devices must be at least 1");
    }
    let format = args.format.unwrap_or_else(|| {
        if args.out.extension().is_some_and(|e| e == "csv") {
            FleetFormat::Csv
        } else {
            FleetFormat::Jsonl
        }
    });
    let (client, hostname, _) = registry(
        args.connection_string.as_deref(),
        args.data_dir.as_deref(),
        args.ca.as_deref(),
    )?;
    let mut random = std::fs::File::open("/dev/urandom").context("open /dev/urandom")?;
    let mut keys = vec![0u8; 32 * args.devices];
    std::io::Read::read_exact(&mut random, &mut keys).context("read /dev/urandom")?;
    let entries: Vec<FleetEntry> = keys
        .chunks_exact(32)
        .enumerate()
        .map(|(i, key)| FleetEntry {
            device_id: device_id(&args.device_prefix, i),
            primary_key: BASE64.encode(key),
            host_name: Some(hostname.clone()),
        })
        .collect();
    let started = std::time::Instant::now();
    let pairs: Vec<(String, String)> = entries
        .iter()
        .map(|e| (e.device_id.clone(), e.primary_key.clone()))
        .collect();
    register_bulk(&client, &pairs)?;
    let secs = started.elapsed().as_secs_f64();
    // Written only after the registry has every device, so a file never names a device that
    // does not exist.
    let mut file = std::fs::File::create(&args.out)
        .with_context(|| format!("create {}", args.out.display()))?;
    file.write_all(format_fleet(&entries, format).as_bytes())
        .with_context(|| format!("write {}", args.out.display()))?;
    println!(
        "{} devices registered in {secs:.1} s ({:.0}/s), written to {}",
        entries.len(),
        entries.len() as f64 / secs.max(1e-9),
        args.out.display()
    );
    Ok(())
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

    #[test]
    fn fleet_files_round_trip_in_both_formats() {
        let entries = vec![
            FleetEntry {
                device_id: "a-0".into(),
                primary_key: BASE64.encode([1u8; 32]),
                host_name: Some("hub.example".into()),
            },
            FleetEntry {
                device_id: "a-1".into(),
                primary_key: BASE64.encode([2u8; 32]),
                host_name: None,
            },
        ];
        for format in [FleetFormat::Jsonl, FleetFormat::Csv] {
            let text = format_fleet(&entries, format);
            assert_eq!(parse_fleet(&text).ok().as_ref(), Some(&entries), "{text}");
        }
        let csv = "# exported\ndev1, AAAA\n\ndev2,BBBB,hub\n";
        let parsed = parse_fleet(csv).unwrap_or_default();
        assert_eq!(parsed.len(), 2);
        assert_eq!(parsed[1].host_name.as_deref(), Some("hub"));
        assert!(parse_fleet("dev1\n").is_err(), "no key");
        assert!(parse_fleet("dev1,not base64!\n").is_err());
        assert!(
            parse_fleet("{\"deviceId\":\"x\"}\n").is_err(),
            "no primaryKey"
        );
    }
}
