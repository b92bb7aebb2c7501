//! The hub's routing as the control plane holds it: the route table in force, shared by every
//! part of the control plane that produces routable events (lifecycle, twin change, connection
//! state), which Azure emits only when a route for their source exists.

use std::path::Path;
use std::sync::{Arc, RwLock};

use ingot_engine::route::{RouteSource, RouteTable};
use serde::{Deserialize, Serialize};

use crate::config::{EndpointConfig, EnrichmentConfig, RouteConfig, RoutingConfig};

/// The current route table; replaced whole when routes change.
#[derive(Debug, Default)]
pub struct RoutingState {
    table: RwLock<Option<Arc<RouteTable>>>,
}

impl RoutingState {
    pub fn new(table: Option<RouteTable>) -> RoutingState {
        RoutingState {
            table: RwLock::new(table.map(Arc::new)),
        }
    }

    /// The table in force (`None`: no routes, every device message goes to `events`).
    pub fn table(&self) -> Option<Arc<RouteTable>> {
        match self.table.read() {
            Ok(table) => table.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub fn replace(&self, table: Option<RouteTable>) {
        let table = table.map(Arc::new);
        match self.table.write() {
            Ok(mut slot) => *slot = table,
            Err(poisoned) => *poisoned.into_inner() = table,
        }
    }

    /// Whether a route condition reads `$twin`: live connections are then sent their twin.
    pub fn reads_twin(&self) -> bool {
        self.table().is_some_and(|t| t.reads_twin())
    }

    /// Whether an enabled route reads `source`: events of other sources than device messages
    /// are built and sent to the shards only then.
    pub fn wants(&self, source: RouteSource) -> bool {
        self.table().is_some_and(|t| t.has_source(source))
    }
}

/// Opens (creating it if new) the segment log of custom endpoint `name`:
/// `data_dir/endpoints/NAME`, with the store settings of `events` and `partitions` partitions.
pub fn open_endpoint_log(
    config: &crate::config::Config,
    name: &str,
    partitions: usize,
) -> anyhow::Result<Vec<ingot_engine::store::PartitionLog>> {
    use anyhow::Context as _;
    let dir = endpoint_dir(&config.data_dir, name);
    let store_config = ingot_engine::store::StoreConfig {
        partitions: partitions as u32,
        ..config.store_config(config.shard_count())?
    };
    let store = ingot_engine::store::Store::open(&dir, store_config)
        .with_context(|| format!("open the log of endpoint '{name}'"))?;
    Ok(store.into_partitions())
}

/// Where custom endpoint `name` keeps its log.
pub fn endpoint_dir(data_dir: &std::path::Path, name: &str) -> std::path::PathBuf {
    data_dir.join("endpoints").join(name)
}

/// The endpoints and routes added through the API, kept in `data_dir/routing.json` (replaced
/// atomically at each change). The configuration file's own are not stored here: the file stays
/// their source, read at every start.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeRouting {
    /// The fallback route's state when changed through the API (over the file's `fallback`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fallback: Option<bool>,
    pub endpoints: Vec<EndpointConfig>,
    pub routes: Vec<RouteConfig>,
    pub enrichments: Vec<EnrichmentConfig>,
}

const RUNTIME_FILE: &str = "routing.json";

impl RuntimeRouting {
    /// Reads `data_dir/routing.json`; none yet is an empty set.
    pub fn load(data_dir: &Path) -> anyhow::Result<RuntimeRouting> {
        use anyhow::Context as _;
        let path = data_dir.join(RUNTIME_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .with_context(|| format!("read the routes and endpoints in {}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(RuntimeRouting::default()),
            Err(e) => Err(e).with_context(|| format!("read {}", path.display())),
        }
    }

    fn save(&self, data_dir: &Path) -> std::io::Result<()> {
        let json = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        crate::fsutil::write_atomic(&data_dir.join(RUNTIME_FILE), &json, true)
    }

    /// The routing in force: the configuration file's endpoints and routes, then these.
    pub fn merged(&self, file: &RoutingConfig) -> RoutingConfig {
        RoutingConfig {
            fallback: self.fallback.unwrap_or(file.fallback),
            endpoints: file
                .endpoints
                .iter()
                .chain(&self.endpoints)
                .cloned()
                .collect(),
            routes: file.routes.iter().chain(&self.routes).cloned().collect(),
            enrichments: file
                .enrichments
                .iter()
                .chain(&self.enrichments)
                .cloned()
                .collect(),
        }
    }
}

/// Why a routing change was refused.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    /// Defined in the configuration file, or still used by a route.
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Unavailable(String),
}

/// Where each endpoint, route and enrichment in force is defined, in order.
#[derive(Debug, Clone, Default)]
pub struct Origins {
    pub endpoints: Vec<Origin>,
    pub routes: Vec<Origin>,
    pub enrichments: Vec<Origin>,
}

/// Where an endpoint, route or enrichment is defined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The configuration file: read-only through the API.
    ConfigFile,
    Api,
}

impl Origin {
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::ConfigFile => "configFile",
            Origin::Api => "api",
        }
    }
}

/// Changes routes and endpoints at run time: validates the whole new routing, opens the logs of
/// new endpoints, puts the new table in force on every shard (which returns once each applied
/// it), saves the change, and only then closes and deletes the logs of removed endpoints.
/// Changes are serialized.
#[derive(Debug)]
pub struct RoutingManager {
    config: crate::config::Config,
    partitions: usize,
    runtime: tokio::sync::Mutex<RuntimeRouting>,
    state: Arc<RoutingState>,
    engine: Arc<ingot_engine::shard::Engine>,
    devices: Arc<crate::devices::Devices>,
    delivery: Arc<crate::delivery::Workers>,
}

impl RoutingManager {
    pub fn new(
        config: crate::config::Config,
        partitions: usize,
        runtime: RuntimeRouting,
        state: Arc<RoutingState>,
        engine: Arc<ingot_engine::shard::Engine>,
        devices: Arc<crate::devices::Devices>,
        delivery: Arc<crate::delivery::Workers>,
    ) -> RoutingManager {
        RoutingManager {
            config,
            partitions,
            runtime: tokio::sync::Mutex::new(runtime),
            state,
            engine,
            devices,
            delivery,
        }
    }

    /// Delivery counters of the `files` and `webhook` endpoints.
    pub fn delivery_status(&self) -> Vec<crate::delivery::EndpointStatus> {
        self.delivery.status()
    }

    /// The routing in force, each endpoint, route and enrichment with where it is defined.
    pub async fn current(&self) -> (RoutingConfig, Origins) {
        let runtime = self.runtime.lock().await;
        let file = &self.config.routing;
        let merged = runtime.merged(file);
        let origins = |file: usize, api: usize| {
            std::iter::repeat_n(Origin::ConfigFile, file)
                .chain(std::iter::repeat_n(Origin::Api, api))
                .collect::<Vec<_>>()
        };
        let origins = Origins {
            endpoints: origins(file.endpoints.len(), runtime.endpoints.len()),
            routes: origins(file.routes.len(), runtime.routes.len()),
            enrichments: origins(file.enrichments.len(), runtime.enrichments.len()),
        };
        (merged, origins)
    }

    /// Enables or disables the fallback route.
    pub async fn set_fallback(&self, enabled: bool) -> Result<(), ChangeError> {
        let mut runtime = self.runtime.lock().await;
        let mut next = runtime.clone();
        next.fallback = Some(enabled);
        let table = self.validate(&next)?;
        self.commit(&mut runtime, next, table, Vec::new(), Vec::new())
            .await
    }

    /// Adds or replaces an enrichment added through the API (by key). Returns whether it was
    /// created.
    pub async fn put_enrichment(&self, enrichment: EnrichmentConfig) -> Result<bool, ChangeError> {
        if self
            .config
            .routing
            .enrichments
            .iter()
            .any(|e| e.key == enrichment.key)
        {
            return Err(ChangeError::Conflict(format!(
                "enrichment '{}' is defined in the configuration file; change it there",
                enrichment.key
            )));
        }
        let mut runtime = self.runtime.lock().await;
        let mut next = runtime.clone();
        let created = match next
            .enrichments
            .iter_mut()
            .find(|e| e.key == enrichment.key)
        {
            Some(existing) => {
                *existing = enrichment;
                false
            }
            None => {
                next.enrichments.push(enrichment);
                true
            }
        };
        let table = self.validate(&next)?;
        self.commit(&mut runtime, next, table, Vec::new(), Vec::new())
            .await?;
        Ok(created)
    }

    pub async fn remove_enrichment(&self, key: &str) -> Result<(), ChangeError> {
        if self.config.routing.enrichments.iter().any(|e| e.key == key) {
            return Err(ChangeError::Conflict(format!(
                "enrichment '{key}' is defined in the configuration file; remove it there"
            )));
        }
        let mut runtime = self.runtime.lock().await;
        if !runtime.enrichments.iter().any(|e| e.key == key) {
            return Err(ChangeError::NotFound(format!("no enrichment '{key}'")));
        }
        let mut next = runtime.clone();
        next.enrichments.retain(|e| e.key != key);
        let table = self.validate(&next)?;
        self.commit(&mut runtime, next, table, Vec::new(), Vec::new())
            .await
    }

    fn file_defines_endpoint(&self, name: &str) -> bool {
        self.config.routing.endpoints.iter().any(|e| e.name == name)
    }

    fn file_defines_route(&self, name: &str) -> bool {
        self.config.routing.routes.iter().any(|r| r.name == name)
    }

    /// Adds an endpoint, or replaces one added through the API (its log is kept). Returns
    /// whether it was created.
    pub async fn put_endpoint(&self, endpoint: EndpointConfig) -> Result<bool, ChangeError> {
        if self.file_defines_endpoint(&endpoint.name) {
            return Err(ChangeError::Conflict(format!(
                "endpoint '{}' is defined in the configuration file; change it there",
                endpoint.name
            )));
        }
        let mut runtime = self.runtime.lock().await;
        let mut next = runtime.clone();
        let created = match next.endpoints.iter_mut().find(|e| e.name == endpoint.name) {
            Some(existing) => {
                *existing = endpoint.clone();
                false
            }
            None => {
                next.endpoints.push(endpoint.clone());
                true
            }
        };
        let table = self.validate(&next)?;
        let mut added = Vec::new();
        if created {
            let (config, name, partitions) =
                (self.config.clone(), endpoint.name.clone(), self.partitions);
            let logs =
                tokio::task::spawn_blocking(move || open_endpoint_log(&config, &name, partitions))
                    .await
                    .map_err(|e| ChangeError::Unavailable(e.to_string()))?
                    .map_err(|e| ChangeError::Unavailable(format!("{e:#}")))?;
            added.push((endpoint.name.clone(), logs));
        } else {
            // Replaced: its worker (if any) finishes what it holds, then restarts with the new
            // settings from the checkpoint it left.
            self.delivery.remove(&endpoint.name).await;
        }
        self.commit(&mut runtime, next, table, added, Vec::new())
            .await?;
        self.delivery.add(&endpoint).map_err(|e| {
            ChangeError::Invalid(format!(
                "endpoint '{}' is saved, but its delivery cannot start: {e:#}",
                endpoint.name
            ))
        })?;
        Ok(created)
    }

    /// Removes an endpoint added through the API, with its log. Refused while a route names it.
    pub async fn remove_endpoint(&self, name: &str) -> Result<(), ChangeError> {
        if self.file_defines_endpoint(name) {
            return Err(ChangeError::Conflict(format!(
                "endpoint '{name}' is defined in the configuration file; remove it there"
            )));
        }
        let mut runtime = self.runtime.lock().await;
        if !runtime.endpoints.iter().any(|e| e.name == name) {
            return Err(ChangeError::NotFound(format!("no endpoint '{name}'")));
        }
        let merged = runtime.merged(&self.config.routing);
        if let Some(route) = merged
            .routes
            .iter()
            .find(|r| r.endpoint_names.iter().any(|e| e == name))
        {
            return Err(ChangeError::Conflict(format!(
                "endpoint '{name}' is used by route '{}'; remove or change the route first",
                route.name
            )));
        }
        if let Some(enrichment) = merged
            .enrichments
            .iter()
            .find(|e| e.endpoint_names.iter().any(|e| e == name))
        {
            return Err(ChangeError::Conflict(format!(
                "endpoint '{name}' is used by enrichment '{}'; remove or change it first",
                enrichment.key
            )));
        }
        let mut next = runtime.clone();
        next.endpoints.retain(|e| e.name != name);
        let table = self.validate(&next)?;
        self.delivery.remove(name).await;
        self.commit(&mut runtime, next, table, Vec::new(), vec![name.to_owned()])
            .await?;
        // Every shard has closed the log: delete it.
        let dir = endpoint_dir(&self.config.data_dir, name);
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            tracing::warn!(
                "failed to delete the log of removed endpoint '{name}' in {}: {e}",
                dir.display()
            );
        }
        Ok(())
    }

    /// Adds or replaces a route added through the API. Returns whether it was created.
    pub async fn put_route(&self, route: RouteConfig) -> Result<bool, ChangeError> {
        if self.file_defines_route(&route.name) {
            return Err(ChangeError::Conflict(format!(
                "route '{}' is defined in the configuration file; change it there",
                route.name
            )));
        }
        let mut runtime = self.runtime.lock().await;
        let mut next = runtime.clone();
        let created = match next.routes.iter_mut().find(|r| r.name == route.name) {
            Some(existing) => {
                *existing = route;
                false
            }
            None => {
                next.routes.push(route);
                true
            }
        };
        let table = self.validate(&next)?;
        self.commit(&mut runtime, next, table, Vec::new(), Vec::new())
            .await?;
        Ok(created)
    }

    pub async fn remove_route(&self, name: &str) -> Result<(), ChangeError> {
        if self.file_defines_route(name) {
            return Err(ChangeError::Conflict(format!(
                "route '{name}' is defined in the configuration file; remove it there"
            )));
        }
        let mut runtime = self.runtime.lock().await;
        if !runtime.routes.iter().any(|r| r.name == name) {
            return Err(ChangeError::NotFound(format!("no route '{name}'")));
        }
        let mut next = runtime.clone();
        next.routes.retain(|r| r.name != name);
        let table = self.validate(&next)?;
        self.commit(&mut runtime, next, table, Vec::new(), Vec::new())
            .await
    }

    fn validate(&self, next: &RuntimeRouting) -> Result<Option<RouteTable>, ChangeError> {
        next.merged(&self.config.routing)
            .table(&self.config.hub_name())
            .map_err(|e| ChangeError::Invalid(e.to_string()))
    }

    /// Saves `next`, then puts it in force on the shards. Saved first: a crash between the two
    /// starts the hub with the change, which the caller was about to be told had succeeded.
    async fn commit(
        &self,
        runtime: &mut RuntimeRouting,
        next: RuntimeRouting,
        table: Option<RouteTable>,
        added: Vec<(String, Vec<ingot_engine::store::PartitionLog>)>,
        removed: Vec<String>,
    ) -> Result<(), ChangeError> {
        let (data_dir, to_save) = (self.config.data_dir.clone(), next.clone());
        tokio::task::spawn_blocking(move || to_save.save(&data_dir))
            .await
            .map_err(|e| ChangeError::Unavailable(e.to_string()))?
            .map_err(|e| ChangeError::Unavailable(format!("failed to save the routing: {e}")))?;
        *runtime = next;
        let update = ingot_engine::shard::RoutingUpdate {
            table: table.clone(),
            added,
            removed,
        };
        self.engine
            .update_routing(update)
            .await
            .map_err(|e| ChangeError::Unavailable(e.to_string()))?;
        let reads_twin = table.as_ref().is_some_and(RouteTable::reads_twin);
        let read_twin = self.state.reads_twin();
        self.state.replace(table);
        if reads_twin && !read_twin {
            // Connections made before have no twin yet.
            let devices = self.devices.clone();
            let _ = tokio::task::spawn_blocking(move || devices.push_twins_to_all()).await;
        }
        Ok(())
    }
}
