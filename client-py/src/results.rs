//! Reading results: a task's record from Redis, and `wait`, which subscribes to the task's
//! notification before it reads the record, so that a result stored in between is not missed.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use dbtask_protocol as protocol;
use protocol::TaskState;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use tokio::time::Instant;

use crate::connection::{redis_error, Inner};
use crate::error::ClientError;
use crate::notify::Event;

/// `wait()` always gets this long to subscribe and read the record once, even with a zero
/// timeout: `get(timeout=0)` means "check once", not "fail at once".
const FIRST_CHECK_BUDGET: Duration = Duration::from_secs(2);
/// How soon a wait with a timeout reads a record again after a read failed, doubling up to
/// the maximum.
const RECHECK_MIN: Duration = Duration::from_millis(100);
const RECHECK_MAX: Duration = Duration::from_secs(2);

#[derive(serde::Deserialize)]
struct StateOnly {
    state: TaskState,
}

fn record_state(id: &str, body: &[u8]) -> Result<TaskState, ClientError> {
    serde_json::from_slice::<StateOnly>(body)
        .map(|s| s.state)
        .map_err(|e| {
            ClientError::runtime(format!(
                "the record of task {id} in Redis is not a dbtask record: {e}"
            ))
            .because(e)
        })
}

pub(crate) async fn get_record(inner: &Inner, id: &str) -> Result<Option<Bytes>, ClientError> {
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

/// `DEL dbtask:result:{<id>}`: the task reads PENDING again.
pub(crate) async fn forget(inner: &Inner, id: &str) -> Result<(), ClientError> {
    inner.check_open()?;
    let mut conn = inner.redis.clone();
    redis::cmd("DEL")
        .arg(protocol::result_key(id))
        .exec_async(&mut conn)
        .await
        .map_err(|e| redis_error(&e, &inner.redis_safe))
}

pub(crate) async fn wait(
    inner: Arc<Inner>,
    id: String,
    timeout: Option<Duration>,
) -> Result<Bytes, ClientError> {
    inner.check_open()?;
    let start = Instant::now();
    let deadline = timeout.map(|t| start + t);
    let first_deadline = timeout.map(|t| start + t.max(FIRST_CHECK_BUDGET));
    // Subscribe first, then read, then wait: a result stored in between is not missed.
    let (_registration, mut events) = inner.notifier.register(&id)?;
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
    let mut down: Option<ClientError> = None;
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
                Some(why) => ClientError::StillDown {
                    task_id: id.clone(),
                    secs,
                    source: Box::new(why),
                },
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
                    Err(why) if why.is_connection() && deadline.is_some() => {
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
            Some(Event::Down(why)) if deadline.is_none() => return Err(ClientError::PubSub(why)),
            Some(Event::Down(why)) => down = Some(ClientError::PubSub(why)),
            None => return Err(ClientError::runtime("this dbtask client is closed")),
        }
    }
}

/// `json.loads(record)`: the one decoding of a record, straight into Python objects.
pub(crate) fn record_to_py(py: Python<'_>, record: Option<Bytes>) -> PyResult<Py<PyAny>> {
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
