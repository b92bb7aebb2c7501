//! The hub's routing as the control plane holds it: the route table in force, shared by every
//! part of the control plane that produces routable events (lifecycle, twin change, connection
//! state), which Azure emits only when a route for their source exists.

use std::sync::{Arc, RwLock};

use ingot_engine::route::{RouteSource, RouteTable};

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

    /// Whether an enabled route reads `source`: events of other sources than device messages
    /// are built and sent to the shards only then.
    pub fn wants(&self, source: RouteSource) -> bool {
        self.table().is_some_and(|t| t.has_source(source))
    }
}
