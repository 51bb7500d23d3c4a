//! Following a task's states as they are stored (`AsyncResult.progress()`), on the same
//! shared pub/sub connection as `wait()`: the worker publishes every state a task stores for
//! itself (`update_state`) and every final record on `dbtask:done:{<id>}`.
//!
//! Subscribe first, then read the current record, then hear each update: nothing stored after
//! the subscription is missed. A record is yielded once (the read and the notice of the same
//! record are one update), never an update older than one already yielded (the read and the
//! notices travel on two connections), and the stream ends after the final record.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use pyo3::prelude::*;
use tokio::sync::{mpsc, Mutex};

use crate::bridge;
use crate::connection::Inner;
use crate::error::ClientError;
use crate::notify::{Event, Registration};
use crate::results::{get_record, record_to_py};
use crate::runtime;

#[derive(serde::Deserialize)]
struct Stamp {
    state: dbtask_protocol::TaskState,
    /// When the worker stored a task's own state (absent from the worker's records).
    #[serde(default)]
    date_updated: Option<f64>,
}

#[derive(Default)]
struct Stream {
    subscription: Option<(Registration, mpsc::UnboundedReceiver<Event>)>,
    /// The last record yielded, and its `date_updated`.
    last: Option<Bytes>,
    last_at: f64,
    finished: bool,
}

impl Stream {
    /// `record`, if it is news: not the one last yielded, not older than it.
    fn news(&mut self, id: &str, record: Bytes) -> Result<Option<Bytes>, ClientError> {
        if self.last.as_ref() == Some(&record) {
            return Ok(None);
        }
        let stamp: Stamp = serde_json::from_slice(&record).map_err(|e| {
            ClientError::runtime(format!(
                "the record of task {id} in Redis is not a dbtask record: {e}"
            ))
            .because(e)
        })?;
        let ready = stamp.state.is_ready();
        if !ready && stamp.date_updated.unwrap_or(f64::INFINITY) < self.last_at {
            return Ok(None);
        }
        if let Some(at) = stamp.date_updated {
            self.last_at = at;
        }
        self.finished = ready;
        self.last = Some(record.clone());
        Ok(Some(record))
    }
}

/// `dbtask._dbtask.ProgressStream`: made by `Client.progress(task_id)`.
#[pyclass(frozen, name = "ProgressStream", module = "dbtask._dbtask")]
pub struct ProgressStream {
    inner: Arc<Inner>,
    id: String,
    stream: Arc<Mutex<Stream>>,
}

impl ProgressStream {
    pub(crate) fn new(inner: Arc<Inner>, id: String) -> ProgressStream {
        ProgressStream {
            inner,
            id,
            stream: Arc::default(),
        }
    }
}

/// The next update of task `id`, or `None` once its final record was yielded.
async fn next(
    inner: Arc<Inner>,
    id: String,
    stream: Arc<Mutex<Stream>>,
    timeout: Option<Duration>,
) -> Result<Option<Bytes>, ClientError> {
    let mut stream = stream.lock().await;
    let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
    loop {
        if stream.finished {
            return Ok(None);
        }
        if stream.subscription.is_none() {
            inner.check_open()?;
            stream.subscription = Some(inner.notifier.register(&id)?);
        }
        let (_, events) = stream.subscription.as_mut().expect("registered above");
        let event = match deadline {
            Some(at) => match tokio::time::timeout_at(at, events.recv()).await {
                Ok(event) => event,
                Err(_) => {
                    let secs = timeout.unwrap_or_default().as_secs_f64();
                    return Err(ClientError::Timeout(format!(
                        "task {id} stored no new state within {secs:.3} s"
                    )));
                }
            },
            None => events.recv().await,
        };
        let record = match event {
            // (Again) subscribed: the current record, which may be news.
            Some(Event::Subscribed) => match get_record(&inner, &id).await? {
                Some(record) => record,
                None => continue,
            },
            Some(Event::Done(record)) => record,
            Some(Event::Down(why)) if deadline.is_none() => return Err(ClientError::PubSub(why)),
            Some(Event::Down(_)) => continue,
            None => return Err(ClientError::runtime("this dbtask client is closed")),
        };
        if let Some(news) = stream.news(&id, record)? {
            if stream.finished {
                stream.subscription = None;
            }
            return Ok(Some(news));
        }
    }
}

fn to_py(py: Python<'_>, record: Option<Bytes>) -> PyResult<Py<PyAny>> {
    record_to_py(py, record)
}

impl ProgressStream {
    /// The future of the next update, `timeout` checked.
    fn next_update(
        &self,
        timeout: Option<f64>,
    ) -> PyResult<impl std::future::Future<Output = Result<Option<Bytes>, ClientError>>> {
        let timeout = crate::client::optional_seconds("timeout", timeout)?;
        Ok(next(
            self.inner.clone(),
            self.id.clone(),
            self.stream.clone(),
            timeout,
        ))
    }
}

#[pymethods]
impl ProgressStream {
    /// Awaitable: the next update as a dict, or None after the final record.
    #[pyo3(signature = (timeout=None))]
    fn next<'py>(&self, py: Python<'py>, timeout: Option<f64>) -> PyResult<Bound<'py, PyAny>> {
        bridge::cancellable(py, self.next_update(timeout)?, to_py)
    }

    /// Blocking form of `next`.
    #[pyo3(signature = (timeout=None))]
    fn next_sync(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Py<PyAny>> {
        let record = runtime::block_on(py, self.next_update(timeout)?)?;
        to_py(py, record)
    }

    /// Stops listening (also done when the stream is garbage-collected or has ended).
    fn close(&self) {
        if let Ok(mut stream) = self.stream.try_lock() {
            stream.subscription = None;
            stream.finished = true;
        }
    }
}
