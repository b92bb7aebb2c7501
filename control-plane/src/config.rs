//! The hub's settings: embedded defaults, an optional TOML file, `INGOT_*` environment variables
//! and command-line flags, merged in that order (later wins) and validated once at start-up.
//!
//! Every setting has a default, so `ingot serve` runs with no configuration at all. A bad
//! setting is a clear error naming the key, never a panic.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use figment::providers::{Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where the registry, keys, certificates (and later the segment store) live.
    pub data_dir: PathBuf,
    /// The hub's host name: the `HostName` of connection strings, the audience of SAS tokens,
    /// and a name in the development server certificate.
    pub hostname: String,
    /// The address every listener binds.
    pub listen_address: IpAddr,
    /// The HTTPS control plane (the Azure service REST API).
    pub https_port: u16,
    /// MQTT over TLS, where the device SDKs connect; 0 turns it off.
    pub mqtt_tls_port: u16,
    /// Plain MQTT, for benchmarks and trusted networks (SAS still required); 0 turns it off.
    pub mqtt_port: u16,
    /// Data-plane shards, one pinned executor per core; 0 means one per core.
    pub shards: usize,
    pub tls: TlsConfig,
    pub http: HttpConfig,
    pub mqtt: MqttConfig,
    pub store: StoreSettings,
    pub c2d: C2dConfig,
    pub routing: RoutingConfig,
    pub log: LogConfig,
}

/// Message routing (Azure's `routing` of a hub: endpoints, routes, the fallback route).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RoutingConfig {
    /// Device messages that no route matched go to the built-in `events` endpoint.
    pub fallback: bool,
    pub endpoints: Vec<EndpointConfig>,
    pub routes: Vec<RouteConfig>,
    /// Application properties added to the messages delivered to chosen endpoints.
    pub enrichments: Vec<EnrichmentConfig>,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        Self {
            fallback: true,
            endpoints: Vec::new(),
            routes: Vec::new(),
            enrichments: Vec::new(),
        }
    }
}

/// A message enrichment, with Azure's field names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EnrichmentConfig {
    /// The application property's name.
    pub key: String,
    /// A static string, `$iothubname`, or `$twin.tags.*`, `$twin.properties.desired.*`,
    /// `$twin.properties.reported.*`.
    pub value: String,
    /// The endpoints (custom names or `events`) whose messages get the property.
    pub endpoint_names: Vec<String>,
}

/// A custom endpoint. Every kind is a segment log beside `events` in `data_dir/endpoints/NAME`
/// that ingest appends to; `files` and `webhook` endpoints also have a delivery worker that reads
/// that log, delivers what it reads and checkpoints its progress (`control-plane/src/delivery`).
/// Field names are camelCase, as Azure's (`fileNameFormat`, `batchFrequencyInSeconds`, ...);
/// the fields of one kind are refused on another.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EndpointConfig {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: EndpointKind,
    /// `files`: the directory the files are written under (Azure's storage container).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<std::path::PathBuf>,
    /// `files`: the name of each file below `path`; Azure's default
    /// `{iothub}/{partition}/{YYYY}/{MM}/{DD}/{HH}/{mm}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_name_format: Option<String>,
    /// `files`: a file is closed when it is this old (Azure: 60 to 720 s, default 300).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_frequency_in_seconds: Option<u32>,
    /// `files`: or when it reaches this size (Azure: 100 to 500 MiB, default 300 MiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_chunk_size_in_bytes: Option<u64>,
    /// `webhook`: where batches are POSTed (`http://` or `https://`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// `webhook`: messages per POST.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_batch_size: Option<u32>,
    /// `webhook`: attempts at one batch before it is dead-lettered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_delivery_attempts: Option<u32>,
    /// `webhook`: the first retry's delay; each next one doubles, up to `maxBackoffMs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_backoff_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_backoff_ms: Option<u64>,
    /// `webhook`: time allowed for one POST.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// `webhook`: a PEM file of CA certificates to trust for `https://`, besides the system's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EndpointKind {
    /// A segment log only: back ends read it like `events`.
    Log,
    /// JSON-lines files rolled by size and time (Azure's storage container endpoint).
    Files,
    /// HTTP POSTs of JSON batches, retried with backoff, dead-lettered when they keep failing.
    Webhook,
}

impl EndpointConfig {
    /// A `log` endpoint (no other fields).
    pub fn log(name: &str) -> EndpointConfig {
        EndpointConfig {
            name: name.to_owned(),
            kind: EndpointKind::Log,
            path: None,
            file_name_format: None,
            batch_frequency_in_seconds: None,
            max_chunk_size_in_bytes: None,
            url: None,
            max_batch_size: None,
            max_delivery_attempts: None,
            initial_backoff_ms: None,
            max_backoff_ms: None,
            timeout_ms: None,
            ca_file: None,
        }
    }
}

/// Tokens a `files` endpoint's `fileNameFormat` must contain (Azure requires all of them, in any
/// order).
pub const FILE_NAME_TOKENS: [&str; 7] = [
    "{iothub}",
    "{partition}",
    "{YYYY}",
    "{MM}",
    "{DD}",
    "{HH}",
    "{mm}",
];
/// Azure's default `fileNameFormat`.
pub const FILE_NAME_FORMAT_DEFAULT: &str = "{iothub}/{partition}/{YYYY}/{MM}/{DD}/{HH}/{mm}";
/// `batchFrequencyInSeconds`: Azure allows 60 to 720; Ingot allows down to 1 (fast rolls for
/// tests and small deployments).
pub const BATCH_FREQUENCY_SECS_DEFAULT: u32 = 300;
pub const BATCH_FREQUENCY_SECS_RANGE: std::ops::RangeInclusive<u32> = 1..=720;
/// `maxChunkSizeInBytes`: Azure allows 100 to 500 MiB; Ingot allows down to 1 KiB.
pub const MAX_CHUNK_BYTES_DEFAULT: u64 = 300 << 20;
pub const MAX_CHUNK_BYTES_RANGE: std::ops::RangeInclusive<u64> = 1024..=(500 << 20);
/// `maxBatchSize` of a webhook: messages per POST.
pub const WEBHOOK_BATCH_DEFAULT: u32 = 100;
pub const WEBHOOK_BATCH_RANGE: std::ops::RangeInclusive<u32> = 1..=1000;
/// `maxDeliveryAttempts` of a webhook batch before it is dead-lettered.
pub const WEBHOOK_ATTEMPTS_DEFAULT: u32 = 10;
pub const WEBHOOK_ATTEMPTS_RANGE: std::ops::RangeInclusive<u32> = 1..=100;
/// `initialBackoffMs` and `maxBackoffMs` (1 ms to 1 hour; the maximum at least the initial).
pub const WEBHOOK_INITIAL_BACKOFF_MS_DEFAULT: u64 = 1000;
pub const WEBHOOK_MAX_BACKOFF_MS_DEFAULT: u64 = 60_000;
pub const WEBHOOK_BACKOFF_MS_RANGE: std::ops::RangeInclusive<u64> = 1..=3_600_000;
/// `timeoutMs` of one POST (connect, send, response).
pub const WEBHOOK_TIMEOUT_MS_DEFAULT: u64 = 30_000;
pub const WEBHOOK_TIMEOUT_MS_RANGE: std::ops::RangeInclusive<u64> = 10..=300_000;

impl EndpointConfig {
    /// Checks the fields of the endpoint's kind (ranges, the `files` name tokens, the webhook
    /// URL) and refuses the fields of the other kinds. The error names the endpoint.
    pub fn validate(&self) -> Result<(), String> {
        let name = &self.name;
        let present = |field: &str, set: bool| set.then(|| field.to_owned());
        let files_fields = [
            present("path", self.path.is_some()),
            present("fileNameFormat", self.file_name_format.is_some()),
            present(
                "batchFrequencyInSeconds",
                self.batch_frequency_in_seconds.is_some(),
            ),
            present(
                "maxChunkSizeInBytes",
                self.max_chunk_size_in_bytes.is_some(),
            ),
        ];
        let webhook_fields = [
            present("url", self.url.is_some()),
            present("maxBatchSize", self.max_batch_size.is_some()),
            present("maxDeliveryAttempts", self.max_delivery_attempts.is_some()),
            present("initialBackoffMs", self.initial_backoff_ms.is_some()),
            present("maxBackoffMs", self.max_backoff_ms.is_some()),
            present("timeoutMs", self.timeout_ms.is_some()),
            present("caFile", self.ca_file.is_some()),
        ];
        let refuse = |fields: &[Option<String>]| -> Result<(), String> {
            match fields.iter().flatten().next() {
                Some(field) => Err(format!(
                    "endpoint '{name}': '{field}' does not apply to a {} endpoint",
                    self.kind.as_str()
                )),
                None => Ok(()),
            }
        };
        fn check<T: PartialOrd + std::fmt::Display + Copy>(
            name: &str,
            field: &str,
            value: Option<T>,
            range: &std::ops::RangeInclusive<T>,
        ) -> Result<(), String> {
            match value {
                Some(v) if !range.contains(&v) => Err(format!(
                    "endpoint '{name}': '{field}' must be between {} and {}, not {v}",
                    range.start(),
                    range.end()
                )),
                _ => Ok(()),
            }
        }
        match self.kind {
            EndpointKind::Log => {
                refuse(&files_fields)?;
                refuse(&webhook_fields)
            }
            EndpointKind::Files => {
                refuse(&webhook_fields)?;
                match &self.path {
                    None => {
                        return Err(format!("endpoint '{name}': a files endpoint needs 'path'"))
                    }
                    Some(path) if !path.is_absolute() => {
                        return Err(format!(
                            "endpoint '{name}': 'path' must be absolute, not '{}'",
                            path.display()
                        ))
                    }
                    Some(_) => {}
                }
                if let Some(format) = &self.file_name_format {
                    let missing: Vec<&str> = FILE_NAME_TOKENS
                        .iter()
                        .copied()
                        .filter(|t| !format.contains(t))
                        .collect();
                    if !missing.is_empty() {
                        return Err(format!(
                            "endpoint '{name}': 'fileNameFormat' must contain every one of {}; it lacks {}",
                            FILE_NAME_TOKENS.join(" "),
                            missing.join(" ")
                        ));
                    }
                    let bad_part = format.starts_with('/')
                        || format
                            .split('/')
                            .any(|p| p.is_empty() || p == "." || p == "..");
                    if bad_part || format.contains('\\') || format.contains('\0') {
                        return Err(format!(
                            "endpoint '{name}': 'fileNameFormat' must be a relative path of non-empty parts, without '.', '..' or '\\'"
                        ));
                    }
                }
                check(
                    name,
                    "batchFrequencyInSeconds",
                    self.batch_frequency_in_seconds,
                    &BATCH_FREQUENCY_SECS_RANGE,
                )?;
                check(
                    name,
                    "maxChunkSizeInBytes",
                    self.max_chunk_size_in_bytes,
                    &MAX_CHUNK_BYTES_RANGE,
                )
            }
            EndpointKind::Webhook => {
                refuse(&files_fields)?;
                let Some(url) = &self.url else {
                    return Err(format!("endpoint '{name}': a webhook endpoint needs 'url'"));
                };
                let uri: hyper::Uri = url
                    .parse()
                    .map_err(|e| format!("endpoint '{name}': 'url' {url:?} is not a URL: {e}"))?;
                let scheme_ok = matches!(uri.scheme_str(), Some("http" | "https"));
                if !scheme_ok || uri.host().is_none_or(str::is_empty) {
                    return Err(format!(
                        "endpoint '{name}': 'url' must be an http:// or https:// URL with a host, not {url:?}"
                    ));
                }
                check(
                    name,
                    "maxBatchSize",
                    self.max_batch_size,
                    &WEBHOOK_BATCH_RANGE,
                )?;
                check(
                    name,
                    "maxDeliveryAttempts",
                    self.max_delivery_attempts,
                    &WEBHOOK_ATTEMPTS_RANGE,
                )?;
                check(
                    name,
                    "initialBackoffMs",
                    self.initial_backoff_ms,
                    &WEBHOOK_BACKOFF_MS_RANGE,
                )?;
                check(
                    name,
                    "maxBackoffMs",
                    self.max_backoff_ms,
                    &WEBHOOK_BACKOFF_MS_RANGE,
                )?;
                check(
                    name,
                    "timeoutMs",
                    self.timeout_ms,
                    &WEBHOOK_TIMEOUT_MS_RANGE,
                )?;
                let initial = self
                    .initial_backoff_ms
                    .unwrap_or(WEBHOOK_INITIAL_BACKOFF_MS_DEFAULT);
                let max = self
                    .max_backoff_ms
                    .unwrap_or(WEBHOOK_MAX_BACKOFF_MS_DEFAULT);
                if max < initial {
                    return Err(format!(
                        "endpoint '{name}': 'maxBackoffMs' ({max}) is below 'initialBackoffMs' ({initial})"
                    ));
                }
                Ok(())
            }
        }
    }
}

impl EndpointKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EndpointKind::Log => "log",
            EndpointKind::Files => "files",
            EndpointKind::Webhook => "webhook",
        }
    }
}

/// A route, with Azure's field names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RouteConfig {
    pub name: String,
    /// `DeviceMessages` (the only source produced so far).
    #[serde(default = "device_messages")]
    pub source: String,
    /// In the IoT Hub routing query language; absent means `true`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub condition: Option<String>,
    pub endpoint_names: Vec<String>,
    #[serde(default = "enabled")]
    pub is_enabled: bool,
}

fn device_messages() -> String {
    "DeviceMessages".to_owned()
}

fn enabled() -> bool {
    true
}

impl RoutingConfig {
    /// The compiled route table, or `None` when there are no routes and no enrichments (every
    /// device message goes to `events`, the fast path). `hub_name` is what the enrichment value
    /// `$iothubname` stands for.
    pub fn table(
        &self,
        hub_name: &str,
    ) -> Result<Option<ingot_engine::route::RouteTable>, ConfigError> {
        use ingot_engine::route::{FallbackRoute, RouteSource, RouteSpec, RouteTable};
        let invalid = |reason: String| ConfigError::Invalid {
            key: "routing",
            reason,
        };
        let mut names = std::collections::HashSet::new();
        for endpoint in &self.endpoints {
            let valid = !endpoint.name.is_empty()
                && endpoint.name.len() <= 64
                && endpoint
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
            if !valid || endpoint.name == ingot_engine::route::EVENTS_ENDPOINT {
                return Err(invalid(format!(
                    "invalid endpoint name '{}': use 1 to 64 letters, digits, '.', '_' or '-', not 'events'",
                    endpoint.name
                )));
            }
            if !names.insert(endpoint.name.as_str()) {
                return Err(invalid(format!("duplicate endpoint '{}'", endpoint.name)));
            }
            endpoint.validate().map_err(invalid)?;
        }
        if self.endpoints.len() > ENDPOINTS_MAX {
            return Err(invalid(format!("at most {ENDPOINTS_MAX} custom endpoints")));
        }
        for enrichment in &self.enrichments {
            for endpoint in &enrichment.endpoint_names {
                if endpoint != ingot_engine::route::EVENTS_ENDPOINT
                    && !names.contains(endpoint.as_str())
                {
                    return Err(invalid(format!(
                        "enrichment '{}' names the unknown endpoint '{endpoint}'",
                        enrichment.key
                    )));
                }
            }
        }
        if self.routes.is_empty() && self.enrichments.is_empty() {
            return Ok(None);
        }
        let mut specs = Vec::with_capacity(self.routes.len());
        for route in &self.routes {
            let source = match route.source.as_str() {
                "DeviceMessages" => RouteSource::DeviceMessages,
                "TwinChangeEvents" => RouteSource::TwinChangeEvents,
                "DeviceLifecycleEvents" => RouteSource::DeviceLifecycleEvents,
                "DeviceConnectionStateEvents" => RouteSource::DeviceConnectionStateEvents,
                other => {
                    return Err(invalid(format!(
                        "route '{}': unknown source '{other}' (DeviceMessages, TwinChangeEvents, \
                         DeviceLifecycleEvents or DeviceConnectionStateEvents)",
                        route.name
                    )))
                }
            };
            for endpoint in &route.endpoint_names {
                if endpoint != ingot_engine::route::EVENTS_ENDPOINT
                    && !names.contains(endpoint.as_str())
                {
                    return Err(invalid(format!(
                        "route '{}' names the unknown endpoint '{endpoint}'",
                        route.name
                    )));
                }
            }
            specs.push(RouteSpec {
                name: route.name.clone(),
                source,
                condition: route.condition.clone(),
                endpoint_names: route.endpoint_names.clone(),
                is_enabled: route.is_enabled,
            });
        }
        let fallback = FallbackRoute {
            enabled: self.fallback,
        };
        let enrichments: Vec<_> = self
            .enrichments
            .iter()
            .map(|e| ingot_engine::route::EnrichmentSpec {
                key: e.key.clone(),
                value: e.value.clone(),
                endpoint_names: e.endpoint_names.clone(),
            })
            .collect();
        RouteTable::compile(&specs, fallback)
            .map_err(|e| invalid(e.to_string()))?
            .with_enrichments(&enrichments, hub_name)
            .map(Some)
            .map_err(|e| invalid(e.to_string()))
    }
}

/// Custom endpoints per hub (Azure: 10 on paid tiers).
pub const ENDPOINTS_MAX: usize = 10;

/// Cloud-to-device queues (Azure's `cloudToDevice` settings of a hub).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct C2dConfig {
    /// Time to live of a message sent without an expiry: 60 to 172800 s (Azure: PT1H).
    pub default_ttl_secs: u64,
    /// Deliveries of a message before it is dropped with `DeliveryCountExceeded` feedback: 1 to
    /// 100 (Azure: 10).
    pub max_delivery_count: u32,
}

impl Default for C2dConfig {
    fn default() -> Self {
        Self {
            default_ttl_secs: 3600,
            max_delivery_count: 10,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MqttConfig {
    /// Time from accept to a complete CONNECT, TLS handshake included.
    pub connect_timeout_ms: u64,
    /// Open connections per shard; more are refused with CONNACK 3.
    pub connections_per_shard_max: usize,
    /// New connections per second over the whole hub; more are refused with CONNACK 3.
    pub connect_rate_per_sec: u32,
    /// QoS 1 messages decoded from one connection before they are appended and acknowledged.
    pub inflight_count_max: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreSettings {
    /// Partitions of the event log, fixed for the life of a data directory; 0 means one per
    /// shard.
    pub partitions: u32,
    /// `always` (PUBACK after the flush covering the message), `interval:MS` or `never`.
    pub fsync: String,
    /// Size of each preallocated segment file.
    pub segment_bytes_max: u64,
    /// Sealed segments older than this are deleted (Azure's built-in endpoint: 7 days).
    pub retention_hours: u64,
    /// Oldest sealed segments are deleted while a partition holds more than this.
    pub retention_bytes_max: u64,
}

impl Default for MqttConfig {
    fn default() -> Self {
        let limits = ingot_engine::shard::ConnectionLimits::default();
        Self {
            connect_timeout_ms: limits.connect_timeout.as_millis() as u64,
            connections_per_shard_max: limits.connections_per_shard_max,
            connect_rate_per_sec: limits.connect_rate_per_sec,
            inflight_count_max: limits.inflight_count_max,
        }
    }
}

impl Default for StoreSettings {
    fn default() -> Self {
        Self {
            partitions: 0,
            fsync: "always".to_owned(),
            segment_bytes_max: 256 * 1024 * 1024,
            retention_hours: 7 * 24,
            retention_bytes_max: ingot_engine::store::RETENTION_BYTES_MAX_DEFAULT,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// The operator's server certificate chain (PEM). With `key_file`; when both are absent
    /// the hub creates a development CA and server certificate under `data_dir/tls/`.
    pub cert_file: Option<PathBuf>,
    /// The private key of `cert_file` (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key_file: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Concurrent HTTPS connections; more wait in the kernel's accept queue.
    pub connections_max: usize,
    /// Largest request body; a larger one is refused with 413 before it is read.
    pub body_bytes_max: usize,
    /// Time a client has to finish the TLS handshake and send its request headers.
    pub handshake_timeout_ms: u64,
    /// Time an idle keep-alive connection is kept.
    pub idle_timeout_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// A tracing filter (`info`, `ingot=debug,hyper=warn`); `RUST_LOG` overrides it.
    pub level: String,
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./ingot-data"),
            hostname: "localhost".to_owned(),
            listen_address: IpAddr::from([0, 0, 0, 0]),
            https_port: 8443,
            mqtt_tls_port: 8883,
            mqtt_port: 1883,
            shards: 0,
            tls: TlsConfig::default(),
            http: HttpConfig::default(),
            mqtt: MqttConfig::default(),
            store: StoreSettings::default(),
            c2d: C2dConfig::default(),
            routing: RoutingConfig::default(),
            log: LogConfig::default(),
        }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            connections_max: 1024,
            body_bytes_max: 4 * 1024 * 1024,
            handshake_timeout_ms: 10_000,
            idle_timeout_ms: 60_000,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".to_owned(),
            format: LogFormat::Text,
        }
    }
}

/// Settings given on the command line; `None` leaves the lower layers' value.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Overrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen_address: Option<IpAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub https_port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mqtt_tls_port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mqtt_port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shards: Option<usize>,
    /// Nested (`store.fsync`), so merged on its own in [`Config::load`].
    #[serde(skip)]
    pub fsync: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {0} does not exist")]
    Missing(PathBuf),
    #[error("invalid configuration: {0}")]
    Parse(Box<figment::Error>),
    #[error("invalid configuration: {key}: {reason}")]
    Invalid { key: &'static str, reason: String },
}

impl Config {
    /// Merges defaults, `file`, the environment (`vars`, usually `std::env::vars()`) and the
    /// command-line overrides, then validates the result.
    pub fn load(
        file: Option<&Path>,
        vars: impl IntoIterator<Item = (String, String)>,
        overrides: &Overrides,
    ) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(file) = file {
            if !file.exists() {
                return Err(ConfigError::Missing(file.to_owned()));
            }
            figment = figment.merge(Toml::file_exact(file));
        }
        // `INGOT_<KEY>` overrides a top-level key, `INGOT_<TABLE>__<KEY>` a nested one. Only
        // variables naming a real top-level key count, so that other `INGOT_*` variables (the
        // CLI's connection string) are not mistaken for settings. The keys come from the
        // defaults themselves, so a new setting is overridable without a list to maintain.
        let keys: Vec<String> = match toml::Value::try_from(Config::default()) {
            Ok(toml::Value::Table(table)) => table.keys().cloned().collect(),
            _ => Vec::new(),
        };
        let env: Vec<(String, String)> = vars
            .into_iter()
            .filter_map(|(k, v)| {
                let key = k.strip_prefix("INGOT_")?.to_ascii_lowercase();
                let top = key.split("__").next().unwrap_or_default().to_owned();
                keys.contains(&top).then(|| (key.replace("__", "."), v))
            })
            .collect();
        for (key, value) in env {
            figment = figment.merge(Serialized::default(&key, env_value(&value)));
        }
        if let Some(fsync) = &overrides.fsync {
            figment = figment.merge(Serialized::default("store.fsync", fsync));
        }
        let config: Config = figment
            .merge(Serialized::defaults(overrides))
            .extract()
            .map_err(|e| ConfigError::Parse(Box::new(e)))?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, reason: &str| ConfigError::Invalid {
            key,
            reason: reason.to_owned(),
        };
        if !is_host_name(&self.hostname) {
            return Err(invalid("hostname", "must be a DNS name or an IP address"));
        }
        if self.https_port == 0 {
            return Err(invalid("https_port", "must be a port from 1 to 65535"));
        }
        if self.data_dir.as_os_str().is_empty() {
            return Err(invalid("data_dir", "must not be empty"));
        }
        match (&self.tls.cert_file, &self.tls.key_file) {
            (Some(cert), Some(key)) => {
                for (name, path) in [("tls.cert_file", cert), ("tls.key_file", key)] {
                    if !path.is_file() {
                        let reason = format!("{} is not a readable file", path.display());
                        return Err(ConfigError::Invalid { key: name, reason });
                    }
                }
            }
            (None, None) => {}
            _ => return Err(invalid("tls", "cert_file and key_file go together")),
        }
        if !(60..=172_800).contains(&self.c2d.default_ttl_secs) {
            return Err(invalid("c2d.default_ttl_secs", "must be from 60 to 172800"));
        }
        if !(1..=100).contains(&self.c2d.max_delivery_count) {
            return Err(invalid("c2d.max_delivery_count", "must be from 1 to 100"));
        }
        self.routing.table(&self.hub_name())?;
        if self.http.connections_max == 0 {
            return Err(invalid("http.connections_max", "must be at least 1"));
        }
        if self.http.body_bytes_max < 64 * 1024 {
            return Err(invalid("http.body_bytes_max", "must be at least 65536"));
        }
        if self.http.handshake_timeout_ms == 0 || self.http.idle_timeout_ms == 0 {
            return Err(invalid("http", "timeouts must be at least 1 ms"));
        }
        if self.mqtt.connect_timeout_ms == 0 {
            return Err(invalid("mqtt.connect_timeout_ms", "must be at least 1 ms"));
        }
        if self.mqtt.connections_per_shard_max == 0 || self.mqtt.connect_rate_per_sec == 0 {
            return Err(invalid("mqtt", "connection limits must be at least 1"));
        }
        if self.mqtt.inflight_count_max == 0 || self.mqtt.inflight_count_max > 65_535 {
            return Err(invalid(
                "mqtt.inflight_count_max",
                "must be from 1 to 65535",
            ));
        }
        if self.shards > 1024 {
            return Err(invalid("shards", "must be at most 1024"));
        }
        self.store_config(self.shard_count())
            .map_err(|e| ConfigError::Invalid {
                key: "store",
                reason: e.to_string(),
            })?;
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return Err(invalid(
                "log.level",
                "is not a tracing filter such as `info`",
            ));
        }
        Ok(())
    }

    /// Shards to run: the setting, or one per core.
    /// The hub's name: the first label of its host name (Azure's `{iothub}`, `$iothubname`).
    pub fn hub_name(&self) -> String {
        self.hostname
            .split('.')
            .next()
            .unwrap_or_default()
            .to_owned()
    }

    pub fn shard_count(&self) -> usize {
        match self.shards {
            0 => std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            n => n,
        }
    }

    /// The segment store's settings for `shards` shards, validated.
    pub fn store_config(
        &self,
        shards: usize,
    ) -> Result<ingot_engine::store::StoreConfig, ingot_engine::store::StoreError> {
        // `0` means one per shard for a new data directory, and whatever an existing one was
        // created with: moving a data directory to a machine with more cores must not make the
        // store refuse to open.
        let partitions = match self.store.partitions {
            0 => ingot_engine::store::Reader::open(&self.data_dir)
                .map(|reader| reader.partition_count())
                .unwrap_or_else(|_| u32::try_from(shards).unwrap_or(u32::MAX)),
            n => n,
        };
        let config = ingot_engine::store::StoreConfig {
            partitions,
            segment_bytes_max: self.store.segment_bytes_max,
            index_interval_bytes: ingot_engine::store::INDEX_INTERVAL_BYTES_DEFAULT,
            fsync: self.store.fsync.parse()?,
            retention_age: std::time::Duration::from_secs(
                self.store.retention_hours.saturating_mul(3600),
            ),
            retention_bytes_max: self.store.retention_bytes_max,
        };
        config.validate()?;
        Ok(config)
    }

    /// The data plane's connection limits.
    pub fn connection_limits(&self) -> ingot_engine::shard::ConnectionLimits {
        ingot_engine::shard::ConnectionLimits {
            connect_timeout: std::time::Duration::from_millis(self.mqtt.connect_timeout_ms),
            connections_per_shard_max: self.mqtt.connections_per_shard_max,
            connect_rate_per_sec: self.mqtt.connect_rate_per_sec,
            inflight_count_max: self.mqtt.inflight_count_max,
            ..Default::default()
        }
    }

    pub fn c2d_settings(&self) -> crate::devices::C2dSettings {
        crate::devices::C2dSettings {
            default_ttl: std::time::Duration::from_secs(self.c2d.default_ttl_secs),
            max_delivery_count: self.c2d.max_delivery_count,
            ..Default::default()
        }
    }

    /// The `HostName` of service connection strings: the host, with the HTTPS port when it is
    /// not 443 (the Azure service SDK builds `https://{HostName}`).
    pub fn service_host(&self) -> String {
        service_host(&self.hostname, self.https_port)
    }

    /// The effective configuration as TOML, for the start-up log.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("<unprintable: {e}>"))
    }
}

pub fn service_host(hostname: &str, https_port: u16) -> String {
    if https_port == 443 {
        hostname.to_owned()
    } else {
        format!("{hostname}:{https_port}")
    }
}

/// Environment values are strings; numbers and booleans are typed so that `INGOT_HTTPS_PORT=9443`
/// fills a `u16`.
fn env_value(value: &str) -> figment::value::Value {
    use figment::value::Value;
    if let Ok(n) = value.parse::<i64>() {
        return Value::from(n);
    }
    match value {
        "true" => Value::from(true),
        "false" => Value::from(false),
        _ => Value::from(value.to_owned()),
    }
}

fn is_host_name(name: &str) -> bool {
    if name.parse::<IpAddr>().is_ok() {
        return true;
    }
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_need_no_file() {
        let config = Config::load(None, vars(&[]), &Overrides::default()).unwrap();
        assert_eq!(config, Config::default());
        assert_eq!(config.service_host(), "localhost:8443");
    }

    #[test]
    fn layers_merge_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ingot.toml");
        std::fs::write(
            &file,
            "hostname = \"hub.example\"\nhttps_port = 9000\n[http]\nconnections_max = 7\n",
        )
        .unwrap();
        let env = vars(&[
            ("INGOT_HTTPS_PORT", "9001"),
            ("INGOT_HTTP__BODY_BYTES_MAX", "100000"),
            ("INGOT_STORE__FSYNC", "interval:50"),
            ("INGOT_MQTT__INFLIGHT_COUNT_MAX", "9"),
            ("INGOT_CONNECTION_STRING", "not a config key"),
            ("PATH", "/bin"),
        ]);
        let overrides = Overrides {
            data_dir: Some("/tmp/x".into()),
            ..Default::default()
        };
        let config = Config::load(Some(&file), env, &overrides).unwrap();
        assert_eq!(config.hostname, "hub.example");
        assert_eq!(config.https_port, 9001);
        assert_eq!(config.http.connections_max, 7);
        assert_eq!(config.http.body_bytes_max, 100_000);
        assert_eq!(config.store.fsync, "interval:50");
        assert_eq!(config.mqtt.inflight_count_max, 9);
        assert_eq!(config.data_dir, PathBuf::from("/tmp/x"));
    }

    #[test]
    fn bad_settings_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ingot.toml");
        let cases = [
            ("htps_port = 1", "htps_port"),
            ("https_port = \"x\"", "https_port"),
            ("https_port = 70000", "https_port"),
            ("https_port = 0", "https_port"),
            ("hostname = \"a b\"", "hostname"),
            ("[tls]\ncert_file = \"/nonexistent\"", "tls"),
            ("[log]\nformat = \"xml\"", "format"),
            ("not toml at all [", "TOML"),
        ];
        for (text, expected) in cases {
            std::fs::write(&file, text).unwrap();
            let err = Config::load(Some(&file), vars(&[]), &Overrides::default()).unwrap_err();
            let message = err.to_string();
            assert!(message.contains(expected), "{text:?} gave {message:?}");
        }
        let missing = dir.path().join("absent.toml");
        let err = Config::load(Some(&missing), vars(&[]), &Overrides::default()).unwrap_err();
        assert!(err.to_string().contains("does not exist"));
    }

    #[test]
    fn endpoint_fields_are_checked_per_kind() {
        let parse = |text: &str| -> Result<(), String> {
            let routing: RoutingConfig = toml::from_str(text).map_err(|e| e.to_string())?;
            routing.table("hub").map(|_| ()).map_err(|e| e.to_string())
        };
        let ok = [
            "[[endpoints]]\nname = \"f\"\ntype = \"files\"\npath = \"/srv/f\"",
            "[[endpoints]]\nname = \"f\"\ntype = \"files\"\npath = \"/srv/f\"\nfileNameFormat = \"{YYYY}/{MM}/{DD}/{HH}/{mm}/{iothub}-{partition}.json\"\nbatchFrequencyInSeconds = 1\nmaxChunkSizeInBytes = 1024",
            "[[endpoints]]\nname = \"w\"\ntype = \"webhook\"\nurl = \"https://example.com/hook\"\nmaxBatchSize = 1\nmaxDeliveryAttempts = 1\ninitialBackoffMs = 5\nmaxBackoffMs = 5\ntimeoutMs = 100",
            "[[endpoints]]\nname = \"l\"\ntype = \"log\"",
        ];
        for text in ok {
            assert_eq!(parse(text), Ok(()), "{text}");
        }
        let bad = [
            ("[[endpoints]]\nname = \"f\"\ntype = \"files\"", "'f': a files endpoint needs 'path'"),
            ("[[endpoints]]\nname = \"f\"\ntype = \"files\"\npath = \"rel\"", "'f': 'path' must be absolute"),
            ("[[endpoints]]\nname = \"f\"\ntype = \"files\"\npath = \"/x\"\nfileNameFormat = \"{iothub}/{partition}/{YYYY}/{MM}/{DD}/{HH}\"", "it lacks {mm}"),
            ("[[endpoints]]\nname = \"f\"\ntype = \"files\"\npath = \"/x\"\nfileNameFormat = \"../{iothub}/{partition}/{YYYY}/{MM}/{DD}/{HH}/{mm}\"", "relative path"),
            ("[[endpoints]]\nname = \"f\"\ntype = \"files\"\npath = \"/x\"\nbatchFrequencyInSeconds = 0", "'batchFrequencyInSeconds' must be between 1 and 720"),
            ("[[endpoints]]\nname = \"f\"\ntype = \"files\"\npath = \"/x\"\nmaxChunkSizeInBytes = 600000000", "'maxChunkSizeInBytes' must be between"),
            ("[[endpoints]]\nname = \"f\"\ntype = \"files\"\npath = \"/x\"\nurl = \"http://a/\"", "'f': 'url' does not apply to a files endpoint"),
            ("[[endpoints]]\nname = \"w\"\ntype = \"webhook\"", "'w': a webhook endpoint needs 'url'"),
            ("[[endpoints]]\nname = \"w\"\ntype = \"webhook\"\nurl = \"ftp://a/\"", "http:// or https://"),
            ("[[endpoints]]\nname = \"w\"\ntype = \"webhook\"\nurl = \"http://a/\"\npath = \"/x\"", "'path' does not apply to a webhook endpoint"),
            ("[[endpoints]]\nname = \"w\"\ntype = \"webhook\"\nurl = \"http://a/\"\nmaxBatchSize = 0", "'maxBatchSize' must be between 1 and 1000"),
            ("[[endpoints]]\nname = \"w\"\ntype = \"webhook\"\nurl = \"http://a/\"\ninitialBackoffMs = 500\nmaxBackoffMs = 100", "'maxBackoffMs' (100) is below 'initialBackoffMs' (500)"),
            ("[[endpoints]]\nname = \"w\"\ntype = \"webhook\"\nurl = \"http://a/\"\ntimeoutMs = 1", "'timeoutMs' must be between"),
            ("[[endpoints]]\nname = \"l\"\ntype = \"log\"\nmaxDeliveryAttempts = 3", "'l': 'maxDeliveryAttempts' does not apply to a log endpoint"),
            ("[[endpoints]]\nname = \"f\"\ntype = \"files\"\npath = \"/x\"\ncaFile = \"/ca.pem\"", "'f': 'caFile' does not apply to a files endpoint"),
        ];
        for (text, expected) in bad {
            let err = parse(text).unwrap_err();
            assert!(err.contains(expected), "{text:?} gave {err:?}");
        }
    }

    #[test]
    fn host_names() {
        assert!(is_host_name("localhost"));
        assert!(is_host_name("hub-1.example.com"));
        assert!(is_host_name("127.0.0.1"));
        assert!(!is_host_name(""));
        assert!(!is_host_name("-a.com"));
        assert!(!is_host_name("a..b"));
        assert!(!is_host_name("a_b"));
    }
}
