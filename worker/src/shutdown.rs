//! SIGTERM and SIGINT: the first one starts a graceful shutdown, a second one quits at once.

use std::future::Future;

use futures::StreamExt;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook_tokio::Signals;
use tokio::sync::oneshot;

fn signal_name(signal: i32) -> &'static str {
    match signal {
        SIGINT => "SIGINT",
        SIGTERM => "SIGTERM",
        _ => "signal",
    }
}

/// Starts listening for SIGTERM and SIGINT and returns a future that completes on the first
/// one: pass it to [`run`](crate::run). A second signal exits the process at once with code
/// 128 + signal number, without waiting for running tasks (NATS redelivers them after
/// `ack_wait`). Call it inside the tokio runtime.
pub fn signals() -> std::io::Result<impl Future<Output = ()> + Send + 'static> {
    let mut signals = Signals::new([SIGTERM, SIGINT])?;
    let (first, first_rx) = oneshot::channel::<()>();
    tokio::spawn(async move {
        let Some(signal) = signals.next().await else {
            return;
        };
        tracing::info!(
            signal = signal_name(signal),
            "shutting down: no new tasks, running ones may finish (send the signal again to quit at once)"
        );
        let _ = first.send(());
        if let Some(signal) = signals.next().await {
            tracing::warn!(
                signal = signal_name(signal),
                "second signal: quitting at once; unfinished tasks will be redelivered after ack_wait"
            );
            std::process::exit(128 + signal);
        }
    });
    Ok(async move {
        // An error means the listener is gone, which only happens when the process ends.
        let _ = first_rx.await;
    })
}
