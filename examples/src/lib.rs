//! Demo backends for wasmgate: small, real WebSocket servers that the demo, the tests and the
//! benchmarks put behind the gateway.

pub mod chat;
pub mod demo;
pub mod echo;
pub mod login;
