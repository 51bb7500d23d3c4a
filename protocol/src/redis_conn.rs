//! The one way the worker and the client reach Redis (feature `redis`): a URL names a single
//! server (`redis://`, `rediss://`, `unix://`), a Redis Cluster (`redis+cluster://h1:7000,h2:7001`,
//! `rediss+cluster://...`) or a master watched by Sentinels
//! (`redis+sentinel://[:password@]h1:26379,h2:26379/<master-name>[/db]`, `rediss+sentinel://`
//! for TLS to the master). [`Conn`] speaks to any of them through redis-rs'
//! `aio::ConnectionLike`, so each store operation is written once.
//!
//! What each kind needs of the code above it:
//! - a single server or a Sentinel master: one multiplexed connection, replaced after a
//!   connection error (for Sentinel, by asking the Sentinels where the master is now; a
//!   `READONLY` reply means the old master was demoted and counts as a connection error);
//! - a Cluster: redis-rs' cluster connection, which follows slot moves and failovers itself.
//!   Every key a script or transaction touches carries one hash tag (see `names.rs`); a plain
//!   pipeline that spans slots (a batch of results) is split by slot here and its parts are
//!   sent at once, replies put back in order.
//!
//! Notifications: on a single server or a Sentinel master, classic pub/sub
//! (`PUBLISH`/`SUBSCRIBE`). On a Cluster, a task's notification is sharded
//! (`SPUBLISH`/`SSUBSCRIBE`, Redis 7.0 or later): its channel carries the task's hash tag, so it
//! goes only to the shard that holds the task's record, where classic `PUBLISH` is copied to
//! every node of the cluster. [`ShardedSource`] opens the client's subscription for those (a
//! RESP3 cluster connection whose push messages arrive on a channel). Revocations stay classic
//! on every kind of Redis: each worker wants each of them, and they are rare. See
//! docs/deployment.md, "Redis".

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use futures::future::{join_all, BoxFuture, FutureExt};
use redis::aio::{ConnectionLike, ConnectionManager, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::Slot;
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{
    AsyncConnectionConfig, ClientTlsConfig, Cmd, IntoConnectionInfo, Pipeline, RedisError,
    RedisFuture, RedisResult, TlsCertificates, Value,
};

/// Where a Redis URL points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// One server: the URL as given (`redis://`, `rediss://`, `unix://`, `redis+unix://`).
    Single(String),
    /// A Redis Cluster: one `redis://` (or `rediss://`) URL per seed node, credentials kept.
    Cluster(Vec<String>),
    /// A master found through Sentinels.
    Sentinel(SentinelTarget),
}

/// `redis+sentinel://[user:password@]h1:26379,h2:26379/<master>[/db]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentinelTarget {
    /// One `redis://host:port` URL per Sentinel (no credentials: Sentinels are asked without).
    pub sentinels: Vec<String>,
    pub master: String,
    pub db: i64,
    pub username: Option<String>,
    /// The master's password (the Sentinels are asked without one).
    pub password: Option<String>,
    /// TLS to the master and the Sentinels (`rediss+sentinel://`).
    pub tls: bool,
}

/// The URL schemes a Redis URL may have.
pub const REDIS_SCHEMES: &[&str] = &[
    "redis",
    "rediss",
    "redis+unix",
    "unix",
    "redis+cluster",
    "rediss+cluster",
    "redis+sentinel",
    "rediss+sentinel",
];

/// Splits `scheme://[userinfo@]host1:port,host2:port[/path]` into its parts.
fn split_hosts(rest: &str) -> (Option<&str>, Vec<&str>, &str) {
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    let (userinfo, hosts) = match authority.rfind('@') {
        Some(i) => (Some(&authority[..i]), &authority[i + 1..]),
        None => (None, authority),
    };
    let hosts = hosts
        .split(',')
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .collect();
    (userinfo, hosts, path)
}

fn with_default_port(host: &str, port: u16) -> String {
    // `[::1]:7000`, `h:7000`, `h`, `[::1]`.
    let has_port = match host.rfind(']') {
        Some(close) => host[close..].contains(':'),
        None => host.contains(':'),
    };
    if has_port {
        host.to_owned()
    } else {
        format!("{host}:{port}")
    }
}

impl Target {
    /// Reads a Redis URL. The error says what is wrong, without repeating the URL (the
    /// caller names it, redacted).
    pub fn parse(url: &str) -> Result<Target, String> {
        let Some((scheme, rest)) = url.split_once("://") else {
            return Err("not a URL (expected redis://host:port)".into());
        };
        let tls = scheme.starts_with("rediss");
        match scheme {
            "redis" | "rediss" | "unix" | "redis+unix" => Ok(Target::Single(url.to_owned())),
            "redis+cluster" | "rediss+cluster" => {
                let (userinfo, hosts, path) = split_hosts(rest);
                if hosts.is_empty() {
                    return Err(
                        "a cluster URL lists its seed nodes: redis+cluster://host1:7000,host2:7001"
                            .into(),
                    );
                }
                if !path.is_empty() && path != "/" && path != "/0" {
                    return Err("Redis Cluster has only database 0".into());
                }
                let node_scheme = if tls { "rediss" } else { "redis" };
                let auth = userinfo.map(|u| format!("{u}@")).unwrap_or_default();
                Ok(Target::Cluster(
                    hosts
                        .iter()
                        .map(|h| format!("{node_scheme}://{auth}{}", with_default_port(h, 6379)))
                        .collect(),
                ))
            }
            "redis+sentinel" | "rediss+sentinel" => {
                let (userinfo, hosts, path) = split_hosts(rest);
                if hosts.is_empty() {
                    return Err("a Sentinel URL lists its Sentinels: redis+sentinel://host1:26379,host2:26379/<master-name>".into());
                }
                let mut parts = path.trim_start_matches('/').split('/');
                let master = parts.next().unwrap_or("").to_owned();
                if master.is_empty() {
                    return Err("a Sentinel URL names the master after the hosts: redis+sentinel://host1:26379,host2:26379/<master-name>".into());
                }
                let db = match parts.next() {
                    None | Some("") => 0,
                    Some(db) => db
                        .parse()
                        .map_err(|_| format!("the database {db:?} is not a number"))?,
                };
                if parts.next().is_some() {
                    return Err("too many path parts: the form is /<master-name>[/db]".into());
                }
                let (username, password) = match userinfo {
                    None => (None, None),
                    Some(info) => match info.split_once(':') {
                        Some((user, password)) => (
                            (!user.is_empty()).then(|| crate::percent_decode(user)),
                            Some(crate::percent_decode(password)),
                        ),
                        None => (None, Some(crate::percent_decode(info))),
                    },
                };
                let node_scheme = if tls { "rediss" } else { "redis" };
                Ok(Target::Sentinel(SentinelTarget {
                    sentinels: hosts
                        .iter()
                        .map(|h| format!("{node_scheme}://{}", with_default_port(h, 26379)))
                        .collect(),
                    master,
                    db,
                    username,
                    password,
                    tls,
                }))
            }
            other => Err(format!(
                "the scheme {other:?} must be one of {}",
                REDIS_SCHEMES.join(", ")
            )),
        }
    }

    /// True when the URL asks for TLS.
    pub fn tls(&self) -> bool {
        match self {
            Target::Single(url) => url.starts_with("rediss://"),
            Target::Cluster(nodes) => nodes.iter().any(|n| n.starts_with("rediss://")),
            Target::Sentinel(s) => s.tls,
        }
    }
}

/// TLS files for `rediss://`: a CA bundle to trust instead of the system's, and a client
/// certificate with its key. All `None`: the system CA store, no client certificate.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RedisTls {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl RedisTls {
    pub fn is_empty(&self) -> bool {
        self.ca.is_none() && self.cert.is_none() && self.key.is_none()
    }

    /// Reads the files. `None` when none is set (redis-rs then trusts the system CA store).
    pub fn certificates(&self) -> Result<Option<TlsCertificates>, String> {
        if self.is_empty() {
            return Ok(None);
        }
        let read = |path: &PathBuf, what: &str| {
            std::fs::read(path)
                .map_err(|e| format!("cannot read the {what} {}: {e}", path.display()))
        };
        let client_tls = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => Some(ClientTlsConfig {
                client_cert: read(cert, "Redis client certificate (redis_cert)")?,
                client_key: read(key, "Redis client key (redis_key)")?,
            }),
            (None, None) => None,
            _ => {
                return Err("a Redis client certificate needs both redis_cert and redis_key".into())
            }
        };
        let root_cert = match &self.ca {
            Some(ca) => Some(read(ca, "Redis CA file (redis_ca)")?),
            None => None,
        };
        Ok(Some(TlsCertificates {
            client_tls,
            root_cert,
        }))
    }
}

/// Opens a client for one server's URL, with `certs` when given.
pub fn client(url: &str, certs: Option<&TlsCertificates>) -> RedisResult<redis::Client> {
    match certs {
        Some(certs) => redis::Client::build_with_tls(url, clone_certs(certs)),
        None => redis::Client::open(url),
    }
}

fn clone_certs(certs: &TlsCertificates) -> TlsCertificates {
    TlsCertificates {
        client_tls: certs.client_tls.as_ref().map(|c| ClientTlsConfig {
            client_cert: c.client_cert.clone(),
            client_key: c.client_key.clone(),
        }),
        root_cert: certs.root_cert.clone(),
    }
}

/// The master of a Sentinel group: asks the Sentinels where it is each time a connection is
/// made, so a new connection after a failover reaches the new master.
pub struct SentinelMaster {
    client: tokio::sync::Mutex<SentinelClient>,
    /// The master's address when last asked.
    known: std::sync::Mutex<Option<String>>,
    /// How many times the master was seen to move: connections made before a move are
    /// replaced (a demoted master keeps answering for a while, with what it will lose).
    generation: std::sync::atomic::AtomicU64,
}

impl SentinelMaster {
    pub fn open(
        target: &SentinelTarget,
        certs: Option<&TlsCertificates>,
    ) -> RedisResult<SentinelMaster> {
        let sentinels: Vec<redis::ConnectionAddr> = target
            .sentinels
            .iter()
            .map(|s| s.as_str().into_connection_info().map(|i| i.addr().clone()))
            .collect::<RedisResult<_>>()?;
        let mut builder =
            SentinelClientBuilder::new(sentinels, &target.master, SentinelServerType::Master)?
                .set_client_to_redis_db(target.db);
        if let Some(user) = &target.username {
            builder = builder.set_client_to_redis_username(user);
        }
        if let Some(password) = &target.password {
            builder = builder.set_client_to_redis_password(password);
        }
        if target.tls {
            builder = builder
                .set_client_to_redis_tls_mode(redis::TlsMode::Secure)
                .set_client_to_sentinel_tls_mode(redis::TlsMode::Secure);
            if let Some(certs) = certs {
                builder = builder
                    .set_client_to_redis_certificates(clone_certs(certs))
                    .set_client_to_sentinel_certificates(clone_certs(certs));
            }
        }
        Ok(SentinelMaster {
            client: tokio::sync::Mutex::new(builder.build()?),
            known: std::sync::Mutex::new(None),
            generation: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// A client for the current master.
    pub async fn master(&self) -> RedisResult<redis::Client> {
        let client = self.client.lock().await.async_get_client().await?;
        let addr = client.get_connection_info().addr().to_string();
        let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        if known.as_deref() != Some(addr.as_str()) {
            if known.is_some() {
                self.generation
                    .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
            }
            *known = Some(addr);
        }
        Ok(client)
    }

    /// Counts the moves of the master seen so far (see [`SentinelMaster::check`]).
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Asks the Sentinels where the master is; true when it moved since last asked.
    pub async fn check(&self) -> RedisResult<bool> {
        let before = self.generation();
        self.master().await?;
        Ok(self.generation() != before)
    }

    /// Where the Sentinels say the master is now.
    pub async fn master_addr(&self) -> RedisResult<redis::ConnectionAddr> {
        Ok(self.master().await?.get_connection_info().addr().clone())
    }
}

/// Builds the cluster connection for `nodes` (seed URLs).
pub async fn connect_cluster(
    nodes: &[String],
    certs: Option<&TlsCertificates>,
    connection_timeout: std::time::Duration,
    response_timeout: std::time::Duration,
) -> RedisResult<ClusterConnection> {
    cluster_builder(nodes, certs, connection_timeout, response_timeout)
        .build()?
        .get_async_connection()
        .await
}

fn cluster_builder(
    nodes: &[String],
    certs: Option<&TlsCertificates>,
    connection_timeout: std::time::Duration,
    response_timeout: std::time::Duration,
) -> redis::cluster::ClusterClientBuilder {
    let mut builder = redis::cluster::ClusterClientBuilder::new(nodes.iter().map(String::as_str))
        .connection_timeout(connection_timeout)
        .response_timeout(response_timeout);
    if let Some(certs) = certs {
        builder = builder.certs(clone_certs(certs));
    }
    builder
}

/// True when task notifications are sharded (`SPUBLISH`/`SSUBSCRIBE`): on a Redis Cluster.
/// A single server or a Sentinel master has one shard, where sharded pub/sub costs what
/// classic pub/sub does; classic is kept there (it also works before Redis 7).
pub fn sharded_notifications(target: &Target) -> bool {
    matches!(target, Target::Cluster(_))
}

/// The oldest Redis that has sharded pub/sub.
const SHARDED_PUBSUB_SINCE: (u32, u32) = (7, 0);

/// True for a `redis_version` of 7.0 or later.
fn has_sharded_pubsub(version: &str) -> bool {
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0)) >= SHARDED_PUBSUB_SINCE
}

/// Checks that every node of the cluster runs Redis 7.0 or later (sharded pub/sub), asking
/// each with `INFO server`. The error names the oldest node's version and what to do.
pub async fn check_sharded_pubsub(conn: &mut ClusterConnection) -> Result<(), String> {
    let info: Value = redis::cmd("INFO")
        .arg("server")
        .query_async(conn)
        .await
        .map_err(|e| format!("cannot read the Redis version of the cluster's nodes: {e}"))?;
    // Sent to every node: a map of node to its text (one text when the cluster has one node).
    let texts: Vec<Value> = match info {
        Value::Map(nodes) => nodes.into_iter().map(|(_, text)| text).collect(),
        other => vec![other],
    };
    for text in texts {
        let text: String = redis::from_redis_value(text).unwrap_or_default();
        let Some(version) = text
            .lines()
            .find_map(|l| l.strip_prefix("redis_version:"))
            .map(str::trim)
        else {
            continue;
        };
        if !has_sharded_pubsub(version) {
            return Err(format!(
                "a node of the Redis Cluster runs Redis {version}: dbtask needs Redis 7.0 or later \
                 on a cluster (its result notifications use sharded pub/sub, SPUBLISH); upgrade \
                 the cluster, or use one Redis server (redis://) or Sentinel"
            ));
        }
    }
    Ok(())
}

/// Where a client hears the sharded notifications of a Redis Cluster: a cluster connection of
/// its own speaking RESP3, whose push messages arrive on a channel: `smessage` (a
/// notification), `ssubscribe`/`sunsubscribe` (confirmations, and a `sunsubscribe` the server
/// sends unasked when the slot of a channel moves to another node), and `disconnection`
/// (redis-rs: a node's connection dropped).
///
/// redis-rs routes each `SSUBSCRIBE` to the node that owns the channel's slot, follows `MOVED`,
/// and after a lost node connection or a topology change subscribes again by itself; but it
/// does not say when, and a notification published meanwhile is gone. The caller therefore
/// treats `disconnection` and an unasked `sunsubscribe` as a lost subscription: it subscribes
/// again itself and reads the records again (see the client's `notify.rs`).
pub struct ShardedSource {
    nodes: Vec<String>,
    certs: Option<TlsCertificates>,
    connection_timeout: std::time::Duration,
    response_timeout: std::time::Duration,
}

impl ShardedSource {
    pub fn new(
        nodes: &[String],
        certs: Option<&TlsCertificates>,
        connection_timeout: std::time::Duration,
        response_timeout: std::time::Duration,
    ) -> ShardedSource {
        ShardedSource {
            nodes: nodes.to_vec(),
            certs: certs.map(clone_certs),
            connection_timeout,
            response_timeout,
        }
    }

    /// A new connection, and the receiver of its push messages.
    pub async fn connect(
        &self,
    ) -> RedisResult<(
        ClusterConnection,
        tokio::sync::mpsc::UnboundedReceiver<redis::PushInfo>,
    )> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let conn = cluster_builder(
            &self.nodes,
            self.certs.as_ref(),
            self.connection_timeout,
            self.response_timeout,
        )
        .use_protocol(redis::ProtocolVersion::RESP3)
        .push_sender(tx)
        .build()?
        .get_async_connection()
        .await?;
        Ok((conn, rx))
    }
}

/// Where to open a classic pub/sub connection: on a cluster, any node hears every classic
/// channel.
#[derive(Clone)]
pub enum PubSubSource {
    /// One server.
    Single(Box<redis::Client>),
    /// Cluster seed nodes, tried in turn.
    Cluster(Arc<Vec<redis::Client>>),
    /// The current master of a Sentinel group.
    Sentinel(Arc<SentinelMaster>),
}

impl PubSubSource {
    pub fn new(
        target: &Target,
        certs: Option<&TlsCertificates>,
        sentinel: Option<&Arc<SentinelMaster>>,
    ) -> RedisResult<PubSubSource> {
        Ok(match target {
            Target::Single(url) => PubSubSource::Single(Box::new(client(url, certs)?)),
            Target::Cluster(nodes) => PubSubSource::Cluster(Arc::new(
                nodes
                    .iter()
                    .map(|n| client(n, certs))
                    .collect::<RedisResult<_>>()?,
            )),
            Target::Sentinel(s) => PubSubSource::Sentinel(match sentinel {
                Some(master) => master.clone(),
                None => Arc::new(SentinelMaster::open(s, certs)?),
            }),
        })
    }

    /// A new pub/sub connection.
    pub async fn connect(&self) -> RedisResult<redis::aio::PubSub> {
        match self {
            PubSubSource::Single(client) => client.get_async_pubsub().await,
            PubSubSource::Sentinel(master) => master.master().await?.get_async_pubsub().await,
            PubSubSource::Cluster(nodes) => {
                let mut last = None;
                for node in nodes.iter() {
                    match node.get_async_pubsub().await {
                        Ok(pubsub) => return Ok(pubsub),
                        Err(e) => last = Some(e),
                    }
                }
                Err(last.unwrap_or_else(|| {
                    RedisError::from((redis::ErrorKind::Client, "no cluster node to subscribe on"))
                }))
            }
        }
    }
}

/// A connection to any kind of Redis; cheap to clone (each variant is a handle).
#[derive(Clone)]
pub enum Conn {
    /// One server or a Sentinel master, multiplexed.
    Multiplexed(MultiplexedConnection),
    /// One server, reconnecting by itself (the client's).
    Managed(ConnectionManager),
    /// A Redis Cluster.
    Cluster(ClusterConnection),
    /// A Sentinel master, found again after a connection error (the client's).
    Redial(Redial),
}

impl Conn {
    /// True for a reply that says this connection should be replaced: the server went away,
    /// or (after a Sentinel failover) it is a replica now.
    pub fn is_stale(e: &RedisError) -> bool {
        e.is_io_error()
            || e.is_connection_dropped()
            || e.is_connection_refusal()
            || e.is_timeout()
            || e.is_unrecoverable_error()
            || e.code() == Some("READONLY")
    }
}

/// The first key of a command, which decides its slot (every command dbtask pipelines has its
/// key, or its channel, as the first argument).
fn slot_of(cmd: &Cmd) -> Option<Slot> {
    let mut args = cmd.args_iter();
    args.next()?;
    match args.next()? {
        redis::Arg::Simple(key) => Some(Slot::for_key(key)),
        _ => None,
    }
}

/// Runs a plain pipeline whose commands span several slots on a cluster: one pipeline per
/// slot, all at once, the replies put back in the original order.
fn split_by_slot<'a>(
    conn: &'a mut ClusterConnection,
    pipeline: &'a Pipeline,
) -> BoxFuture<'a, RedisResult<Vec<Value>>> {
    async move {
        let mut parts: Vec<(Pipeline, Vec<usize>)> = Vec::new();
        let mut by_slot: HashMap<Option<Slot>, usize> = HashMap::new();
        for (i, cmd) in pipeline.cmd_iter().enumerate() {
            let part = *by_slot.entry(slot_of(cmd)).or_insert_with(|| {
                parts.push((Pipeline::new(), Vec::new()));
                parts.len() - 1
            });
            parts[part].0.add_command(cmd.clone());
            parts[part].1.push(i);
        }
        let replies = join_all(parts.iter().map(|(pipe, _)| {
            let mut conn = conn.clone();
            async move { conn.req_packed_commands(pipe, 0, pipe.len()).await }
        }))
        .await;
        let mut out = vec![Value::Nil; pipeline.len()];
        for ((_, indexes), reply) in parts.iter().zip(replies) {
            for (i, value) in indexes.iter().zip(reply?) {
                out[*i] = value;
            }
        }
        Ok(out)
    }
    .boxed()
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Multiplexed(c) => c.req_packed_command(cmd),
            Conn::Managed(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
            Conn::Redial(c) => c.command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Multiplexed(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Managed(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Redial(c) => c.commands(pipeline, offset, count),
            Conn::Cluster(c) => {
                let first = pipeline.cmd_iter().next().and_then(slot_of);
                let one_slot = pipeline.cmd_iter().all(|cmd| slot_of(cmd) == first);
                if pipeline.is_transaction() || one_slot {
                    c.req_packed_commands(pipeline, offset, count)
                } else {
                    split_by_slot(c, pipeline)
                }
            }
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Multiplexed(c) => c.get_db(),
            Conn::Managed(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
            Conn::Redial(c) => c.db,
        }
    }
}

/// A multiplexed connection to a single server, or to a Sentinel group's master, that is
/// made again after a connection error: the worker's and the client's connection to a
/// non-cluster Redis.
pub enum Dialer {
    Single(Box<redis::Client>),
    Sentinel(Arc<SentinelMaster>),
}

impl Dialer {
    pub async fn connect(
        &self,
        config: &AsyncConnectionConfig,
    ) -> RedisResult<MultiplexedConnection> {
        Ok(self.connect_to(config).await?.0)
    }

    /// A connection and the address it was made to.
    pub async fn connect_to(
        &self,
        config: &AsyncConnectionConfig,
    ) -> RedisResult<(MultiplexedConnection, redis::ConnectionAddr)> {
        let client = match self {
            Dialer::Single(client) => client.as_ref().clone(),
            Dialer::Sentinel(master) => master.master().await?,
        };
        let addr = client.get_connection_info().addr().clone();
        let conn = client
            .get_multiplexed_async_connection_with_config(config)
            .await?;
        Ok((conn, addr))
    }
}

/// One multiplexed connection made by a [`Dialer`] when first needed, dropped at a connection
/// error or a `READONLY` reply (see [`Conn::is_stale`]) and made again by the next command.
#[derive(Clone)]
pub struct Redial {
    dialer: Arc<Dialer>,
    /// The connection and the Sentinel generation it was made in.
    current: Arc<std::sync::Mutex<Option<(MultiplexedConnection, u64)>>>,
    connection_timeout: std::time::Duration,
    response_timeout: std::time::Duration,
    db: i64,
}

impl Redial {
    /// Connects once (so that a wrong address fails now) and keeps the connection.
    pub async fn connect(
        dialer: Dialer,
        connection_timeout: std::time::Duration,
        response_timeout: std::time::Duration,
    ) -> RedisResult<Redial> {
        let redial = Redial {
            dialer: Arc::new(dialer),
            current: Arc::default(),
            connection_timeout,
            response_timeout,
            db: 0,
        };
        redial.conn().await?;
        Ok(redial)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(MultiplexedConnection, u64)>> {
        // Never held across an await, and nothing in it can panic: recover regardless.
        self.current.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn generation(&self) -> u64 {
        match self.dialer.as_ref() {
            Dialer::Sentinel(master) => master.generation(),
            Dialer::Single(_) => 0,
        }
    }

    async fn conn(&self) -> RedisResult<MultiplexedConnection> {
        let generation = self.generation();
        {
            let mut current = self.lock();
            match current.as_ref() {
                Some((conn, made)) if *made == generation => return Ok(conn.clone()),
                Some(_) => *current = None, // the master moved since
                None => {}
            }
        }
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.connection_timeout))
            .set_response_timeout(Some(self.response_timeout));
        let fresh = self.dialer.connect(&config).await?;
        let generation = self.generation();
        Ok(self.lock().get_or_insert((fresh, generation)).0.clone())
    }

    fn forget_if_stale<T>(&self, result: RedisResult<T>) -> RedisResult<T> {
        if let Err(e) = &result {
            if Conn::is_stale(e) {
                self.lock().take();
            }
        }
        result
    }

    fn command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        async move {
            let mut conn = self.conn().await?;
            let result = conn.req_packed_command(cmd).await;
            self.forget_if_stale(result)
        }
        .boxed()
    }

    fn commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        async move {
            let mut conn = self.conn().await?;
            let result = conn.req_packed_commands(pipeline, offset, count).await;
            self.forget_if_stale(result)
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_a_server_a_cluster_or_a_sentinel_group() {
        assert_eq!(
            Target::parse("redis://h:1/2").unwrap(),
            Target::Single("redis://h:1/2".into())
        );
        assert_eq!(
            Target::parse("redis+cluster://:pw@h1:7000, h2").unwrap(),
            Target::Cluster(vec![
                "redis://:pw@h1:7000".into(),
                "redis://:pw@h2:6379".into()
            ])
        );
        assert_eq!(
            Target::parse("rediss+cluster://[::1]:7000").unwrap(),
            Target::Cluster(vec!["rediss://[::1]:7000".into()])
        );
        let Target::Sentinel(s) =
            Target::parse("redis+sentinel://:p%40ss@s1:26379,s2/mymaster/3").unwrap()
        else {
            panic!()
        };
        assert_eq!(s.sentinels, ["redis://s1:26379", "redis://s2:26379"]);
        assert_eq!((s.master.as_str(), s.db), ("mymaster", 3));
        assert_eq!(s.password.as_deref(), Some("p@ss"));
        assert!(!s.tls);
        for bad in [
            "redis+sentinel://s1:26379",
            "redis+sentinel://s1/m/x",
            "redis+cluster://",
            "redis+cluster://h/3",
            "http://h",
            "h:6379",
        ] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sharded_pubsub_needs_redis_7() {
        for (version, has) in [
            ("7.0.15", true),
            ("7.2.4", true),
            ("10.0.0", true),
            ("6.2.14", false),
            ("5.0.7", false),
            ("", false),
        ] {
            assert_eq!(has_sharded_pubsub(version), has, "{version}");
        }
        assert!(sharded_notifications(
            &Target::parse("redis+cluster://h:7000").unwrap()
        ));
        assert!(!sharded_notifications(&Target::parse("redis://h").unwrap()));
        assert!(!sharded_notifications(
            &Target::parse("redis+sentinel://s/m").unwrap()
        ));
    }

    #[test]
    fn a_client_certificate_needs_its_key() {
        let tls = RedisTls {
            cert: Some("c.pem".into()),
            ..RedisTls::default()
        };
        assert!(tls.certificates().unwrap_err().contains("redis_key"));
        assert!(RedisTls::default().certificates().unwrap().is_none());
    }
}
