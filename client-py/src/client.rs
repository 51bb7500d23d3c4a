//! The connected client: one NATS connection (with its JetStream context), one multiplexed
//! Redis connection for commands and one Redis pub/sub connection for notifications, shared by
//! every call of the process. Each operation exists as an awaitable (`publish`) and as a
//! blocking twin (`publish_sync`) that runs the same Rust future with the GIL released.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::context::{
    ContextBuilder, CreateStreamErrorKind, PublishAckFuture, PublishErrorKind,
};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream::{Config as StreamConfig, RetentionPolicy, StorageType};
use async_nats::jetstream::ErrorCode;
use async_nats::{ConnectErrorKind, ConnectOptions, HeaderMap, ServerAddr, Subject};
use bytes::Bytes;
use dbtask_protocol as protocol;
use protocol::{TaskMessage, TaskState};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyList, PyString, PyTuple};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde_json::value::RawValue;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::bridge;
use crate::canvas;
use crate::error::{percent_decode, redact_url, ClientError};
use crate::json;
use crate::notify::{Event, Notifier};
use crate::runtime;

mod revoke;

/// How long JetStream may take to confirm a publish (and to answer API requests).
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(10);
/// Publishes awaiting their confirmation at once, per client; more wait for a slot.
const MAX_ACK_INFLIGHT: usize = 32_768;
/// `publish_many` keeps at most this many of its own confirmations pending.
const BULK_WINDOW: usize = 4_096;
/// Redis answers slower than this are an error (redis-rs's default of 500 ms is too short
/// for a large record on a busy server).
const REDIS_RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);
/// `wait()` always gets this long to subscribe and read the record once, even with a zero
/// timeout: `get(timeout=0)` means "check once", not "fail at once".
const FIRST_CHECK_BUDGET: Duration = Duration::from_secs(2);
/// How soon a wait with a timeout reads a record again after a read failed, doubling up to
/// the maximum.
const RECHECK_MIN: Duration = Duration::from_millis(100);
const RECHECK_MAX: Duration = Duration::from_secs(2);

pub struct Inner {
    nats: async_nats::Client,
    js: async_nats::jetstream::Context,
    pub(crate) redis: ConnectionManager,
    notifier: Notifier,
    /// The URLs as given (with secrets), only compared, never shown.
    nats_given: String,
    redis_given: String,
    nats_safe: String,
    pub(crate) redis_safe: String,
    closed: AtomicBool,
    /// Publishes in progress, and a wake-up for `close` when the last one ends.
    publishing: AtomicUsize,
    idle: tokio::sync::Notify,
    /// Hands `publish` calls to the publisher task (see [`run_publisher`]).
    jobs: mpsc::UnboundedSender<PublishJob>,
}

/// Counts one publish in progress for as long as it lives. Taken on the caller's thread,
/// before the work is handed to tokio, so that `close` cannot slip in between.
pub(crate) struct Publishing(Arc<Inner>);

impl Publishing {
    pub(crate) fn inner(&self) -> &Inner {
        &self.0
    }
}

impl Drop for Publishing {
    fn drop(&mut self) {
        if self.0.publishing.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Connecting

fn nats_options(
    url: &str,
    safe: &str,
    timeout: Duration,
) -> Result<(ConnectOptions, Vec<ServerAddr>), ClientError> {
    let invalid = |why: String| ClientError::Value(format!("invalid NATS URL {safe}: {why}"));
    let mut servers = Vec::new();
    let mut credentials: Option<(String, Option<String>)> = None;
    for part in url.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let text = if part.contains("://") {
            part.to_owned()
        } else {
            format!("nats://{part}")
        };
        let mut parsed = url::Url::parse(&text).map_err(|e| invalid(e.to_string()))?;
        if !parsed.username().is_empty() {
            let user = percent_decode(parsed.username());
            let password = parsed.password().map(percent_decode);
            credentials = Some((user, password));
            let _ = parsed.set_username("");
            let _ = parsed.set_password(None);
        }
        servers.push(
            parsed
                .as_str()
                .parse::<ServerAddr>()
                .map_err(|e| invalid(e.to_string()))?,
        );
    }
    if servers.is_empty() {
        return Err(invalid("no server".into()));
    }
    let options = match credentials {
        Some((user, Some(password))) => ConnectOptions::with_user_and_password(user, password),
        Some((token, None)) => ConnectOptions::with_token(token),
        None => ConnectOptions::new(),
    };
    let options = options
        .name("dbtask-client")
        .connection_timeout(timeout)
        .client_capacity(16_384);
    Ok((options, servers))
}

pub(crate) async fn connect_nats(
    url: &str,
    safe: &str,
    timeout: Duration,
) -> Result<async_nats::Client, ClientError> {
    let (options, servers) = nats_options(url, safe, timeout)?;
    // No retry_on_initial_connect: a closed port fails at once. Later disconnections are
    // retried forever in the background (publishes then wait up to PUBLISH_TIMEOUT).
    options.connect(servers).await.map_err(|e| match e.kind() {
        ConnectErrorKind::AuthorizationViolation | ConnectErrorKind::Authentication => ClientError::Connection(format!(
            "NATS at {safe} refused the connection ({e}): check the user, password or token in the URL"
        )),
        ConnectErrorKind::TimedOut => ClientError::Connection(format!(
            "cannot reach NATS at {safe} (no answer within {:.1} s): is nats-server running?",
            timeout.as_secs_f64()
        )),
        ConnectErrorKind::ServerParse => ClientError::Value(format!("invalid NATS URL {safe}: {e}")),
        _ => ClientError::Connection(format!("cannot reach NATS at {safe} ({e}): is nats-server running?")),
    })
}

/// The async-nats configuration of the stream `spec` describes (the worker's twin is
/// worker/src/broker/mapping.rs).
fn stream_config(spec: &protocol::StreamSpec) -> StreamConfig {
    StreamConfig {
        name: spec.name.to_owned(),
        description: Some(spec.description.to_owned()),
        subjects: spec.subjects.iter().map(|s| (*s).to_owned()).collect(),
        retention: match spec.retention {
            protocol::Retention::WorkQueue => RetentionPolicy::WorkQueue,
            protocol::Retention::Limits => RetentionPolicy::Limits,
        },
        storage: match spec.storage {
            protocol::Storage::File => StorageType::File,
            protocol::Storage::Memory => StorageType::Memory,
        },
        allow_message_schedules: spec.allow_msg_schedules,
        duplicate_window: spec.duplicate_window.unwrap_or_default(),
        max_message_size: spec.max_msg_size_i32(),
        ..Default::default()
    }
}

/// Creates the task stream when it is missing; an existing one is left as it is (the worker
/// owns its settings and brings the stream in line with its config when it starts).
///
/// Why the client creates it at all rather than refusing until a worker has run: tasks may be
/// enqueued before any worker starts (a deploy that starts the web app first, a test that
/// publishes and then starts a worker), and JetStream keeps them until one does. The stream
/// is made from the same description as the worker's ([`protocol::StreamSpec::tasks`]) with
/// the same default limits, so a default worker finds nothing to change, and one configured
/// otherwise updates the window and the size in place (a work queue keeps its messages).
async fn ensure_stream(js: &async_nats::jetstream::Context, safe: &str) -> Result<(), ClientError> {
    let no_js = || {
        ClientError::Connection(format!(
            "NATS at {safe} has no JetStream: start nats-server with -js (version 2.12 or later)"
        ))
    };
    match js
        .get_or_create_stream(stream_config(&protocol::StreamSpec::tasks()))
        .await
    {
        Ok(_) => Ok(()),
        Err(e) => match e.kind() {
            // Created by a worker or another client between our lookup and our create.
            CreateStreamErrorKind::JetStream(err)
                if err.error_code() == ErrorCode::STREAM_NAME_EXIST =>
            {
                Ok(())
            }
            CreateStreamErrorKind::JetStream(err)
                if err.error_code() == ErrorCode::JETSTREAM_NOT_ENABLED
                    || err.error_code() == ErrorCode::JETSTREAM_NOT_ENABLED_FOR_ACCOUNT =>
            {
                Err(no_js())
            }
            CreateStreamErrorKind::JetStreamUnavailable => Err(no_js()),
            _ => Err(ClientError::Connection(format!(
                "cannot create the JetStream stream {} on NATS at {safe}: {e}",
                protocol::TASK_STREAM
            ))),
        },
    }
}

pub(crate) fn redis_error(e: &redis::RedisError, safe: &str) -> ClientError {
    if e.is_timeout() {
        ClientError::Connection(format!("Redis at {safe} did not answer in time ({e})"))
    } else {
        ClientError::Connection(format!("Redis at {safe} failed: {e}"))
    }
}

async fn connect_redis(
    url: &str,
    safe: &str,
    timeout: Duration,
) -> Result<(redis::Client, ConnectionManager, redis::aio::PubSub), ClientError> {
    let client = redis::Client::open(url)
        .map_err(|e| ClientError::Value(format!("invalid Redis URL {safe}: {e}")))?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(REDIS_RESPONSE_TIMEOUT))
        // Reconnection attempts after a failure (the first connection is tried once more
        // with these too, which keeps a closed port's error under a second).
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_secs(2));
    let unreachable = |e: String| {
        ClientError::Connection(format!(
            "cannot reach Redis at {safe} ({e}): is redis-server running?"
        ))
    };
    let budget = timeout + Duration::from_secs(1);
    let commands = async {
        tokio::time::timeout(
            budget,
            ConnectionManager::new_with_config(client.clone(), config),
        )
        .await
        .map_err(|_| unreachable("timed out".into()))?
        .map_err(|e| unreachable(e.to_string()))
    };
    let pubsub = async {
        tokio::time::timeout(budget, client.get_async_pubsub())
            .await
            .map_err(|_| unreachable("timed out".into()))?
            .map_err(|e| unreachable(e.to_string()))
    };
    let (commands, pubsub) = tokio::try_join!(commands, pubsub)?;
    Ok((client, commands, pubsub))
}

impl Inner {
    async fn connect(
        nats_url: String,
        redis_url: String,
        timeout: Duration,
    ) -> Result<Inner, ClientError> {
        let nats_safe = redact_url(&nats_url);
        let redis_safe = redact_url(&redis_url);
        let (nats, (redis_client, redis, pubsub)) = tokio::try_join!(
            connect_nats(&nats_url, &nats_safe, timeout),
            connect_redis(&redis_url, &redis_safe, timeout)
        )?;
        let js = ContextBuilder::new()
            .timeout(PUBLISH_TIMEOUT)
            .max_ack_inflight(MAX_ACK_INFLIGHT)
            .backpressure_on_inflight(true)
            .build(nats.clone());
        ensure_stream(&js, &nats_safe).await?;
        let notifier = Notifier::start(redis_client, pubsub, timeout, redis_safe.clone());
        let (jobs, queue) = mpsc::unbounded_channel();
        tokio::spawn(run_publisher(queue));
        Ok(Inner {
            nats,
            js,
            redis,
            notifier,
            nats_given: nats_url,
            redis_given: redis_url,
            nats_safe,
            redis_safe,
            closed: AtomicBool::new(false),
            publishing: AtomicUsize::new(0),
            idle: tokio::sync::Notify::new(),
            jobs,
        })
    }

    fn check_open(&self) -> Result<(), ClientError> {
        if self.closed.load(Ordering::Acquire) {
            Err(ClientError::Runtime(
                "this dbtask client is closed: call dbtask.init(...) again".into(),
            ))
        } else {
            Ok(())
        }
    }

    /// Registers a publish; refused once the client is closed.
    fn start_publishing(self: &Arc<Self>) -> Result<Publishing, ClientError> {
        self.publishing.fetch_add(1, Ordering::SeqCst);
        let guard = Publishing(self.clone());
        self.check_open()?;
        Ok(guard)
    }

    async fn close(&self) {
        if self.closed.swap(true, Ordering::SeqCst) {
            return;
        }
        // Publishes in progress get their confirmation (or their error) first.
        let deadline = Instant::now() + PUBLISH_TIMEOUT;
        loop {
            let idle = self.idle.notified();
            if self.publishing.load(Ordering::SeqCst) == 0 {
                break;
            }
            if tokio::time::timeout_at(deadline, idle).await.is_err() {
                break;
            }
        }
        let _ = tokio::time::timeout(PUBLISH_TIMEOUT, self.nats.flush()).await;
        let _ = self.nats.drain().await;
        self.notifier.close();
    }
}

// ---------------------------------------------------------------------------------------------
// Publishing

/// A task message ready to go: encoded on the Python thread (with the GIL), sent from tokio.
pub(crate) struct Outgoing {
    pub(crate) id: String,
    subject: Subject,
    /// Moved into the publish, not copied: empty once sent (see [`Outgoing::headers_again`]).
    headers: HeaderMap,
    body: Bytes,
}

impl Outgoing {
    /// `message` encoded for `route`, with the headers every task message carries: its id
    /// (`Nats-Msg-Id` for JetStream's de-duplication, and for a worker that cannot read the
    /// body), its task name, and the route's schedule headers.
    pub(crate) fn new(message: TaskMessage, route: protocol::Route) -> Outgoing {
        let headers = task_headers(&message, &route);
        let body = Bytes::from(message.encode());
        Outgoing {
            id: message.id,
            subject: Subject::from(route.subject),
            headers,
            body,
        }
    }

    /// The headers again, for publishing a second time: rebuilt from the body, which holds
    /// everything they were made of (the route depends only on the message's own queue, eta
    /// and sent_at). Rare (the stream was deleted after init), so the first publish need not
    /// keep a copy.
    fn headers_again(&self) -> Result<HeaderMap, ClientError> {
        let message = TaskMessage::decode(&self.body)
            .map_err(|e| ClientError::Runtime(format!("dbtask internal error: {e}")))?;
        let queue = message.queue.clone().unwrap_or_default();
        let route = message.route(&queue, message.sent_at.unwrap_or_else(protocol::now_unix));
        Ok(task_headers(&message, &route))
    }
}

/// The headers of a first publish of `message` (see [`protocol::task_headers`]; the worker's
/// twin is worker/src/broker/mapping.rs).
fn task_headers(message: &TaskMessage, route: &protocol::Route) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (name, value) in protocol::task_headers(message, route, &message.id) {
        headers.insert(name, value);
    }
    headers
}

#[allow(clippy::too_many_arguments)]
fn prepare(
    queue: &str,
    task: &str,
    args: &Bound<'_, PyAny>,
    kwargs: Option<&Bound<'_, PyAny>>,
    task_id: Option<String>,
    eta: Option<f64>,
    expires: Option<f64>,
    priority: Option<u8>,
    sent_at: f64,
) -> Result<Outgoing, ClientError> {
    protocol::validate_queue(queue)?;
    protocol::validate_task_name(task)?;
    let id = match task_id {
        Some(id) => {
            protocol::validate_task_id(&id)?;
            id
        }
        None => crate::ids::new_task_id(),
    };
    if !(args.is_instance_of::<PyTuple>() || args.is_instance_of::<PyList>()) {
        return Err(ClientError::Value(format!(
            "task arguments must be a tuple or a list, not {}",
            args.get_type()
                .name()
                .map(|n| n.to_string())
                .unwrap_or_default()
        )));
    }
    let args = json::to_raw_json(args, "args")?;
    let kwargs = match kwargs {
        None => empty_object(),
        Some(k) if k.is_none() => empty_object(),
        Some(k) => {
            let dict = k.cast::<PyDict>().map_err(|_| {
                ClientError::Value(format!(
                    "task keyword arguments must be a dict, not {}",
                    k.get_type()
                        .name()
                        .map(|n| n.to_string())
                        .unwrap_or_default()
                ))
            })?;
            if dict.is_empty() {
                empty_object()
            } else {
                if let Some(key) = dict.keys().iter().find(|k| !k.is_instance_of::<PyString>()) {
                    return Err(ClientError::Value(format!(
                        "keyword argument names must be str, not {}",
                        key.repr().map(|r| r.to_string()).unwrap_or_default()
                    )));
                }
                json::to_raw_json(k, "kwargs")?
            }
        }
    };
    let check_time = |name: &str, t: Option<f64>| match t {
        Some(v) if !v.is_finite() => Err(ClientError::Value(format!(
            "{name} must be a finite time, not {v}"
        ))),
        _ => Ok(()),
    };
    check_time("eta", eta)?;
    check_time("expires", expires)?;
    let message = TaskMessage {
        v: protocol::PROTOCOL_VERSION,
        id,
        task: task.to_owned(),
        args,
        kwargs,
        queue: Some(queue.to_owned()),
        eta,
        expires,
        retries: 0,
        priority,
        sent_at: Some(sent_at),
        chain: Vec::new(),
        chord: None,
        link: Vec::new(),
        link_error: Vec::new(),
    };
    // A future eta waits in JetStream as a message schedule that the server publishes to the
    // subject of the task's priority level at that time; an eta in the past goes there at once.
    let route = message.route(queue, sent_at);
    Ok(Outgoing::new(message, route))
}

fn empty_object() -> Box<RawValue> {
    RawValue::from_string("{}".to_owned()).expect("literal JSON")
}

fn publish_error(
    inner: &Inner,
    id: &str,
    e: async_nats::jetstream::context::PublishError,
) -> ClientError {
    let safe = &inner.nats_safe;
    match e.kind() {
        PublishErrorKind::MaxPayloadExceeded => ClientError::Value(format!(
            "task {id} is too large to send: {e} (NATS at {safe} accepts at most {} bytes per \
             message, its max_payload): pass large data by reference, e.g. a URL or a key",
            inner.nats.server_info().max_payload
        )),
        PublishErrorKind::TimedOut => ClientError::Connection(format!(
            "JetStream at {safe} did not confirm task {id} within {} s (is NATS reachable?); \
             publishing again with the same task_id is safe: JetStream drops a duplicate id \
             within the stream's duplicate window",
            PUBLISH_TIMEOUT.as_secs()
        )),
        PublishErrorKind::StreamNotFound => ClientError::Connection(format!(
            "no JetStream stream on NATS at {safe} takes task subjects ({}, and {} for countdown/eta): \
             the stream {} is missing, or was made by an older dbtask: start a current dbtask worker \
             once, it adds the subjects and enables message schedules (nats-server 2.12+)",
            protocol::TASK_SUBJECT_WILDCARD,
            protocol::SCHEDULE_SUBJECT_WILDCARD,
            protocol::TASK_STREAM
        )),
        _ => ClientError::Connection(format!("cannot publish task {id} to NATS at {safe}: {e}")),
    }
}

/// Sends `out`, moving its headers into the message (the subject and body are shared).
async fn start_publish(
    inner: &Inner,
    out: &mut Outgoing,
) -> Result<PublishAckFuture, async_nats::jetstream::context::PublishError> {
    inner
        .js
        .send_publish(
            out.subject.clone(),
            PublishMessage::build()
                .payload(out.body.clone())
                .headers(std::mem::take(&mut out.headers)),
        )
        .await
}

async fn publish_one(publishing: Publishing, mut out: Outgoing) -> Result<String, ClientError> {
    let inner = &publishing.0;
    let mut recreated = false;
    loop {
        let result = match start_publish(inner, &mut out).await {
            Ok(ack) => ack.await,
            Err(e) => Err(e),
        };
        match result {
            Ok(_ack) => return Ok(out.id),
            // The stream was deleted after init: create it again, once.
            Err(e) if e.kind() == PublishErrorKind::StreamNotFound && !recreated => {
                recreated = true;
                // Boxed: this state machine is several KB, and inline it made every publish
                // future that large (10.7 KB instead of 2.9 KB, allocated and copied per task).
                Box::pin(ensure_stream(&inner.js, &inner.nats_safe)).await?;
                out.headers = out.headers_again()?;
            }
            Err(e) => return Err(publish_error(inner, &out.id, e)),
        }
    }
}

/// Jobs the publisher takes at once before letting the tasks it spawned run.
const PUBLISHER_BURST: usize = 1024;

/// One `publish` call on its way: the message, and the asyncio future that awaits it.
pub(crate) struct PublishJob {
    publishing: Publishing,
    out: Outgoing,
    pending: bridge::Pending,
    /// Applied to the id on the loop's thread (e.g. `AsyncResult`).
    wrap: Option<Py<PyAny>>,
}

/// The one task that publishes for every `publish` call of a client.
///
/// A tokio task spawned per call cost more than the publish itself in W1: each spawn from
/// the Python thread wakes the I/O thread (the current-thread scheduler writes its eventfd
/// for every remote spawn), and each publish then ran alone, so async-nats flushed one
/// message per write. Here a burst of calls is taken in one go, every publish of the burst
/// is started before the connection's writer runs (one write for all of them), and the
/// I/O thread is woken only when this task is idle.
///
/// The confirmations go to one confirming task, which awaits them in the order of the
/// publishes (see [`confirm_in_order`]).
async fn run_publisher(mut queue: mpsc::UnboundedReceiver<PublishJob>) {
    let (sent_tx, sent_rx) = mpsc::unbounded_channel();
    tokio::spawn(confirm_in_order(sent_rx));
    let mut burst = Vec::new();
    while queue.recv_many(&mut burst, PUBLISHER_BURST).await > 0 {
        for mut job in burst.drain(..) {
            match start_publish(&job.publishing.0, &mut job.out).await {
                Ok(ack) => {
                    // The confirming task lives as long as this sender.
                    let _ = sent_tx.send(Sent {
                        job,
                        at: Instant::now(),
                        ack,
                    });
                }
                Err(e) => {
                    let err = publish_error(&job.publishing.0, &job.out.id, e);
                    job.resolve(Err(err));
                }
            }
        }
    }
}

/// A publish written to the connection, its confirmation still to come.
struct Sent {
    job: PublishJob,
    at: Instant,
    ack: PublishAckFuture,
}

/// Awaits each publish's confirmation, oldest first, and resolves its call.
///
/// JetStream confirms one connection's publishes in the order they were written, so the
/// oldest confirmation is the next to arrive and the ones behind it are complete by the time
/// they are reached: this task wakes once per burst of confirmations, and nothing else is
/// polled or woken per publish (the task per publish this replaced cost about a quarter more
/// of the I/O thread's time in W1's `gather`).
/// A confirmation that never comes (a lost connection) holds the ones behind it until its
/// timeout, PUBLISH_TIMEOUT after its publish; theirs run from their own publish, so they
/// resolve at once after it.
async fn confirm_in_order(mut sent: mpsc::UnboundedReceiver<Sent>) {
    while let Some(Sent { job, at, ack }) = sent.recv().await {
        let confirmed = bridge::guarded(async { Ok(confirmation(at, ack).await) }).await;
        match confirmed {
            Ok(Ok(_ack)) => {
                let id = job.out.id.clone();
                job.resolve(Ok(id));
            }
            // The stream was deleted after init: made again and published again, apart from
            // the others (publish_one makes it again at most once more).
            Ok(Err(e)) if e.kind() == PublishErrorKind::StreamNotFound => {
                tokio::spawn(Box::pin(republish(job)));
            }
            Ok(Err(e)) => {
                let err = publish_error(&job.publishing.0, &job.out.id, e);
                job.resolve(Err(err));
            }
            Err(panicked) => job.resolve(Err(panicked)),
        }
    }
}

/// A publish's confirmation, at most PUBLISH_TIMEOUT after the publish (`at`), however late
/// it is awaited.
async fn confirmation(
    at: Instant,
    ack: PublishAckFuture,
) -> Result<async_nats::jetstream::publish::PublishAck, async_nats::jetstream::context::PublishError>
{
    match tokio::time::timeout_at(at + PUBLISH_TIMEOUT, ack).await {
        Ok(result) => result,
        Err(_) => Err(PublishErrorKind::TimedOut.into()),
    }
}

impl PublishJob {
    /// Resolves the call's asyncio future with the task id (wrapped, e.g. in `AsyncResult`)
    /// or the error.
    fn resolve(self, result: Result<String, ClientError>) {
        resolve_call(self.pending, self.wrap, result);
    }
}

fn resolve_call(
    pending: bridge::Pending,
    wrap: Option<Py<PyAny>>,
    result: Result<String, ClientError>,
) {
    pending.resolve(result, move |py, id| match wrap {
        None => bridge::into_py(py, id),
        Some(wrap) => Ok(wrap.bind(py).call1((id,))?.unbind()),
    });
}

/// Makes the stream again, then publishes the job's message again (see [`publish_one`]).
async fn republish(job: PublishJob) {
    let PublishJob {
        publishing,
        mut out,
        pending,
        wrap,
    } = job;
    let result = bridge::guarded(async move {
        let inner = &publishing.0;
        Box::pin(ensure_stream(&inner.js, &inner.nats_safe)).await?;
        out.headers = out.headers_again()?;
        publish_one(publishing, out).await
    })
    .await;
    resolve_call(pending, wrap, result);
}

/// Writes every message, keeping up to [`BULK_WINDOW`] confirmations pending, then awaits the
/// rest: one round trip's latency for the whole batch instead of one per task.
///
/// Confirmations are awaited oldest first, one at a time. JetStream confirms one connection's
/// publishes in order, so the oldest is the next to arrive, and the ones behind it are
/// complete by the time they are reached: nothing polls or wakes them before (the
/// `FuturesOrdered` of them this replaced cost about a third of the I/O thread's time).
/// The first error ends the call, so a confirmation that never comes costs one timeout.
pub(crate) async fn publish_all(
    publishing: Publishing,
    mut outs: Vec<Outgoing>,
) -> Result<Vec<String>, ClientError> {
    let inner = &publishing.0;
    let total = outs.len();
    // Sent, awaiting confirmation, oldest first: the front is always task `confirmed`.
    let mut pending: VecDeque<(Instant, PublishAckFuture)> =
        VecDeque::with_capacity(BULK_WINDOW.min(total));
    let mut confirmed = 0usize;
    let fail = |confirmed: usize, err: ClientError| {
        let msg = err.to_string();
        let text = format!(
            "{msg} (publish_many: {confirmed} of {total} tasks were confirmed before this error)"
        );
        match err {
            ClientError::Value(_) => ClientError::Value(text),
            _ => ClientError::Connection(text),
        }
    };
    for index in 0..total {
        if pending.len() >= BULK_WINDOW {
            let (at, ack) = pending.pop_front().expect("the window is full");
            let result = confirmation(at, ack).await;
            finish(inner, &outs[confirmed].id, result).map_err(|e| fail(confirmed, e))?;
            confirmed += 1;
        }
        let out = &mut outs[index];
        let ack = start_publish(inner, out)
            .await
            .map_err(|e| fail(confirmed, publish_error(inner, &out.id, e)))?;
        pending.push_back((Instant::now(), ack));
    }
    while let Some((at, ack)) = pending.pop_front() {
        let result = confirmation(at, ack).await;
        finish(inner, &outs[confirmed].id, result).map_err(|e| fail(confirmed, e))?;
        confirmed += 1;
    }
    Ok(outs.into_iter().map(|o| o.id).collect())
}

fn finish(
    inner: &Inner,
    id: &str,
    result: Result<
        async_nats::jetstream::publish::PublishAck,
        async_nats::jetstream::context::PublishError,
    >,
) -> Result<(), ClientError> {
    result.map(|_| ()).map_err(|e| publish_error(inner, id, e))
}

// ---------------------------------------------------------------------------------------------
// Results

#[derive(serde::Deserialize)]
struct StateOnly {
    state: TaskState,
}

fn record_state(id: &str, body: &[u8]) -> Result<TaskState, ClientError> {
    serde_json::from_slice::<StateOnly>(body)
        .map(|s| s.state)
        .map_err(|e| {
            ClientError::Runtime(format!(
                "the record of task {id} in Redis is not a dbtask record: {e}"
            ))
        })
}

async fn get_record(inner: &Inner, id: &str) -> Result<Option<Bytes>, ClientError> {
    inner.check_open()?;
    let key = protocol::result_key(id);
    let mut conn = inner.redis.clone();
    let mut retried = false;
    loop {
        match redis::cmd("GET")
            .arg(&key)
            .query_async::<Option<Vec<u8>>>(&mut conn)
            .await
        {
            Ok(value) => return Ok(value.map(Bytes::from)),
            // The first command after a lost connection fails while the connection manager
            // reconnects; a GET can simply be sent again. Not after a timeout: that GET already
            // waited the whole response timeout, and a second one would double the wait.
            Err(e)
                if !retried
                    && !e.is_timeout()
                    && (e.is_connection_dropped() || e.is_io_error()) =>
            {
                retried = true
            }
            Err(e) => return Err(redis_error(&e, &inner.redis_safe)),
        }
    }
}

async fn wait(
    inner: Arc<Inner>,
    id: String,
    timeout: Option<Duration>,
) -> Result<Bytes, ClientError> {
    inner.check_open()?;
    let start = Instant::now();
    let deadline = timeout.map(|t| start + t);
    let first_deadline = timeout.map(|t| start + t.max(FIRST_CHECK_BUDGET));
    // Subscribe first, then read, then wait: a result stored in between is not missed.
    let (_registration, mut events) = inner.notifier.register(&id).map_err(ClientError::Runtime)?;
    // Also read once right away, alongside the subscription (another connection): a result
    // already stored, as a short task's often is by the time its caller asks, then takes one
    // round trip instead of two. Not finding it proves nothing; the read after subscribing
    // decides, so this read's errors are ignored too.
    //
    // The early read is dropped, not just left alone, once the subscription is active: a GET
    // that nobody polls can still hold one of the Redis connection's request slots (redis-rs
    // queues requests in a bounded channel, and tokio hands a freed slot to the oldest waiting
    // sender whether or not it is polled). Thousands of waits each holding a slot with their
    // early read while awaiting their second read starved the connection until the response
    // timeout (issue 23). Each wait now has at most one read in flight, always polled.
    let mut early = std::pin::pin!(Some(get_record(&inner, &id)));
    let mut checked = false;
    let mut last_state = TaskState::Pending;
    // Why Redis is unreachable, while it is: a wait with a timeout rides out the outage.
    let mut down: Option<String> = None;
    // When to read the record again after a read failed during a wait with a timeout.
    let mut recheck: Option<Instant> = None;
    let mut backoff = RECHECK_MIN;
    loop {
        let limit = if checked { deadline } else { first_deadline };
        let next = async {
            match limit {
                Some(limit) => tokio::time::timeout_at(limit, events.recv()).await.ok(),
                None => Some(events.recv().await),
            }
        };
        let event = tokio::select! {
            biased;
            record = async { early.as_mut().as_pin_mut().expect("polled only while set").await },
                if early.is_some() =>
            {
                early.set(None);
                if let Ok(Some(record)) = record {
                    if let Ok(state) = record_state(&id, &record) {
                        if state.is_ready() {
                            return Ok(record);
                        }
                    }
                }
                continue;
            }
            // An async block, so that no timer is made while there is nothing to recheck.
            () = async { tokio::time::sleep_until(recheck.unwrap_or(start)).await }, if recheck.is_some() => {
                recheck = None;
                Some(Some(Event::Subscribed))
            }
            event = next => event,
        };
        let Some(event) = event else {
            let secs = timeout.unwrap_or_default().as_secs_f64();
            return Err(match down {
                Some(why) => ClientError::Connection(format!(
                    "{why}; still unreachable after waiting {secs:.3} s for task {id}"
                )),
                None => ClientError::Timeout(format!(
                    "task {id} is not ready after {secs:.3} s (state {last_state})"
                )),
            });
        };
        match event {
            Some(Event::Subscribed) => {
                early.set(None);
                match get_record(&inner, &id).await {
                    Ok(record) => {
                        down = None;
                        backoff = RECHECK_MIN;
                        if let Some(record) = record {
                            last_state = record_state(&id, &record)?;
                            if last_state.is_ready() {
                                return Ok(record);
                            }
                        }
                        checked = true;
                    }
                    // With a timeout, a read that failed is tried again until the deadline:
                    // Redis may be back before then (a Done message still ends the wait).
                    Err(ClientError::Connection(why)) if deadline.is_some() => {
                        down = Some(why);
                        recheck = Some(Instant::now() + backoff);
                        backoff = (backoff * 2).min(RECHECK_MAX);
                    }
                    Err(e) => return Err(e),
                }
            }
            Some(Event::Done(record)) => {
                last_state = record_state(&id, &record)?;
                if last_state.is_ready() {
                    return Ok(record);
                }
            }
            // No timeout: say so at once rather than hang on a server that may never return.
            Some(Event::Down(why)) if deadline.is_none() => {
                return Err(ClientError::Connection(why))
            }
            Some(Event::Down(why)) => down = Some(why),
            None => return Err(ClientError::Runtime("this dbtask client is closed".into())),
        }
    }
}

/// `json.loads(record)`: the one decoding of a record, straight into Python objects.
fn record_to_py(py: Python<'_>, record: Option<Bytes>) -> PyResult<Py<PyAny>> {
    static LOADS: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
    match record {
        None => Ok(py.None()),
        Some(body) => {
            let loads = LOADS.get_or_try_init(py, || -> PyResult<_> {
                Ok(py.import("json")?.getattr("loads")?.unbind())
            })?;
            Ok(loads
                .bind(py)
                .call1((pyo3::types::PyBytes::new(py, &body),))?
                .unbind())
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Python class

fn seconds(name: &str, value: f64) -> PyResult<Duration> {
    if value.is_nan() || value < 0.0 {
        return Err(ClientError::Value(format!(
            "{name} must be a non-negative number of seconds, not {value}"
        ))
        .into());
    }
    Ok(Duration::try_from_secs_f64(value).unwrap_or(Duration::MAX))
}

fn optional_seconds(name: &str, value: Option<f64>) -> PyResult<Option<Duration>> {
    match value {
        None => Ok(None),
        Some(v) if v == f64::INFINITY => Ok(None),
        Some(v) => seconds(name, v).map(Some),
    }
}

fn check_id(task_id: &str) -> PyResult<()> {
    protocol::validate_task_id(task_id).map_err(|e| ClientError::from(e).into())
}

/// A connection to NATS and Redis. Made by `Client.connect` / `Client.connect_sync`; the
/// `dbtask` package keeps one per process (see `dbtask.init`).
#[pyclass(frozen, module = "dbtask._dbtask")]
pub struct Client {
    inner: Arc<Inner>,
}

#[pymethods]
impl Client {
    /// Connects to NATS and Redis and creates the task stream if it is missing.
    #[staticmethod]
    fn connect(
        py: Python<'_>,
        nats_url: String,
        redis_url: String,
        timeout: f64,
    ) -> PyResult<Bound<'_, PyAny>> {
        let timeout = seconds("timeout", timeout)?;
        bridge::awaitable(
            py,
            Inner::connect(nats_url, redis_url, timeout),
            |py, inner| {
                Ok(Py::new(
                    py,
                    Client {
                        inner: Arc::new(inner),
                    },
                )?
                .into_any())
            },
        )
    }

    /// Blocking form of `connect`.
    #[staticmethod]
    fn connect_sync(
        py: Python<'_>,
        nats_url: String,
        redis_url: String,
        timeout: f64,
    ) -> PyResult<Client> {
        let timeout = seconds("timeout", timeout)?;
        let inner = runtime::block_on(py, Inner::connect(nats_url, redis_url, timeout))?;
        Ok(Client {
            inner: Arc::new(inner),
        })
    }

    /// Publishes one task and returns an asyncio future of the running loop that resolves to
    /// its id (or to `wrap(id)`) once JetStream confirmed it. The message is validated and
    /// encoded here, before this returns, and handed to the I/O thread at once: the publish
    /// goes ahead whether or not the future is awaited.
    #[pyo3(signature = (queue, task, args, kwargs=None, task_id=None, eta=None, expires=None, priority=None, wrap=None))]
    #[allow(clippy::too_many_arguments)]
    fn publish<'py>(
        &self,
        py: Python<'py>,
        queue: &str,
        task: &str,
        args: &Bound<'py, PyAny>,
        kwargs: Option<&Bound<'py, PyAny>>,
        task_id: Option<String>,
        eta: Option<f64>,
        expires: Option<f64>,
        priority: Option<i64>,
        wrap: Option<Py<PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let out = prepare(
            queue,
            task,
            args,
            kwargs,
            task_id,
            eta,
            expires,
            check_priority(priority)?,
            protocol::now_unix(),
        )?;
        let publishing = self.inner.start_publishing()?;
        let (py_future, pending) = bridge::Pending::new(py)?;
        self.inner
            .jobs
            .send(PublishJob {
                publishing,
                out,
                pending,
                wrap,
            })
            .map_err(|_| {
                ClientError::Runtime("dbtask internal error: the publisher task stopped".into())
            })?;
        Ok(py_future)
    }

    /// Blocking form of `publish` (without `wrap`).
    #[pyo3(signature = (queue, task, args, kwargs=None, task_id=None, eta=None, expires=None, priority=None))]
    #[allow(clippy::too_many_arguments)]
    fn publish_sync(
        &self,
        py: Python<'_>,
        queue: &str,
        task: &str,
        args: &Bound<'_, PyAny>,
        kwargs: Option<&Bound<'_, PyAny>>,
        task_id: Option<String>,
        eta: Option<f64>,
        expires: Option<f64>,
        priority: Option<i64>,
    ) -> PyResult<String> {
        let out = prepare(
            queue,
            task,
            args,
            kwargs,
            task_id,
            eta,
            expires,
            check_priority(priority)?,
            protocol::now_unix(),
        )?;
        runtime::block_on(py, publish_one(self.inner.start_publishing()?, out))
    }

    /// Publishes one task per `(args, kwargs)` item of `calls`; resolves to their ids, in order.
    #[pyo3(signature = (queue, task, calls, eta=None, expires=None, priority=None))]
    #[allow(clippy::too_many_arguments)]
    fn publish_many<'py>(
        &self,
        py: Python<'py>,
        queue: &str,
        task: &str,
        calls: &Bound<'py, PyAny>,
        eta: Option<f64>,
        expires: Option<f64>,
        priority: Option<i64>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let outs = prepare_many(queue, task, calls, eta, expires, check_priority(priority)?)?;
        bridge::awaitable(
            py,
            publish_all(self.inner.start_publishing()?, outs),
            bridge::into_py,
        )
    }

    /// Blocking form of `publish_many`.
    #[pyo3(signature = (queue, task, calls, eta=None, expires=None, priority=None))]
    #[allow(clippy::too_many_arguments)]
    fn publish_many_sync(
        &self,
        py: Python<'_>,
        queue: &str,
        task: &str,
        calls: &Bound<'_, PyAny>,
        eta: Option<f64>,
        expires: Option<f64>,
        priority: Option<i64>,
    ) -> PyResult<Vec<String>> {
        let outs = prepare_many(queue, task, calls, eta, expires, check_priority(priority)?)?;
        runtime::block_on(py, publish_all(self.inner.start_publishing()?, outs))
    }

    /// Publishes a workflow: `signature` is the JSON of a signature tree whose ids are all
    /// assigned; its groups are stored in Redis for `group_ttl` seconds first.
    fn publish_workflow<'py>(
        &self,
        py: Python<'py>,
        signature: &str,
        group_ttl: f64,
    ) -> PyResult<Bound<'py, PyAny>> {
        let prepared = canvas::prepare(signature)?;
        let ttl = seconds("group_ttl", group_ttl)?;
        bridge::awaitable(
            py,
            canvas::publish(self.inner.start_publishing()?, prepared, ttl),
            |py, ()| Ok(py.None()),
        )
    }

    /// Blocking form of `publish_workflow`.
    fn publish_workflow_sync(
        &self,
        py: Python<'_>,
        signature: &str,
        group_ttl: f64,
    ) -> PyResult<()> {
        let prepared = canvas::prepare(signature)?;
        let ttl = seconds("group_ttl", group_ttl)?;
        runtime::block_on(
            py,
            canvas::publish(self.inner.start_publishing()?, prepared, ttl),
        )
    }

    /// The JSON list of a group's member result ids, or None when the group is unknown.
    fn get_group<'py>(&self, py: Python<'py>, group_id: String) -> PyResult<Bound<'py, PyAny>> {
        check_id(&group_id)?;
        self.inner.check_open()?;
        let inner = self.inner.clone();
        bridge::awaitable(
            py,
            async move { canvas::get_group(&inner, &group_id).await },
            bridge::into_py,
        )
    }

    /// Blocking form of `get_group`.
    fn get_group_sync(&self, py: Python<'_>, group_id: String) -> PyResult<Option<String>> {
        check_id(&group_id)?;
        self.inner.check_open()?;
        let inner = self.inner.clone();
        runtime::block_on(
            py,
            async move { canvas::get_group(&inner, &group_id).await },
        )
    }

    /// The stored record of a task as a dict, or None when there is none (PENDING).
    fn get_record<'py>(&self, py: Python<'py>, task_id: String) -> PyResult<Bound<'py, PyAny>> {
        check_id(&task_id)?;
        let inner = self.inner.clone();
        bridge::awaitable(
            py,
            async move { get_record(&inner, &task_id).await },
            record_to_py,
        )
    }

    /// Blocking form of `get_record`.
    fn get_record_sync(&self, py: Python<'_>, task_id: String) -> PyResult<Py<PyAny>> {
        check_id(&task_id)?;
        let inner = self.inner.clone();
        let record = runtime::block_on(py, async move { get_record(&inner, &task_id).await })?;
        record_to_py(py, record)
    }

    /// Waits until the task's record is in a ready state (SUCCESS, FAILURE, REVOKED) and
    /// returns it as a dict. `timeout` in seconds (None: no limit) -> TimeoutError.
    #[pyo3(signature = (task_id, timeout=None))]
    fn wait<'py>(
        &self,
        py: Python<'py>,
        task_id: String,
        timeout: Option<f64>,
    ) -> PyResult<Bound<'py, PyAny>> {
        check_id(&task_id)?;
        let timeout = optional_seconds("timeout", timeout)?;
        bridge::cancellable(py, wait(self.inner.clone(), task_id, timeout), |py, r| {
            record_to_py(py, Some(r))
        })
    }

    /// Blocking form of `wait`.
    #[pyo3(signature = (task_id, timeout=None))]
    fn wait_sync(
        &self,
        py: Python<'_>,
        task_id: String,
        timeout: Option<f64>,
    ) -> PyResult<Py<PyAny>> {
        check_id(&task_id)?;
        let timeout = optional_seconds("timeout", timeout)?;
        let record = runtime::block_on(py, wait(self.inner.clone(), task_id, timeout))?;
        record_to_py(py, Some(record))
    }

    /// Revokes a task on every worker for `ttl` seconds: it never starts; with `terminate`
    /// a running one is stopped.
    fn revoke<'py>(
        &self,
        py: Python<'py>,
        task_id: String,
        terminate: bool,
        ttl: f64,
    ) -> PyResult<Bound<'py, PyAny>> {
        check_id(&task_id)?;
        let ttl = seconds("ttl", ttl)?;
        let fut = revoke::revoke(self.inner.clone(), task_id, terminate, ttl);
        bridge::awaitable(py, fut, |py, ()| Ok(py.None()))
    }

    /// Blocking form of `revoke`.
    fn revoke_sync(
        &self,
        py: Python<'_>,
        task_id: String,
        terminate: bool,
        ttl: f64,
    ) -> PyResult<()> {
        check_id(&task_id)?;
        let ttl = seconds("ttl", ttl)?;
        runtime::block_on(
            py,
            revoke::revoke(self.inner.clone(), task_id, terminate, ttl),
        )
    }

    /// Flushes pending publishes and closes the connections.
    fn close<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let inner = self.inner.clone();
        bridge::awaitable(
            py,
            async move {
                inner.close().await;
                Ok(())
            },
            |py, ()| Ok(py.None()),
        )
    }

    /// Blocking form of `close`.
    fn close_sync(&self, py: Python<'_>) -> PyResult<()> {
        let inner = self.inner.clone();
        runtime::block_on(py, async move {
            inner.close().await;
            Ok(())
        })
    }

    /// True when this client is open and was connected with exactly these URLs.
    fn connected_to(&self, nats_url: &str, redis_url: &str) -> bool {
        !self.inner.closed.load(Ordering::Acquire)
            && self.inner.nats_given == nats_url
            && self.inner.redis_given == redis_url
    }

    #[getter]
    fn closed(&self) -> bool {
        self.inner.closed.load(Ordering::Acquire)
    }

    /// The NATS URL, password hidden.
    #[getter(nats_url)]
    fn safe_nats_url(&self) -> &str {
        &self.inner.nats_safe
    }

    /// The Redis URL, password hidden.
    #[getter(redis_url)]
    fn safe_redis_url(&self) -> &str {
        &self.inner.redis_safe
    }

    fn __repr__(&self) -> String {
        format!(
            "<dbtask Client nats={} redis={}{}>",
            self.inner.nats_safe,
            self.inner.redis_safe,
            if self.closed() { " closed" } else { "" }
        )
    }
}

/// A task's priority level (0..=9, 9 first); `None` is the default level.
fn check_priority(priority: Option<i64>) -> PyResult<Option<u8>> {
    let Some(p) = priority else { return Ok(None) };
    let level = u8::try_from(p)
        .ok()
        .filter(|l| *l <= protocol::MAX_PRIORITY)
        .ok_or_else(|| {
            ClientError::Value(format!(
                "priority must be an integer from 0 to {} (highest), not {p}",
                protocol::MAX_PRIORITY
            ))
        })?;
    Ok(Some(level))
}

fn prepare_many(
    queue: &str,
    task: &str,
    calls: &Bound<'_, PyAny>,
    eta: Option<f64>,
    expires: Option<f64>,
    priority: Option<u8>,
) -> PyResult<Vec<Outgoing>> {
    let sent_at = protocol::now_unix();
    let mut outs = Vec::with_capacity(calls.len().unwrap_or(0));
    for (i, call) in calls.try_iter()?.enumerate() {
        let call = call?;
        let (args, kwargs): (Bound<'_, PyAny>, Option<Bound<'_, PyAny>>) =
            call.extract().map_err(|_| {
                ClientError::Value(format!(
                    "publish_many: item {i} must be an (args, kwargs) pair"
                ))
            })?;
        outs.push(prepare(
            queue,
            task,
            &args,
            kwargs.as_ref(),
            None,
            eta,
            expires,
            priority,
            sent_at,
        )?);
    }
    Ok(outs)
}
