//! `wss://`: the gateway terminates TLS for clients (rustls).

pub mod pem;
