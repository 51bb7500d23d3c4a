//! This worker's crash journal, and what the journals of dead workers of the same servers
//! left behind (see [`crate::journal`]): told to Redis before the first pull, so that the
//! redeliveries of their messages are charged only for the tasks that were running.

use std::os::unix::fs::DirBuilderExt;
use std::path::Path;

use tracing::{debug, info, warn};

use crate::config::Config;
use crate::journal::{self, Crashed, Journal};
use crate::store::Store;

/// Opens this worker's journal (`slots` entries) and accounts for the dead workers' ones.
/// Never fails the start: without a usable directory the journal is kept in memory only, and
/// a crash is then charged to every held task, as NATS counts.
pub(super) async fn open_journal(
    config: &Config,
    identity: u64,
    store: &Store,
    slots: usize,
) -> Journal {
    let dir = config.state_dir();
    match prepare(&dir, identity, slots) {
        Ok((journal, crashed)) => {
            for dead in crashed {
                account(store, dead).await;
            }
            debug!(path = ?journal.path(), "crash journal open");
            journal
        }
        Err(e) => {
            warn!(
                state_dir = %dir.display(),
                error = %e,
                "cannot keep a crash journal there (set --state-dir to a writable directory): if this worker dies, every task it holds is charged a delivery"
            );
            Journal::in_memory(slots).expect("an anonymous mapping of a few KiB")
        }
    }
}

fn prepare(dir: &Path, identity: u64, slots: usize) -> std::io::Result<(Journal, Vec<Crashed>)> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let crashed = journal::recover::find(dir, identity)?;
    let journal = Journal::create(dir, identity, slots)?;
    Ok((journal, crashed))
}

/// Tells Redis what a dead worker held, then removes its journal; left for the next start if
/// Redis fails (its messages are then charged if they come back before).
async fn account(store: &Store, dead: Crashed) {
    let cause = dead.cause();
    if dead.running.is_empty() && dead.idle.is_empty() {
        dead.discard();
        return;
    }
    match store.record_crash(&dead.idle, &dead.running, &cause).await {
        Ok(()) => {
            warn!(
                pid = dead.pid,
                running = dead.running.len(),
                waiting = dead.idle.len(),
                cause = %cause,
                "a worker of these servers died holding tasks: the running ones are charged the delivery they lost, the waiting ones are not"
            );
            dead.discard();
        }
        Err(e) => info!(
            pid = dead.pid,
            error = %e,
            "cannot record what a dead worker held; its journal is kept for the next start"
        ),
    }
}
