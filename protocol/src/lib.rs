//! The dbtask wire protocol, shared by the worker and the Python client.
//!
//! Everything that crosses a process boundary is defined here and nowhere else: the JSON task
//! message published to JetStream, the JSON result record stored in Redis, the subject, stream,
//! consumer, header and key names. No tokio, no pyo3: plain data and names (the optional
//! `nats` feature adds async-nats, only to map those onto its types).
//!
//! Arguments and results stay raw JSON ([`RawValue`](serde_json::value::RawValue)) on both
//! sides so that they are decoded once, straight into Python objects, never into an
//! intermediate `serde_json::Value`.
//!
//! One module per concept, every public item re-exported here (this file keeps only the
//! protocol version and the clock, `now_unix`):
//! - [`names`]: streams, subjects, consumers, Redis keys and channels, `Nats-Msg-Id` formats;
//! - [`stream`]: the task and dead-letter streams' description, one for the worker and client;
//! - [`headers`]: header names, the `Nats-Schedule` value, the task-message header builder;
//! - `nats` (feature `nats`): the stream description and the headers as async-nats types;
//! - [`message`]: the task message, its route, the revocation notice;
//! - [`record`]: task states, errors and the result record;
//! - [`validation`]: queue, task name and id checks, [`ProtocolError`];
//! - [`rate`]: rate limits;
//! - `redact`: [`redact_url`] and [`percent_decode`], server URLs and their credentials;
//! - [`nats_auth`]: the TLS and credential files of a NATS connection, named and checked once;
//! - `seeds` (feature `nats`): a NATS URL or a comma-separated list of seed servers, and the
//!   one set of credentials they carry;
//! - `signing` (feature `nats`): the optional HMAC signature of task messages (`--message-key`);
//! - [`canvas`]: workflows (signatures, chains, groups, chords);
//! - [`periodic`]: periodic schedules, their ticks and catch-up rule (used by path, not
//!   re-exported).

pub mod canvas;
pub mod headers;
pub mod message;
pub mod names;
#[cfg(feature = "nats")]
pub mod nats;
pub mod nats_auth;
pub mod periodic;
pub mod rate;
pub mod record;
#[cfg(feature = "redis")]
pub mod redis_conn;
#[cfg(feature = "nats")]
pub mod seeds;
#[cfg(feature = "nats")]
pub mod signing;
pub mod stream;
pub mod validation;

pub use canvas::{ChordRef, Signature};
pub use headers::*;
pub use message::*;
pub use names::*;
pub use nats_auth::{check_together, nkey_seed, NatsFile};
pub use rate::*;
pub use record::*;
pub use stream::*;
pub use validation::*;
mod redact;
pub use redact::{percent_decode, redact_url, split_servers};

/// Version of the message format; a worker rejects messages with a newer major version.
pub const PROTOCOL_VERSION: u32 = 1;

/// Current time as Unix seconds.
pub fn now_unix() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Optional counters are left out of the wire JSON while they are zero.
pub(crate) fn is_zero(n: &u32) -> bool {
    *n == 0
}
