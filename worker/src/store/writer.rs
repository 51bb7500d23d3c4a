//! Batches record writes from many tasks into one Redis pipeline.
//!
//! Every finished task hands its record to the writer and waits; the writer takes whatever is
//! queued at that moment (up to [`MAX_BATCH`]), stores it in one round trip, and wakes the
//! waiters, who then ack their messages. Under load this turns N round trips into one; when
//! idle, a lone record goes out at once.

use std::future::Future;

use dbtask_protocol::ResultRecord;
use tokio::sync::{mpsc, oneshot};

use super::{RecordWrite, Store};

/// Most records in one pipeline.
pub const MAX_BATCH: usize = 256;
/// Most bytes in one pipeline, but for a single record larger than this. The connection keeps
/// a buffer the size of the largest pipeline it sent: 256 large results in one pipeline left a
/// worker tens of MiB larger for good. A MiB is well past where batching stops paying.
const MAX_PIPELINE_BYTES: usize = 1 << 20;

struct Pending {
    write: RecordWrite,
    stored: oneshot::Sender<()>,
}

/// The writer stopped before storing the record (the process is shutting down).
#[derive(Debug, thiserror::Error)]
#[error("the result writer has stopped")]
pub struct WriterClosed;

/// Handle to the batching writer. Cheap to clone.
#[derive(Clone)]
pub struct Writer {
    tx: mpsc::UnboundedSender<Pending>,
    /// Seconds a result record lives in Redis.
    ttl: u64,
    /// Notifications are sharded (`SPUBLISH`, on a cluster).
    sharded: bool,
}

impl Writer {
    /// The handle and the writer loop; spawn the loop. It ends when every handle is dropped
    /// and the queued records are stored.
    pub fn new(store: Store) -> (Writer, impl Future<Output = ()> + Send + 'static) {
        let (tx, rx) = mpsc::unbounded_channel();
        let ttl = store.result_ttl();
        let sharded = store.sharded();
        (Writer { tx, ttl, sharded }, run(store, rx))
    }

    /// Queues a record to be stored, without waiting for it: for states nobody acks on
    /// (RECEIVED). Dropped silently once the writer has stopped.
    pub fn enqueue(&self, record: &ResultRecord) {
        let (stored, _) = oneshot::channel();
        let _ = self.tx.send(Pending {
            write: RecordWrite::new(record, self.ttl, self.sharded),
            stored,
        });
    }

    /// Stores a record (and publishes it when its state is ready); returns once Redis has it.
    /// Redis outages are retried inside the writer, so this only fails at shutdown.
    pub async fn write(&self, record: &ResultRecord) -> Result<(), WriterClosed> {
        self.write_for(record, None).await
    }

    /// [`write`](Self::write), kept `ttl` seconds (`None`: the store's `result_ttl`).
    pub async fn write_for(
        &self,
        record: &ResultRecord,
        ttl: Option<u64>,
    ) -> Result<(), WriterClosed> {
        let (stored, done) = oneshot::channel();
        self.tx
            .send(Pending {
                write: RecordWrite::new(record, ttl.unwrap_or(self.ttl), self.sharded),
                stored,
            })
            .map_err(|_| WriterClosed)?;
        done.await.map_err(|_| WriterClosed)
    }

    /// Queues a write made elsewhere (a task's own state), without waiting for it. Writes
    /// reach Redis in the order they are queued, so a task's final record, queued after its
    /// run, is never hidden by one of its states. False once the writer has stopped.
    pub fn enqueue_write(&self, write: RecordWrite) -> bool {
        let (stored, _) = oneshot::channel();
        self.tx.send(Pending { write, stored }).is_ok()
    }

    /// A task's own state (`update_state`), stored for `ttl` seconds and published whatever
    /// its state (see [`RecordWrite::published`]).
    pub fn published(&self, id: &str, json: &[u8], ttl: u64) -> RecordWrite {
        RecordWrite::published(id, json, ttl, self.sharded)
    }

    /// Seconds a record lives when its task sets no `result_ttl`.
    pub fn default_ttl(&self) -> u64 {
        self.ttl
    }
}

async fn run(store: Store, mut rx: mpsc::UnboundedReceiver<Pending>) {
    let mut batch: Vec<Pending> = Vec::with_capacity(MAX_BATCH);
    let mut waiters: Vec<oneshot::Sender<()>> = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let mut queued = batch.drain(..).peekable();
        while queued.peek().is_some() {
            // The commands move into the pipeline: nothing is copied, and a retry sends the same.
            let mut pipe = redis::Pipeline::with_capacity(2 * queued.len());
            let mut bytes = 0;
            while let Some(Pending { write, stored }) =
                queued.next_if(|p| bytes == 0 || bytes + p.write.bytes <= MAX_PIPELINE_BYTES)
            {
                let RecordWrite {
                    set,
                    publish,
                    bytes: size,
                } = write;
                bytes += size;
                pipe.add_command(set);
                if let Some(publish) = publish {
                    pipe.add_command(publish);
                }
                waiters.push(stored);
            }
            // Records whose waiter gave up (its message was handed back at shutdown) are still
            // written: they are correct, and a redelivery then finds the outcome instead of
            // rerunning.
            store.retrying("store results", || store.put(&pipe)).await;
            tracing::trace!(records = waiters.len(), bytes, "stored a batch of records");
            for stored in waiters.drain(..) {
                let _ = stored.send(());
            }
        }
    }
}
