//! Watching the worker from outside: the `--http-addr` endpoint (`/metrics`, `/livez`,
//! `/readyz`) and systemd's notify protocol (`READY=1`, the watchdog). See
//! docs/operations.md.
//!
//! Off unless asked for: without `--http-addr` and without `NOTIFY_SOCKET` nothing here is
//! made and no task is counted. Everything runs on the worker's tokio runtime, beside the
//! runner; the runner shows itself through [`Status`] and counts through a [`Hook`].
//!
//! Layout: `counts` (connection trouble, counted where it happens), `metrics` (the series and
//! the counting hook), `health` (heartbeats, liveness, readiness), `http` (the endpoint),
//! `systemd` (notify and watchdog).

pub mod counts;
mod health;
mod http;
mod metrics;
pub mod systemd;

use std::sync::Arc;
use std::time::Duration;

pub use health::{Liveness, Loop, Readiness};
pub use http::{bind, BindError};

use self::health::{Heartbeats, BEAT_EVERY};
use self::metrics::{Format, Metrics};
use crate::config::Config;
use crate::events::{Hook, Hooks};
use crate::python::{PythonError, PythonRuntime};
use crate::runner::Status;

/// What the endpoint and the watchdog read.
pub struct Monitor {
    status: Arc<Status>,
    beats: Heartbeats,
    /// With `--http-addr` only.
    metrics: Option<Metrics>,
    liveness_timeout: Duration,
    queues: Vec<String>,
    registered: usize,
}

impl Monitor {
    pub fn status(&self) -> &Arc<Status> {
        &self.status
    }

    pub fn queues(&self) -> &[String] {
        &self.queues
    }

    /// Whether the event loops progress.
    pub fn liveness(&self) -> Liveness {
        health::liveness(&self.beats, &self.status, self.liveness_timeout)
    }

    /// Whether the worker can take tasks now.
    pub async fn readiness(&self) -> Readiness {
        health::readiness(&self.status, self.registered).await
    }

    /// Every series, as text; `None` without `--http-addr`.
    async fn scrape(&self, format: Format) -> Option<String> {
        let metrics = self.metrics.as_ref()?;
        Some(metrics.scrape(&self.status, format).await)
    }

    /// The hook that counts tasks, with `--http-addr`.
    pub fn hook(&self) -> Option<Arc<dyn Hook>> {
        self.metrics.as_ref().map(Metrics::hook)
    }
}

/// A monitor made, not started yet.
pub struct Watch {
    monitor: Arc<Monitor>,
    listener: Option<std::net::TcpListener>,
}

impl Watch {
    /// The monitor for `listener` (bound from `--http-addr` with [`bind`]) and for systemd
    /// when `NOTIFY_SOCKET` is set; `None` when neither asks for one. Starts the asyncio
    /// loop's heartbeat: call it before the tokio runtime runs (it takes the GIL).
    pub fn prepare(
        config: &Config,
        python: &PythonRuntime,
        listener: Option<std::net::TcpListener>,
    ) -> Result<Option<Watch>, PythonError> {
        if listener.is_none() && !systemd::listening() {
            return Ok(None);
        }
        let metrics = listener.is_some().then(|| Metrics::new(config, python));
        let monitor = Arc::new(Monitor {
            status: Arc::default(),
            beats: Heartbeats::default(),
            metrics,
            liveness_timeout: Duration::from_secs_f64(config.liveness_timeout),
            queues: config.queues.clone(),
            registered: python.tasks().len(),
        });
        let beating = Arc::clone(&monitor);
        python.beat_on_asyncio_loop(BEAT_EVERY, move || beating.beats.beat(Loop::Asyncio))?;
        Ok(Some(Watch { monitor, listener }))
    }

    /// Starts the tokio heartbeat, the endpoint and the systemd reports on the current tokio
    /// runtime; returns `hooks` with the counting hook added, and the status for the runner
    /// to keep ([`crate::run_watched`]).
    pub fn start(self, hooks: Hooks) -> (Hooks, Arc<Status>) {
        let Watch { monitor, listener } = self;
        let beating = Arc::clone(&monitor);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(BEAT_EVERY);
            loop {
                tick.tick().await;
                beating.beats.beat(Loop::Tokio);
            }
        });
        if let Some(listener) = listener {
            tokio::spawn(http::serve(listener, Arc::clone(&monitor)));
        }
        if systemd::listening() {
            tokio::spawn(systemd::report_phases(Arc::clone(&monitor)));
            tokio::spawn(systemd::feed_watchdog(Arc::clone(&monitor)));
        }
        let hooks = match monitor.hook() {
            Some(hook) => hooks.with(hook),
            None => hooks,
        };
        (hooks, Arc::clone(&monitor.status))
    }
}
