//! The `ingot` command line: the hub itself (`serve`) and the commands that manage it through
//! the REST API, as a back end with a service connection string would.
//!
//! Resource documents print as JSON; commands whose result is one string (connection strings,
//! SAS tokens) print just that string, so `export X=$(ingot connection-string)` works.

use std::path::PathBuf;

use anyhow::{bail, Context as _};
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use clap::{Args, Parser, Subcommand, ValueEnum};
use hyper::Method;
use serde_json::{json, Value};

use ingot_engine::auth::sas;

use crate::client::{segment, ServiceClient, ServiceConnectionString};
use crate::config::{Config, Overrides};
use crate::local;

#[derive(Debug, Parser)]
#[command(
    name = "ingot",
    version,
    about = "Ingot: a self-hosted IoT hub, wire-compatible with Azure IoT Hub"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the hub (zero configuration: embedded defaults, a development CA on first start).
    Serve(ServeArgs),
    /// Print the service connection string of a local hub (read from its data directory).
    ConnectionString {
        #[arg(long, env = "INGOT_DATA_DIR", default_value = "./ingot-data")]
        data_dir: PathBuf,
        /// The shared access policy.
        #[arg(long, default_value = "iothubowner")]
        policy: String,
    },
    /// Manage devices in the identity registry.
    #[command(subcommand)]
    Device(DeviceCommand),
    /// Manage modules of a device.
    #[command(subcommand)]
    Module(ModuleCommand),
    /// Manage the CA certificates that certificateAuthority devices chain to.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Send cloud-to-device messages, read their delivery feedback, purge queues.
    #[command(subcommand)]
    C2d(C2dCommand),
    /// Read and update device and module twins, and run twin queries.
    #[command(subcommand)]
    Twin(TwinCommand),
    /// Call a direct method on a device or module and print its answer.
    Method(MethodArgs),
    /// Message routes: add, list, remove, and test a condition offline.
    #[command(subcommand)]
    Route(RouteCommand),
    /// Custom endpoints that routes send messages to: add, list, remove.
    #[command(subcommand)]
    Endpoint(EndpointCommand),
    /// Message enrichments: application properties added to messages bound for endpoints.
    #[command(subcommand)]
    Enrichment(EnrichmentCommand),
    /// Print a SAS token for a device, a module or a shared access policy.
    SasToken(SasTokenArgs),
    /// Print the events of the built-in endpoint, one JSON object per line (reads the segment
    /// files of a data directory; works while the hub runs).
    MonitorEvents(crate::monitor::MonitorEventsArgs),
    /// Inspect the event log's segment files.
    #[command(subcommand)]
    Log(LogCommand),
}

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Register (or replace) a CA certificate; devices created with --x509-ca whose certificate
    /// chains to it, with CN = device id, can connect.
    Add {
        name: String,
        /// The CA certificate (PEM).
        #[arg(long, value_name = "FILE")]
        cert: PathBuf,
        #[command(flatten)]
        connection: Connection,
    },
    /// List the registered CA certificates.
    List {
        #[command(flatten)]
        connection: Connection,
    },
    /// Show one CA certificate.
    Show {
        name: String,
        #[command(flatten)]
        connection: Connection,
    },
    /// Remove a CA certificate; the devices it admitted are disconnected.
    Remove {
        name: String,
        #[command(flatten)]
        connection: Connection,
    },
}

#[derive(Debug, Subcommand)]
pub enum C2dCommand {
    /// Queue a message for a device; it is delivered over MQTT when the device has subscribed.
    Send {
        device: String,
        /// The message body.
        #[arg(long)]
        body: String,
        /// An application property, `name=value` (repeatable).
        #[arg(long = "prop", value_name = "NAME=VALUE")]
        props: Vec<String>,
        /// Which outcomes produce feedback.
        #[arg(long, value_enum, default_value = "none")]
        ack: AckArg,
        /// Time to live in seconds [default: the hub's c2d.default_ttl_secs].
        #[arg(long)]
        ttl: Option<u64>,
        #[arg(long)]
        message_id: Option<String>,
        #[arg(long)]
        correlation_id: Option<String>,
        #[arg(long)]
        content_type: Option<String>,
        #[arg(long)]
        content_encoding: Option<String>,
        #[command(flatten)]
        connection: Connection,
    },
    /// Print pending delivery feedback (JSON array); --complete removes what was printed.
    Feedback {
        #[arg(long)]
        complete: bool,
        #[command(flatten)]
        connection: Connection,
    },
    /// Remove every message queued for a device.
    Purge {
        device: String,
        #[command(flatten)]
        connection: Connection,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum AckArg {
    None,
    Positive,
    Negative,
    Full,
}

#[derive(Debug, Subcommand)]
pub enum TwinCommand {
    /// Print a device's (or module's) twin.
    Show {
        device: String,
        #[arg(long)]
        module: Option<String>,
        #[command(flatten)]
        connection: Connection,
    },
    /// Merge tags and desired properties into a twin (JSON objects; null deletes).
    Update {
        device: String,
        #[arg(long)]
        module: Option<String>,
        /// Desired properties to merge, e.g. '{"interval": 5}'.
        #[arg(long)]
        desired: Option<String>,
        /// Tags to merge, e.g. '{"location": {"region": "us"}}'.
        #[arg(long)]
        tags: Option<String>,
        /// Only update when the twin still has this etag.
        #[arg(long)]
        etag: Option<String>,
        #[command(flatten)]
        connection: Connection,
    },
    /// Run an IoT Hub query, e.g. "SELECT * FROM devices WHERE tags.region = 'us'".
    Query {
        query: String,
        #[command(flatten)]
        connection: Connection,
    },
}

#[derive(Debug, Args)]
pub struct MethodArgs {
    device: String,
    /// The method name.
    name: String,
    #[arg(long)]
    module: Option<String>,
    /// The JSON payload.
    #[arg(long, default_value = "null")]
    payload: String,
    /// Seconds to wait for the device's answer (5-300).
    #[arg(long, default_value_t = 30)]
    timeout: u64,
    /// Seconds to wait for the device to come online (0-300).
    #[arg(long, default_value_t = 0)]
    connect_timeout: u64,
    #[command(flatten)]
    connection: Connection,
}

#[derive(Debug, Subcommand)]
pub enum RouteCommand {
    /// Add a route, or replace one added before (in force on every shard when this returns).
    Add {
        name: String,
        /// DeviceMessages, TwinChangeEvents, DeviceLifecycleEvents or
        /// DeviceConnectionStateEvents.
        #[arg(long, default_value = "DeviceMessages")]
        source: String,
        /// In the IoT Hub routing query language; none matches every message.
        #[arg(long)]
        condition: Option<String>,
        /// The endpoint: a custom endpoint's name or `events` (Azure takes exactly one).
        #[arg(long = "endpoint", value_name = "NAME", required = true, num_args = 1..)]
        endpoints: Vec<String>,
        /// Add the route disabled.
        #[arg(long)]
        disabled: bool,
        #[command(flatten)]
        connection: Connection,
    },
    /// List the routes (those of the configuration file too, with `"origin": "configFile"`).
    List {
        #[command(flatten)]
        connection: Connection,
    },
    /// Show one route.
    Show {
        name: String,
        #[command(flatten)]
        connection: Connection,
    },
    /// Remove a route added through the API.
    Remove {
        name: String,
        #[command(flatten)]
        connection: Connection,
    },
    /// Enable or disable the fallback route (device messages no route matched go to `events`).
    Fallback {
        #[arg(value_enum)]
        state: FallbackArg,
        #[command(flatten)]
        connection: Connection,
    },
    /// Evaluate a route condition against a message, offline: prints match, noMatch or undefined
    /// (or where the condition does not parse).
    Test {
        /// The condition, in the IoT Hub routing query language (docs/routing.md).
        #[arg(long)]
        condition: String,
        /// The message: one line of `ingot monitor-events` (`body`, `properties`,
        /// `systemProperties` by their stored names, `bodyEncoding`).
        #[arg(long, value_name = "FILE")]
        message: PathBuf,
        /// The sender's twin for `$twin` references (the JSON of `ingot twin show`).
        #[arg(long, value_name = "FILE")]
        twin: Option<PathBuf>,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum FallbackArg {
    On,
    Off,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum EndpointTypeArg {
    Log,
    Files,
    Webhook,
}

#[derive(Debug, Subcommand)]
pub enum EndpointCommand {
    /// Add a custom endpoint, or replace one added before (docs/routing.md lists each type's
    /// settings).
    Add {
        name: String,
        #[arg(long = "type", value_enum)]
        kind: EndpointTypeArg,
        /// webhook: where batches are POSTed.
        #[arg(long)]
        url: Option<String>,
        /// files: the directory files are written under.
        #[arg(long)]
        path: Option<PathBuf>,
        /// Any other setting by its field name, e.g. `batchFrequencyInSeconds=60` (repeatable).
        #[arg(long = "set", value_name = "FIELD=VALUE")]
        settings: Vec<String>,
        #[command(flatten)]
        connection: Connection,
    },
    /// List the custom endpoints (those of the configuration file too).
    List {
        #[command(flatten)]
        connection: Connection,
    },
    /// Show one endpoint.
    Show {
        name: String,
        #[command(flatten)]
        connection: Connection,
    },
    /// Remove an endpoint added through the API, with its log (refused while a route names it).
    Remove {
        name: String,
        #[command(flatten)]
        connection: Connection,
    },
}

#[derive(Debug, Subcommand)]
pub enum EnrichmentCommand {
    /// Add an enrichment, or replace one added before.
    Add {
        /// The application property's name.
        key: String,
        /// A static string, `$iothubname`, or a `$twin.tags.*` / `$twin.properties.*` path.
        #[arg(long)]
        value: String,
        /// An endpoint whose messages get the property (repeatable; `events` for the built-in).
        #[arg(long = "endpoint", value_name = "NAME", required = true, num_args = 1..)]
        endpoints: Vec<String>,
        #[command(flatten)]
        connection: Connection,
    },
    /// List the enrichments (those of the configuration file too).
    List {
        #[command(flatten)]
        connection: Connection,
    },
    /// Remove an enrichment added through the API.
    Remove {
        key: String,
        #[command(flatten)]
        connection: Connection,
    },
}

#[derive(Debug, Subcommand)]
pub enum LogCommand {
    /// Check every record's checksum and report damage (exit status 1 if any).
    Verify(crate::monitor::LogVerifyArgs),
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// A TOML file with any of the settings (see docs/operations.md).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Where the registry, keys and certificates live [default: ./ingot-data].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// The hub's host name, as devices and back ends reach it [default: localhost].
    #[arg(long)]
    pub hostname: Option<String>,
    /// The HTTPS control plane's port [default: 8443].
    #[arg(long)]
    pub https_port: Option<u16>,
    /// The address the listeners bind [default: 0.0.0.0].
    #[arg(long)]
    pub listen_address: Option<std::net::IpAddr>,
    /// MQTT over TLS port; 0 turns it off [default: 8883].
    #[arg(long)]
    pub mqtt_tls_port: Option<u16>,
    /// Plain MQTT port; 0 turns it off [default: 1883].
    #[arg(long)]
    pub mqtt_port: Option<u16>,
    /// Data-plane shards (pinned executors); 0 means one per core [default: 0].
    #[arg(long)]
    pub shards: Option<usize>,
    /// Durability of acknowledged messages: always, interval:MS or never [default: always].
    #[arg(long)]
    pub fsync: Option<String>,
}

/// How a command reaches the hub's API.
#[derive(Debug, Args)]
pub struct Connection {
    /// A service connection string (HostName=...;SharedAccessKeyName=...;SharedAccessKey=...).
    /// Default: the iothubowner policy of the hub in --data-dir.
    #[arg(
        long,
        env = "INGOT_CONNECTION_STRING",
        hide_env_values = true,
        global = true
    )]
    pub connection_string: Option<String>,
    /// A CA certificate (PEM) to trust besides the system's. Default: the development CA of the
    /// hub in --data-dir, if it has one.
    #[arg(long, env = "INGOT_CA", global = true)]
    pub ca: Option<PathBuf>,
    /// The data directory of a local hub.
    #[arg(
        long,
        env = "INGOT_DATA_DIR",
        default_value = "./ingot-data",
        global = true
    )]
    pub data_dir: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StatusArg {
    Enabled,
    Disabled,
}

impl StatusArg {
    fn as_str(self) -> &'static str {
        match self {
            StatusArg::Enabled => "enabled",
            StatusArg::Disabled => "disabled",
        }
    }
}

/// How a new identity authenticates; SAS with generated keys when no flag says otherwise.
#[derive(Debug, Args)]
pub struct AuthArgs {
    /// Authenticate with an X.509 certificate of this SHA-1 or SHA-256 thumbprint (selfSigned).
    #[arg(long, value_name = "HEX", conflicts_with_all = ["x509_ca", "primary_key", "secondary_key"])]
    pub x509_thumbprint: Option<String>,
    /// A second thumbprint, for certificate rollover.
    #[arg(long, value_name = "HEX", requires = "x509_thumbprint")]
    pub x509_secondary_thumbprint: Option<String>,
    /// Authenticate with a certificate signed by a registered CA (certificateAuthority).
    #[arg(long, conflicts_with_all = ["primary_key", "secondary_key"])]
    pub x509_ca: bool,
    /// A SAS primary key (base64 of 16-64 bytes); generated when absent.
    #[arg(long)]
    pub primary_key: Option<String>,
    /// A SAS secondary key; generated when absent.
    #[arg(long)]
    pub secondary_key: Option<String>,
}

impl AuthArgs {
    fn json(&self) -> Value {
        if let Some(primary) = &self.x509_thumbprint {
            json!({"type": "selfSigned", "x509Thumbprint": {
                "primaryThumbprint": primary, "secondaryThumbprint": self.x509_secondary_thumbprint }})
        } else if self.x509_ca {
            json!({"type": "certificateAuthority"})
        } else {
            json!({"type": "sas", "symmetricKey": {
                "primaryKey": self.primary_key, "secondaryKey": self.secondary_key }})
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum DeviceCommand {
    /// Register a device.
    Create {
        id: String,
        #[arg(long, value_enum, default_value = "enabled")]
        status: StatusArg,
        #[arg(long)]
        status_reason: Option<String>,
        /// Register an IoT Edge device.
        #[arg(long)]
        edge: bool,
        #[command(flatten)]
        auth: AuthArgs,
        #[command(flatten)]
        connection: Connection,
    },
    /// Show a device.
    Show {
        id: String,
        #[command(flatten)]
        connection: Connection,
    },
    /// List devices (every page).
    List {
        /// Stop after this many devices.
        #[arg(long)]
        top: Option<usize>,
        #[command(flatten)]
        connection: Connection,
    },
    /// Change a device's status or keys (disable a stolen device, rotate keys).
    Update {
        id: String,
        #[arg(long, value_enum)]
        status: Option<StatusArg>,
        #[arg(long)]
        status_reason: Option<String>,
        /// Replace both SAS keys with new random ones.
        #[arg(long)]
        regenerate_keys: bool,
        /// Only update when the device still has this etag.
        #[arg(long)]
        etag: Option<String>,
        #[command(flatten)]
        connection: Connection,
    },
    /// Delete a device, its modules and its data.
    Delete {
        id: String,
        /// Only delete when the device still has this etag.
        #[arg(long)]
        etag: Option<String>,
        #[command(flatten)]
        connection: Connection,
    },
    /// Print the device's connection string (HostName=...;DeviceId=...;SharedAccessKey=...).
    ConnectionString {
        id: String,
        /// Use the secondary key.
        #[arg(long)]
        secondary: bool,
        #[command(flatten)]
        connection: Connection,
    },
}

#[derive(Debug, Subcommand)]
pub enum ModuleCommand {
    /// Add a module to a device.
    Create {
        device: String,
        module: String,
        #[command(flatten)]
        auth: AuthArgs,
        #[command(flatten)]
        connection: Connection,
    },
    /// Show a module.
    Show {
        device: String,
        module: String,
        #[command(flatten)]
        connection: Connection,
    },
    /// List a device's modules.
    List {
        device: String,
        #[command(flatten)]
        connection: Connection,
    },
    /// Delete a module.
    Delete {
        device: String,
        module: String,
        #[arg(long)]
        etag: Option<String>,
        #[command(flatten)]
        connection: Connection,
    },
    /// Print the module's connection string.
    ConnectionString {
        device: String,
        module: String,
        #[arg(long)]
        secondary: bool,
        #[command(flatten)]
        connection: Connection,
    },
}

#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("identity").required(true).args(["device", "policy"]))]
pub struct SasTokenArgs {
    /// A device's token, signed with its primary key (fetched from the registry).
    #[arg(long)]
    pub device: Option<String>,
    /// With --device: a module's token.
    #[arg(long, requires = "device")]
    pub module: Option<String>,
    /// A shared access policy's token (the key comes from the local hub or the connection
    /// string).
    #[arg(long)]
    pub policy: Option<String>,
    /// Lifetime in seconds.
    #[arg(long, default_value_t = 3600)]
    pub ttl: u64,
    #[command(flatten)]
    pub connection: Connection,
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => serve(args),
        Command::ConnectionString { data_dir, policy } => {
            println!("{}", local::service_connection_string(&data_dir, &policy)?);
            Ok(())
        }
        Command::Device(command) => device(command),
        Command::Module(command) => module(command),
        Command::SasToken(args) => sas_token(args),
        Command::Ca(command) => ca(command),
        Command::C2d(command) => c2d(command),
        Command::Twin(command) => twin(command),
        Command::Method(args) => method(args),
        Command::Route(command) => route(command),
        Command::Endpoint(command) => endpoint(command),
        Command::Enrichment(command) => enrichment(command),
        Command::MonitorEvents(args) => crate::monitor::monitor_events(&args),
        Command::Log(LogCommand::Verify(args)) => crate::monitor::log_verify(&args),
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let overrides = Overrides {
        data_dir: args.data_dir,
        hostname: args.hostname,
        listen_address: args.listen_address,
        https_port: args.https_port,
        mqtt_tls_port: args.mqtt_tls_port,
        mqtt_port: args.mqtt_port,
        shards: args.shards,
        fsync: args.fsync,
    };
    let config = Config::load(args.config.as_deref(), std::env::vars(), &overrides)?;
    crate::serve::init_logging(&config);
    crate::serve::run(config)
}

impl Connection {
    fn client(&self) -> anyhow::Result<ServiceClient> {
        let connection_string = match &self.connection_string {
            Some(cs) => cs.clone(),
            None => local::service_connection_string(&self.data_dir, "iothubowner")?,
        };
        let parsed: ServiceConnectionString = connection_string
            .parse()
            .context("invalid --connection-string")?;
        let ca = self.ca.clone().or_else(|| local::dev_ca(&self.data_dir));
        ServiceClient::new(parsed, ca.as_deref())
    }
}

fn print(value: &Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn device_path(id: &str) -> String {
    format!("/devices/{}", segment(id))
}

fn module_path(device: &str, module: &str) -> String {
    format!("/devices/{}/modules/{}", segment(device), segment(module))
}

fn if_match(etag: Option<&str>) -> String {
    format!("\"{}\"", etag.unwrap_or("*"))
}

fn device(command: DeviceCommand) -> anyhow::Result<()> {
    match command {
        DeviceCommand::Create {
            id,
            status,
            status_reason,
            edge,
            auth,
            connection,
        } => {
            let body = json!({
                "deviceId": id,
                "status": status.as_str(),
                "statusReason": status_reason,
                "authentication": auth.json(),
                "capabilities": {"iotEdge": edge},
            });
            let reply =
                connection
                    .client()?
                    .request(Method::PUT, &device_path(&id), &[], Some(&body))?;
            print(&reply.success()?)
        }
        DeviceCommand::Show { id, connection } => print(
            &connection
                .client()?
                .request(Method::GET, &device_path(&id), &[], None)?
                .success()?,
        ),
        DeviceCommand::List { top, connection } => {
            print(&Value::Array(connection.client()?.list_devices(top)?))
        }
        DeviceCommand::Update {
            id,
            status,
            status_reason,
            regenerate_keys,
            etag,
            connection,
        } => {
            let client = connection.client()?;
            let mut device = client
                .request(Method::GET, &device_path(&id), &[], None)?
                .success()?;
            let current_etag = device["etag"].as_str().unwrap_or("*").to_owned();
            if let Some(status) = status {
                device["status"] = json!(status.as_str());
            }
            if let Some(reason) = status_reason {
                device["statusReason"] = json!(reason);
            }
            if regenerate_keys {
                if device["authentication"]["type"] != "sas" {
                    bail!("device {id} does not use SAS keys");
                }
                device["authentication"]["symmetricKey"] = json!({});
            }
            // Without --etag, update what was just read, so a concurrent change is not lost.
            let etag = if_match(Some(etag.as_deref().unwrap_or(&current_etag)));
            let reply = client.request(
                Method::PUT,
                &device_path(&id),
                &[("if-match", &etag)],
                Some(&device),
            )?;
            print(&reply.success()?)
        }
        DeviceCommand::Delete {
            id,
            etag,
            connection,
        } => {
            let etag = if_match(etag.as_deref());
            let reply = connection.client()?.request(
                Method::DELETE,
                &device_path(&id),
                &[("if-match", &etag)],
                None,
            )?;
            reply.success()?;
            Ok(())
        }
        DeviceCommand::ConnectionString {
            id,
            secondary,
            connection,
        } => {
            let client = connection.client()?;
            let device = client
                .request(Method::GET, &device_path(&id), &[], None)?
                .success()?;
            println!(
                "{}",
                identity_connection_string(&client, &device, None, secondary)?
            );
            Ok(())
        }
    }
}

fn module(command: ModuleCommand) -> anyhow::Result<()> {
    match command {
        ModuleCommand::Create {
            device,
            module,
            auth,
            connection,
        } => {
            let body =
                json!({"deviceId": device, "moduleId": module, "authentication": auth.json()});
            let path = module_path(&device, &module);
            print(
                &connection
                    .client()?
                    .request(Method::PUT, &path, &[], Some(&body))?
                    .success()?,
            )
        }
        ModuleCommand::Show {
            device,
            module,
            connection,
        } => {
            let path = module_path(&device, &module);
            print(
                &connection
                    .client()?
                    .request(Method::GET, &path, &[], None)?
                    .success()?,
            )
        }
        ModuleCommand::List { device, connection } => {
            let path = format!("{}/modules", device_path(&device));
            print(
                &connection
                    .client()?
                    .request(Method::GET, &path, &[], None)?
                    .success()?,
            )
        }
        ModuleCommand::Delete {
            device,
            module,
            etag,
            connection,
        } => {
            let etag = if_match(etag.as_deref());
            let path = module_path(&device, &module);
            connection
                .client()?
                .request(Method::DELETE, &path, &[("if-match", &etag)], None)?
                .success()?;
            Ok(())
        }
        ModuleCommand::ConnectionString {
            device,
            module,
            secondary,
            connection,
        } => {
            let client = connection.client()?;
            let doc = client
                .request(Method::GET, &module_path(&device, &module), &[], None)?
                .success()?;
            println!(
                "{}",
                identity_connection_string(&client, &doc, Some(&module), secondary)?
            );
            Ok(())
        }
    }
}

fn ca(command: CaCommand) -> anyhow::Result<()> {
    let path = |name: &str| format!("/certificates/{}", segment(name));
    match command {
        CaCommand::Add {
            name,
            cert,
            connection,
        } => {
            let pem = std::fs::read_to_string(&cert)
                .with_context(|| format!("read {}", cert.display()))?;
            let body = json!({"properties": {"certificate": pem}});
            print(
                &connection
                    .client()?
                    .request(Method::PUT, &path(&name), &[], Some(&body))?
                    .success()?,
            )
        }
        CaCommand::List { connection } => {
            let reply = connection
                .client()?
                .request(Method::GET, "/certificates", &[], None)?;
            print(&reply.success()?["value"])
        }
        CaCommand::Show { name, connection } => print(
            &connection
                .client()?
                .request(Method::GET, &path(&name), &[], None)?
                .success()?,
        ),
        CaCommand::Remove { name, connection } => {
            connection
                .client()?
                .request(Method::DELETE, &path(&name), &[], None)?
                .success()?;
            Ok(())
        }
    }
}

fn route(command: RouteCommand) -> anyhow::Result<()> {
    let path = |name: &str| format!("/routing/routes/{}", segment(name));
    match command {
        RouteCommand::Add {
            name,
            source,
            condition,
            endpoints,
            disabled,
            connection,
        } => {
            let mut body = json!({
                "source": source,
                "endpointNames": endpoints,
                "isEnabled": !disabled,
            });
            if let Some(condition) = condition {
                body["condition"] = json!(condition);
            }
            routing_call(&connection, Method::PUT, &path(&name), Some(&body), false)
        }
        RouteCommand::List { connection } => {
            routing_call(&connection, Method::GET, "/routing/routes", None, true)
        }
        RouteCommand::Show { name, connection } => {
            routing_call(&connection, Method::GET, &path(&name), None, false)
        }
        RouteCommand::Remove { name, connection } => {
            connection
                .client()?
                .request(Method::DELETE, &path(&name), &[], None)?
                .success()?;
            Ok(())
        }
        RouteCommand::Fallback { state, connection } => {
            let body = json!({ "isEnabled": matches!(state, FallbackArg::On) });
            routing_call(
                &connection,
                Method::PUT,
                "/routing/fallbackRoute",
                Some(&body),
                false,
            )
        }
        RouteCommand::Test {
            condition,
            message,
            twin,
        } => route_test(&condition, &message, twin.as_deref()),
    }
}

fn enrichment(command: EnrichmentCommand) -> anyhow::Result<()> {
    let path = |key: &str| format!("/routing/enrichments/{}", segment(key));
    match command {
        EnrichmentCommand::Add {
            key,
            value,
            endpoints,
            connection,
        } => {
            let body = json!({ "value": value, "endpointNames": endpoints });
            routing_call(&connection, Method::PUT, &path(&key), Some(&body), false)
        }
        EnrichmentCommand::List { connection } => {
            routing_call(&connection, Method::GET, "/routing/enrichments", None, true)
        }
        EnrichmentCommand::Remove { key, connection } => {
            connection
                .client()?
                .request(Method::DELETE, &path(&key), &[], None)?
                .success()?;
            Ok(())
        }
    }
}

fn endpoint(command: EndpointCommand) -> anyhow::Result<()> {
    let path = |name: &str| format!("/routing/endpoints/{}", segment(name));
    match command {
        EndpointCommand::Add {
            name,
            kind,
            url,
            path: dir,
            settings,
            connection,
        } => {
            let kind = match kind {
                EndpointTypeArg::Log => "log",
                EndpointTypeArg::Files => "files",
                EndpointTypeArg::Webhook => "webhook",
            };
            let mut body = json!({ "type": kind });
            if let Some(url) = url {
                body["url"] = json!(url);
            }
            if let Some(dir) = dir {
                // The hub resolves nothing against its own working directory.
                let dir = std::path::absolute(&dir)
                    .with_context(|| format!("resolve {}", dir.display()))?;
                body["path"] = json!(dir);
            }
            for setting in settings {
                let (field, value) = setting
                    .split_once('=')
                    .with_context(|| format!("--set {setting}: expected FIELD=VALUE"))?;
                // Numbers and booleans as JSON, anything else as a string.
                let value = serde_json::from_str::<Value>(value)
                    .ok()
                    .filter(|v| v.is_number() || v.is_boolean())
                    .unwrap_or_else(|| json!(value));
                body[field] = value;
            }
            routing_call(&connection, Method::PUT, &path(&name), Some(&body), false)
        }
        EndpointCommand::List { connection } => {
            routing_call(&connection, Method::GET, "/routing/endpoints", None, true)
        }
        EndpointCommand::Show { name, connection } => {
            routing_call(&connection, Method::GET, &path(&name), None, false)
        }
        EndpointCommand::Remove { name, connection } => {
            connection
                .client()?
                .request(Method::DELETE, &path(&name), &[], None)?
                .success()?;
            Ok(())
        }
    }
}

/// One call of the routing API, its answer printed (`list`: the items of a `{"value": [...]}`).
fn routing_call(
    connection: &Connection,
    method: Method,
    path: &str,
    body: Option<&Value>,
    list: bool,
) -> anyhow::Result<()> {
    let reply = connection
        .client()?
        .request(method, path, &[], body)?
        .success()?;
    print(if list { &reply["value"] } else { &reply })
}

/// The device SDK's connection string. Its HostName has no port: the device SDK always dials
/// 8883 (MQTT) or 443 on that name.
fn identity_connection_string(
    client: &ServiceClient,
    doc: &Value,
    module: Option<&str>,
    secondary: bool,
) -> anyhow::Result<String> {
    let host = client.connection.hostname();
    let device_id = doc["deviceId"].as_str().unwrap_or_default();
    let module_part = module.map(|m| format!(";ModuleId={m}")).unwrap_or_default();
    let auth = &doc["authentication"];
    match auth["type"].as_str() {
        Some("sas") => {
            let which = if secondary {
                "secondaryKey"
            } else {
                "primaryKey"
            };
            let key = auth["symmetricKey"][which].as_str().unwrap_or_default();
            Ok(format!(
                "HostName={host};DeviceId={device_id}{module_part};SharedAccessKey={key}"
            ))
        }
        Some("selfSigned" | "certificateAuthority") => Ok(format!(
            "HostName={host};DeviceId={device_id}{module_part};x509=true"
        )),
        other => bail!("the identity's authentication type {other:?} has no connection string"),
    }
}

fn sas_token(args: SasTokenArgs) -> anyhow::Result<()> {
    let expiry = crate::api::now_secs() + args.ttl;
    if let Some(policy) = &args.policy {
        let connection = &args.connection;
        // The local hub's policy file first, then the connection string's own policy.
        let (host, key) = match local::HubInfo::read(&connection.data_dir)
            .ok()
            .zip(crate::policy::Policies::load(&connection.data_dir).ok())
        {
            Some((info, policies)) if connection.connection_string.is_none() => {
                let found = policies
                    .find(policy)
                    .with_context(|| format!("the local hub has no policy named {policy:?}"))?;
                (info.service_host(), found.primary_key.clone())
            }
            _ => {
                let cs: ServiceConnectionString = match &connection.connection_string {
                    Some(cs) => cs.parse()?,
                    None => bail!(
                        "no local hub in {} and no --connection-string",
                        connection.data_dir.display()
                    ),
                };
                if cs.policy != *policy {
                    bail!(
                        "the connection string is for policy {:?}, not {policy:?}",
                        cs.policy
                    );
                }
                (cs.host, cs.key)
            }
        };
        let key = BASE64.decode(key).context("the policy key is not base64")?;
        println!("{}", sas::generate(&host, &key, expiry, Some(policy)));
        return Ok(());
    }
    let device = args.device.as_deref().unwrap_or_default();
    let client = args.connection.client()?;
    let (path, resource) = match &args.module {
        Some(module) => (
            module_path(device, module),
            format!(
                "{}/devices/{device}/modules/{module}",
                client.connection.hostname()
            ),
        ),
        None => (
            device_path(device),
            format!("{}/devices/{device}", client.connection.hostname()),
        ),
    };
    let doc = client.request(Method::GET, &path, &[], None)?.success()?;
    let key = doc["authentication"]["symmetricKey"]["primaryKey"]
        .as_str()
        .context("the identity has no SAS key")?;
    let key = BASE64
        .decode(key)
        .context("the identity's key is not base64")?;
    println!("{}", sas::generate(&resource, &key, expiry, None));
    Ok(())
}

fn c2d(command: C2dCommand) -> anyhow::Result<()> {
    match command {
        C2dCommand::Send {
            device,
            body,
            props,
            ack,
            ttl,
            message_id,
            correlation_id,
            content_type,
            content_encoding,
            connection,
        } => {
            let ack = match ack {
                AckArg::None => "none",
                AckArg::Positive => "positive",
                AckArg::Negative => "negative",
                AckArg::Full => "full",
            };
            let ttl = ttl.map(|t| t.to_string());
            let mut headers: Vec<(String, String)> = vec![("iothub-ack".into(), ack.into())];
            let optional = [
                ("iothub-ttl", ttl),
                ("iothub-messageid", message_id),
                ("iothub-correlationid", correlation_id),
                ("content-encoding", content_encoding),
            ];
            for (name, value) in optional {
                if let Some(value) = value {
                    headers.push((name.to_owned(), value));
                }
            }
            for prop in &props {
                let (name, value) = prop
                    .split_once('=')
                    .with_context(|| format!("--prop {prop:?} is not NAME=VALUE"))?;
                headers.push((format!("iothub-app-{name}"), value.to_owned()));
            }
            let header_refs: Vec<(&str, &str)> = headers
                .iter()
                .map(|(n, v)| (n.as_str(), v.as_str()))
                .collect();
            let content_type = content_type
                .as_deref()
                .unwrap_or("text/plain; charset=utf-8");
            let path = format!("{}/messages/deviceBound", device_path(&device));
            let reply = connection.client()?.request_bytes(
                Method::POST,
                &path,
                &header_refs,
                Some((bytes::Bytes::from(body.into_bytes()), content_type)),
            )?;
            print(&reply.success()?)
        }
        C2dCommand::Feedback {
            complete,
            connection,
        } => {
            let client = connection.client()?;
            let path = "/messages/serviceBound/feedback";
            let reply = client.request(Method::GET, path, &[], None)?;
            let lock = reply
                .headers
                .get("iothub-lock-token")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let records = reply.success()?;
            let records = if records.is_null() {
                json!([])
            } else {
                records
            };
            print(&records)?;
            if let (true, Some(lock)) = (complete, lock) {
                client
                    .request(Method::DELETE, &format!("{path}/{lock}"), &[], None)?
                    .success()?;
            }
            Ok(())
        }
        C2dCommand::Purge { device, connection } => {
            let path = format!("{}/commands", device_path(&device));
            print(
                &connection
                    .client()?
                    .request(Method::DELETE, &path, &[], None)?
                    .success()?,
            )
        }
    }
}

fn twin_path(device: &str, module: Option<&str>) -> String {
    match module {
        Some(module) => format!("/twins/{}/modules/{}", segment(device), segment(module)),
        None => format!("/twins/{}", segment(device)),
    }
}

fn parse_object(flag: &str, text: Option<&str>) -> anyhow::Result<Option<Value>> {
    let Some(text) = text else { return Ok(None) };
    let value: Value =
        serde_json::from_str(text).with_context(|| format!("{flag} is not valid JSON"))?;
    if !value.is_object() {
        bail!("{flag} must be a JSON object");
    }
    Ok(Some(value))
}

fn twin(command: TwinCommand) -> anyhow::Result<()> {
    match command {
        TwinCommand::Show {
            device,
            module,
            connection,
        } => print(
            &connection
                .client()?
                .request(
                    Method::GET,
                    &twin_path(&device, module.as_deref()),
                    &[],
                    None,
                )?
                .success()?,
        ),
        TwinCommand::Update {
            device,
            module,
            desired,
            tags,
            etag,
            connection,
        } => {
            let mut patch = json!({});
            if let Some(tags) = parse_object("--tags", tags.as_deref())? {
                patch["tags"] = tags;
            }
            if let Some(desired) = parse_object("--desired", desired.as_deref())? {
                patch["properties"] = json!({ "desired": desired });
            }
            if patch.as_object().is_some_and(|o| o.is_empty()) {
                bail!("give --desired and/or --tags");
            }
            let etag = if_match(etag.as_deref());
            let reply = connection.client()?.request(
                Method::PATCH,
                &twin_path(&device, module.as_deref()),
                &[("if-match", &etag)],
                Some(&patch),
            )?;
            print(&reply.success()?)
        }
        TwinCommand::Query { query, connection } => {
            let client = connection.client()?;
            let mut all = Vec::new();
            let mut continuation: Option<String> = None;
            loop {
                let headers: Vec<(&str, &str)> = continuation
                    .iter()
                    .map(|c| ("x-ms-continuation", c.as_str()))
                    .collect();
                let reply = client.request(
                    Method::POST,
                    "/devices/query",
                    &headers,
                    Some(&json!({ "query": query })),
                )?;
                let next = reply.continuation.clone();
                if let Value::Array(items) = reply.success()? {
                    all.extend(items);
                }
                match next {
                    Some(next) if !next.is_empty() => continuation = Some(next),
                    _ => break,
                }
            }
            print(&Value::Array(all))
        }
    }
}

fn method(args: MethodArgs) -> anyhow::Result<()> {
    let payload: Value =
        serde_json::from_str(&args.payload).context("--payload is not valid JSON")?;
    let body = json!({
        "methodName": args.name,
        "payload": payload,
        "responseTimeoutInSeconds": args.timeout,
        "connectTimeoutInSeconds": args.connect_timeout,
    });
    let path = format!(
        "{}/methods",
        twin_path(&args.device, args.module.as_deref())
    );
    print(
        &args
            .connection
            .client()?
            .request(Method::POST, &path, &[], Some(&body))?
            .success()?,
    )
}

/// The properties of a message file's object member, as (name, value) strings.
fn string_pairs(message: &Value, member: &str) -> anyhow::Result<Vec<(String, String)>> {
    let Some(object) = message.get(member) else {
        return Ok(Vec::new());
    };
    let object = object
        .as_object()
        .with_context(|| format!("'{member}' must be an object"))?;
    object
        .iter()
        .map(|(name, value)| match value {
            Value::String(text) => Ok((name.clone(), text.clone())),
            other => bail!("'{member}.{name}' must be a string, not {other}"),
        })
        .collect()
}

fn route_test(
    condition: &str,
    message_file: &std::path::Path,
    twin_file: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    use ingot_engine::route::{Condition, Evaluator, Outcome, RouteMessage};
    use ingot_engine::store::{MessageRef, PropertyRef};

    let compiled = Condition::compile(condition)
        .map_err(|e| anyhow::anyhow!("the condition does not parse: {e}"))?;
    let read_json = |path: &std::path::Path| -> anyhow::Result<Value> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))
    };
    let message = read_json(message_file)?;
    let twin = twin_file.map(read_json).transpose()?;
    let system = string_pairs(&message, "systemProperties")?;
    let application = string_pairs(&message, "properties")?;
    let body = match (message.get("body"), message.get("bodyEncoding")) {
        (Some(Value::String(text)), Some(Value::String(encoding))) if encoding == "base64" => {
            BASE64.decode(text).context("'body' is not base64")?
        }
        (Some(Value::String(text)), _) => text.clone().into_bytes(),
        (Some(Value::Null) | None, _) => Vec::new(),
        (Some(json), _) => serde_json::to_vec(json)?,
    };
    let system_refs: Vec<PropertyRef<'_>> = system
        .iter()
        .map(|(name, value)| PropertyRef { name, value })
        .collect();
    let application_refs: Vec<PropertyRef<'_>> = application
        .iter()
        .map(|(name, value)| PropertyRef { name, value })
        .collect();
    let view = RouteMessage {
        message: MessageRef {
            system_properties: &system_refs,
            application_properties: &application_refs,
            body: &body,
        },
        twin: twin.as_ref(),
    };
    let outcome = Evaluator::new().evaluate(&compiled, &view);
    let result = match outcome {
        Outcome::Match => "match",
        Outcome::NoMatch => "noMatch",
        Outcome::Undefined => "undefined",
    };
    print(&json!({ "condition": condition, "result": result }))
}
