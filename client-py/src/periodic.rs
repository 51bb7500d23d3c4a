//! Periodic schedules from Python (`dbtask.schedule`, `unschedule`, `schedules`,
//! `run_schedule`; see docs/periodic.md): the Python class `Schedules`, made over the
//! process's `Client` for each call. The schedules themselves are read and written by
//! `dbtask_protocol::periodic::jetstream`, the same code the worker applies declarations with.

use std::sync::Arc;

use dbtask_protocol as protocol;
use protocol::periodic::jetstream::{self as schedules, ScheduleError, Stored};
use protocol::periodic::{periodic_key, validate_schedule_name, PeriodicSpec};
use pyo3::prelude::*;
use redis::AsyncCommands;

use crate::bridge;
use crate::client::Client;
use crate::connection::Inner;
use crate::error::ClientError;
use crate::runtime;

/// The schedules of the connected client's servers.
#[pyclass(module = "dbtask._dbtask", frozen)]
pub struct Schedules {
    inner: Arc<Inner>,
}

fn failed(inner: &Inner, e: ScheduleError) -> ClientError {
    match e {
        ScheduleError::Refused { .. } => ClientError::value(e.to_string()).because(e),
        ScheduleError::Stored { .. } => ClientError::runtime(e.to_string()).because(e),
        ScheduleError::Nats { .. } => {
            ClientError::connection(format!("{e} (NATS at {})", inner.nats_safe)).because(e)
        }
    }
}

fn checked_name(name: &str) -> Result<(), ClientError> {
    validate_schedule_name(name).map_err(|e| ClientError::value(e.to_string()).because(e))
}

async fn task_stream(inner: &Inner) -> Result<async_nats::jetstream::stream::Stream, ClientError> {
    inner.check_open()?;
    inner
        .js
        .get_stream(protocol::TASK_STREAM)
        .await
        .map_err(|e| {
            ClientError::connection(format!(
                "cannot read the task stream {} on NATS at {}: {e}",
                protocol::TASK_STREAM,
                inner.nats_safe
            ))
            .because(e)
        })
}

async fn create(inner: Arc<Inner>, declaration: String) -> Result<(), ClientError> {
    let spec = PeriodicSpec::from_json(&declaration)
        .map_err(|e| ClientError::value(e.to_string()).because(e))?;
    let version = inner.nats.server_info().version;
    schedules::check_version(&version)
        .map_err(|why| ClientError::runtime(format!("NATS at {}: {why}", inner.nats_safe)))?;
    let stream = task_stream(&inner).await?;
    schedules::apply(&inner.js, &stream, &spec, inner.message_key.as_ref())
        .await
        .map_err(|e| failed(&inner, e))?;
    Ok(())
}

async fn remove(inner: Arc<Inner>, name: String) -> Result<bool, ClientError> {
    checked_name(&name)?;
    let stream = task_stream(&inner).await?;
    let removed = schedules::remove(&stream, &name)
        .await
        .map_err(|e| failed(&inner, e))?;
    let mut redis = inner.redis.clone();
    let _: () = redis
        .del(periodic_key(&name))
        .await
        .map_err(|e| crate::connection::redis_error(&e, &inner.redis_safe))?;
    Ok(removed)
}

/// What the workers noted of a schedule's ticks: (last tick id, its time, the next tick).
type Seen = (Option<String>, Option<f64>, Option<f64>);

async fn seen(inner: &Inner, names: &[&str]) -> Result<Vec<Seen>, ClientError> {
    let mut redis = inner.redis.clone();
    let mut pipe = redis::pipe();
    for name in names {
        pipe.cmd("HMGET")
            .arg(periodic_key(name))
            .arg("last_id")
            .arg("last_at")
            .arg("next_at");
    }
    let rows: Vec<(Option<String>, Option<f64>, Option<f64>)> = pipe
        .query_async(&mut redis)
        .await
        .map_err(|e| crate::connection::redis_error(&e, &inner.redis_safe))?;
    Ok(rows)
}

async fn list(inner: Arc<Inner>) -> Result<String, ClientError> {
    let stream = task_stream(&inner).await?;
    let stored: Vec<Stored> = schedules::list(&stream)
        .await
        .map_err(|e| failed(&inner, e))?;
    let names: Vec<&str> = stored.iter().map(|s| s.spec.name.as_str()).collect();
    let seen = if names.is_empty() {
        Vec::new()
    } else {
        seen(&inner, &names).await?
    };
    let now = protocol::now_unix();
    let listings: Vec<_> = stored
        .iter()
        .zip(&seen)
        .map(|(s, (last_id, last_at, next_at))| {
            // The server's own word while it is ahead; else computed from the rule.
            let next = next_at
                .filter(|n| *n > now)
                .or_else(|| s.spec.rule.next_after(now, s.stored_at));
            s.spec.listing(next, (last_id.as_deref(), *last_at))
        })
        .collect();
    serde_json::to_string(&listings)
        .map_err(|e| ClientError::runtime(format!("cannot list the schedules: {e}")).because(e))
}

async fn fire(inner: Arc<Inner>, name: String) -> Result<String, ClientError> {
    checked_name(&name)?;
    let stream = task_stream(&inner).await?;
    let stored = schedules::read(&stream, &name)
        .await
        .map_err(|e| failed(&inner, e))?
        .ok_or_else(|| {
            ClientError::value(format!(
                "no schedule named {name:?}: see dbtask schedule list"
            ))
        })?;
    schedules::fire(&inner.js, &stored.spec, inner.message_key.as_ref())
        .await
        .map_err(|e| failed(&inner, e))
}

#[pymethods]
impl Schedules {
    #[new]
    fn new(client: &Bound<'_, Client>) -> Self {
        Schedules {
            inner: client.get().shared(),
        }
    }

    /// Creates or replaces a schedule from its declaration (JSON made by `dbtask._periodic`).
    fn schedule<'py>(&self, py: Python<'py>, declaration: String) -> PyResult<Bound<'py, PyAny>> {
        bridge::awaitable(py, create(self.inner.clone(), declaration), |py, ()| {
            Ok(py.None())
        })
    }

    fn schedule_sync(&self, py: Python<'_>, declaration: String) -> PyResult<()> {
        runtime::block_on(py, create(self.inner.clone(), declaration))
    }

    /// Removes a schedule; resolves to whether there was one.
    fn unschedule<'py>(&self, py: Python<'py>, name: String) -> PyResult<Bound<'py, PyAny>> {
        bridge::awaitable(py, remove(self.inner.clone(), name), bridge::into_py)
    }

    fn unschedule_sync(&self, py: Python<'_>, name: String) -> PyResult<bool> {
        runtime::block_on(py, remove(self.inner.clone(), name))
    }

    /// Every schedule with its next run and last tick, as a JSON list.
    fn list<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        bridge::awaitable(py, list(self.inner.clone()), bridge::into_py)
    }

    fn list_sync(&self, py: Python<'_>) -> PyResult<String> {
        runtime::block_on(py, list(self.inner.clone()))
    }

    /// Fires one tick of a schedule now; resolves to the tick's task id.
    fn run<'py>(&self, py: Python<'py>, name: String) -> PyResult<Bound<'py, PyAny>> {
        bridge::awaitable(py, fire(self.inner.clone(), name), bridge::into_py)
    }

    fn run_sync(&self, py: Python<'_>, name: String) -> PyResult<String> {
        runtime::block_on(py, fire(self.inner.clone(), name))
    }
}
