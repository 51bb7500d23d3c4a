//! Python's `logging` and `print()` in the worker's log stream (`dbtask/_logs.py` hands each
//! record over): one event per record or printed line, with `task_id` and `task_name` when a
//! task is running, `logger`, and `stream = "stdout"` for printed lines. The worker's
//! `log_level` applies twice: Python's root logger is set to it, so that records nobody
//! would see are not even formatted, and the logs' own filter decides as for any event.
//! In the text format the message starts with `task_name[task_id]: ` so that a person reading
//! it sees which task spoke; the JSON format has the fields alone.

use pyo3::prelude::*;
use tracing::level_filters::LevelFilter;
use tracing::{debug, error, info, trace, warn};

use crate::telemetry::{self, LogFormat};

/// Python's level for the worker's (`logging.DEBUG`...): the most verbose one its logs show.
pub(crate) fn python_level() -> u32 {
    match LevelFilter::current() {
        LevelFilter::OFF => 60, // above CRITICAL: nothing
        LevelFilter::ERROR => 40,
        LevelFilter::WARN => 30,
        LevelFilter::INFO => 20,
        LevelFilter::DEBUG => 10,
        _ => 1,
    }
}

/// `emit_log(level, logger, message, task_id, task_name, stream)`.
#[pyfunction]
#[pyo3(signature = (level, logger, message, task_id=None, task_name=None, stream=None))]
fn emit_log(
    level: u32,
    logger: &str,
    message: &str,
    task_id: Option<&str>,
    task_name: Option<&str>,
    stream: Option<&str>,
) {
    let text;
    let message = match (telemetry::format(), task_id, task_name) {
        (LogFormat::Text, Some(id), Some(name)) => {
            text = format!("{name}[{id}]: {message}");
            text.as_str()
        }
        _ => message,
    };
    let task_id = task_id.unwrap_or("");
    let task_name = task_name.unwrap_or("");
    let stream = stream.unwrap_or("");
    macro_rules! event {
        ($level:ident) => {
            $level!(task_id, task_name, logger, stream, "{message}")
        };
    }
    match level {
        40.. => event!(error),
        30..=39 => event!(warn),
        20..=29 => event!(info),
        10..=19 => event!(debug),
        _ => event!(trace),
    }
}

pub(crate) fn emitter(py: Python<'_>) -> PyResult<Bound<'_, PyAny>> {
    Ok(wrap_pyfunction!(emit_log, py)?.into_any())
}
