//! Routing on the ingest path: each device message is evaluated against the route table once,
//! on the shard that appends it, and appended to every endpoint log it matched (the built-in
//! `events` and custom `log` endpoints), before its PUBACK.
//!
//! A shard owns partition `p` of every endpoint log exactly when it owns partition `p` of
//! `events`, so a device's messages stay in order in each endpoint, appended by one core.

use std::cell::RefCell;
use std::collections::HashMap;

use crate::route::{EndpointSet, Evaluator, RouteMessage, RouteSource, RouteTable};
use crate::store::{MessageRef, PartitionLog, StoreError};

use super::Routing;

/// One shard's share of the routing: the table, the evaluator's reusable buffers, and its
/// partitions of the custom endpoint logs.
pub struct ShardRouting {
    table: RouteTable,
    evaluator: RefCell<Evaluator>,
    /// By partition: the log of each table endpoint (index 0, `events`, is the shard's own
    /// partition log and is `None` here).
    logs: RefCell<HashMap<u32, Vec<Option<PartitionLog>>>>,
}

impl std::fmt::Debug for ShardRouting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardRouting")
            .field("endpoints", &self.table.endpoint_names())
            .finish_non_exhaustive()
    }
}

/// The messages of one batch bound for the custom endpoints, by endpoint index.
pub type CustomBatches<'a> = Vec<(usize, Vec<MessageRef<'a>>)>;

impl ShardRouting {
    /// Gives every shard its share: the table (each shard compiles its own copy of the same
    /// routes, so nothing is shared across cores) and its partitions of each endpoint log.
    pub fn split(routing: Option<Routing>, shards: usize) -> Vec<ShardRouting> {
        let Some(routing) = routing else {
            return Vec::new();
        };
        let names = routing.table.endpoint_names().to_vec();
        let mut per_shard: Vec<HashMap<u32, Vec<Option<PartitionLog>>>> =
            (0..shards).map(|_| HashMap::new()).collect();
        for (name, partitions) in routing.endpoints {
            let Some(index) = names.iter().position(|n| *n == name) else {
                continue; // an endpoint no route uses
            };
            for partition in partitions {
                let p = partition.id().0;
                let slots = per_shard[p as usize % shards]
                    .entry(p)
                    .or_insert_with(|| (0..names.len()).map(|_| None).collect());
                slots[index] = Some(partition);
            }
        }
        per_shard
            .into_iter()
            .map(|logs| ShardRouting {
                table: routing.table.clone(),
                evaluator: RefCell::new(Evaluator::new()),
                logs: RefCell::new(logs),
            })
            .collect()
    }

    /// Routes a batch: returns the messages for `events` and fills `custom` with the others.
    pub fn route<'a>(
        &self,
        messages: &[MessageRef<'a>],
        custom: &mut CustomBatches<'a>,
    ) -> Vec<MessageRef<'a>> {
        let mut evaluator = self.evaluator.borrow_mut();
        let mut events = Vec::with_capacity(messages.len());
        let mut matched = EndpointSet::new();
        for message in messages {
            matched.clear();
            let view = RouteMessage {
                message: *message,
                twin: None,
            };
            self.table.matches(
                RouteSource::DeviceMessages,
                &view,
                &mut evaluator,
                &mut matched,
            );
            for endpoint in matched.iter() {
                if endpoint == 0 {
                    events.push(*message);
                    continue;
                }
                match custom.iter_mut().find(|(i, _)| *i == endpoint) {
                    Some((_, batch)) => batch.push(*message),
                    None => custom.push((endpoint, vec![*message])),
                }
            }
        }
        events
    }

    /// Appends each custom batch to its endpoint's partition `partition` (flushed as the log's
    /// fsync policy promises).
    pub fn append(
        &self,
        partition: u32,
        custom: &CustomBatches<'_>,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let mut logs = self.logs.borrow_mut();
        let Some(slots) = logs.get_mut(&partition) else {
            return Ok(());
        };
        for (endpoint, batch) in custom {
            if let Some(Some(log)) = slots.get_mut(*endpoint) {
                log.append_batch(batch, now_ms)?;
            }
        }
        Ok(())
    }

    pub fn flush_all(&self) {
        for log in self.logs.borrow_mut().values_mut().flatten().flatten() {
            if let Err(e) = log.flush() {
                tracing::error!("failed to flush an endpoint log at shutdown: {e}");
            }
        }
    }

    pub fn enforce_retention(&self, now_ms: u64) {
        for log in self.logs.borrow_mut().values_mut().flatten().flatten() {
            if let Err(e) = log.enforce_retention(now_ms) {
                tracing::warn!("failed to enforce retention on an endpoint log: {e}");
            }
        }
    }
}
