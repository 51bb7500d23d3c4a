//! Publishing task messages: a message is checked and encoded on the Python thread (with the
//! GIL), then sent from the I/O thread. `publish` hands its message to the client's one
//! publisher task, `publish_many` and workflows send a batch and await its confirmations in
//! order, and a stream deleted after `init` is made again once.

use std::collections::VecDeque;
use std::time::Duration;

use async_nats::jetstream::context::{PublishAckFuture, PublishError, PublishErrorKind};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::publish::PublishAck;
use async_nats::{HeaderMap, Subject};
use bytes::Bytes;
use dbtask_protocol as protocol;
use protocol::nats::{add_trace, task_header_map};
use protocol::{TaskMessage, Trace};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString, PyTuple};
use serde_json::value::RawValue;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::bridge;
use crate::connection::{ensure_stream, Inner, Publishing, PUBLISH_TIMEOUT};
use crate::error::ClientError;
use crate::json;

/// `publish_many` keeps at most this many of its own confirmations pending.
const BULK_WINDOW: usize = 4_096;

/// A task message ready to go: encoded on the Python thread (with the GIL), sent from tokio.
pub(crate) struct Outgoing {
    pub(crate) id: String,
    subject: Subject,
    /// Moved into the publish, not copied: empty once sent (see [`Outgoing::headers_again`]).
    headers: HeaderMap,
    body: Bytes,
    /// The caller's trace context (OpenTelemetry), kept for [`Outgoing::headers_again`].
    trace: Option<Box<Trace>>,
}

impl Outgoing {
    /// `message` encoded for `route`, with the headers every task message carries: its id
    /// (`Nats-Msg-Id` for JetStream's de-duplication, and for a worker that cannot read the
    /// body), its task name, and the route's schedule headers.
    pub(crate) fn new(message: TaskMessage, route: protocol::Route) -> Outgoing {
        let headers = task_header_map(&message, &route, &message.id);
        let body = Bytes::from(message.encode());
        Outgoing {
            id: message.id,
            subject: Subject::from(route.subject),
            headers,
            body,
            trace: None,
        }
    }

    /// With the caller's trace context in its headers (`traceparent`, `tracestate`).
    pub(crate) fn with_trace(mut self, trace: Option<&Trace>) -> Outgoing {
        if let Some(trace) = trace {
            add_trace(&mut self.headers, Some(trace));
            self.trace = Some(Box::new(trace.clone()));
        }
        self
    }

    /// The encoded message body (eager mode runs it in-process instead of sending it).
    pub(crate) fn body(&self) -> &[u8] {
        &self.body
    }

    /// The headers again, for publishing a second time: rebuilt from the body, which holds
    /// everything they were made of (the route depends only on the message's own queue, eta
    /// and sent_at). Rare (the stream was deleted after init), so the first publish need not
    /// keep a copy.
    fn headers_again(&self) -> Result<HeaderMap, ClientError> {
        let message = TaskMessage::decode(&self.body)
            .map_err(|e| ClientError::runtime(format!("dbtask internal error: {e}")).because(e))?;
        let queue = message.queue.clone().unwrap_or_default();
        let route = message.route(&queue, message.sent_at.unwrap_or_else(protocol::now_unix));
        let mut headers = task_header_map(&message, &route, &message.id);
        add_trace(&mut headers, self.trace.as_deref());
        Ok(headers)
    }
}

/// The options a publish call gives every message it makes (the task id is per message).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct PublishOptions {
    /// Run no earlier than this Unix time.
    pub(crate) eta: Option<f64>,
    /// Do not run after this Unix time.
    pub(crate) expires: Option<f64>,
    /// Priority level 0..=9 (checked by the caller); `None` is the default level.
    pub(crate) priority: Option<u8>,
    /// `apply_async(ignore_result=...)`; `None`: the task's own option.
    pub(crate) ignore_result: Option<bool>,
}

/// One task message for `task` on `queue`, checked and encoded: `args` a tuple or list,
/// `kwargs` a dict with str keys (or None), `task_id` a new id when None.
pub(crate) fn prepare(
    queue: &str,
    task: &str,
    args: &Bound<'_, PyAny>,
    kwargs: Option<&Bound<'_, PyAny>>,
    task_id: Option<String>,
    options: PublishOptions,
    sent_at: f64,
) -> Result<Outgoing, ClientError> {
    let PublishOptions {
        eta,
        expires,
        priority,
        ignore_result,
    } = options;
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
        return Err(ClientError::value(format!(
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
                ClientError::value(format!(
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
                    return Err(ClientError::value(format!(
                        "keyword argument names must be str, not {}",
                        key.repr().map(|r| r.to_string()).unwrap_or_default()
                    )));
                }
                json::to_raw_json(k, "kwargs")?
            }
        }
    };
    let check_time = |name: &str, t: Option<f64>| match t {
        Some(v) if !v.is_finite() => Err(ClientError::value(format!(
            "{name} must be a finite time, not {v}"
        ))),
        _ => Ok(()),
    };
    check_time("eta", eta)?;
    check_time("expires", expires)?;
    if let Some(at) = eta.filter(|at| *at > protocol::MAX_ETA) {
        return Err(ClientError::value(format!(
            "eta {at} is after the year 9999, the last time NATS can schedule a task at: use a smaller countdown or an earlier eta"
        )));
    }
    let message = TaskMessage {
        queue: Some(queue.to_owned()),
        eta,
        expires,
        priority,
        sent_at: Some(sent_at),
        ignore_result,
        ..TaskMessage::new(id, task.to_owned(), args, kwargs)
    };
    // A future eta waits in JetStream as a message schedule that the server publishes to the
    // subject of the task's priority level at that time; an eta in the past goes there at once.
    let route = message.route(queue, sent_at);
    Ok(Outgoing::new(message, route))
}

fn empty_object() -> Box<RawValue> {
    RawValue::from_string("{}".to_owned()).expect("literal JSON")
}

fn publish_error(inner: &Inner, id: &str, e: PublishError) -> ClientError {
    let safe = &inner.nats_safe;
    let error = match e.kind() {
        PublishErrorKind::MaxPayloadExceeded => ClientError::value(format!(
            "task {id} is too large to send: {e} (NATS at {safe} accepts at most {} bytes per \
             message, its max_payload): pass large data by reference, e.g. a URL or a key",
            inner.nats.server_info().max_payload
        )),
        PublishErrorKind::TimedOut => ClientError::connection(format!(
            "JetStream at {safe} did not confirm task {id} within {} s (is NATS reachable?); \
             publishing again with the same task_id is safe: JetStream drops a duplicate id \
             within the stream's duplicate window",
            PUBLISH_TIMEOUT.as_secs()
        )),
        PublishErrorKind::StreamNotFound => ClientError::connection(format!(
            "no JetStream stream on NATS at {safe} takes task subjects ({}, and {} for countdown/eta): \
             the stream {} is missing, or was made by an older dbtask: start a current dbtask worker \
             once, it adds the subjects and enables message schedules (nats-server 2.12+)",
            protocol::TASK_SUBJECT_WILDCARD,
            protocol::SCHEDULE_SUBJECT_WILDCARD,
            protocol::TASK_STREAM
        )),
        _ => ClientError::connection(format!("cannot publish task {id} to NATS at {safe}: {e}")),
    };
    error.because(e)
}

/// Sends `out`, moving its headers into the message (the subject and body are shared).
async fn start_publish(
    inner: &Inner,
    out: &mut Outgoing,
) -> Result<PublishAckFuture, PublishError> {
    if let Some(key) = &inner.message_key {
        key.sign_headers(&mut out.headers, &out.subject, &out.body);
    }
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

pub(crate) async fn publish_one(
    publishing: Publishing,
    mut out: Outgoing,
) -> Result<String, ClientError> {
    let inner = publishing.inner();
    // Set on the first "no stream answered": how long to wait for one (nothing on success).
    let mut deadline: Option<Instant> = None;
    loop {
        let result = match start_publish(inner, &mut out).await {
            Ok(ack) => ack.await,
            Err(e) => Err(e),
        };
        match result {
            Ok(_ack) => return Ok(out.id),
            Err(e) if e.kind() == PublishErrorKind::StreamNotFound => {
                let until = match deadline {
                    None => *deadline.insert(Instant::now() + PUBLISH_TIMEOUT),
                    Some(until) if Instant::now() >= until => {
                        return Err(publish_error(inner, &out.id, e))
                    }
                    // Found again but not answering yet: an election still going on.
                    Some(until) => {
                        tokio::time::sleep(STREAM_RETRY).await;
                        until
                    }
                };
                // Boxed: this state machine is several KB, and inline it made every publish
                // future that large (10.7 KB instead of 2.9 KB, allocated and copied per task).
                Box::pin(stream_back(inner, until)).await?;
                out.headers = out.headers_again()?;
            }
            Err(e) => return Err(publish_error(inner, &out.id, e)),
        }
    }
}

/// How often a stream that does not answer is asked for again.
const STREAM_RETRY: Duration = Duration::from_millis(250);

/// After a publish that no stream answered ("no responders"): the task stream was deleted
/// after init, or, on a NATS cluster, it is between two leaders for the seconds of an
/// election (the server it led died). Makes the stream again if it is missing; while it
/// answers nothing, asks again until `deadline`.
async fn stream_back(inner: &Inner, deadline: Instant) -> Result<(), ClientError> {
    loop {
        let attempt = (Instant::now() + Duration::from_secs(2)).min(deadline);
        let ensured = tokio::time::timeout_at(
            attempt,
            ensure_stream(&inner.js, &inner.nats_safe, inner.stream_replicas),
        )
        .await;
        match ensured {
            Ok(done) => return done,
            Err(_) if Instant::now() + STREAM_RETRY < deadline => {
                tokio::time::sleep(STREAM_RETRY).await
            }
            Err(_) => {
                return Err(ClientError::connection(format!(
                    "no JetStream stream {} answered on NATS at {} within {} s (on a cluster, \
                     its servers may be electing a new leader, or too few of them are up): \
                     publishing again with the same task_id is safe",
                    protocol::TASK_STREAM,
                    inner.nats_safe,
                    PUBLISH_TIMEOUT.as_secs()
                )))
            }
        }
    }
}

/// Jobs the publisher takes at once before letting the tasks it spawned run.
const PUBLISHER_BURST: usize = 1024;

/// The handle of a client's one publisher task (see [`run_publisher`]); the task ends when the
/// handle is dropped, after the calls already handed to it.
pub(crate) struct Publisher {
    jobs: mpsc::UnboundedSender<PublishJob>,
}

impl Publisher {
    /// Spawns the publisher task: call it on the I/O thread.
    pub(crate) fn start() -> Publisher {
        let (jobs, queue) = mpsc::unbounded_channel();
        tokio::spawn(run_publisher(queue));
        Publisher { jobs }
    }

    /// Hands one `publish` call to the publisher task: it goes ahead whether or not the
    /// call's asyncio future (`pending`) is awaited.
    pub(crate) fn submit(
        &self,
        publishing: Publishing,
        out: Outgoing,
        pending: bridge::Pending,
        wrap: Option<Py<PyAny>>,
    ) -> Result<(), ClientError> {
        self.jobs
            .send(PublishJob {
                publishing,
                out,
                pending,
                wrap,
            })
            .map_err(|_| ClientError::runtime("dbtask internal error: the publisher task stopped"))
    }
}

/// One `publish` call on its way: the message, and the asyncio future that awaits it.
struct PublishJob {
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
            match start_publish(job.publishing.inner(), &mut job.out).await {
                Ok(ack) => {
                    // The confirming task lives as long as this sender.
                    let _ = sent_tx.send(Sent {
                        job,
                        at: Instant::now(),
                        ack,
                    });
                }
                Err(e) => {
                    let err = publish_error(job.publishing.inner(), &job.out.id, e);
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
            // The stream was deleted after init, or is between two leaders: made again (or
            // waited for) and published again, apart from the others (publish_one waits
            // at most PUBLISH_TIMEOUT more).
            Ok(Err(e)) if e.kind() == PublishErrorKind::StreamNotFound => {
                tokio::spawn(Box::pin(republish(job)));
            }
            Ok(Err(e)) => {
                let err = publish_error(job.publishing.inner(), &job.out.id, e);
                job.resolve(Err(err));
            }
            Err(panicked) => job.resolve(Err(panicked)),
        }
    }
}

/// A publish's confirmation, at most PUBLISH_TIMEOUT after the publish (`at`), however late
/// it is awaited.
async fn confirmation(at: Instant, ack: PublishAckFuture) -> Result<PublishAck, PublishError> {
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

/// Makes the stream again (or waits for it to answer), then publishes the job's message again
/// (see [`publish_one`]).
async fn republish(job: PublishJob) {
    let PublishJob {
        publishing,
        mut out,
        pending,
        wrap,
    } = job;
    let result = bridge::guarded(async move {
        let inner = publishing.inner();
        Box::pin(stream_back(inner, Instant::now() + PUBLISH_TIMEOUT)).await?;
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
    let inner = publishing.inner();
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
        if err.is_value() {
            ClientError::value(text).because(err)
        } else {
            ClientError::connection(text).because(err)
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
    result: Result<PublishAck, PublishError>,
) -> Result<(), ClientError> {
    result.map(|_| ()).map_err(|e| publish_error(inner, id, e))
}

/// One message per `(args, kwargs)` item of `calls`, all sent at the same time.
pub(crate) fn prepare_many(
    queue: &str,
    task: &str,
    calls: &Bound<'_, PyAny>,
    options: PublishOptions,
    trace: Option<&Trace>,
) -> PyResult<Vec<Outgoing>> {
    let sent_at = protocol::now_unix();
    let mut outs = Vec::with_capacity(calls.len().unwrap_or(0));
    for (i, call) in calls.try_iter()?.enumerate() {
        let call = call?;
        let (args, kwargs): (Bound<'_, PyAny>, Option<Bound<'_, PyAny>>) =
            call.extract().map_err(|_| {
                ClientError::value(format!(
                    "publish_many: item {i} must be an (args, kwargs) pair"
                ))
            })?;
        outs.push(
            prepare(queue, task, &args, kwargs.as_ref(), None, options, sent_at)?.with_trace(trace),
        );
    }
    Ok(outs)
}
