//! `ingot serve`: start-up, the listeners, and a clean shutdown on SIGTERM or SIGINT.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;

use crate::api::{self, AppState};
use crate::config::{Config, LogFormat};
use crate::local::{self, HubInfo};
use crate::policy::Policies;
use crate::registry::Registry;
use crate::{fsutil, tls};

/// How long in-flight requests may take to finish after a shutdown signal.
const DRAIN: Duration = Duration::from_secs(10);

pub fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.log.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match config.log.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

pub fn run(config: Config) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("ingot-control")
        .build()
        .context("start the control-plane runtime")?;
    runtime.block_on(serve(config))
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let shutdown = shutdown_signal()?;
    tracing::info!("effective configuration:\n{}", config.to_toml());
    let data_dir = &config.data_dir;
    fsutil::create_private_dir(data_dir)
        .with_context(|| format!("create data directory {}", data_dir.display()))?;
    let registry_path = data_dir.join("registry.redb");
    let registry = Registry::open(&registry_path).with_context(|| {
        format!(
            "open the registry {} (is another hub using this data directory?)",
            registry_path.display()
        )
    })?;
    let policies = Policies::load_or_create(data_dir)?;
    let tls_files = tls::prepare(&config).context("prepare TLS certificates")?;
    let https_tls =
        tls::server_config(&tls_files, &[b"http/1.1"]).context("load the HTTPS certificate")?;

    // Before any listener opens: a client that finds a port open may read hub.json at once.
    HubInfo {
        hostname: config.hostname.clone(),
        https_port: config.https_port,
    }
    .write(data_dir)
    .context("write hub.json")?;

    let addr = SocketAddr::new(config.listen_address, config.https_port);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("bind the HTTPS listener on {addr}"))?;

    let registry = Arc::new(registry);
    let (events_tx, events_rx) = async_channel::bounded(crate::devices::EVENT_QUEUE_DEPTH);
    let sessions = registry
        .sessions()
        .context("read the persisted MQTT sessions")?;
    let services = ingot_engine::shard::EngineServices {
        events: events_tx,
        sessions,
        routing: ingot_engine::shard::RoutingUpdate::default(),
    };
    // The configuration file's routes and endpoints, then those added through the API.
    let runtime_routing = crate::routing::RuntimeRouting::load(data_dir)?;
    let mut effective = config.clone();
    effective.routing = runtime_routing.merged(&config.routing);
    let table = effective.routing.table(&config.hub_name())?;
    let engine = Arc::new(start_engine(
        &effective,
        table.clone(),
        &tls_files,
        registry.clone(),
        policies.clone(),
        services,
    )?);
    let routing = Arc::new(crate::routing::RoutingState::new(table));
    // Delivery to `files` and `webhook` endpoints: reads their logs, never slows ingest.
    let delivery = Arc::new(crate::delivery::Workers::start(
        crate::delivery::Context::new(data_dir, &config.hub_name()),
        &effective.routing.endpoints,
    )?);
    let system_events = Arc::new(crate::system_events::SystemEvents::new(
        engine.clone(),
        routing.clone(),
        config.hub_name(),
    ));
    let devices = crate::devices::Devices::new(
        registry.clone(),
        engine.clone(),
        config.c2d_settings(),
        routing.clone(),
        system_events.clone(),
    );
    let routing_manager = Arc::new(crate::routing::RoutingManager::new(
        config.clone(),
        engine.partition_count() as usize,
        runtime_routing,
        routing.clone(),
        engine.clone(),
        devices.clone(),
        delivery.clone(),
    ));
    // Kept to close the queue at shutdown: tasks a shard leaves behind when it stops (a
    // connection still in its handshake) may keep a sender alive, so the end of the senders
    // cannot be what stops the thread.
    let events_control = events_rx.clone();
    let device_thread = devices
        .spawn(events_rx)
        .context("start the device service thread")?;

    let connection_string = local::service_connection_string(data_dir, "iothubowner")?;
    // The one thing an operator needs to start: printed on stdout, logs go to stderr.
    println!("Ingot is serving the HTTPS API on https://{addr}");
    let port = |p: u16| {
        if p == 0 {
            "off".to_owned()
        } else {
            p.to_string()
        }
    };
    println!(
        "MQTT devices: TLS port {}, plain port {} ({} shards)",
        port(config.mqtt_tls_port),
        port(config.mqtt_port),
        config.shard_count()
    );
    println!("Service connection string (iothubowner): {connection_string}");
    if let Some(ca) = &tls_files.dev_ca {
        println!(
            "Development CA (give it to devices and back ends): {}",
            ca.display()
        );
    }

    let state = Arc::new(AppState {
        registry,
        policies,
        hostname: config.hostname.clone(),
        http: config.http.clone(),
        engine: Some(engine.clone()),
        devices: Some(devices),
        routing,
        routing_manager: Some(routing_manager),
        system_events: Some(system_events),
    });
    api::serve(listener, https_tls, state, shutdown, DRAIN).await;
    tracing::info!("the HTTPS API has stopped; stopping the data plane");
    // The data plane closes its connections and flushes every partition before exit.
    tokio::task::spawn_blocking(move || {
        engine.shutdown();
        tracing::info!("the data plane has stopped; stopping the device service");
        // The shards have stopped sending: the thread commits what is queued and ends.
        events_control.close();
        drop(engine);
        let _ = device_thread.join();
        tracing::info!("the device service has stopped");
    })
    .await
    .context("stop the data plane")?;
    // After the flush: `files` workers roll their open files and checkpoint them.
    delivery.shutdown().await;
    tracing::info!("delivery has stopped");
    tracing::info!("shut down cleanly");
    Ok(())
}

/// Opens the segment store and starts the shards with the MQTT listeners.
fn start_engine(
    config: &Config,
    table: Option<ingot_engine::route::RouteTable>,
    tls_files: &tls::TlsFiles,
    registry: Arc<Registry>,
    policies: Policies,
    mut services: ingot_engine::shard::EngineServices,
) -> anyhow::Result<ingot_engine::shard::Engine> {
    let shards = config.shard_count();
    let store_config = config.store_config(shards)?;
    let store = ingot_engine::store::Store::open(&config.data_dir, store_config.clone())
        .context("open the segment store")?;
    let partitions = store.into_partitions();
    // Each custom endpoint is a store of its own with as many partitions as `events`.
    let mut added = Vec::new();
    for endpoint in &config.routing.endpoints {
        let logs = crate::routing::open_endpoint_log(config, &endpoint.name, partitions.len())?;
        added.push((endpoint.name.clone(), logs));
    }
    services.routing = ingot_engine::shard::RoutingUpdate {
        table,
        added,
        removed: Vec::new(),
    };
    let certs = tls::load_certs(&tls_files.cert_chain)?;
    let key = tls::load_key(&tls_files.key)?;
    let mqtt_tls = ingot_engine::net::tls::mqtt_server_config(certs, key)
        .context("load the MQTT TLS certificate")?;
    let engine_config = ingot_engine::shard::EngineConfig {
        hostname: config.hostname.clone(),
        listen_address: config.listen_address,
        mqtt_tls_port: (config.mqtt_tls_port != 0).then_some(config.mqtt_tls_port),
        mqtt_port: (config.mqtt_port != 0).then_some(config.mqtt_port),
        shards,
        tls: Arc::new(mqtt_tls),
        limits: config.connection_limits(),
    };
    let identities = Arc::new(crate::identity::RegistryIdentities { registry, policies });
    let engine =
        ingot_engine::shard::Engine::start(engine_config, partitions, identities, services)?;
    Ok(engine)
}

/// Installs the SIGTERM and SIGINT handlers now and returns the future that resolves on the
/// first of them. Installed before anything listens: without a handler the default action kills
/// the process, so a signal during start-up would skip the clean shutdown.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("install the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("install the SIGINT handler")?;
    Ok(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!("{name} received, shutting down");
    })
}
