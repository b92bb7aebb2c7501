//! Ingot's data plane.
//!
//! Modules are declared in the order bytes travel through the hub: `auth` decides who a peer is,
//! and the shared vocabulary (`id`, `limits`) sits beside it. The cores here are sans-IO: they take
//! byte slices, plain values and the current time as parameters, so they can be unit-tested,
//! fuzzed and benchmarked without sockets, files or a runtime. The control plane
//! (`ingot-control-plane`) is the only crate that knows HTTP; JSON appears here only where
//! routing reads message bodies (simd-json) and twins (`serde_json::Value`).

pub mod auth;
pub mod id;
pub mod iothub;
pub mod limits;
pub mod mqtt;
pub mod net;
pub mod route;
pub mod services;
pub mod shard;
pub mod store;
