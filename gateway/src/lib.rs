//! wasmgate: a WebSocket gateway whose per-connection decisions are made by WebAssembly
//! plugins.
//!
//! A connection's life, module by module:
//! [`listener`] accepts ([`proxy_protocol`] reads who the client is behind a balancer) →
//! [`handshake`] validates the upgrade ([`normalize`] puts its path and host in normal form,
//! [`forwarding`] decides whose forwarding headers count) → [`routes`] picks the route →
//! [`upstream`] opens the upstream WebSocket → [`relay`] moves frames until both sides close.
//! [`gateway`] ties them together behind [`Gateway::start`]; [`config`] is the TOML schema;
//! [`tls`] terminates `wss://`; [`session`] keeps a connection alive across upstream servers.
//! [`static_files`] answers plain GETs on routes that serve a directory.
//! [`admin`] serves health, metrics and the [`dashboard`]; [`access_log`] writes a line per
//! connection; [`cluster`] makes several gateways one (Redis); [`upgrade`] hands the listeners
//! to a new process. [`limits`] admits client sockets; [`resources`] handles the gateway running
//! out of descriptors or ports.

pub mod access_log;
pub mod admin;
pub mod cluster;
pub mod compression;
pub mod config;
pub mod dashboard;
pub mod forwarding;
pub mod gateway;
pub mod handshake;
pub mod limits;
pub mod listener;
pub mod metrics;
pub mod normalize;
pub mod plugin;
pub mod proxy;
pub mod proxy_protocol;
pub mod relay;
pub mod resources;
pub mod routes;
pub mod session;
pub mod static_files;
pub mod upgrade;
pub mod tls;
pub mod upstream;
pub mod workers;

pub use config::Config;
pub use gateway::{check_plugins, Gateway};
