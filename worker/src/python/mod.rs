//! The embedded CPython interpreter: start-up, the task registry, and running tasks.
//!
//! INTERFACE CONTRACT (used by `runner`): the signatures below are fixed; bodies are filled in
//! by the python-module work. Sync `def` tasks run on a pool of Python threads, `async def`
//! tasks on one asyncio loop on its own thread. Tokio threads never hold the GIL: `call`
//! sends the job to a Python thread and awaits a oneshot reply.

use std::collections::HashMap;
use std::path::PathBuf;

use dbtask_protocol::TaskError;
use serde_json::value::RawValue;

/// How to start the interpreter.
#[derive(Debug, Clone)]
pub struct PythonConfig {
    /// The interpreter executable whose environment (venv) to use. `None`: `$VIRTUAL_ENV/bin/python`
    /// when set, else the interpreter this binary was built against.
    pub python: Option<PathBuf>,
    /// Modules to import (`-A`); their `@task` decorators fill the registry.
    pub apps: Vec<String>,
    /// Size of the thread pool for sync tasks (the worker passes its concurrency).
    pub threads: usize,
}

/// What the worker knows of a registered task.
#[derive(Debug, Clone)]
pub struct TaskInfo {
    pub name: String,
    pub is_async: bool,
    /// The task's default queue (informational: the worker consumes the queues it is told).
    pub queue: String,
    /// `track_started` from the task's options, if it set one.
    pub track_started: Option<bool>,
}

/// One call of a task.
#[derive(Debug)]
pub struct Job {
    pub task_id: String,
    pub task: String,
    /// JSON array, as it came in the message (decoded once, in Python).
    pub args: Box<RawValue>,
    /// JSON object, as it came in the message.
    pub kwargs: Box<RawValue>,
    /// Delivery count of this message (1 on the first delivery).
    pub attempt: u32,
    /// Retries before this message.
    pub retries: u32,
}

/// How a call ended.
#[derive(Debug)]
pub enum CallOutcome {
    /// The task returned; the JSON of its return value.
    Success(Box<RawValue>),
    /// The task raised, its arguments did not fit its signature, its name is unknown, or its
    /// return value is not JSON-serializable. The error says which.
    Failure(TaskError),
}

#[derive(Debug, thiserror::Error)]
pub enum PythonError {
    #[error("cannot start the embedded Python interpreter: {0}")]
    Init(String),
    #[error("cannot import task module {module:?} (is it on sys.path, or is the venv active?):\n{traceback}")]
    Import { module: String, traceback: String },
    #[error("cannot read the dbtask task registry: {0} (is the dbtask package installed in this interpreter's environment?)")]
    Registry(String),
}

/// Handle to the running interpreter and its threads. Cheap to clone.
#[derive(Clone)]
pub struct PythonRuntime {
    _private: (),
}

impl PythonRuntime {
    /// Initializes CPython (PEP 587 config: the venv's executable, no signal handlers), puts
    /// the current directory on `sys.path`, imports `dbtask` and the apps, reads the registry,
    /// and starts the sync thread pool and the asyncio thread. Call it on the main thread
    /// before the tokio runtime exists. Returns with the GIL released.
    pub fn start(_cfg: &PythonConfig) -> Result<Self, PythonError> {
        todo!()
    }

    /// The registered tasks, by name.
    pub fn tasks(&self) -> &HashMap<String, TaskInfo> {
        todo!()
    }

    /// `sys.version` of the embedded interpreter, for the start-up log.
    pub fn version(&self) -> &str {
        todo!()
    }

    /// Runs one task to its outcome. Never panics on user input: an unknown name gives
    /// `Failure` with type `dbtask.UnknownTask`.
    pub async fn call(&self, _job: Job) -> CallOutcome {
        todo!()
    }

    /// Stops the thread pool and the asyncio loop once the jobs already handed over are done.
    pub fn shutdown(&self) {
        todo!()
    }
}
