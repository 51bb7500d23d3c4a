//! dbtask worker: fetches task messages from NATS JetStream, runs them in embedded CPython,
//! stores outcomes in Redis, then acks.
//!
//! `main.rs` only parses the command line and calls [`run`]; everything else lives here so that
//! tests can drive it with their own servers and their own shutdown future.

pub mod activity;
pub mod broker;
pub mod canvas;
pub mod cli;
pub mod config;
pub mod event_stream;
pub mod events;
pub mod journal;
pub mod limits;
pub mod memory;
pub mod monitor;
pub mod python;
pub mod record;
pub mod results;
pub mod retry;
pub mod revoke;
pub mod runner;
pub mod shutdown;
pub mod store;
pub mod telemetry;

pub use config::Config;
pub use runner::{run, run_watched, run_with_hooks, WorkerError};
