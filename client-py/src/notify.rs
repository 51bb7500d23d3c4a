//! One Redis pub/sub connection per client, shared by every `wait()` of the process and
//! demultiplexed by task id.
//!
//! A waiter registers its task id and waits for [`Event::Subscribed`]; only then does it read
//! the record (subscribe first, then check, then wait: a result stored in between cannot be
//! missed). One task owns the connection: it batches the SUBSCRIBE/UNSUBSCRIBE commands of
//! all waiters that arrived meanwhile, routes each `dbtask:done:{<id>}` message to the waiters
//! of that id, and, when the connection drops, reconnects with backoff, subscribes again and
//! sends every waiter `Subscribed` once more, so that each reads its record again.
//!
//! On a Redis Cluster the subscriptions are sharded (`SSUBSCRIBE dbtask:done:{<id>}`, one per
//! channel, each sent by redis-rs to the node that owns the channel's slot, which is the node
//! that holds the record: see `dbtask_protocol::redis_conn::ShardedSource`). There, a node's
//! connection that dropped, or a `sunsubscribe` the server sent unasked (the slot moved to
//! another node, or its master was demoted), counts as lost for the channels concerned: they
//! are subscribed again and their waiters told `Subscribed` again, so each reads its record
//! again. A notification published while a subscription was down is thus never waited for.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use dbtask_protocol::redis_conn::{PubSubSource, ShardedSource};
use dbtask_protocol::{done_channel, done_channel_task};
use futures::future::join_all;
use futures::StreamExt;
use redis::aio::{PubSubSink, PubSubStream};
use redis::cluster_async::ClusterConnection;
use redis::{PushInfo, PushKind};
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

/// Where the notifications are heard: classic pub/sub on a single server or a Sentinel
/// master, sharded pub/sub on a Cluster.
pub enum Source {
    Classic(PubSubSource),
    Sharded(ShardedSource),
}

/// A connection made by a [`Source`].
pub enum Link {
    Classic(PubSubSink, PubSubStream),
    /// A RESP3 cluster connection and its push messages.
    Sharded(ClusterConnection, mpsc::UnboundedReceiver<PushInfo>),
}

impl Source {
    pub async fn connect(&self) -> redis::RedisResult<Link> {
        match self {
            Source::Classic(source) => {
                let (sink, stream) = source.connect().await?.split();
                Ok(Link::Classic(sink, stream))
            }
            Source::Sharded(source) => {
                let (conn, pushes) = source.connect().await?;
                Ok(Link::Sharded(conn, pushes))
            }
        }
    }
}

/// What a [`Link`] heard.
enum Incoming {
    /// A notification: its channel and its body.
    Message(String, Bytes),
    /// The subscriptions of these channels (`None`: of every channel) may have been lost
    /// (sharded pub/sub only).
    Lost(Option<String>),
    /// The connection is gone.
    Closed,
    /// Nothing for the waiters (a confirmation).
    Nothing,
}

async fn next_incoming(link: &mut Option<Link>) -> Incoming {
    match link {
        None => std::future::pending().await,
        Some(Link::Classic(_, stream)) => match stream.next().await {
            Some(msg) => Incoming::Message(
                msg.get_channel_name().to_owned(),
                Bytes::copy_from_slice(msg.get_payload_bytes()),
            ),
            None => Incoming::Closed,
        },
        Some(Link::Sharded(_, pushes)) => match pushes.recv().await {
            None => Incoming::Closed,
            Some(push) => sharded_incoming(push),
        },
    }
}

fn sharded_incoming(push: PushInfo) -> Incoming {
    let text = |value: &redis::Value| redis::from_redis_value_ref::<String>(value).ok();
    match push.kind {
        // [channel, body]
        PushKind::SMessage => {
            let mut data = push.data.into_iter();
            match (data.next(), data.next()) {
                (Some(channel), Some(body)) => match (
                    redis::from_redis_value::<String>(channel),
                    redis::from_redis_value::<Vec<u8>>(body),
                ) {
                    (Ok(channel), Ok(body)) => Incoming::Message(channel, Bytes::from(body)),
                    _ => Incoming::Nothing,
                },
                _ => Incoming::Nothing,
            }
        }
        // A node's connection dropped: redis-rs subscribes again there when it is back, but
        // what was published meanwhile is gone.
        PushKind::Disconnection => Incoming::Lost(None),
        // [channel, count]: the confirmation of our own SUNSUBSCRIBE, or the server dropping
        // the subscription because the slot is no longer its.
        PushKind::SUnsubscribe => match push.data.first().and_then(text) {
            Some(channel) => Incoming::Lost(Some(channel)),
            None => Incoming::Lost(None),
        },
        _ => Incoming::Nothing,
    }
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
        client: Source,
        connection: Link,
        connect_timeout: Duration,
        safe_url: String,
    ) -> Notifier {
        let (tx, rx) = mpsc::unbounded_channel();
        let owner = Owner {
            client,
            connect_timeout,
            safe_url,
            conn: Some(connection),
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
    client: Source,
    connect_timeout: Duration,
    safe_url: String,
    conn: Option<Link>,
    entries: HashMap<String, Entry>,
    /// Ids whose last waiter left while subscribed.
    unsubscribe: HashSet<String>,
    /// Why the connection is down, while it is.
    down: Option<Arc<Down>>,
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
            Source::Classic(PubSubSource::Sentinel(master)) => Some(master.clone()),
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
                incoming = next_incoming(&mut self.conn), if connected => match incoming {
                    Incoming::Message(channel, body) => self.dispatch(&channel, body),
                    Incoming::Lost(channel) => {
                        if self.resubscribe(channel.as_deref()) {
                            self.sync().await;
                        }
                    }
                    Incoming::Closed => self.lost(None),
                    Incoming::Nothing => {}
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
        self.conn = Some(conn);
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

    /// Marks the subscription of `channel` (`None`: of every channel) as to be made again,
    /// so that the next [`sync`](Self::sync) subscribes again and tells its waiters to read
    /// their record again. False when no waiter is concerned (the confirmation of an
    /// unsubscribe, or a channel not yet subscribed, which the next sync covers anyway).
    fn resubscribe(&mut self, channel: Option<&str>) -> bool {
        match channel {
            None => {
                let mut any = false;
                for entry in self.entries.values_mut() {
                    any |= std::mem::replace(&mut entry.subscribed, false);
                }
                any
            }
            Some(channel) => {
                match done_channel_task(channel).and_then(|id| self.entries.get_mut(id)) {
                    Some(entry) => std::mem::replace(&mut entry.subscribed, false),
                    None => false,
                }
            }
        }
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
        let Some(link) = self.conn.as_mut() else {
            return;
        };
        if !self.unsubscribe.is_empty() {
            let channels: Vec<String> = self
                .unsubscribe
                .drain()
                .map(|id| done_channel(&id))
                .collect();
            if let Err(e) = unsubscribe(link, &channels).await {
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
        let Some(link) = self.conn.as_mut() else {
            return;
        };
        if let Err(e) = subscribe(link, &channels).await {
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

    fn dispatch(&mut self, channel: &str, body: Bytes) {
        let Some(id) = done_channel_task(channel) else {
            return;
        };
        if let Some(entry) = self.entries.get_mut(id) {
            entry
                .waiters
                .retain(|(_, tx)| tx.send(Event::Done(body.clone())).is_ok());
        }
    }
}

/// Subscribes to `channels`: one `SUBSCRIBE` for all of them, or on a cluster one `SSUBSCRIBE`
/// per channel (a sharded subscription names channels of one slot), all at once. Returns
/// once every subscription is confirmed.
async fn subscribe(link: &mut Link, channels: &[String]) -> redis::RedisResult<()> {
    match link {
        Link::Classic(sink, _) => sink.subscribe(channels).await,
        Link::Sharded(conn, _) => each_channel(conn, channels, true).await,
    }
}

async fn unsubscribe(link: &mut Link, channels: &[String]) -> redis::RedisResult<()> {
    match link {
        Link::Classic(sink, _) => sink.unsubscribe(channels).await,
        Link::Sharded(conn, _) => each_channel(conn, channels, false).await,
    }
}

async fn each_channel(
    conn: &ClusterConnection,
    channels: &[String],
    subscribe: bool,
) -> redis::RedisResult<()> {
    let replies = join_all(channels.iter().map(|channel| {
        let mut conn = conn.clone();
        async move {
            if subscribe {
                conn.ssubscribe(channel).await
            } else {
                conn.sunsubscribe(channel).await
            }
        }
    }))
    .await;
    replies.into_iter().collect()
}
