//! outpost: durable event ingest for edge sites. See `shared/design.md` for
//! the architecture; data flows ingest → site log → (forwarder, stream hub).
#![deny(clippy::unwrap_used, clippy::await_holding_lock)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod api;
pub mod app;
pub mod auth;
pub mod central;
pub mod cli;
pub mod config;
pub mod doctor;
pub mod event;
pub mod failpoint;
pub mod forward;
pub mod http;
pub mod ingest;
pub mod limits;
pub mod live;
pub mod log;
pub mod logging;
pub mod metrics;
pub mod mqtt;
pub mod stream;
pub mod sysinfo;
pub mod systemd;
pub mod tls;
