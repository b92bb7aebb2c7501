//! Message routing: the IoT Hub routing query language and route tables (sans-IO).
//!
//! A route condition (azure-protocol.md section 7.2, `docs/routing.md`) is parsed once
//! ([`parse`]), compiled to a flat program ([`Condition`]) and evaluated per message by an
//! [`Evaluator`] the caller keeps per shard, against any [`MessageView`]. Evaluation does not
//! recurse and, once the evaluator's buffers have grown to fit, does not allocate; `$body` is
//! parsed with simd-json at most once per message, and only when a condition reaches it.
//!
//! A [`RouteTable`] is a compiled, immutable set of routes: [`RouteTable::matches`] fills an
//! [`EndpointSet`] with the endpoints one message goes to.

mod compile;
mod enrich;
mod eval;
mod message;
pub mod parse;
mod simple;

#[cfg(test)]
mod tests;

pub use compile::Condition;
pub use enrich::{EnrichmentError, EnrichmentSpec, ENRICHMENTS_MAX};
pub use eval::{Evaluator, Outcome, Session, SCRATCH_BYTES_MAX};
pub use message::{body_encoding, eq_ignore_case, BodyEncoding, MessageView, RouteMessage};
pub use parse::ParseError;

/// Azure's limit on routes per hub (paid tiers).
pub const ROUTES_MAX: usize = 100;
/// Longest route name.
pub const ROUTE_NAME_BYTES_MAX: usize = 64;
/// The built-in endpoint, always index 0 of a table's endpoints.
pub const EVENTS_ENDPOINT: &str = "events";

/// Which messages a route sees (ARM `source`; the sources Ingot produces).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RouteSource {
    DeviceMessages,
    TwinChangeEvents,
    DeviceLifecycleEvents,
    DeviceConnectionStateEvents,
}

/// One route as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteSpec {
    pub name: String,
    pub source: RouteSource,
    /// The condition; `None` matches every message.
    pub condition: Option<String>,
    /// Endpoint names; Azure takes exactly one per route.
    pub endpoint_names: Vec<String>,
    pub is_enabled: bool,
}

/// The fallback route: device messages that no route matched go to `events` when enabled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FallbackRoute {
    pub enabled: bool,
}

impl Default for FallbackRoute {
    fn default() -> Self {
        FallbackRoute { enabled: true }
    }
}

/// Why a set of routes does not compile.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RouteError {
    #[error("too many routes: {count} (at most {ROUTES_MAX})")]
    TooManyRoutes { count: usize },
    #[error("invalid route name '{name}': use 1 to 64 letters, digits, '.', '_' or '-'")]
    InvalidName { name: String },
    #[error("duplicate route name '{name}'")]
    DuplicateName { name: String },
    #[error("route '{route}' must name exactly one endpoint, not {count}")]
    EndpointCount { route: String, count: usize },
    #[error("route '{route}' has an empty endpoint name")]
    EmptyEndpointName { route: String },
    #[error("route '{route}': invalid condition: {error}")]
    Condition { route: String, error: ParseError },
}

/// A set of endpoint indexes (into [`RouteTable::endpoint_names`]): a 128-bit set, enough for
/// 100 routes of one endpoint each plus `events`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct EndpointSet(u128);

impl EndpointSet {
    /// Largest number of distinct endpoints a set (and so a table) can hold.
    pub const CAPACITY: usize = 128;

    pub fn new() -> EndpointSet {
        EndpointSet(0)
    }

    pub fn insert(&mut self, index: usize) {
        if index < Self::CAPACITY {
            self.0 |= 1 << index;
        }
    }

    pub fn contains(&self, index: usize) -> bool {
        index < Self::CAPACITY && self.0 & (1 << index) != 0
    }

    pub fn clear(&mut self) {
        self.0 = 0;
    }

    pub fn is_empty(&self) -> bool {
        self.0 == 0
    }

    pub fn len(&self) -> usize {
        self.0.count_ones() as usize
    }

    /// The indexes in increasing order.
    pub fn iter(&self) -> impl Iterator<Item = usize> {
        let mut bits = self.0;
        std::iter::from_fn(move || {
            if bits == 0 {
                return None;
            }
            let index = bits.trailing_zeros() as usize;
            bits &= bits - 1;
            Some(index)
        })
    }
}

#[derive(Debug, Clone)]
struct CompiledRoute {
    source: RouteSource,
    /// `None`: no condition, always matches.
    condition: Option<Condition>,
    /// The condition in the simple shape, evaluated without the program.
    simple: Option<simple::Simple>,
    endpoint: usize,
}

fn source_index(source: RouteSource) -> usize {
    match source {
        RouteSource::DeviceMessages => 0,
        RouteSource::TwinChangeEvents => 1,
        RouteSource::DeviceLifecycleEvents => 2,
        RouteSource::DeviceConnectionStateEvents => 3,
    }
}

/// What routing one message found, besides the endpoints.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RouteReport {
    /// Routes whose condition was evaluated and `true` (a route whose endpoint an earlier route
    /// already chose is skipped, not evaluated).
    pub matched: u32,
    /// Conditions that evaluated to undefined, null or a non-boolean (Azure logs a routing
    /// error for each; the route does not match).
    pub undefined: u32,
    /// Whether the fallback route delivered the message to `events`.
    pub fallback: bool,
}

/// Compiled routes, immutable once built (swap a new table in to change routes).
#[derive(Debug, Clone)]
pub struct RouteTable {
    /// Enabled routes only, in configuration order.
    routes: Vec<CompiledRoute>,
    /// `events` first, then every other endpoint name in order of first use.
    endpoints: Vec<String>,
    fallback: bool,
    /// No routes were configured at all: every device message goes to `events`.
    empty: bool,
    enrichments: Vec<enrich::Enrichment>,
    /// The properties simple conditions read, by slot, with their constants.
    slots: simple::Slots,
    /// By source: whether a route of it needs the program (and so an evaluator session).
    programs: [bool; 4],
}

fn valid_route_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= ROUTE_NAME_BYTES_MAX
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

impl RouteTable {
    /// Validates and compiles routes: names (1-64 of `A-Za-z0-9._-`, unique), at most 100
    /// routes, exactly one endpoint each, and every condition (also of disabled routes).
    pub fn compile(
        routes: &[RouteSpec],
        fallback: FallbackRoute,
    ) -> Result<RouteTable, RouteError> {
        if routes.len() > ROUTES_MAX {
            return Err(RouteError::TooManyRoutes {
                count: routes.len(),
            });
        }
        let mut endpoints = vec![EVENTS_ENDPOINT.to_owned()];
        let mut compiled = Vec::with_capacity(routes.len());
        let mut slots = simple::Slots::default();
        let mut programs = [false; 4];
        for (i, route) in routes.iter().enumerate() {
            if !valid_route_name(&route.name) {
                return Err(RouteError::InvalidName {
                    name: route.name.clone(),
                });
            }
            if routes[..i].iter().any(|r| r.name == route.name) {
                return Err(RouteError::DuplicateName {
                    name: route.name.clone(),
                });
            }
            let [endpoint_name] = route.endpoint_names.as_slice() else {
                return Err(RouteError::EndpointCount {
                    route: route.name.clone(),
                    count: route.endpoint_names.len(),
                });
            };
            if endpoint_name.is_empty() {
                return Err(RouteError::EmptyEndpointName {
                    route: route.name.clone(),
                });
            }
            // Parsed once: compiled to the program, and to the simple shape when it has it.
            let (condition, simple) = match &route.condition {
                None => (None, None),
                Some(text) => {
                    let expr = parse::parse(text).map_err(|error| RouteError::Condition {
                        route: route.name.clone(),
                        error,
                    })?;
                    let simple = route
                        .is_enabled
                        .then(|| simple::Simple::from_expr(&expr, &mut slots))
                        .flatten();
                    (Some(Condition::from_expr(&expr, text)), simple)
                }
            };
            let endpoint = match endpoints.iter().position(|e| e == endpoint_name) {
                Some(index) => index,
                None => {
                    endpoints.push(endpoint_name.clone());
                    endpoints.len() - 1
                }
            };
            if route.is_enabled {
                if condition.is_some() && simple.is_none() {
                    programs[source_index(route.source)] = true;
                }
                compiled.push(CompiledRoute {
                    source: route.source,
                    condition,
                    simple,
                    endpoint,
                });
            }
        }
        Ok(RouteTable {
            routes: compiled,
            endpoints,
            fallback: fallback.enabled,
            empty: routes.is_empty(),
            enrichments: Vec::new(),
            slots,
            programs,
        })
    }

    /// Adds message enrichments (at most 10): `hub_name` is what `$iothubname` stands for.
    /// Enrichments of endpoints that no route sends to are kept but never apply.
    pub fn with_enrichments(
        mut self,
        specs: &[EnrichmentSpec],
        hub_name: &str,
    ) -> Result<RouteTable, EnrichmentError> {
        let endpoints = &self.endpoints;
        self.enrichments = enrich::compile(specs, hub_name, |name| {
            endpoints.iter().position(|e| e == name)
        })?;
        Ok(self)
    }

    pub fn has_enrichments(&self) -> bool {
        !self.enrichments.is_empty()
    }

    /// Each enrichment's value for a sender with this twin (see [`RouteTable::enrich`]).
    pub fn enrichment_values<'a>(
        &'a self,
        twin: Option<&'a serde_json::Value>,
    ) -> Vec<std::borrow::Cow<'a, str>> {
        enrich::values(&self.enrichments, twin)
    }

    /// Enriched application properties of `messages` bound for endpoint `endpoint`, written to
    /// `storage`, as a range of it per message; `None` when no enrichment applies there.
    pub fn enrich<'a>(
        &'a self,
        values: &'a [std::borrow::Cow<'a, str>],
        endpoint: usize,
        messages: &[crate::store::MessageRef<'a>],
        storage: &mut Vec<crate::store::PropertyRef<'a>>,
    ) -> Option<Vec<std::ops::Range<usize>>> {
        enrich::properties(&self.enrichments, values, endpoint, messages, storage)
    }

    /// The endpoint names, indexed as in [`EndpointSet`]; index 0 is always `events`.
    pub fn endpoint_names(&self) -> &[String] {
        &self.endpoints
    }

    /// Whether an enabled route's condition reads `$twin`: connections then need their
    /// device's twin to route.
    pub fn reads_twin(&self) -> bool {
        self.routes
            .iter()
            .any(|r| r.condition.as_ref().is_some_and(Condition::reads_twin))
            || self
                .enrichments
                .iter()
                .any(|e| matches!(e.source, enrich::Source::Twin { .. }))
    }

    /// Whether any enabled route reads this source (non-telemetry events need not be produced
    /// at all when none does).
    pub fn has_source(&self, source: RouteSource) -> bool {
        self.routes.iter().any(|r| r.source == source)
            || (source == RouteSource::DeviceMessages && (self.fallback || self.empty))
    }

    /// Routes one message: clears `out`, then adds the endpoint of every enabled route of
    /// `source` whose condition is `true` (each endpoint once). Device messages that no route
    /// matched go to `events` when the fallback is enabled, and every device message does when
    /// the table has no routes at all. Other sources go only where their routes send them.
    pub fn matches<M: MessageView + ?Sized>(
        &self,
        source: RouteSource,
        message: &M,
        evaluator: &mut Evaluator,
        out: &mut EndpointSet,
    ) -> RouteReport {
        out.clear();
        let mut report = RouteReport::default();
        // Properties of simple conditions are looked up once per message; the program's
        // session (and its buffers) only when a route of this source needs it.
        let mut memo = simple::Memo::new();
        let mut session = self.programs[source_index(source)].then(|| evaluator.session(message));
        for route in self.routes.iter().filter(|r| r.source == source) {
            // A route whose endpoint is already chosen cannot add anything: skip its condition.
            if out.contains(route.endpoint) {
                continue;
            }
            let outcome = match (&route.simple, &route.condition, &mut session) {
                (Some(simple), _, _) => simple.evaluate(&self.slots, message, &mut memo),
                (None, None, _) => Outcome::Match,
                (None, Some(condition), Some(session)) => session.evaluate(condition),
                // Not reached: `programs` says a session is needed for this source.
                (None, Some(_), None) => Outcome::Undefined,
            };
            match outcome {
                Outcome::Match => {
                    report.matched += 1;
                    out.insert(route.endpoint);
                }
                Outcome::NoMatch => {}
                Outcome::Undefined => report.undefined += 1,
            }
        }
        if source == RouteSource::DeviceMessages
            && report.matched == 0
            && (self.fallback || self.empty)
        {
            report.fallback = true;
            out.insert(0);
        }
        report
    }
}
