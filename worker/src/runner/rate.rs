//! Waiting for a rate-limited task's turn: one Redis round trip reserves a start slot shared by
//! the whole cluster, then the handler sleeps until it (in-progress acks keep going meanwhile).
//! Tasks without a rate limit never get here.

use dbtask_protocol::Rate;
use tracing::debug;

use super::{reached, Phase, Shared};

/// Waits until `task` may start under `rate`. `false`: the worker is shutting down, hand the
/// message back (its reserved slot is simply left unused).
pub(super) async fn wait_turn(shared: &Shared, task_id: &str, task: &str, rate: Rate) -> bool {
    let store = &shared.store;
    let wait = store
        .retrying("reserve a rate-limit slot", || {
            store.reserve_rate_slot(task, rate)
        })
        .await;
    if wait.is_zero() {
        return true;
    }
    debug!(
        task_id,
        task,
        wait_ms = wait.as_secs_f64() * 1000.0,
        "rate limit: waiting for the task's turn"
    );
    let mut phase = shared.phase.subscribe();
    tokio::select! {
        biased;
        _ = reached(&mut phase, Phase::Draining) => false,
        _ = tokio::time::sleep(wait) => true,
    }
}
