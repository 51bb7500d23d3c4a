//! Liveness and readiness: what `/livez` and `/readyz` answer, and what feeds the systemd
//! watchdog.
//!
//! Liveness: each event loop beats, from inside itself, every [`BEAT_EVERY`]: the tokio runtime
//! (a timer task) and the Python asyncio loop (a timer callback of the loop). A beat is a
//! relaxed store of a timestamp; a loop whose last beat is older than `liveness_timeout` is
//! stalled (a task blocking the asyncio loop, the tokio thread stuck).
//!
//! Readiness: the worker serves (`worker ready`, not draining), its NATS connection is up,
//! Redis answers a PING, and its task modules are imported.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::runner::{Serving, Status};

/// How often each loop beats.
pub const BEAT_EVERY: Duration = Duration::from_secs(1);
/// How long `/readyz` waits for Redis to answer its PING.
const PING_TIMEOUT: Duration = Duration::from_secs(1);

/// The last beat of each loop, in milliseconds since `origin`.
pub struct Heartbeats {
    origin: Instant,
    tokio: AtomicU64,
    asyncio: AtomicU64,
}

/// A loop that beats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Loop {
    Tokio,
    Asyncio,
}

impl Default for Heartbeats {
    fn default() -> Self {
        // Both start as just beaten: a loop is given `liveness_timeout` for its first beat.
        Heartbeats {
            origin: Instant::now(),
            tokio: AtomicU64::new(0),
            asyncio: AtomicU64::new(0),
        }
    }
}

impl Heartbeats {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn slot(&self, which: Loop) -> &AtomicU64 {
        match which {
            Loop::Tokio => &self.tokio,
            Loop::Asyncio => &self.asyncio,
        }
    }

    pub fn beat(&self, which: Loop) {
        self.slot(which).store(self.now_ms(), Ordering::Relaxed);
    }

    /// How long since `which` last beat.
    pub fn silence(&self, which: Loop) -> Duration {
        let last = self.slot(which).load(Ordering::Relaxed);
        Duration::from_millis(self.now_ms().saturating_sub(last))
    }
}

/// One loop's state in `/livez`.
#[derive(Debug, Serialize)]
pub struct LoopState {
    #[serde(rename = "loop")]
    pub which: Loop,
    pub ok: bool,
    /// Seconds since its last beat.
    pub silent_secs: f64,
}

/// What `/livez` answers.
#[derive(Debug, Serialize)]
pub struct Liveness {
    pub live: bool,
    /// The loops found stalled.
    pub stalled: Vec<Loop>,
    pub loops: Vec<LoopState>,
    pub timeout_secs: f64,
}

/// Whether the loops progress. The asyncio loop is left out once the worker has stopped (its
/// Python threads are being shut down).
pub fn liveness(beats: &Heartbeats, status: &Status, timeout: Duration) -> Liveness {
    let mut watched = vec![Loop::Tokio];
    if status.phase() < Serving::Stopped {
        watched.push(Loop::Asyncio);
    }
    let loops: Vec<LoopState> = watched
        .into_iter()
        .map(|which| {
            let silence = beats.silence(which);
            LoopState {
                which,
                ok: silence <= timeout,
                silent_secs: silence.as_secs_f64(),
            }
        })
        .collect();
    let stalled: Vec<Loop> = loops.iter().filter(|l| !l.ok).map(|l| l.which).collect();
    Liveness {
        live: stalled.is_empty(),
        stalled,
        loops,
        timeout_secs: timeout.as_secs_f64(),
    }
}

/// One part's state in `/readyz`.
#[derive(Debug, Serialize)]
pub struct Check {
    pub ok: bool,
    /// What is wrong, or what was found.
    pub detail: String,
}

impl Check {
    fn ok(detail: impl Into<String>) -> Check {
        Check {
            ok: true,
            detail: detail.into(),
        }
    }

    fn failed(detail: impl Into<String>) -> Check {
        Check {
            ok: false,
            detail: detail.into(),
        }
    }
}

/// What `/readyz` answers.
#[derive(Debug, Serialize)]
pub struct Readiness {
    pub ready: bool,
    /// The parts that are not ready: `worker`, `nats`, `redis`, `tasks`.
    pub failing: Vec<&'static str>,
    pub worker: Check,
    pub nats: Check,
    pub redis: Check,
    pub tasks: Check,
}

/// Whether the worker can take tasks now; `registered`: the task modules' task count.
pub async fn readiness(status: &Status, registered: usize) -> Readiness {
    let phase = status.phase();
    let worker = match phase {
        Serving::Ready => Check::ok("serving"),
        other => Check::failed(other.as_str()),
    };
    let nats = match status.broker() {
        None => Check::failed("not connected yet"),
        Some(broker) if broker.is_connected() => {
            Check::ok(format!("connected to {}", broker.url()))
        }
        Some(broker) => Check::failed(format!("disconnected from {} (reconnecting)", broker.url())),
    };
    let redis = match status.store() {
        None => Check::failed("not connected yet"),
        Some(store) => match store.ping(PING_TIMEOUT).await {
            Ok(()) => Check::ok(format!("answers at {}", store.url())),
            Err(e) => Check::failed(e.to_string()),
        },
    };
    // The modules are imported before the endpoint serves (a failed import stops the worker).
    let tasks = Check::ok(format!("imported: {registered} tasks registered"));
    let failing: Vec<&'static str> = [
        ("worker", &worker),
        ("nats", &nats),
        ("redis", &redis),
        ("tasks", &tasks),
    ]
    .into_iter()
    .filter(|(_, check)| !check.ok)
    .map(|(name, _)| name)
    .collect();
    Readiness {
        ready: failing.is_empty(),
        failing,
        worker,
        nats,
        redis,
        tasks,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loop_that_stops_beating_is_stalled_after_the_timeout() {
        let beats = Heartbeats::default();
        let status = Status::default();
        let timeout = Duration::from_millis(50);
        beats.beat(Loop::Tokio);
        beats.beat(Loop::Asyncio);
        assert!(liveness(&beats, &status, timeout).live);
        std::thread::sleep(Duration::from_millis(80));
        beats.beat(Loop::Tokio);
        let live = liveness(&beats, &status, timeout);
        assert!(!live.live);
        assert_eq!(live.stalled, vec![Loop::Asyncio]);
        let json = serde_json::to_string(&live).unwrap();
        assert!(json.contains(r#""stalled":["asyncio"]"#), "{json}");
    }
}
