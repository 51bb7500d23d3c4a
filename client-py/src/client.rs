//! The Python class `Client`: one connected client per process (see [`Inner`]). Each
//! operation exists as an awaitable (`publish`) and as a blocking twin (`publish_sync`) that
//! runs the same Rust future with the GIL released. The work is done in [`crate::publish`],
//! [`crate::results`], [`crate::canvas`] and [`crate::revoke`]; here Python's arguments are
//! checked and the futures handed to the bridge.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use dbtask_protocol as protocol;
use pyo3::prelude::*;

use crate::bridge;
use crate::canvas;
use crate::connection::Inner;
use crate::error::ClientError;
use crate::publish::{prepare, prepare_many, publish_all, publish_one, PublishOptions, Publisher};
use crate::results::{forget, get_record, record_to_py, wait};
use crate::revoke;
use crate::runtime;
use crate::security::NatsSecurity;
use dbtask_protocol::redis_conn::RedisTls;

fn seconds(name: &str, value: f64) -> PyResult<Duration> {
    if value.is_nan() || value < 0.0 {
        return Err(ClientError::value(format!(
            "{name} must be a non-negative number of seconds, not {value}"
        ))
        .into());
    }
    Ok(Duration::try_from_secs_f64(value).unwrap_or(Duration::MAX))
}

/// `stream_replicas`: 1 to 5, the most JetStream keeps.
fn replicas(value: usize) -> PyResult<usize> {
    if !(1..=5).contains(&value) {
        return Err(ClientError::value(format!(
            "stream_replicas must be between 1 and 5 (3 on a NATS cluster of 3 servers or more), not {value}"
        ))
        .into());
    }
    Ok(value)
}

pub(crate) fn optional_seconds(name: &str, value: Option<f64>) -> PyResult<Option<Duration>> {
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
    /// Hands `publish` calls to the client's publisher task.
    publisher: Publisher,
}

impl Client {
    /// The connections, for the other classes of the module (`Schedules`).
    pub(crate) fn shared(&self) -> Arc<Inner> {
        self.inner.clone()
    }

    /// What `connect` and `connect_sync` share: the arguments checked, and the connecting to
    /// await (or block on).
    fn opening(
        nats_url: String,
        redis_url: String,
        timeout: f64,
        security: NatsSecurity,
        redis_tls: RedisTls,
        stream_replicas: usize,
    ) -> PyResult<impl std::future::Future<Output = Result<Client, ClientError>> + Send + 'static>
    {
        let timeout = seconds("timeout", timeout)?;
        let stream_replicas = replicas(stream_replicas)?;
        Ok(Client::open(
            nats_url,
            redis_url,
            timeout,
            security,
            redis_tls,
            stream_replicas,
        ))
    }

    /// Connects, then starts the publisher task (on the I/O thread, where this runs).
    async fn open(
        nats_url: String,
        redis_url: String,
        timeout: Duration,
        security: NatsSecurity,
        redis_tls: RedisTls,
        stream_replicas: usize,
    ) -> Result<Client, ClientError> {
        let inner = Inner::connect(
            nats_url,
            redis_url,
            timeout,
            security,
            redis_tls,
            stream_replicas,
        )
        .await?;
        Ok(Client {
            inner: Arc::new(inner),
            publisher: Publisher::start(),
        })
    }
}

#[pymethods]
impl Client {
    /// Connects to NATS and Redis and creates the task stream if it is missing; the
    /// `nats_*` files secure the NATS connection (TLS, credentials).
    #[staticmethod]
    #[pyo3(signature = (nats_url, redis_url, timeout, *, nats_tls_ca=None, nats_tls_cert=None, nats_tls_key=None, nats_creds=None, nats_nkey=None, message_key=None, redis_ca=None, redis_cert=None, redis_key=None, stream_replicas=1))]
    // One Rust parameter per Python parameter of the signature in _dbtask.pyi.
    #[allow(clippy::too_many_arguments)]
    fn connect(
        py: Python<'_>,
        nats_url: String,
        redis_url: String,
        timeout: f64,
        nats_tls_ca: Option<PathBuf>,
        nats_tls_cert: Option<PathBuf>,
        nats_tls_key: Option<PathBuf>,
        nats_creds: Option<PathBuf>,
        nats_nkey: Option<PathBuf>,
        message_key: Option<PathBuf>,
        redis_ca: Option<PathBuf>,
        redis_cert: Option<PathBuf>,
        redis_key: Option<PathBuf>,
        stream_replicas: usize,
    ) -> PyResult<Bound<'_, PyAny>> {
        let opening = Client::opening(
            nats_url,
            redis_url,
            timeout,
            NatsSecurity::new(
                nats_tls_ca,
                nats_tls_cert,
                nats_tls_key,
                nats_creds,
                nats_nkey,
                message_key,
            ),
            RedisTls {
                ca: redis_ca,
                cert: redis_cert,
                key: redis_key,
            },
            stream_replicas,
        )?;
        bridge::awaitable(
            py,
            opening,
            |py, client| Ok(Py::new(py, client)?.into_any()),
        )
    }

    /// Blocking form of `connect`.
    #[staticmethod]
    #[pyo3(signature = (nats_url, redis_url, timeout, *, nats_tls_ca=None, nats_tls_cert=None, nats_tls_key=None, nats_creds=None, nats_nkey=None, message_key=None, redis_ca=None, redis_cert=None, redis_key=None, stream_replicas=1))]
    // One Rust parameter per Python parameter of the signature in _dbtask.pyi.
    #[allow(clippy::too_many_arguments)]
    fn connect_sync(
        py: Python<'_>,
        nats_url: String,
        redis_url: String,
        timeout: f64,
        nats_tls_ca: Option<PathBuf>,
        nats_tls_cert: Option<PathBuf>,
        nats_tls_key: Option<PathBuf>,
        nats_creds: Option<PathBuf>,
        nats_nkey: Option<PathBuf>,
        message_key: Option<PathBuf>,
        redis_ca: Option<PathBuf>,
        redis_cert: Option<PathBuf>,
        redis_key: Option<PathBuf>,
        stream_replicas: usize,
    ) -> PyResult<Client> {
        let opening = Client::opening(
            nats_url,
            redis_url,
            timeout,
            NatsSecurity::new(
                nats_tls_ca,
                nats_tls_cert,
                nats_tls_key,
                nats_creds,
                nats_nkey,
                message_key,
            ),
            RedisTls {
                ca: redis_ca,
                cert: redis_cert,
                key: redis_key,
            },
            stream_replicas,
        )?;
        runtime::block_on(py, opening)
    }

    /// Publishes one task and returns an asyncio future of the running loop that resolves to
    /// its id (or to `wrap(id)`) once JetStream confirmed it. The message is validated and
    /// encoded here, before this returns, and handed to the I/O thread at once: the publish
    /// goes ahead whether or not the future is awaited. `options`: a [`CallOptions`] (the task
    /// id, eta, expires and priority), made once and reused by every `delay()` of a task.
    /// `trace`: the caller's `(traceparent, tracestate)` (OpenTelemetry, see `dbtask._otel`),
    /// carried in the message's headers.
    #[pyo3(signature = (queue, task, args, kwargs=None, options=None, wrap=None, trace=None))]
    #[allow(clippy::too_many_arguments)]
    fn publish<'py>(
        &self,
        queue: &str,
        task: &str,
        args: &Bound<'py, PyAny>,
        kwargs: Option<&Bound<'py, PyAny>>,
        options: Option<&Bound<'py, CallOptions>>,
        wrap: Option<Py<PyAny>>,
        trace: Option<(String, Option<String>)>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let trace = trace_context(trace)?;
        let (task_id, options) = CallOptions::read(options);
        let out = prepare(
            queue,
            task,
            args,
            kwargs,
            task_id,
            options,
            protocol::now_unix(),
        )?
        .with_trace(trace.as_ref());
        let publishing = self.inner.start_publishing()?;
        let (py_future, pending) = bridge::Pending::new(args.py())?;
        self.publisher.submit(publishing, out, pending, wrap)?;
        Ok(py_future)
    }

    /// Blocking form of `publish` (without `wrap`).
    #[pyo3(signature = (queue, task, args, kwargs=None, options=None, trace=None))]
    fn publish_sync(
        &self,
        queue: &str,
        task: &str,
        args: &Bound<'_, PyAny>,
        kwargs: Option<&Bound<'_, PyAny>>,
        options: Option<&Bound<'_, CallOptions>>,
        trace: Option<(String, Option<String>)>,
    ) -> PyResult<String> {
        let trace = trace_context(trace)?;
        let (task_id, options) = CallOptions::read(options);
        let out = prepare(
            queue,
            task,
            args,
            kwargs,
            task_id,
            options,
            protocol::now_unix(),
        )?
        .with_trace(trace.as_ref());
        runtime::block_on(args.py(), publish_one(self.inner.start_publishing()?, out))
    }

    /// Publishes one task per `(args, kwargs)` item of `calls`; resolves to their ids, in order.
    #[pyo3(signature = (queue, task, calls, eta=None, expires=None, priority=None, trace=None))]
    #[allow(clippy::too_many_arguments)]
    fn publish_many<'py>(
        &self,
        queue: &str,
        task: &str,
        calls: &Bound<'py, PyAny>,
        eta: Option<f64>,
        expires: Option<f64>,
        priority: Option<i64>,
        trace: Option<(String, Option<String>)>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let options = publish_options(eta, expires, priority)?;
        let trace = trace_context(trace)?;
        let outs = prepare_many(queue, task, calls, options, trace.as_ref())?;
        bridge::awaitable(
            calls.py(),
            publish_all(self.inner.start_publishing()?, outs),
            bridge::into_py,
        )
    }

    /// Blocking form of `publish_many`.
    #[pyo3(signature = (queue, task, calls, eta=None, expires=None, priority=None, trace=None))]
    #[allow(clippy::too_many_arguments)]
    fn publish_many_sync(
        &self,
        queue: &str,
        task: &str,
        calls: &Bound<'_, PyAny>,
        eta: Option<f64>,
        expires: Option<f64>,
        priority: Option<i64>,
        trace: Option<(String, Option<String>)>,
    ) -> PyResult<Vec<String>> {
        let options = publish_options(eta, expires, priority)?;
        let trace = trace_context(trace)?;
        let outs = prepare_many(queue, task, calls, options, trace.as_ref())?;
        runtime::block_on(
            calls.py(),
            publish_all(self.inner.start_publishing()?, outs),
        )
    }

    /// Publishes a workflow: `signature` is the JSON of a signature tree whose ids are all
    /// assigned; its groups are stored in Redis for `group_ttl` seconds first.
    #[pyo3(signature = (signature, group_ttl, trace=None))]
    fn publish_workflow<'py>(
        &self,
        py: Python<'py>,
        signature: &str,
        group_ttl: f64,
        trace: Option<(String, Option<String>)>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let prepared = canvas::prepare(signature, trace_context(trace)?.as_ref())?;
        let ttl = seconds("group_ttl", group_ttl)?;
        bridge::awaitable(
            py,
            canvas::publish(self.inner.start_publishing()?, prepared, ttl),
            |py, ()| Ok(py.None()),
        )
    }

    /// Blocking form of `publish_workflow`.
    #[pyo3(signature = (signature, group_ttl, trace=None))]
    fn publish_workflow_sync(
        &self,
        py: Python<'_>,
        signature: &str,
        group_ttl: f64,
        trace: Option<(String, Option<String>)>,
    ) -> PyResult<()> {
        let prepared = canvas::prepare(signature, trace_context(trace)?.as_ref())?;
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

    /// A stream of the task's states as they are stored (`AsyncResult.progress()`).
    fn progress(&self, task_id: String) -> PyResult<crate::progress::ProgressStream> {
        check_id(&task_id)?;
        self.inner.check_open()?;
        Ok(crate::progress::ProgressStream::new(
            self.inner.clone(),
            task_id,
        ))
    }

    /// Deletes the task's record (`AsyncResult.forget()`).
    fn forget<'py>(&self, py: Python<'py>, task_id: String) -> PyResult<Bound<'py, PyAny>> {
        check_id(&task_id)?;
        let inner = self.inner.clone();
        bridge::awaitable(
            py,
            async move { forget(&inner, &task_id).await },
            |py, ()| Ok(py.None()),
        )
    }

    /// Blocking form of `forget`.
    fn forget_sync(&self, py: Python<'_>, task_id: String) -> PyResult<()> {
        check_id(&task_id)?;
        let inner = self.inner.clone();
        runtime::block_on(py, async move { forget(&inner, &task_id).await })
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

    /// True when this client is open and was connected with exactly these URLs and NATS
    /// TLS and credential files.
    #[pyo3(signature = (nats_url, redis_url, *, nats_tls_ca=None, nats_tls_cert=None, nats_tls_key=None, nats_creds=None, nats_nkey=None, message_key=None, redis_ca=None, redis_cert=None, redis_key=None))]
    // One Rust parameter per Python parameter of the signature in _dbtask.pyi.
    #[allow(clippy::too_many_arguments)]
    fn connected_to(
        &self,
        nats_url: &str,
        redis_url: &str,
        nats_tls_ca: Option<PathBuf>,
        nats_tls_cert: Option<PathBuf>,
        nats_tls_key: Option<PathBuf>,
        nats_creds: Option<PathBuf>,
        nats_nkey: Option<PathBuf>,
        message_key: Option<PathBuf>,
        redis_ca: Option<PathBuf>,
        redis_cert: Option<PathBuf>,
        redis_key: Option<PathBuf>,
    ) -> bool {
        let security = NatsSecurity::new(
            nats_tls_ca,
            nats_tls_cert,
            nats_tls_key,
            nats_creds,
            nats_nkey,
            message_key,
        );
        !self.inner.closed.load(Ordering::Acquire)
            && self.inner.nats_given == nats_url
            && self.inner.redis_given == redis_url
            && self.inner.security == security
            && self.inner.redis_tls
                == RedisTls {
                    ca: redis_ca,
                    cert: redis_cert,
                    key: redis_key,
                }
    }

    #[getter]
    fn closed(&self) -> bool {
        self.inner.closed.load(Ordering::Acquire)
    }

    /// Replicas of the task stream if this client has to create it.
    #[getter]
    fn stream_replicas(&self) -> usize {
        self.inner.stream_replicas
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

/// The options of a publish call as Python gave them, checked.
/// The options of a `publish` / `publish_sync` call, checked once when made, in Python
/// `dbtask._dbtask.PublishOptions(task_id=None, eta=None, expires=None, priority=None,
/// ignore_result=None)`: a
/// task makes one for all its plain `delay()` calls (its priority), `apply_async` one per call.
#[pyclass(frozen, name = "PublishOptions", module = "dbtask._dbtask")]
pub struct CallOptions {
    task_id: Option<String>,
    options: PublishOptions,
}

#[pymethods]
impl CallOptions {
    #[new]
    #[pyo3(signature = (*, task_id=None, eta=None, expires=None, priority=None, ignore_result=None))]
    fn new(
        task_id: Option<String>,
        eta: Option<f64>,
        expires: Option<f64>,
        priority: Option<i64>,
        ignore_result: Option<bool>,
    ) -> PyResult<CallOptions> {
        let mut options = publish_options(eta, expires, priority)?;
        options.ignore_result = ignore_result;
        Ok(CallOptions { task_id, options })
    }

    /// The priority level these options give (None: the default level).
    #[getter]
    fn priority(&self) -> Option<u8> {
        self.options.priority
    }
}

impl CallOptions {
    /// The task id (copied: the options may serve many calls) and the options `prepare`
    /// takes; no options are the defaults.
    pub(crate) fn read(
        options: Option<&Bound<'_, CallOptions>>,
    ) -> (Option<String>, PublishOptions) {
        options.map_or((None, PublishOptions::default()), |o| {
            let o = o.get();
            (o.task_id.clone(), o.options)
        })
    }
}

fn publish_options(
    eta: Option<f64>,
    expires: Option<f64>,
    priority: Option<i64>,
) -> PyResult<PublishOptions> {
    Ok(PublishOptions {
        eta,
        expires,
        priority: check_priority(priority)?,
        ignore_result: None,
    })
}

/// A task's priority level (0..=9, 9 first); `None` is the default level.
fn check_priority(priority: Option<i64>) -> PyResult<Option<u8>> {
    let Some(p) = priority else { return Ok(None) };
    let level = u8::try_from(p)
        .ok()
        .filter(|l| *l <= protocol::MAX_PRIORITY)
        .ok_or_else(|| {
            ClientError::value(format!(
                "priority must be an integer from 0 to {} (highest), not {p}",
                protocol::MAX_PRIORITY
            ))
        })?;
    Ok(Some(level))
}

/// A publish call's `trace` argument checked: `(traceparent, tracestate)` -> ValueError when
/// a value could not travel in a header.
fn trace_context(trace: Option<(String, Option<String>)>) -> PyResult<Option<protocol::Trace>> {
    trace
        .map(|(parent, state)| protocol::Trace::new(parent, state).map_err(ClientError::value))
        .transpose()
        .map_err(Into::into)
}
