//! outpost: durable event ingest for edge sites.
//!
//! Devices send events over MQTT (`mqtt`), HTTP and WebSocket
//! ([`ingest`]); each is authenticated ([`auth`]), rate-limited
//! (`limits`) and made durable in the SQLite site log ([`log`]) before it
//! is acknowledged. From the log, the forwarder ([`forward`]) sends batches
//! to the central PostgreSQL ([`central`]), and the stream hub (`stream`)
//! serves local subscribers. [`app`] wires these together and supervises
//! them; [`cli`] is the command line around it.
//!
//! The public modules are what the binary, the tests, the bench and the
//! fuzz targets use: the composition root, the configuration, the event
//! model, the site log and its CLI. The protocol front-ends (MQTT, HTTP
//! routes, streams, status page) are private: reach them through a running
//! [`app::Running`] and its sockets, as a device does.
#![deny(clippy::unwrap_used, clippy::await_holding_lock)]
#![warn(unreachable_pub)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod app;
pub mod auth;
pub mod central;
pub mod cli;
pub mod config;
pub mod event;
pub mod forward;
pub mod ingest;
pub mod log;
pub mod logging;
pub mod metrics;
pub mod payload;
pub mod sysinfo;

mod api;
mod doctor;
mod failpoint;
mod http;
mod limits;
mod live;
mod mqtt;
mod stream;
mod systemd;
mod tls;
