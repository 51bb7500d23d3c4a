//! `/metrics`: the Prometheus series of one worker (listed with their meaning in
//! docs/operations.md), in the Prometheus text format (or OpenMetrics when asked for), written
//! by the `prometheus-client` crate.
//!
//! Per task, counting is a [`Hook`]: the series of every registered task and consumed queue
//! are made at start-up, so that an event costs a hash look-up of its task name and atomic
//! adds (a histogram observation takes the crate's uncontended lock), with no allocation.
//! What no event says (running and prefetched tasks, the queues' backlog) is read when a scrape
//! comes; connection trouble and the Python pools' replacements are counters kept where they
//! happen ([`super::counts`], [`PythonRuntime`]) and read at the scrape too.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dbtask_protocol::TaskError;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};
use tracing::debug;

use super::counts;
use crate::config::{Config, PoolKind};
use crate::events::{Hook, TaskRef};
use crate::python::PythonRuntime;
use crate::runner::Status;

/// Bounds of the runtime and queue-wait histograms, in seconds: from a millisecond (most
/// tasks of a busy worker) to an hour.
const BUCKETS: [f64; 20] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0, 600.0, 1800.0, 3600.0,
];

/// Task names not registered here (messages refused as unknown, unreadable ones) that get
/// their own series; past this many, they are counted under `task="_other"`, so that a stream
/// of made-up names cannot grow the scrape without bound.
const MAX_UNREGISTERED: usize = 100;
const OTHER_TASK: &str = "_other";

/// How long a scrape waits for the queues' backlog from NATS.
const PENDING_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TaskState {
    task: String,
    queue: String,
    state: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TaskName {
    task: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueLevel {
    queue: String,
    priority: String,
}

/// The `state` label values of `dbtask_tasks_total`, in [`Outcomes`] order.
const STATES: [&str; 6] = [
    "succeeded",
    "failed",
    "retried",
    "revoked",
    "rejected",
    "dead_lettered",
];

#[derive(Clone, Copy)]
enum Outcome {
    Succeeded,
    Failed,
    Retried,
    Revoked,
    Rejected,
    DeadLettered,
}

/// The counters of one task on one queue, one per state.
struct Outcomes([Counter; 6]);

/// One registered task's series.
struct TaskSeries {
    /// Per consumed queue (a worker consumes a few: a short list beats a second hash).
    queues: Vec<(Box<str>, Outcomes)>,
    runtime: Histogram,
    queue_wait: Histogram,
}

/// The [`Hook`] that counts tasks.
pub(super) struct TaskMetrics {
    tasks: HashMap<Box<str>, TaskSeries>,
    total: Family<TaskState, Counter>,
    runtime: Family<TaskName, Histogram>,
    queue_wait: Family<TaskName, Histogram>,
    /// Unregistered names given their own series so far (see [`MAX_UNREGISTERED`]).
    unregistered: Mutex<HashSet<String>>,
}

fn histogram() -> Histogram {
    Histogram::new(BUCKETS)
}

impl TaskMetrics {
    fn new(tasks: &[&str], queues: &[String]) -> TaskMetrics {
        let total = Family::<TaskState, Counter>::default();
        let runtime = Family::<TaskName, Histogram>::new_with_constructor(histogram as fn() -> _);
        let queue_wait =
            Family::<TaskName, Histogram>::new_with_constructor(histogram as fn() -> _);
        let mut series = HashMap::with_capacity(tasks.len());
        for &task in tasks {
            let outcomes = |queue: &str| {
                Outcomes(STATES.map(|state| {
                    total.get_or_create_owned(&TaskState {
                        task: task.to_owned(),
                        queue: queue.to_owned(),
                        state: state.to_owned(),
                    })
                }))
            };
            let name = TaskName {
                task: task.to_owned(),
            };
            series.insert(
                task.into(),
                TaskSeries {
                    queues: queues
                        .iter()
                        .map(|q| (q.as_str().into(), outcomes(q)))
                        .collect(),
                    runtime: runtime.get_or_create_owned(&name),
                    queue_wait: queue_wait.get_or_create_owned(&name),
                },
            );
        }
        TaskMetrics {
            tasks: series,
            total,
            runtime,
            queue_wait,
            unregistered: Mutex::default(),
        }
    }

    fn count(&self, task: TaskRef<'_>, outcome: Outcome) {
        let known = self.tasks.get(task.task).and_then(|series| {
            series
                .queues
                .iter()
                .find(|(queue, _)| **queue == *task.queue)
        });
        match known {
            Some((_, outcomes)) => {
                outcomes.0[outcome as usize].inc();
            }
            None => self.count_unregistered(task, outcome),
        }
    }

    /// A task or queue without series made at start-up: rare (an unknown task, an unreadable
    /// message), so its labels are built here.
    fn count_unregistered(&self, task: TaskRef<'_>, outcome: Outcome) {
        let name = if self.tasks.contains_key(task.task) {
            task.task
        } else {
            let mut seen = self.unregistered.lock().unwrap_or_else(|e| e.into_inner());
            if seen.contains(task.task) {
                task.task
            } else if seen.len() < MAX_UNREGISTERED {
                seen.insert(task.task.to_owned());
                task.task
            } else {
                OTHER_TASK
            }
        };
        self.total
            .get_or_create(&TaskState {
                task: name.to_owned(),
                queue: task.queue.to_owned(),
                state: STATES[outcome as usize].to_owned(),
            })
            .inc();
    }
}

impl Hook for TaskMetrics {
    fn ran(&self, task: TaskRef<'_>, queued_secs: f64, runtime_secs: f64) {
        match self.tasks.get(task.task) {
            Some(series) => {
                series.runtime.observe(runtime_secs);
                series.queue_wait.observe(queued_secs);
            }
            // Only registered tasks run.
            None => debug!(
                task = task.task,
                "no runtime series for an unregistered task"
            ),
        }
    }
    fn succeeded(&self, task: TaskRef<'_>, _runtime_secs: f64) {
        self.count(task, Outcome::Succeeded);
    }
    fn failed(&self, task: TaskRef<'_>, _error: &TaskError) {
        self.count(task, Outcome::Failed);
    }
    fn retried(&self, task: TaskRef<'_>, _error: &TaskError, _delay_secs: f64) {
        self.count(task, Outcome::Retried);
    }
    fn revoked(&self, task: TaskRef<'_>, _error: &TaskError) {
        self.count(task, Outcome::Revoked);
    }
    fn rejected(&self, task: TaskRef<'_>, _error: &TaskError) {
        self.count(task, Outcome::Rejected);
    }
    fn dead_lettered(&self, task: TaskRef<'_>, _reason: &str) {
        self.count(task, Outcome::DeadLettered);
    }
}

/// Every series of the worker.
pub(super) struct Metrics {
    registry: Registry,
    tasks: Arc<TaskMetrics>,
    running: Gauge,
    prefetched: Gauge,
    pending: Family<QueueLevel, Gauge>,
    /// The consumed queues, and their priority levels.
    queues: Vec<String>,
    levels: Vec<u8>,
}

/// The text formats `/metrics` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Format {
    /// Prometheus text format 0.0.4: what Prometheus and most tools read.
    Prometheus,
    /// OpenMetrics 1.0 text, for a scraper that asks for it (`Accept`).
    OpenMetrics,
}

impl Format {
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Prometheus => prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

impl Metrics {
    pub fn new(config: &Config, python: &PythonRuntime) -> Metrics {
        let mut names: Vec<&str> = python.tasks().keys().map(String::as_str).collect();
        names.sort_unstable();
        let tasks = Arc::new(TaskMetrics::new(&names, &config.queues));
        let mut registry = Registry::with_prefix("dbtask");
        registry.register(
            "tasks",
            "Tasks settled by this worker, by task name, queue and how they ended (succeeded, failed, retried, revoked, rejected, dead_lettered)",
            tasks.total.clone(),
        );
        registry.register_with_unit(
            "task_runtime",
            "How long task functions ran (to their return, exception or interruption), by task name",
            Unit::Seconds,
            tasks.runtime.clone(),
        );
        registry.register_with_unit(
            "task_queue_wait",
            "How long tasks waited from being due (stored in their queue, or their eta) to starting, by task name",
            Unit::Seconds,
            tasks.queue_wait.clone(),
        );
        let running = Gauge::default();
        registry.register(
            "tasks_running",
            "Tasks running now (holding a concurrency slot)",
            running.clone(),
        );
        let prefetched = Gauge::default();
        registry.register(
            "tasks_prefetched",
            "Messages received and waiting for a concurrency slot",
            prefetched.clone(),
        );
        let pending = Family::<QueueLevel, Gauge>::default();
        registry.register(
            "queue_pending",
            "Messages waiting in JetStream to be delivered, by queue and priority level (the consumer's num_pending, shared by every worker of the queue)",
            pending.clone(),
        );
        let pool = match config.pool {
            PoolKind::Threads => "threads",
            PoolKind::Processes => "processes",
        };
        registry.register(
            "worker",
            "This worker: its dbtask version and pool (always 1)",
            Info::new(vec![
                ("version".to_owned(), env!("CARGO_PKG_VERSION").to_owned()),
                ("pool".to_owned(), pool.to_owned()),
            ]),
        );
        registry.register_collector(Box::new(Counts {
            python: python.clone(),
            concurrency: config.concurrency as i64,
        }));
        let levels = if config.priorities {
            (0..=dbtask_protocol::MAX_PRIORITY).rev().collect()
        } else {
            vec![dbtask_protocol::DEFAULT_PRIORITY]
        };
        Metrics {
            registry,
            tasks,
            running,
            prefetched,
            pending,
            queues: config.queues.clone(),
            levels,
        }
    }

    /// The hook that counts tasks.
    pub fn hook(&self) -> Arc<dyn Hook> {
        self.tasks.clone()
    }

    /// Reads what is read at a scrape, then writes every series.
    pub async fn scrape(&self, status: &Status, format: Format) -> String {
        let load = status.load().await.unwrap_or_default();
        self.running.set(load.running as i64);
        self.prefetched.set(load.prefetched as i64);
        self.read_pending(status).await;
        let mut text = String::with_capacity(16 << 10);
        let written = match format {
            Format::Prometheus => {
                prometheus_client::encoding::prometheus_text::encode(&mut text, &self.registry)
            }
            Format::OpenMetrics => {
                prometheus_client::encoding::text::encode(&mut text, &self.registry)
            }
        };
        if let Err(e) = written {
            // Writing into a String cannot fail; say so if it ever does.
            let _ = writeln!(text, "# dbtask: cannot write the metrics: {e}");
        }
        text
    }

    /// Sets `dbtask_queue_pending` from the consumers' `num_pending`, asked of NATS now. A
    /// queue whose figures cannot be had has no series in this scrape (rather than stale
    /// figures).
    async fn read_pending(&self, status: &Status) {
        let Some(broker) = status.broker() else {
            return;
        };
        let asks = self.queues.iter().map(|queue| async move {
            let read = tokio::time::timeout(PENDING_TIMEOUT, broker.pending(queue, &self.levels));
            (queue, read.await)
        });
        for (queue, read) in futures::future::join_all(asks).await {
            match read {
                Ok(Ok(levels)) => {
                    for (priority, pending) in levels {
                        self.pending
                            .get_or_create(&self.level(queue, priority))
                            .set(i64::try_from(pending).unwrap_or(i64::MAX));
                    }
                }
                failed => {
                    let error = match failed {
                        Ok(Err(e)) => e.to_string(),
                        _ => format!("no answer within {} s", PENDING_TIMEOUT.as_secs()),
                    };
                    debug!(queue, error, "cannot read the queue's backlog for /metrics");
                    for &priority in &self.levels {
                        self.pending.remove(&self.level(queue, priority));
                    }
                }
            }
        }
    }

    fn level(&self, queue: &str, priority: u8) -> QueueLevel {
        QueueLevel {
            queue: queue.to_owned(),
            priority: priority.to_string(),
        }
    }
}

/// Counters kept elsewhere, read at each scrape.
struct Counts {
    python: PythonRuntime,
    concurrency: i64,
}

impl std::fmt::Debug for Counts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Counts").finish_non_exhaustive()
    }
}

impl Collector for Counts {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let counters = [
            (
                "nats_connection_errors",
                "NATS connection losses and failed (re)connection attempts.",
                counts::NATS.errors(),
            ),
            (
                "nats_reconnects",
                "Times the NATS connection came back after a loss.",
                counts::NATS.reconnects(),
            ),
            (
                "redis_connection_errors",
                "Redis connection losses, failed connection attempts and commands failed on the connection.",
                counts::REDIS.errors(),
            ),
            (
                "redis_reconnects",
                "Times a Redis connection was made anew after a loss.",
                counts::REDIS.reconnects(),
            ),
            (
                "python_threads_abandoned",
                "Python threads abandoned to a sync task past its hard time limit or terminated (each replaced by a new thread).",
                self.python.threads_abandoned(),
            ),
            (
                "pool_processes_replaced",
                "Pool processes (--pool processes) started in place of others: recycled, killed or dead.",
                self.python.processes_replaced(),
            ),
        ];
        for (name, help, value) in counters {
            let counter = ConstCounter::new(value);
            let metric = encoder.encode_descriptor(name, help, None, counter.metric_type())?;
            counter.encode(metric)?;
        }
        let gauges = [
            (
                "python_threads_stuck",
                "Abandoned Python threads still alive, stuck in their task.",
                self.python.threads_stuck() as i64,
            ),
            (
                "worker_concurrency",
                "Tasks this worker runs at once at most (--concurrency).",
                self.concurrency,
            ),
        ];
        for (name, help, value) in gauges {
            let gauge = ConstGauge::new(value);
            let metric = encoder.encode_descriptor(name, help, None, gauge.metric_type())?;
            gauge.encode(metric)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task<'a>(name: &'a str, queue: &'a str) -> TaskRef<'a> {
        TaskRef {
            id: "id",
            task: name,
            queue,
            attempt: 1,
            parent_id: None,
            root_id: None,
        }
    }

    fn text(metrics: &TaskMetrics) -> String {
        let mut registry = Registry::with_prefix("dbtask");
        registry.register("tasks", "t", metrics.total.clone());
        registry.register_with_unit("task_runtime", "r", Unit::Seconds, metrics.runtime.clone());
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &registry).unwrap();
        out
    }

    #[test]
    fn counts_per_task_queue_and_state_with_series_made_up_front() {
        let metrics = TaskMetrics::new(&["add", "slow"], &["default".into(), "io".into()]);
        let error = TaskError::new("ValueError", "bad");
        metrics.succeeded(task("add", "default"), 0.1);
        metrics.succeeded(task("add", "default"), 0.1);
        metrics.failed(task("add", "io"), &error);
        metrics.rejected(task("nope", "default"), &error);
        metrics.ran(task("add", "default"), 0.5, 0.002);
        let out = text(&metrics);
        assert!(
            out.contains(r#"dbtask_tasks_total{task="add",queue="default",state="succeeded"} 2"#),
            "{out}"
        );
        assert!(
            out.contains(r#"dbtask_tasks_total{task="add",queue="io",state="failed"} 1"#),
            "{out}"
        );
        assert!(
            out.contains(r#"dbtask_tasks_total{task="nope",queue="default",state="rejected"} 1"#),
            "{out}"
        );
        // Every registered task has its series from the start, at 0.
        assert!(
            out.contains(r#"dbtask_tasks_total{task="slow",queue="io",state="dead_lettered"} 0"#),
            "{out}"
        );
        assert!(
            out.contains(r#"dbtask_task_runtime_seconds_count{task="add"} 1"#),
            "{out}"
        );
    }

    #[test]
    fn made_up_task_names_cannot_grow_the_scrape_without_bound() {
        let metrics = TaskMetrics::new(&["add"], &["default".into()]);
        let error = TaskError::new("dbtask.UnknownTask", "no");
        let names: Vec<String> = (0..MAX_UNREGISTERED + 50)
            .map(|i| format!("x{i}"))
            .collect();
        for name in &names {
            metrics.rejected(task(name, "default"), &error);
        }
        let out = text(&metrics);
        let series = out
            .lines()
            .filter(|l| l.contains("state=\"rejected\""))
            .count();
        // add's own series, one per admitted unknown name, and `_other`.
        assert_eq!(series, 1 + MAX_UNREGISTERED + 1, "{out}");
        assert!(
            out.contains(
                r#"dbtask_tasks_total{task="_other",queue="default",state="rejected"} 50"#
            ),
            "{out}"
        );
    }
}
