//! outpost: durable event ingest for edge sites. See `shared/design.md` for
//! the architecture; data flows ingest → site log → (forwarder, stream hub).
#![deny(clippy::unwrap_used, clippy::await_holding_lock)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

mod api;
pub mod app;
pub mod auth;
pub mod central;
pub mod cli;
pub mod config;
mod doctor;
pub mod event;
mod failpoint;
pub mod forward;
mod http;
pub mod ingest;
mod limits;
mod live;
pub mod log;
pub mod logging;
pub mod metrics;
mod mqtt;
mod stream;
pub mod sysinfo;
mod systemd;
mod tls;
