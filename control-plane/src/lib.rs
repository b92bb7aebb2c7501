//! Ingot's control plane: the HTTPS API that the Azure service SDKs speak, the identity registry
//! behind it, and the `ingot` command line.
//!
//! Modules in the order a request travels: `config` and `tls` set the server up, `api` accepts
//! requests and authorizes them against `policy`, `registry` stores identities. `client` and
//! `cli` are the other side of the same API.

#![forbid(unsafe_code)]

pub mod api;
pub mod cli;
pub mod client;
pub mod config;
pub mod delivery;
pub mod devices;
pub mod fsutil;
pub mod identity;
pub mod local;
pub mod monitor;
pub mod policy;
pub mod registry;
pub mod routing;
pub mod serve;
pub mod system_events;
pub mod tls;
pub mod twin;
