//! The embedded interpreter against a real task module using `from dbtask import task`.
//!
//! CPython starts once per process: every test here shares one runtime (`runtime()`); the
//! tests that need another (`start` again reuses the interpreter) say so.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use dbtask_protocol::TaskError;
use dbtask_worker::python::{
    CallOutcome, Executor, Job, PythonConfig, PythonError, PythonRuntime, INTERNAL_ERROR,
};
use serde_json::value::RawValue;
use serde_json::{json, Value};

const TASKS: &str = r#"
import asyncio
import enum
import functools
import sys
import time

from dbtask import task


class Declined(Exception):
    pass


@task(name="add", queue="math", track_started=True)
def add(x, y):
    return x + y


@task(name="aadd")
async def aadd(x, y):
    await asyncio.sleep(0.01)
    return x + y


@task(name="anow")
async def anow(x, y):
    return x + y


@task(name="kw")
def kw(a, b=2, *, c):
    return {"a": a, "b": b, "c": c}


@task(name="boom")
def boom(msg):
    raise ValueError(msg)  # the raising line


@task(name="aboom")
async def aboom(msg):
    await asyncio.sleep(0)
    raise ValueError(msg)  # the async raising line


@task(name="declined")
def declined():
    raise Declined("not today")


@task(name="type_error_inside")
def type_error_inside(x):
    return x + "a"


def logged(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)
    return wrapper


@task(name="wrapped")
@logged
def wrapped(x, y):
    return x * y


@task(name="wrapped_type_error")
@logged
def wrapped_type_error(x):
    return len(x)


@task(name="a_set")
def a_set():
    return {1, 2}


@task(name="a_nan")
def a_nan():
    return float("nan")


@task(name="an_object")
async def an_object():
    return object()


@task(name="nothing")
def nothing():
    print("a task printing to stdout")


@task(name="unicode")
def unicode(s):
    return {"echo": s + " é✓"}


class Color(enum.IntEnum):
    RED = 3


SCALARS = {
    "big": 2**70, "neg": -7, "true": True, "false": False, "float": 0.1, "tiny": 1e-300,
    "text": 'a"b\n\u00e9\u2713\x00', "intenum": Color.RED, "inf": float("-inf"),
}


@task(name="arg_types")
def arg_types(*args):
    return [[type(a).__name__, a] for a in args]


@task(name="scalar")
def scalar(kind):
    return SCALARS[kind]


@task(name="exits")
def exits():
    sys.exit(3)


@task(name="interrupts")
async def interrupts():
    raise KeyboardInterrupt


@task(name="prefix")
def prefix():
    return {"prefix": sys.prefix, "path0": sys.path[0]}


@task(name="sleep")
def sleep(seconds):
    time.sleep(seconds)
    return seconds


@task(name="asleep")
async def asleep(seconds):
    await asyncio.sleep(seconds)
    return seconds
"#;

const BROKEN: &str =
    "import dbtask\n\ndef helper():\n    return 1 / 0\n\nhelper()  # fails at import\n";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// A directory holding the test task modules, and the dbtask source tree. Written once:
/// rewriting a module while a traceback reads its lines would garble the traceback.
fn sys_path() -> &'static [PathBuf] {
    static PATHS: OnceLock<Vec<PathBuf>> = OnceLock::new();
    PATHS.get_or_init(write_modules)
}

fn write_modules() -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("python_runtime");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("dbtask_test_tasks.py"), TASKS).unwrap();
    std::fs::write(dir.join("dbtask_test_broken.py"), BROKEN).unwrap();
    vec![root().join("client-py/python"), dir]
}

fn config(apps: &[&str]) -> PythonConfig {
    PythonConfig {
        python: Some(root().join(".venv/bin/python")),
        apps: apps.iter().map(|s| s.to_string()).collect(),
        threads: 4,
        ..PythonConfig::default()
    }
}

fn runtime() -> &'static PythonRuntime {
    static RUNTIME: OnceLock<PythonRuntime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        PythonRuntime::start_with_sys_path(&config(&["dbtask_test_tasks"]), sys_path())
            .unwrap_or_else(|e| panic!("{e}"))
    })
}

fn job(task: &str, args: Value, kwargs: Value) -> Job {
    Job {
        task_id: uuid::Uuid::new_v4().to_string(),
        task: task.into(),
        args: RawValue::from_string(args.to_string()).unwrap(),
        kwargs: RawValue::from_string(kwargs.to_string()).unwrap(),
        attempt: 1,
        retries: 0,
        request: Default::default(),
    }
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

fn call_on(rt: &PythonRuntime, task: &str, args: Value) -> CallOutcome {
    block_on(rt.call(job(task, args, json!({}))))
}

fn call(task: &str, args: Value) -> CallOutcome {
    call_on(runtime(), task, args)
}

#[track_caller]
fn success(outcome: CallOutcome) -> Value {
    match outcome {
        CallOutcome::Success(raw) => serde_json::from_str(raw.get()).unwrap(),
        other => panic!("expected a success, got {other:?}"),
    }
}

#[track_caller]
fn failure(outcome: CallOutcome) -> TaskError {
    match outcome {
        CallOutcome::Failure(e) => e,
        CallOutcome::Success(raw) => panic!("expected a failure, got {}", raw.get()),
        other => panic!("expected a failure, got {other:?}"),
    }
}

#[test]
fn reads_the_registry() {
    let rt = runtime();
    assert!(rt.version().starts_with("3."), "{}", rt.version());
    let add = &rt.tasks()["add"];
    assert_eq!(add.executor, Executor::Threads);
    assert_eq!(add.queue, "math");
    assert_eq!(add.track_started, Some(true));
    let aadd = &rt.tasks()["aadd"];
    assert_eq!(aadd.executor, Executor::AsyncLoop);
    assert_eq!(aadd.queue, "default");
    assert_eq!(aadd.track_started, None);
}

#[test]
fn uses_the_venv_and_the_working_directory() {
    let got = success(call("prefix", json!([])));
    assert_eq!(got["prefix"], json!(root().join(".venv").to_str().unwrap()));
    assert_eq!(
        got["path0"],
        json!(std::env::current_dir().unwrap().to_str().unwrap())
    );
}

#[test]
fn runs_sync_and_async_tasks() {
    assert_eq!(success(call("add", json!([2, 3]))), json!(5));
    assert_eq!(success(call("aadd", json!([2, 3]))), json!(5));
    assert_eq!(success(call("add", json!(["a", "b"]))), json!("ab"));
    assert_eq!(
        success(call("unicode", json!(["ok"]))),
        json!({"echo": "ok é✓"})
    );
}

#[test]
fn passes_kwargs() {
    let got = success(block_on(runtime().call(job(
        "kw",
        json!([1]),
        json!({"c": 3}),
    ))));
    assert_eq!(got, json!({"a": 1, "b": 2, "c": 3}));
    let got = success(block_on(runtime().call(job(
        "kw",
        json!([]),
        json!({"a": 1, "b": 5, "c": 3}),
    ))));
    assert_eq!(got, json!({"a": 1, "b": 5, "c": 3}));
}

#[test]
fn scalar_results_are_exact_json() {
    // Beyond i64: Python's encoder writes every digit.
    match call("scalar", json!(["big"])) {
        CallOutcome::Success(raw) => assert_eq!(raw.get(), "1180591620717411303424"),
        other => panic!("{other:?}"),
    }
    let cases = [
        ("neg", json!(-7)),
        ("true", json!(true)),
        ("false", json!(false)),
        ("float", json!(0.1)),
        ("tiny", json!(1e-300)),
        ("text", json!("a\"b\n\u{e9}\u{2713}\u{0}")),
        ("intenum", json!(3)),
    ];
    for (kind, want) in cases {
        assert_eq!(success(call("scalar", json!([kind]))), want, "{kind}");
    }
    let e = failure(call("scalar", json!(["inf"])));
    assert_eq!(e.exc_type, "dbtask.UnserializableResult", "{}", e.message);
}

#[test]
fn arguments_keep_their_json_types() {
    let raw_job = |args: &str| Job {
        args: RawValue::from_string(args.to_owned()).unwrap(),
        ..job("arg_types", json!([]), json!({}))
    };
    let flat = r#"[1, -2, 0, 1.5, 1e2, -0.0, "é\"\n\u2713", true, false, null]"#;
    assert_eq!(
        success(block_on(runtime().call(raw_job(flat)))),
        json!([
            ["int", 1],
            ["int", -2],
            ["int", 0],
            ["float", 1.5],
            ["float", 100.0],
            ["float", -0.0],
            ["str", "é\"\n✓"],
            ["bool", true],
            ["bool", false],
            ["NoneType", null]
        ])
    );
    // Big integers and nested values go through json.loads: still exact.
    let mixed = r#"[123456789012345678901234567890, [1, {"a": 2}], "x"]"#;
    match block_on(runtime().call(raw_job(mixed))) {
        CallOutcome::Success(raw) => assert_eq!(
            raw.get(),
            r#"[["int",123456789012345678901234567890],["list",[1,{"a":2}]],["str","x"]]"#
        ),
        other => panic!("{other:?}"),
    }
}

#[test]
fn none_is_json_null() {
    assert_eq!(success(call("nothing", json!([]))), Value::Null);
}

#[test]
fn records_what_a_task_raises() {
    let e = failure(call("boom", json!(["bad input"])));
    assert_eq!(e.exc_type, "ValueError");
    assert_eq!(e.message, "bad input");
    let tb = e.traceback.unwrap();
    assert!(tb.starts_with("Traceback (most recent call last):"), "{tb}");
    assert!(
        tb.contains("raise ValueError(msg)  # the raising line"),
        "{tb}"
    );
    assert!(tb.trim_end().ends_with("ValueError: bad input"), "{tb}");

    let e = failure(call("aboom", json!(["async bad"])));
    assert_eq!(
        (e.exc_type.as_str(), e.message.as_str()),
        ("ValueError", "async bad")
    );
    assert!(e.traceback.unwrap().contains("# the async raising line"));

    let e = failure(call("declined", json!([])));
    assert_eq!(e.exc_type, "dbtask_test_tasks.Declined");
    assert_eq!(e.message, "not today");
}

#[test]
fn system_exit_and_keyboard_interrupt_are_failures() {
    let e = failure(call("exits", json!([])));
    assert_eq!(
        (e.exc_type.as_str(), e.message.as_str()),
        ("SystemExit", "3")
    );
    let e = failure(call("interrupts", json!([])));
    assert_eq!(e.exc_type, "KeyboardInterrupt");
    // Both kinds of threads are still there.
    assert_eq!(success(call("add", json!([1, 1]))), json!(2));
    assert_eq!(success(call("aadd", json!([1, 1]))), json!(2));
}

#[test]
fn unknown_task() {
    let e = failure(call("no.such.task", json!([])));
    assert_eq!(e.exc_type, "dbtask.UnknownTask");
    assert!(e.message.contains("\"no.such.task\""), "{}", e.message);
    assert!(
        e.message
            .contains("22 registered: a_nan, a_set, aadd, aboom, add, an_object,"),
        "{}",
        e.message
    );
}

#[test]
fn arguments_that_do_not_fit() {
    let e = failure(call("add", json!([1])));
    assert_eq!(e.exc_type, "dbtask.InvalidArguments");
    assert_eq!(
        e.message,
        "arguments do not fit add(x, y): missing a required argument: 'y'"
    );
    let e = failure(call("aadd", json!([1, 2, 3])));
    assert_eq!(e.exc_type, "dbtask.InvalidArguments");
    assert_eq!(
        e.message,
        "arguments do not fit aadd(x, y): too many positional arguments"
    );
    let e = failure(block_on(runtime().call(job("kw", json!([1]), json!({})))));
    assert_eq!(
        e.message,
        "arguments do not fit kw(a, b=2, *, c): missing a required argument: 'c'"
    );
    let e = failure(block_on(runtime().call(job(
        "add",
        json!([1, 2]),
        json!({"z": 1}),
    ))));
    assert_eq!(
        e.message,
        "arguments do not fit add(x, y): got an unexpected keyword argument 'z'"
    );
    // Through a functools.wraps wrapper, checked before the call.
    let e = failure(call("wrapped", json!([1])));
    assert_eq!(
        e.message,
        "arguments do not fit wrapped(x, y): missing a required argument: 'y'"
    );
    assert_eq!(success(call("wrapped", json!([3, 4]))), json!(12));
    // Not an array / not an object.
    let e = failure(call("add", json!({"x": 1})));
    assert_eq!(e.exc_type, "dbtask.InvalidArguments");
    assert!(
        e.message.contains("args must be a JSON array"),
        "{}",
        e.message
    );
}

#[test]
fn a_type_error_inside_the_task_is_a_task_failure() {
    let e = failure(call("type_error_inside", json!([1])));
    assert_eq!(e.exc_type, "TypeError");
    assert!(e.message.contains("unsupported operand"), "{}", e.message);
    let tb = e.traceback.unwrap();
    assert!(tb.contains("return x + \"a\""), "{tb}");
    let e = failure(call("wrapped_type_error", json!([1])));
    assert_eq!(e.exc_type, "TypeError");
}

#[test]
fn unserializable_results() {
    let e = failure(call("a_set", json!([])));
    assert_eq!(e.exc_type, "dbtask.UnserializableResult");
    assert!(
        e.message.contains("a_set") && e.message.contains("of type set"),
        "{}",
        e.message
    );
    let e = failure(call("a_nan", json!([])));
    assert_eq!(e.exc_type, "dbtask.UnserializableResult");
    assert!(e.message.contains("of type float"), "{}", e.message);
    let e = failure(call("an_object", json!([])));
    assert_eq!(e.exc_type, "dbtask.UnserializableResult");
    assert!(e.message.contains("of type object"), "{}", e.message);
}

#[test]
fn fifty_concurrent_calls_mixing_sync_and_async() {
    let rt = runtime();
    let outcomes = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let calls = (0..50).map(|i| {
                let rt = rt.clone();
                let task = match i % 3 {
                    0 => "add",
                    1 => "aadd",
                    _ => "sleep",
                };
                let args = if task == "sleep" {
                    json!([0.05])
                } else {
                    json!([i, 1])
                };
                tokio::spawn(async move { (i, task, rt.call(job(task, args, json!({}))).await) })
            });
            futures::future::join_all(calls).await
        });
    assert_eq!(outcomes.len(), 50);
    for outcome in outcomes {
        let (i, task, outcome) = outcome.unwrap();
        let expected = if task == "sleep" {
            json!(0.05)
        } else {
            json!(i + 1)
        };
        assert_eq!(success(outcome), expected, "call {i} of {task}");
    }
}

#[test]
fn an_import_error_gives_the_traceback() {
    runtime();
    let err = PythonRuntime::start_with_sys_path(&config(&["dbtask_test_broken"]), sys_path())
        .err()
        .expect("the broken module must not import");
    match &err {
        PythonError::Import { module, traceback } => {
            assert_eq!(module, "dbtask_test_broken");
            assert!(
                traceback.contains("helper()  # fails at import"),
                "{traceback}"
            );
            assert!(
                traceback.contains("ZeroDivisionError: division by zero"),
                "{traceback}"
            );
        }
        other => panic!("expected an import error, got {other}"),
    }
    let missing =
        PythonRuntime::start_with_sys_path(&config(&["no_such_module_here"]), sys_path()).err();
    assert!(
        matches!(&missing, Some(PythonError::Import { traceback, .. }) if traceback.contains("ModuleNotFoundError")),
        "{missing:?}"
    );
}

#[test]
fn shutdown_lets_handed_over_jobs_finish() {
    runtime();
    // A runtime of its own (same interpreter), to shut down.
    let rt =
        PythonRuntime::start_with_sys_path(&config(&["dbtask_test_tasks"]), sys_path()).unwrap();
    let outcomes = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let slow = [
                ("sleep", 0.3),
                ("asleep", 0.3),
                ("sleep", 0.2),
                ("asleep", 0.2),
            ]
            .map(|(task, s)| {
                let rt = rt.clone();
                tokio::spawn(async move { rt.call(job(task, json!([s]), json!({}))).await })
            });
            tokio::time::sleep(Duration::from_millis(100)).await;
            rt.shutdown();
            let refused = rt.call(job("add", json!([1, 2]), json!({}))).await;
            let mut outcomes = vec![refused];
            for handle in slow {
                outcomes.push(handle.await.unwrap());
            }
            outcomes
        });
    let mut outcomes = outcomes.into_iter();
    assert_eq!(failure(outcomes.next().unwrap()).exc_type, INTERNAL_ERROR);
    let finished: Vec<Value> = outcomes.map(success).collect();
    assert_eq!(finished, [json!(0.3), json!(0.3), json!(0.2), json!(0.2)]);
    assert!(
        rt.wait_stopped(Duration::from_secs(5)),
        "the runtime's threads did not exit"
    );
    // The shared runtime is not affected.
    assert_eq!(success(call("add", json!([1, 1]))), json!(2));
}
