//! What the runner shows of itself to whoever watches it from outside its thread (the
//! `--http-addr` endpoint, systemd): where it is in its life, its connections once made, and
//! on request its load. Nobody watching (the default): none of this exists.
//!
//! The runner's state lives on its one thread without locks (`Rc`, `Cell`), so a watcher never
//! reads it directly: [`Status::load`] asks a small task on that thread, which answers from
//! the live counts. Nothing is counted per task for it.

use std::rc::{Rc, Weak};
use std::sync::{Mutex, OnceLock};

use tokio::sync::{mpsc, oneshot, watch};

use super::Shared;
use crate::broker::Broker;
use crate::store::Store;

/// Where the worker is in its life, as a watcher sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Serving {
    /// Connecting to NATS and Redis, setting up the stream and the consumers.
    Starting,
    /// `worker ready`: pulling and running tasks.
    Ready,
    /// Shutdown requested: no more pulls, running tasks finish.
    Draining,
    /// Every message is acked or handed back; the Python threads are being stopped.
    Stopped,
}

impl Serving {
    pub fn as_str(self) -> &'static str {
        match self {
            Serving::Starting => "starting",
            Serving::Ready => "ready",
            Serving::Draining => "draining",
            Serving::Stopped => "stopped",
        }
    }
}

/// The worker's load at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Load {
    /// Tasks holding a concurrency slot (their function is running).
    pub running: usize,
    /// Messages received and waiting for a slot: in their handlers, or handed over to the
    /// Python threads and not taken by one yet.
    pub prefetched: usize,
    /// Messages held (received and not yet acked or handed back), the two above included.
    pub held: usize,
    /// Slots: tasks allowed to run at once.
    pub concurrency: usize,
}

type LoadRequest = oneshot::Sender<Load>;

/// Shared between the runner (which fills it) and its watchers. `Send + Sync`.
pub struct Status {
    phase: watch::Sender<Serving>,
    connections: OnceLock<(Broker, Store)>,
    /// Where load requests go, once the runner serves.
    loads: Mutex<Option<mpsc::UnboundedSender<LoadRequest>>>,
}

impl Default for Status {
    fn default() -> Self {
        Status {
            phase: watch::channel(Serving::Starting).0,
            connections: OnceLock::new(),
            loads: Mutex::new(None),
        }
    }
}

impl std::fmt::Debug for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Status")
            .field("phase", &self.phase())
            .finish_non_exhaustive()
    }
}

impl Status {
    pub fn phase(&self) -> Serving {
        *self.phase.borrow()
    }

    /// Completes once the worker is at least at `phase`.
    pub async fn reached(&self, phase: Serving) {
        let mut rx = self.phase.subscribe();
        // The sender lives in `self`: the wait ends only by reaching the phase.
        let _ = rx.wait_for(|p| *p >= phase).await;
    }

    /// The NATS connection, once made.
    pub fn broker(&self) -> Option<&Broker> {
        self.connections.get().map(|(broker, _)| broker)
    }

    /// The Redis store, once connected.
    pub fn store(&self) -> Option<&Store> {
        self.connections.get().map(|(_, store)| store)
    }

    /// The load now; `None` unless the worker serves.
    pub async fn load(&self) -> Option<Load> {
        let tx = self
            .loads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()?;
        let (reply, answer) = oneshot::channel();
        tx.send(reply).ok()?;
        answer.await.ok()
    }

    pub(super) fn set_phase(&self, phase: Serving) {
        self.phase.send_if_modified(|p| {
            let forward = phase > *p;
            if forward {
                *p = phase;
            }
            forward
        });
    }

    pub(super) fn connected(&self, broker: &Broker, store: &Store) {
        let _ = self.connections.set((broker.clone(), store.clone()));
    }

    /// Answers load requests from the runner's thread while `shared` lives; spawned on the
    /// runner's `LocalSet`. Holds `shared` weakly: it never delays the shutdown.
    pub(super) fn answer_loads(&self, shared: &Rc<Shared>) {
        let (tx, mut rx) = mpsc::unbounded_channel::<LoadRequest>();
        *self.loads.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx);
        let shared: Weak<Shared> = Rc::downgrade(shared);
        tokio::task::spawn_local(async move {
            while let Some(reply) = rx.recv().await {
                let Some(shared) = shared.upgrade() else {
                    break;
                };
                let _ = reply.send(load(&shared));
            }
        });
    }
}

fn load(shared: &Shared) -> Load {
    let concurrency = shared.config.concurrency;
    Load {
        running: concurrency.saturating_sub(shared.slots.available_permits()),
        prefetched: shared.waiting_for_slots(),
        held: shared.in_flight.get(),
        concurrency,
    }
}
