//! systemd's notify protocol (`Type=notify`, `WatchdogSec=`), through the `sd-notify` crate:
//! `READY=1` once the worker is ready (right after its `worker ready` log line), `STOPPING=1`
//! when it starts to drain, and `WATCHDOG=1` every half watchdog period while its event loops
//! progress (see [`super::health`]). Without `NOTIFY_SOCKET` in the environment nothing is
//! sent, and nothing runs for it.

use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;
use tracing::{debug, warn};

use super::Monitor;
use crate::runner::Serving;

/// Whether a service manager listens (`NOTIFY_SOCKET` is set).
pub fn listening() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some_and(|s| !s.is_empty())
}

fn notify(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        debug!(error = %e, "cannot notify the service manager");
    }
}

/// Tells the service manager where the worker is in its life, until the runtime stops.
pub async fn report_phases(monitor: Arc<Monitor>) {
    let status = monitor.status();
    notify(&[NotifyState::Status("connecting to NATS and Redis")]);
    status.reached(Serving::Ready).await;
    if status.phase() == Serving::Ready {
        let text = format!("serving queues {}", monitor.queues().join(","));
        notify(&[NotifyState::Ready, NotifyState::Status(&text)]);
    }
    status.reached(Serving::Draining).await;
    notify(&[
        NotifyState::Stopping,
        NotifyState::Status("draining: waiting for running tasks"),
    ]);
}

/// Feeds the watchdog (`WatchdogSec=`, announced as `WATCHDOG_USEC`) while the event loops
/// progress, until the runtime stops. A stalled loop stops the feeding, and systemd then
/// kills and restarts the worker. Returns at once without a watchdog.
pub async fn feed_watchdog(monitor: Arc<Monitor>) {
    let Some(period) = sd_notify::watchdog_enabled() else {
        return;
    };
    let every = (period / 2).max(Duration::from_millis(100));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut starving = false;
    loop {
        tick.tick().await;
        let live = monitor.liveness();
        if live.live {
            if starving {
                warn!("the event loops progress again: feeding the systemd watchdog again");
                starving = false;
            }
            notify(&[NotifyState::Watchdog]);
        } else if !starving {
            starving = true;
            let stalled: Vec<&str> = live
                .stalled
                .iter()
                .map(|l| match l {
                    super::health::Loop::Tokio => "tokio",
                    super::health::Loop::Asyncio => "asyncio",
                })
                .collect();
            warn!(
                stalled = %stalled.join(","),
                timeout_secs = live.timeout_secs,
                "an event loop made no progress within liveness_timeout: no longer feeding the systemd watchdog"
            );
        }
    }
}
