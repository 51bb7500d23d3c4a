//! One Redis pub/sub connection per client, shared by every `wait()` of the process and
//! demultiplexed by task id.
//!
//! A waiter registers its task id and waits for [`Event::Subscribed`]; only then does it read
//! the record (subscribe first, then check, then wait: a result stored in between cannot be
//! missed). One task owns the connection: it batches the SUBSCRIBE/UNSUBSCRIBE commands of
//! all waiters that arrived meanwhile, routes each `dbtask:done:{<id>}` message to the waiters
//! of that id, and, when the connection drops, reconnects with backoff, subscribes again and
//! sends every waiter `Subscribed` once more, so that each reads its record again.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use dbtask_protocol::redis_conn::PubSubSource;
use dbtask_protocol::{done_channel, done_channel_task};
use futures::StreamExt;
use redis::aio::{PubSubSink, PubSubStream};
use tokio::sync::mpsc;

use crate::error::ClientError;

/// Why the pub/sub connection is down, with Redis's error when there is one. Shared by every
/// waiter that hears of it.
#[derive(Debug, thiserror::Error)]
pub enum Down {
    #[error("cannot reach Redis at {url} (timed out)")]
    ConnectTimedOut { url: String },
    #[error("cannot reach Redis at {url} ({source})")]
    Connect {
        url: String,
        source: redis::RedisError,
    },
    #[error("lost the Redis pub/sub connection to {url} (the connection was closed)")]
    Closed { url: String },
    #[error("lost the Redis pub/sub connection to {url} ({source})")]
    Lost {
        url: String,
        source: redis::RedisError,
    },
}

/// What a waiter hears.
#[derive(Debug, Clone)]
pub enum Event {
    /// The subscription for its id is active (again): read the record now.
    Subscribed,
    /// The record JSON published by the worker.
    Done(Bytes),
    /// The pub/sub connection is down and could not be re-established yet (the waiter stays
    /// registered and hears `Subscribed` once it is).
    Down(Arc<Down>),
}

enum Command {
    Register {
        id: String,
        waiter: u64,
        tx: mpsc::UnboundedSender<Event>,
    },
    Unregister {
        id: String,
        waiter: u64,
    },
    /// Stop: drop the connection; every waiter's channel closes.
    Close,
}

pub struct Notifier {
    commands: mpsc::UnboundedSender<Command>,
    next_waiter: AtomicU64,
}

/// Unregisters on drop, also when the waiting future is cancelled. Owns what it needs, so
/// that a progress stream held by Python can keep one.
pub struct Registration {
    commands: mpsc::UnboundedSender<Command>,
    id: String,
    waiter: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Unregister {
            id: std::mem::take(&mut self.id),
            waiter: self.waiter,
        });
    }
}

impl Notifier {
    /// Starts the task that owns `connection` (already connected by the caller, so that
    /// `init` fails fast when Redis is down). The task ends when the notifier is dropped.
    pub fn start(
        client: PubSubSource,
        connection: redis::aio::PubSub,
        connect_timeout: Duration,
        safe_url: String,
    ) -> Notifier {
        let (tx, rx) = mpsc::unbounded_channel();
        let (sink, stream) = connection.split();
        let owner = Owner {
            client,
            connect_timeout,
            safe_url,
            conn: Some((sink, stream)),
            entries: HashMap::new(),
            unsubscribe: HashSet::new(),
            down: None,
        };
        crate::runtime::spawn(owner.run(rx));
        Notifier {
            commands: tx,
            next_waiter: AtomicU64::new(1),
        }
    }

    /// Registers interest in `id`; events arrive on the returned receiver.
    pub fn register(
        &self,
        id: &str,
    ) -> Result<(Registration, mpsc::UnboundedReceiver<Event>), ClientError> {
        let waiter = self.next_waiter.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        self.commands
            .send(Command::Register {
                id: id.to_owned(),
                waiter,
                tx,
            })
            .map_err(|_| ClientError::runtime("the client is closed".to_owned()))?;
        Ok((
            Registration {
                commands: self.commands.clone(),
                id: id.to_owned(),
                waiter,
            },
            rx,
        ))
    }

    /// Ends the connection's task; waiters see their channel close.
    pub fn close(&self) {
        let _ = self.commands.send(Command::Close);
    }
}

struct Entry {
    waiters: Vec<(u64, mpsc::UnboundedSender<Event>)>,
    /// SUBSCRIBE confirmed on the current connection.
    subscribed: bool,
}

struct Owner {
    client: PubSubSource,
    connect_timeout: Duration,
    safe_url: String,
    conn: Option<(PubSubSink, PubSubStream)>,
    entries: HashMap<String, Entry>,
    /// Ids whose last waiter left while subscribed.
    unsubscribe: HashSet<String>,
    /// Why the connection is down, while it is.
    down: Option<Arc<Down>>,
}

async fn next_message(conn: &mut Option<(PubSubSink, PubSubStream)>) -> Option<redis::Msg> {
    match conn {
        Some((_, stream)) => stream.next().await,
        None => std::future::pending().await,
    }
}

const BACKOFF_MIN: Duration = Duration::from_millis(50);
/// How often a client of a Sentinel group asks where the master is.
const SENTINEL_CHECK: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

impl Owner {
    async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        let mut backoff = BACKOFF_MIN;
        // Sentinel: a master that a failover replaced keeps its subscribers for a while but
        // hears nothing the new master publishes. Asking the Sentinels now and then finds the
        // move; the connection is then made again (to the new master) and every waiter reads
        // its record again.
        let sentinel = match &self.client {
            PubSubSource::Sentinel(master) => Some(master.clone()),
            _ => None,
        };
        let mut watch = tokio::time::interval(SENTINEL_CHECK);
        watch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let connected = self.conn.is_some();
            tokio::select! {
                _ = watch.tick(), if sentinel.is_some() && connected => {
                    let moved = match &sentinel {
                        Some(master) => master.check().await.unwrap_or(false),
                        None => false,
                    };
                    if moved {
                        self.lost(None);
                        backoff = BACKOFF_MIN;
                    }
                }
                command = commands.recv() => {
                    let Some(command) = command else { return };
                    if !self.apply(command) {
                        return;
                    }
                    while let Ok(command) = commands.try_recv() {
                        if !self.apply(command) {
                            return;
                        }
                    }
                    self.sync().await;
                }
                message = next_message(&mut self.conn), if connected => match message {
                    Some(msg) => self.dispatch(msg),
                    None => self.lost(None),
                },
                () = tokio::time::sleep(backoff), if !connected => {
                    match self.connect().await {
                        Ok(()) => {
                            backoff = BACKOFF_MIN;
                            self.sync().await;
                        }
                        Err(e) => {
                            backoff = (backoff * 2).min(BACKOFF_MAX);
                            self.down = Some(Arc::new(e));
                        }
                    }
                }
            }
        }
    }

    async fn connect(&mut self) -> Result<(), Down> {
        let url = || self.safe_url.clone();
        let conn = tokio::time::timeout(self.connect_timeout, self.client.connect())
            .await
            .map_err(|_| Down::ConnectTimedOut { url: url() })?
            .map_err(|source| Down::Connect { url: url(), source })?;
        self.conn = Some(conn.split());
        self.down = None;
        Ok(())
    }

    /// The connection is gone: closed by the server (`None`), or broken by `error`.
    fn lost(&mut self, error: Option<redis::RedisError>) {
        self.conn = None;
        self.unsubscribe.clear();
        for entry in self.entries.values_mut() {
            entry.subscribed = false;
        }
        let url = self.safe_url.clone();
        self.down = Some(Arc::new(match error {
            None => Down::Closed { url },
            Some(source) => Down::Lost { url, source },
        }));
    }

    /// Applies one command; false means stop.
    fn apply(&mut self, command: Command) -> bool {
        match command {
            Command::Close => return false,
            Command::Register { id, waiter, tx } => {
                // Told at once that Redis is down, and still registered: it hears
                // `Subscribed` when the connection is back, if it waits that long.
                if self.conn.is_none() {
                    if let Some(why) = &self.down {
                        let _ = tx.send(Event::Down(Arc::clone(why)));
                    }
                }
                // Its last waiter left in this same batch: the subscription is still active.
                let still = self.unsubscribe.remove(&id);
                let entry = self.entries.entry(id).or_insert_with(|| Entry {
                    waiters: Vec::new(),
                    subscribed: still,
                });
                if entry.subscribed {
                    let _ = tx.send(Event::Subscribed);
                }
                entry.waiters.push((waiter, tx));
            }
            Command::Unregister { id, waiter } => {
                if let Some(entry) = self.entries.get_mut(&id) {
                    entry.waiters.retain(|(w, _)| *w != waiter);
                    if entry.waiters.is_empty() {
                        let subscribed = entry.subscribed;
                        self.entries.remove(&id);
                        if subscribed {
                            self.unsubscribe.insert(id);
                        }
                    }
                }
            }
        }
        true
    }

    /// Sends the batched UNSUBSCRIBE and SUBSCRIBE commands and tells the new subscribers.
    async fn sync(&mut self) {
        let Some((sink, _)) = self.conn.as_mut() else {
            return;
        };
        if !self.unsubscribe.is_empty() {
            let channels: Vec<String> = self
                .unsubscribe
                .drain()
                .map(|id| done_channel(&id))
                .collect();
            if let Err(e) = sink.unsubscribe(&channels).await {
                return self.lost(Some(e));
            }
        }
        let pending: Vec<String> = self
            .entries
            .iter()
            .filter(|(_, e)| !e.subscribed)
            .map(|(id, _)| id.clone())
            .collect();
        if pending.is_empty() {
            return;
        }
        let channels: Vec<String> = pending.iter().map(|id| done_channel(id)).collect();
        if let Err(e) = sink.subscribe(&channels).await {
            return self.lost(Some(e));
        }
        for id in pending {
            if let Some(entry) = self.entries.get_mut(&id) {
                entry.subscribed = true;
                entry
                    .waiters
                    .retain(|(_, tx)| tx.send(Event::Subscribed).is_ok());
            }
        }
    }

    fn dispatch(&mut self, msg: redis::Msg) {
        let Some(id) = done_channel_task(msg.get_channel_name()) else {
            return;
        };
        if let Some(entry) = self.entries.get_mut(id) {
            let body = Bytes::copy_from_slice(msg.get_payload_bytes());
            entry
                .waiters
                .retain(|(_, tx)| tx.send(Event::Done(body.clone())).is_ok());
        }
    }
}
