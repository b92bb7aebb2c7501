//! Routing on the ingest path: each device message is evaluated against the route table once,
//! on the shard that appends it, and appended to every endpoint log it matched (the built-in
//! `events` and the custom endpoints' logs), before its PUBACK.
//!
//! A shard owns partition `p` of every endpoint log exactly when it owns partition `p` of
//! `events`, so a device's messages stay in order in each endpoint, appended by one core.
//!
//! Routes change at run time by [`RoutingUpdate`]s, applied between two batches: a batch is
//! routed and appended under one table, with no await in between, so no message sees half a
//! change and none is lost. An update adds the logs of new endpoints before the new table can
//! send anything to them, and closes the logs of removed endpoints only after the table that used
//! them is gone.

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::HashMap;
use std::ops::Range;
use std::rc::Rc;

use crate::route::{EndpointSet, Evaluator, RouteMessage, RouteSource, RouteTable};
use crate::store::{MessageRef, PartitionLog, PropertyRef, StoreError};

/// A change of the hub's routing, as the control plane sends it to the engine.
#[derive(Debug, Default)]
pub struct RoutingUpdate {
    /// The table from now on; `None`: no routes (every device message goes to `events`).
    pub table: Option<crate::route::RouteTable>,
    /// Logs of endpoints that appear with this update, each with every partition (as many as
    /// `events` has).
    pub added: Vec<(String, Vec<PartitionLog>)>,
    /// Endpoints whose logs close with this update (no route of `table` may name them).
    pub removed: Vec<String>,
}

/// One shard's share of an update.
#[derive(Debug)]
pub(super) struct ShardUpdate {
    pub table: Option<RouteTable>,
    pub added: Vec<(String, HashMap<u32, PartitionLog>)>,
    pub removed: Vec<String>,
}

impl RoutingUpdate {
    /// Splits the update between `shards` shards: each gets a copy of the table (nothing is
    /// shared across cores) and the partitions it owns (`p % shards`).
    pub(super) fn split(self, shards: usize) -> Vec<ShardUpdate> {
        let mut per_shard: Vec<ShardUpdate> = (0..shards)
            .map(|_| ShardUpdate {
                table: self.table.clone(),
                added: Vec::new(),
                removed: self.removed.clone(),
            })
            .collect();
        for (name, partitions) in self.added {
            let mut owned: Vec<HashMap<u32, PartitionLog>> =
                (0..shards).map(|_| HashMap::new()).collect();
            for partition in partitions {
                let p = partition.id().0;
                owned[p as usize % shards].insert(p, partition);
            }
            for (update, logs) in per_shard.iter_mut().zip(owned) {
                update.added.push((name.clone(), logs));
            }
        }
        per_shard
    }
}

/// One shard's routing: the table in force, the evaluator's reusable buffers, and the shard's
/// partitions of every custom endpoint log (by endpoint name).
pub struct ShardRouting {
    table: RefCell<Option<Rc<RouteTable>>>,
    evaluator: RefCell<Evaluator>,
    logs: RefCell<HashMap<String, HashMap<u32, PartitionLog>>>,
}

impl std::fmt::Debug for ShardRouting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardRouting")
            .field("endpoints", &self.logs.borrow().keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// The messages of one batch bound for the custom endpoints, by endpoint index of the table.
pub type CustomBatches<'a> = Vec<(usize, Vec<MessageRef<'a>>)>;

/// Where each enriched message's application properties are in the enrichment storage: for
/// `events`, and for each custom batch; `None` where no enrichment applies.
pub type EnrichmentRanges = (Option<Vec<Range<usize>>>, Vec<Option<Vec<Range<usize>>>>);

/// First step of enriching a routed batch: writes the enriched application properties of the
/// messages bound for `events` and for each custom endpoint to `storage`.
pub fn enrichment_ranges<'a>(
    table: &'a RouteTable,
    values: &'a [Cow<'a, str>],
    events: &[MessageRef<'a>],
    custom: &CustomBatches<'a>,
    storage: &mut Vec<PropertyRef<'a>>,
) -> EnrichmentRanges {
    let events = table.enrich(values, 0, events, storage);
    let custom = custom
        .iter()
        .map(|(endpoint, batch)| table.enrich(values, *endpoint, batch, storage))
        .collect();
    (events, custom)
}

/// Second step: the messages with their enriched properties (from `storage`).
pub fn enriched<'s>(
    storage: &'s [PropertyRef<'s>],
    events: Vec<MessageRef<'s>>,
    custom: CustomBatches<'s>,
    ranges: EnrichmentRanges,
) -> (Vec<MessageRef<'s>>, CustomBatches<'s>) {
    let apply = |batch: Vec<MessageRef<'s>>, ranges: Option<Vec<Range<usize>>>| match ranges {
        None => batch,
        Some(ranges) => batch
            .into_iter()
            .zip(ranges)
            .map(|(message, range)| MessageRef {
                application_properties: storage.get(range).unwrap_or_default(),
                ..message
            })
            .collect(),
    };
    let (events_ranges, custom_ranges) = ranges;
    let events = apply(events, events_ranges);
    let custom = custom
        .into_iter()
        .zip(custom_ranges.into_iter().chain(std::iter::repeat(None)))
        .map(|((endpoint, batch), ranges)| (endpoint, apply(batch, ranges)))
        .collect();
    (events, custom)
}

impl ShardRouting {
    pub(super) fn new(update: Option<ShardUpdate>) -> ShardRouting {
        let routing = ShardRouting {
            table: RefCell::new(None),
            evaluator: RefCell::new(Evaluator::new()),
            logs: RefCell::new(HashMap::new()),
        };
        if let Some(update) = update {
            routing.apply(update);
        }
        routing
    }

    /// The table in force; `None` without routes. Hold it for one batch: a change applied
    /// meanwhile takes effect at the next batch.
    pub fn table(&self) -> Option<Rc<RouteTable>> {
        self.table.borrow().clone()
    }

    /// Applies a change: new logs first, then the table, then the removed logs are flushed and
    /// closed.
    pub(super) fn apply(&self, update: ShardUpdate) {
        {
            let mut logs = self.logs.borrow_mut();
            for (name, partitions) in update.added {
                logs.insert(name, partitions);
            }
        }
        *self.table.borrow_mut() = update.table.map(Rc::new);
        let mut logs = self.logs.borrow_mut();
        for name in update.removed {
            if let Some(partitions) = logs.remove(&name) {
                for mut log in partitions.into_values() {
                    if let Err(e) = log.flush() {
                        tracing::error!("failed to flush the log of removed endpoint {name}: {e}");
                    }
                }
            }
        }
    }

    /// Routes a batch of one device's messages under `table`: returns the messages for
    /// `events` and fills `custom` with the others. `twin` is the sender's twin, if known.
    pub fn route<'a>(
        &self,
        table: &RouteTable,
        messages: &[MessageRef<'a>],
        twin: Option<&serde_json::Value>,
        custom: &mut CustomBatches<'a>,
    ) -> Vec<MessageRef<'a>> {
        let mut evaluator = self.evaluator.borrow_mut();
        let mut events = Vec::with_capacity(messages.len());
        let mut matched = EndpointSet::new();
        for message in messages {
            let view = RouteMessage {
                message: *message,
                twin,
            };
            table.matches(
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
    /// fsync policy promises). An endpoint of the table without a log here is an error: the
    /// control plane adds a log before any table that names it.
    pub fn append(
        &self,
        table: &RouteTable,
        partition: u32,
        custom: &CustomBatches<'_>,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        if custom.is_empty() {
            return Ok(());
        }
        let mut logs = self.logs.borrow_mut();
        for (endpoint, batch) in custom {
            let name = table
                .endpoint_names()
                .get(*endpoint)
                .map(String::as_str)
                .unwrap_or_default();
            let Some(log) = logs.get_mut(name).and_then(|l| l.get_mut(&partition)) else {
                return Err(StoreError::Io {
                    context: "append to endpoint",
                    path: std::path::PathBuf::from(name),
                    source: std::io::Error::other(format!(
                        "no log for partition {partition} on this shard"
                    )),
                });
            };
            log.append_batch(batch, now_ms)?;
        }
        Ok(())
    }

    pub fn flush_all(&self) {
        for log in self
            .logs
            .borrow_mut()
            .values_mut()
            .flat_map(|l| l.values_mut())
        {
            if let Err(e) = log.flush() {
                tracing::error!("failed to flush an endpoint log at shutdown: {e}");
            }
        }
    }

    pub fn enforce_retention(&self, now_ms: u64) {
        for log in self
            .logs
            .borrow_mut()
            .values_mut()
            .flat_map(|l| l.values_mut())
        {
            if let Err(e) = log.enforce_retention(now_ms) {
                tracing::warn!("failed to enforce retention on an endpoint log: {e}");
            }
        }
    }
}

/// Routes one system event on the shard that owns its device: evaluates the routes of `source`
/// and appends the event (enriched per endpoint) to the device's partition of every endpoint
/// they chose, flushed as the fsync policy promises.
pub(super) fn route_event(
    shard: &super::Shard,
    source: RouteSource,
    event: &crate::services::SystemEvent,
) -> Result<(), StoreError> {
    let Some(table) = shard.routing.table() else {
        return Ok(());
    };
    let properties: Vec<PropertyRef<'_>> = event
        .system_properties
        .iter()
        .chain(&event.application_properties)
        .map(|(name, value)| PropertyRef { name, value })
        .collect();
    let (system, application) = properties.split_at(event.system_properties.len());
    let message = MessageRef {
        system_properties: system,
        application_properties: application,
        body: &event.body,
    };
    let mut matched = EndpointSet::new();
    {
        let mut evaluator = shard.routing.evaluator.borrow_mut();
        let view = RouteMessage {
            message,
            twin: None,
        };
        table.matches(source, &view, &mut evaluator, &mut matched);
    }
    if matched.is_empty() {
        return Ok(());
    }
    let mut events = Vec::new();
    let mut custom: CustomBatches<'_> = Vec::new();
    for endpoint in matched.iter() {
        if endpoint == 0 {
            events.push(message);
        } else {
            custom.push((endpoint, vec![message]));
        }
    }
    let values = table.enrichment_values(None);
    let mut storage = Vec::new();
    let ranges = enrichment_ranges(&table, &values, &events, &custom, &mut storage);
    let (events, custom) = enriched(&storage, events, custom, ranges);
    let partition = shard.partition_of(&event.device_id).0;
    let now_ms = super::stats::now_ms();
    shard.routing.append(&table, partition, &custom, now_ms)?;
    if !events.is_empty() {
        if let Some(log) = shard.partitions.borrow_mut().get_mut(&partition) {
            log.append_batch(&events, now_ms)?;
        }
    }
    Ok(())
}
