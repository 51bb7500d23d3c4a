//! The worker's settings: defaults, then a TOML file, then `DBTASK_*` env vars and flags.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::broker::NatsSecurity;
use crate::python::{Executor, ProcessOptions, PythonConfig};
pub use crate::telemetry::LogFormat;
use dbtask_protocol::signing::MessageKey;

/// Everything the worker can be told. Field names are the TOML keys and, upper-cased with a
/// `DBTASK_` prefix, the environment variables.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Queues to consume; each is the JetStream subject `dbtask.tasks.<queue>`.
    pub queues: Vec<String>,
    /// Python modules to import; their `@task` functions are the tasks this worker runs.
    pub apps: Vec<String>,
    /// A Django project's settings module (`myproject.settings`): the worker sets
    /// `DJANGO_SETTINGS_MODULE`, calls `django.setup()` and imports the `tasks` module of every
    /// installed app before `apps` (which may then be empty); see docs/django.md.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub django: Option<String>,
    /// Tasks in flight at once.
    pub concurrency: usize,
    /// One NATS server, or several seed servers of a cluster separated by commas (in TOML also
    /// a list of strings): the worker connects to any that answers and moves on when it dies.
    #[serde(deserialize_with = "seed_list")]
    pub nats_url: String,
    pub redis_url: String,
    /// Interpreter of the virtualenv to embed; `None`: `$VIRTUAL_ENV`, else the build's python.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub python: Option<PathBuf>,
    /// A level (`info`) or a tracing filter directive (`info,dbtask_worker=debug`).
    pub log_level: String,
    pub log_format: LogFormat,
    /// Seconds running tasks get to finish after the first SIGTERM/SIGINT.
    pub shutdown_timeout: f64,
    /// Seconds NATS waits for an ack before redelivering; in-progress acks (every third of it)
    /// extend it. Short, so that the tasks of a worker that died run again within seconds.
    pub ack_wait: f64,
    /// Seconds a result record lives in Redis.
    pub result_ttl: u64,
    /// Store STARTED before running each task (a task's own option wins).
    pub track_started: bool,
    /// Charged deliveries of one message; the last one dead-letters it (see `runner/dead.rs`).
    pub max_deliver: i64,
    /// Unacked messages a queue's consumer allows in flight, across all its workers.
    pub max_ack_pending: i64,
    /// Most messages asked for in one pull request (never more than free concurrency slots).
    pub fetch_batch: usize,
    /// Messages held waiting for a slot, on top of the running ones: keeps the pipeline full
    /// for short tasks. 0: fetch only for free slots.
    pub prefetch: usize,
    /// Seconds JetStream remembers task ids to drop duplicate publishes.
    pub duplicate_window: f64,
    /// Largest task message accepted, in bytes (also the stream's max message size).
    pub max_message_bytes: usize,
    /// Largest result stored, in bytes; a bigger one becomes a `dbtask.TooLarge` failure.
    pub max_result_bytes: usize,
    /// Keep each task's args and kwargs in its result record (`info()` shows them).
    pub result_extended: bool,
    /// Default hard time limit of a task, in seconds (0: none); a task's `time_limit` wins.
    pub time_limit: f64,
    /// Default soft time limit of a task, in seconds (0: none); a task's `soft_time_limit` wins.
    pub soft_time_limit: f64,
    /// Consume the priority levels 0-9 of each queue (one consumer per level), highest first.
    pub priorities: bool,
    /// What runs sync tasks: `threads` (one process; a task past its hard limit is abandoned)
    /// or `processes` (`concurrency` child processes; such a task's process is killed).
    pub pool: PoolKind,
    /// With `pool = "processes"`: replace a child process after it ran this many tasks (0: never).
    pub max_tasks_per_child: u64,
    /// With `pool = "processes"`: replace a child process after the task that took its
    /// resident memory past this many MiB (0: never).
    pub max_memory_per_child: u64,
    /// Where the worker keeps its crash journal (which held tasks are running), so that after
    /// a crash only those are charged a delivery. `None`: `$RUNTIME_DIRECTORY` (systemd),
    /// else `$XDG_RUNTIME_DIR/dbtask`, else `dbtask-<uid>` in the temp directory.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_dir: Option<PathBuf>,

    // NATS TLS and credentials (docs/security.md): paths of files, never their contents.
    /// PEM CA certificate(s) that signed the NATS server's certificate; TLS is then required.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nats_tls_ca: Option<PathBuf>,
    /// PEM client certificate for servers that verify clients (mutual TLS); needs `nats_tls_key`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nats_tls_cert: Option<PathBuf>,
    /// PEM private key of `nats_tls_cert`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nats_tls_key: Option<PathBuf>,
    /// NATS credentials file (user JWT and nkey seed), for servers in operator (JWT) mode.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nats_creds: Option<PathBuf>,
    /// File holding an nkey user seed (`SU...`), for servers with nkey users.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nats_nkey: Option<PathBuf>,
    /// File holding the key task messages are signed with (HMAC-SHA256): messages without a
    /// valid signature are dead-lettered unrun, and what the worker publishes is signed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message_key: Option<PathBuf>,

    // Monitoring (docs/operations.md).
    /// `HOST:PORT` to serve `/metrics`, `/livez` and `/readyz` on (unauthenticated); `None`:
    /// no endpoint, and nothing is counted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_addr: Option<String>,
    /// Seconds the asyncio loop or the tokio runtime may go without progress before `/livez`
    /// fails and the systemd watchdog is no longer fed.
    pub liveness_timeout: f64,
    // Events, inspect and control (docs/operations.md).
    /// Publish lifecycle events on core NATS (`dbtask.events.>`), as Celery's `-E`.
    pub events: bool,
    /// Seconds between two `worker.heartbeat` events (with `events`).
    pub heartbeat_interval: f64,
    /// Answer `dbtask inspect` and `dbtask control` requests (the NATS service `dbtask-worker`).
    pub control: bool,
    /// Copies of each message the task and dead-letter streams keep on a NATS cluster (1 to
    /// 5): 3 survives the loss of one server. Written to the streams at start.
    pub stream_replicas: usize,
    // Redis TLS (`rediss://`, docs/deployment.md "Redis"): paths of files, never contents.
    /// PEM CA certificate(s) to trust for `rediss://` instead of the system CA store.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_ca: Option<PathBuf>,
    /// PEM client certificate for a Redis that verifies clients; needs `redis_key`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_cert: Option<PathBuf>,
    /// PEM private key of `redis_cert`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_key: Option<PathBuf>,
}

/// `nats_url` in TOML: a string (one URL, or seeds separated by commas) or a list of URLs,
/// kept as one comma-separated string.
fn seed_list<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Seeds {
        One(String),
        List(Vec<String>),
    }
    match Seeds::deserialize(deserializer)? {
        Seeds::One(url) => Ok(url),
        Seeds::List(urls) if urls.is_empty() => Err(serde::de::Error::custom(
            "nats_url is an empty list: give at least one NATS server URL",
        )),
        Seeds::List(urls) => Ok(urls.join(",")),
    }
}

/// What runs sync (`def`) tasks; `async def` tasks always run on the worker's asyncio loop.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum PoolKind {
    /// Python threads in the worker process.
    #[default]
    Threads,
    /// Child processes, one task at a time each.
    Processes,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            queues: vec!["default".to_owned()],
            apps: Vec::new(),
            django: None,
            concurrency: 16,
            nats_url: "nats://127.0.0.1:4222".to_owned(),
            redis_url: "redis://127.0.0.1:6379".to_owned(),
            python: None,
            log_level: "info".to_owned(),
            log_format: LogFormat::Text,
            shutdown_timeout: 30.0,
            ack_wait: 3.0,
            result_ttl: 86_400,
            track_started: false,
            max_deliver: 10,
            max_ack_pending: 10_000,
            fetch_batch: 256,
            prefetch: 128,
            duplicate_window: dbtask_protocol::DEFAULT_DUPLICATE_WINDOW.as_secs_f64(),
            max_message_bytes: dbtask_protocol::DEFAULT_MAX_MESSAGE_BYTES,
            max_result_bytes: 8 * 1024 * 1024,
            result_extended: false,
            time_limit: 0.0,
            soft_time_limit: 0.0,
            priorities: true,
            pool: PoolKind::Threads,
            max_tasks_per_child: 0,
            max_memory_per_child: 0,
            state_dir: None,
            nats_tls_ca: None,
            nats_tls_cert: None,
            nats_tls_key: None,
            nats_creds: None,
            nats_nkey: None,
            message_key: None,
            http_addr: None,
            liveness_timeout: 30.0,
            events: false,
            heartbeat_interval: 5.0,
            control: true,
            stream_replicas: 1,
            redis_ca: None,
            redis_cert: None,
            redis_key: None,
        }
    }
}

/// Why the settings cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid setting `{field}`: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
}

fn invalid(field: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        message: message.into(),
    }
}

impl Config {
    /// Defaults overridden by the keys present in a TOML file.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::from_toml(&text).map_err(|message| ConfigError::Parse {
            path: path.to_owned(),
            message,
        })
    }

    /// Defaults overridden by the keys present in TOML text.
    pub fn from_toml(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e| e.to_string().trim_end().to_owned())
    }

    /// Checks every value, naming the setting and what would be accepted.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.queues.is_empty() {
            return Err(invalid(
                "queues",
                "give at least one queue, e.g. --queues default",
            ));
        }
        for (i, q) in self.queues.iter().enumerate() {
            dbtask_protocol::validate_queue(q).map_err(|e| invalid("queues", e.to_string()))?;
            if self.queues[..i].contains(q) {
                return Err(invalid("queues", format!("queue {q:?} is listed twice")));
            }
        }
        if self.apps.is_empty() && self.django.is_none() {
            return Err(invalid(
                "apps",
                "no task module to import: pass -A MODULE (or `apps = [\"myapp.tasks\"]` in the config file), or --django SETTINGS for a Django project",
            ));
        }
        if let Some(settings) = self.django.as_ref().filter(|s| !is_module_name(s)) {
            return Err(invalid(
                "django",
                format!("{settings:?} is not a Python module name like myproject.settings"),
            ));
        }
        if let Some(app) = self.apps.iter().find(|a| !is_module_name(a)) {
            return Err(invalid(
                "apps",
                format!("{app:?} is not a Python module name like myapp.tasks"),
            ));
        }
        if self.concurrency == 0 {
            return Err(invalid("concurrency", "must be at least 1"));
        }
        dbtask_protocol::seeds::seeds(&self.nats_url)
            .map_err(|e| invalid("nats_url", e.to_string()))?;
        let redis = dbtask_protocol::redis_conn::Target::parse(&self.redis_url).map_err(|why| {
            invalid(
                "redis_url",
                format!("{}: {why}", redact_url(&self.redis_url)),
            )
        })?;
        if let dbtask_protocol::redis_conn::Target::Single(single) = &redis {
            check_url(
                single,
                "redis_url",
                &["redis", "rediss", "redis+unix", "unix"],
            )?;
        }
        self.check_redis_tls(redis.tls())?;
        crate::telemetry::filter_for(&self.log_level).map_err(|e| invalid("log_level", e))?;
        positive_secs(self.shutdown_timeout, "shutdown_timeout", 0.0)?;
        // JetStream counts ack_wait in whole nanoseconds; in-progress acks need some room.
        positive_secs(self.ack_wait, "ack_wait", 1.0)?;
        positive_secs(self.duplicate_window, "duplicate_window", 0.0)?;
        positive_secs(self.heartbeat_interval, "heartbeat_interval", 0.0)?;
        if self.result_ttl == 0 {
            return Err(invalid("result_ttl", "must be at least 1 second"));
        }
        if self.max_deliver == 0 || self.max_deliver < -1 {
            return Err(invalid(
                "max_deliver",
                "must be at least 1 (or -1 for no limit)",
            ));
        }
        if self.max_ack_pending == 0 || self.max_ack_pending < -1 {
            return Err(invalid(
                "max_ack_pending",
                "must be at least 1 (or -1 for no limit)",
            ));
        }
        if !(1..=MAX_STREAM_REPLICAS).contains(&self.stream_replicas) {
            return Err(invalid(
                "stream_replicas",
                format!("must be between 1 and {MAX_STREAM_REPLICAS} (the most JetStream keeps); 3 on a cluster of 3 servers or more"),
            ));
        }
        if self.fetch_batch == 0 {
            return Err(invalid("fetch_batch", "must be at least 1"));
        }
        if self.max_message_bytes < 1024 || self.max_message_bytes > i32::MAX as usize {
            return Err(invalid(
                "max_message_bytes",
                "must be between 1024 and 2147483647",
            ));
        }
        if self.max_result_bytes < 16 {
            return Err(invalid("max_result_bytes", "must be at least 16"));
        }
        for (field, secs) in [
            ("time_limit", self.time_limit),
            ("soft_time_limit", self.soft_time_limit),
        ] {
            if !(secs.is_finite() && secs >= 0.0) {
                return Err(invalid(
                    field,
                    "must be a number of seconds, 0 for no limit",
                ));
            }
        }
        if self.pool == PoolKind::Threads {
            for (field, value) in [
                ("max_tasks_per_child", self.max_tasks_per_child),
                ("max_memory_per_child", self.max_memory_per_child),
            ] {
                if value > 0 {
                    return Err(invalid(
                        field,
                        "replaces child processes: it needs --pool processes (threads are never recycled)",
                    ));
                }
            }
        }
        if self.max_memory_per_child > u64::MAX >> 20 {
            return Err(invalid("max_memory_per_child", "is in MiB: too large"));
        }
        if let Some(addr) = &self.http_addr {
            check_http_addr(addr).map_err(|message| invalid("http_addr", message))?;
        }
        positive_secs(self.liveness_timeout, "liveness_timeout", 1.0)?;
        self.nats_security()
            .check()
            .map_err(|e| invalid(e.setting.setting(), e.to_string()))?;
        self.message_key()?;
        Ok(())
    }

    /// The key of `message_key`, read from its file.
    pub fn message_key(&self) -> Result<Option<MessageKey>, ConfigError> {
        let Some(path) = &self.message_key else {
            return Ok(None);
        };
        MessageKey::from_file(path).map(Some).map_err(|e| {
            invalid(
                "message_key",
                format!("--message-key {}: {e}", path.display()),
            )
        })
    }

    /// The TLS files of the Redis connection.
    pub fn redis_tls(&self) -> dbtask_protocol::redis_conn::RedisTls {
        dbtask_protocol::redis_conn::RedisTls {
            ca: self.redis_ca.clone(),
            cert: self.redis_cert.clone(),
            key: self.redis_key.clone(),
        }
    }

    /// The Redis TLS files exist, come as a pair where they must, and go with `rediss://`.
    fn check_redis_tls(&self, tls_url: bool) -> Result<(), ConfigError> {
        for (field, flag, path) in [
            ("redis_ca", "--redis-ca", &self.redis_ca),
            ("redis_cert", "--redis-cert", &self.redis_cert),
            ("redis_key", "--redis-key", &self.redis_key),
        ] {
            if let Some(path) = path {
                if !tls_url {
                    return Err(invalid(
                        field,
                        format!(
                            "{flag} is for TLS: the Redis URL must start with rediss:// (or rediss+cluster://, rediss+sentinel://)"
                        ),
                    ));
                }
                if !path.is_file() {
                    return Err(invalid(
                        field,
                        format!("{flag} {}: file not found", path.display()),
                    ));
                }
            }
        }
        if self.redis_cert.is_some() != self.redis_key.is_some() {
            let field = if self.redis_cert.is_some() {
                "redis_key"
            } else {
                "redis_cert"
            };
            return Err(invalid(
                field,
                "a Redis client certificate needs both --redis-cert and --redis-key",
            ));
        }
        Ok(())
    }

    /// The TLS and credential files of the NATS connection.
    pub fn nats_security(&self) -> NatsSecurity {
        NatsSecurity {
            tls_ca: self.nats_tls_ca.clone(),
            tls_cert: self.nats_tls_cert.clone(),
            tls_key: self.nats_tls_key.clone(),
            creds: self.nats_creds.clone(),
            nkey: self.nats_nkey.clone(),
        }
    }

    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.shutdown_timeout)
    }

    pub fn ack_wait(&self) -> Duration {
        Duration::from_secs_f64(self.ack_wait)
    }

    pub fn duplicate_window(&self) -> Duration {
        Duration::from_secs_f64(self.duplicate_window)
    }

    /// How to start the embedded interpreter.
    pub fn python_config(&self) -> PythonConfig {
        let (threads, sync_executor) = match self.pool {
            PoolKind::Threads => (self.concurrency, Executor::Threads),
            // One thread, never used: sync tasks go to the children.
            PoolKind::Processes => (1, Executor::Processes),
        };
        PythonConfig {
            python: self.python.clone(),
            apps: self.apps.clone(),
            django: self.django.clone(),
            threads,
            sync_executor,
        }
    }

    /// The crash journal's directory: `state_dir`, else the service manager's runtime
    /// directory, else the user's, else one in the temp directory.
    pub fn state_dir(&self) -> PathBuf {
        if let Some(dir) = &self.state_dir {
            return dir.clone();
        }
        let from_env = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
        if let Some(dir) = from_env("RUNTIME_DIRECTORY") {
            // systemd may list several, separated by colons: the first is ours.
            let first = dir
                .to_string_lossy()
                .split(':')
                .next()
                .unwrap_or("")
                .to_owned();
            return PathBuf::from(first);
        }
        if let Some(dir) = from_env("XDG_RUNTIME_DIR") {
            return PathBuf::from(dir).join("dbtask");
        }
        // SAFETY: getuid cannot fail.
        let uid = unsafe { libc::getuid() };
        std::env::temp_dir().join(format!("dbtask-{uid}"))
    }

    /// The pool of processes, with `pool = "processes"`.
    pub fn process_options(&self) -> Option<ProcessOptions> {
        (self.pool == PoolKind::Processes).then(|| ProcessOptions {
            size: self.concurrency,
            max_tasks: self.max_tasks_per_child,
            max_memory: self.max_memory_per_child << 20,
            log_level: self.log_level.clone(),
            log_format: self.log_format,
        })
    }

    /// The configuration as TOML, with URL passwords replaced by `***`.
    pub fn to_redacted_toml(&self) -> String {
        let mut shown = self.clone();
        shown.nats_url = redact_url(&self.nats_url);
        shown.redis_url = redact_url(&self.redis_url);
        toml::to_string(&shown).expect("a Config always serializes")
    }
}

/// The most replicas JetStream keeps of a stream.
pub const MAX_STREAM_REPLICAS: usize = 5;

fn is_module_name(name: &str) -> bool {
    !name.is_empty()
        && name.split('.').all(|part| {
            let mut chars = part.chars();
            matches!(chars.next(), Some(c) if c == '_' || c.is_alphabetic())
                && chars.all(|c| c == '_' || c.is_alphanumeric())
        })
}

fn positive_secs(value: f64, field: &'static str, min: f64) -> Result<(), ConfigError> {
    // Durations past a century are a typo, and would overflow a Duration in nanoseconds.
    if !value.is_finite() || value <= 0.0 || value < min || value > 3.2e9 {
        let floor = if min > 0.0 {
            format!("at least {min}")
        } else {
            "more than 0".to_owned()
        };
        return Err(invalid(field, format!("{value} seconds: must be {floor}")));
    }
    Ok(())
}

/// `HOST:PORT`: an IP address (IPv6 in brackets) or a host name, and a port (0: any free one).
pub fn check_http_addr(addr: &str) -> Result<(), String> {
    let example = "give HOST:PORT, e.g. 127.0.0.1:9808 (0.0.0.0:9808 in a container)";
    if addr.parse::<std::net::SocketAddr>().is_ok() {
        return Ok(());
    }
    let Some((host, port)) = addr.rsplit_once(':') else {
        return Err(format!("{addr:?} has no port: {example}"));
    };
    if port.parse::<u16>().is_err() {
        return Err(format!(
            "{addr:?}: {port:?} is not a port number: {example}"
        ));
    }
    let name_ok = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && !label.starts_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        });
    if !name_ok {
        return Err(format!(
            "{addr:?}: {host:?} is neither an IP address nor a host name (an IPv6 address goes in brackets: [::1]:9808)"
        ));
    }
    Ok(())
}

fn check_url(value: &str, field: &'static str, schemes: &[&str]) -> Result<(), ConfigError> {
    let url = url::Url::parse(value)
        .map_err(|e| invalid(field, format!("{} is not a URL ({e})", redact_url(value))))?;
    if !schemes.contains(&url.scheme()) {
        return Err(invalid(
            field,
            format!(
                "{}: the scheme must be one of {}",
                redact_url(value),
                schemes.join(", ")
            ),
        ));
    }
    Ok(())
}

/// A URL fit for logs and error messages: every log line and error that names a server goes
/// through this one function, shared with the client.
pub use dbtask_protocol::redact_url;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_documented_ones() {
        let c = Config::default();
        assert_eq!(c.queues, ["default"]);
        assert_eq!(c.concurrency, 16);
        assert_eq!(c.nats_url, "nats://127.0.0.1:4222");
        assert_eq!(c.redis_url, "redis://127.0.0.1:6379");
        assert_eq!(c.shutdown_timeout(), Duration::from_secs(30));
        assert_eq!(c.ack_wait(), Duration::from_secs(3));
        assert_eq!(c.result_ttl, 86_400);
        assert!(!c.track_started);
        assert_eq!(c.max_deliver, 10);
        assert_eq!(c.max_ack_pending, 10_000);
        assert_eq!(c.fetch_batch, 256);
        assert_eq!(c.prefetch, 128);
        assert_eq!(c.duplicate_window(), Duration::from_secs(120));
        assert_eq!(c.max_result_bytes, 8 * 1024 * 1024);
        assert_eq!(c.log_format, LogFormat::Text);
    }

    #[test]
    fn bad_values_are_refused_with_the_setting_named() {
        let ok = || Config {
            apps: vec!["tasks".into()],
            ..Config::default()
        };
        ok().validate().unwrap();
        // --django imports the installed apps' tasks modules: -A is then optional.
        Config {
            apps: vec![],
            django: Some("myproject.settings".into()),
            ..Config::default()
        }
        .validate()
        .unwrap();
        let cases: Vec<(Config, &str)> = vec![
            (
                Config {
                    queues: vec!["a.b".into()],
                    ..ok()
                },
                "queues",
            ),
            (
                Config {
                    queues: vec![],
                    ..ok()
                },
                "queues",
            ),
            (
                Config {
                    queues: vec!["a".into(), "a".into()],
                    ..ok()
                },
                "listed twice",
            ),
            (
                Config {
                    apps: vec![],
                    ..ok()
                },
                "-A MODULE",
            ),
            (
                Config {
                    apps: vec!["my-app".into()],
                    ..ok()
                },
                "apps",
            ),
            (
                Config {
                    apps: vec![],
                    django: Some("my-project.settings".into()),
                    ..ok()
                },
                "myproject.settings",
            ),
            (
                Config {
                    concurrency: 0,
                    ..ok()
                },
                "concurrency",
            ),
            (
                Config {
                    nats_url: "http://x".into(),
                    ..ok()
                },
                "nats_url",
            ),
            (
                Config {
                    redis_url: "nope".into(),
                    ..ok()
                },
                "redis_url",
            ),
            (
                Config {
                    log_level: "loud".into(),
                    ..ok()
                },
                "log_level",
            ),
            (
                Config {
                    ack_wait: 0.5,
                    ..ok()
                },
                "ack_wait",
            ),
            (
                Config {
                    shutdown_timeout: f64::NAN,
                    ..ok()
                },
                "shutdown_timeout",
            ),
            (
                Config {
                    result_ttl: 0,
                    ..ok()
                },
                "result_ttl",
            ),
            (
                Config {
                    max_deliver: 0,
                    ..ok()
                },
                "max_deliver",
            ),
            (
                Config {
                    fetch_batch: 0,
                    ..ok()
                },
                "fetch_batch",
            ),
        ];
        for (config, expected) in cases {
            let err = config.validate().unwrap_err().to_string();
            assert!(err.contains(expected), "{expected}: {err}");
        }
    }

    #[test]
    fn redis_urls_name_a_server_a_cluster_or_sentinels_and_tls_files_need_rediss() {
        let with = |url: &str| Config {
            apps: vec!["tasks".into()],
            redis_url: url.into(),
            ..Config::default()
        };
        for good in [
            "redis+cluster://:pw@h1:7000,h2:7001",
            "rediss+cluster://h1:7000",
            "redis+sentinel://s1:26379,s2:26379/mymaster/2",
        ] {
            with(good).validate().unwrap();
        }
        for (bad, expected) in [
            ("redis+sentinel://s1:26379", "master"),
            ("redis+cluster://", "seed nodes"),
            ("redis+cluster://:pw@h1/3", "database 0"),
            ("memcached://h", "scheme"),
        ] {
            let err = with(bad).validate().unwrap_err().to_string();
            assert!(err.contains("redis_url") && err.contains(expected), "{err}");
        }
        let file = tempfile::NamedTempFile::new().unwrap();
        let ca = Config {
            redis_ca: Some(file.path().to_owned()),
            ..with("redis://h")
        };
        let err = ca.validate().unwrap_err().to_string();
        assert!(
            err.contains("redis_ca") && err.contains("rediss://"),
            "{err}"
        );
        let cert_alone = Config {
            redis_cert: Some(file.path().to_owned()),
            ..with("rediss://h")
        };
        let err = cert_alone.validate().unwrap_err().to_string();
        assert!(err.contains("redis_key"), "{err}");
        Config {
            redis_ca: Some(file.path().to_owned()),
            ..with("rediss+sentinel://s1/m")
        }
        .validate()
        .unwrap();
    }

    #[test]
    fn unknown_keys_and_wrong_types_in_the_file_are_errors() {
        let err = Config::from_toml("concurency = 3").unwrap_err();
        assert!(err.contains("concurency"), "{err}");
        let err = Config::from_toml("concurrency = \"many\"").unwrap_err();
        assert!(err.contains("concurrency"), "{err}");
        // Whole seconds are accepted where fractions are.
        assert_eq!(Config::from_toml("ack_wait = 5").unwrap().ack_wait, 5.0);
    }

    #[test]
    fn printed_config_hides_passwords_and_reads_back() {
        let shown = Config {
            redis_url: "redis://u:pw@h".into(),
            ..Config::default()
        };
        let text = shown.to_redacted_toml();
        assert!(!text.contains("pw"), "{text}");
        assert!(
            Config::from_toml(&text).is_ok(),
            "printed config reads back: {text}"
        );
    }

    #[test]
    fn http_addresses() {
        for good in [
            "127.0.0.1:9808",
            "0.0.0.0:0",
            "[::1]:9808",
            "localhost:9808",
            "my-host.lan:80",
        ] {
            assert_eq!(check_http_addr(good), Ok(()), "{good}");
        }
        for (bad, says) in [
            ("9808", "no port"),
            ("127.0.0.1", "no port"),
            ("127.0.0.1:99999", "not a port"),
            ("127.0.0.1:http", "not a port"),
            (":9808", "neither"),
            ("::1:9808", "brackets"),
            ("a b:80", "neither"),
        ] {
            let err = check_http_addr(bad).unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
        }
        let config = Config {
            apps: vec!["tasks".into()],
            http_addr: Some("nowhere".into()),
            ..Config::default()
        };
        let err = config.validate().unwrap_err().to_string();
        assert!(err.starts_with("invalid setting `http_addr`"), "{err}");
    }

    #[test]
    fn nats_url_takes_seeds_as_a_list_or_a_comma_separated_string() {
        let listed = Config::from_toml(
            r#"nats_url = ["nats://u:pw@n1:4222", "nats://n2:4222", "nats://n3:4222"]"#,
        )
        .unwrap();
        assert_eq!(
            listed.nats_url,
            "nats://u:pw@n1:4222,nats://n2:4222,nats://n3:4222"
        );
        let joined = Config::from_toml(r#"nats_url = "nats://n1:4222, nats://n2:4222""#).unwrap();
        assert_eq!(joined.nats_url, "nats://n1:4222, nats://n2:4222");
        let err = Config::from_toml("nats_url = []").unwrap_err();
        assert!(err.contains("empty list"), "{err}");
        let ok = |nats_url: &str| Config {
            apps: vec!["tasks".into()],
            nats_url: nats_url.into(),
            ..Config::default()
        };
        ok(&listed.nats_url).validate().unwrap();
        let err = ok("nats://n1:4222,http://u:pw@n2:80")
            .validate()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("nats_url") && err.contains("http://u:***@n2:80"),
            "{err}"
        );
        let shown = listed.to_redacted_toml();
        assert!(!shown.contains("pw"), "{shown}");
        assert!(shown.contains("nats://n3:4222"), "{shown}");
    }

    #[test]
    fn stream_replicas_are_one_to_five() {
        assert_eq!(Config::default().stream_replicas, 1);
        for (replicas, fine) in [(0, false), (1, true), (3, true), (5, true), (6, false)] {
            let c = Config {
                apps: vec!["tasks".into()],
                stream_replicas: replicas,
                ..Config::default()
            };
            assert_eq!(c.validate().is_ok(), fine, "{replicas}");
        }
    }

    #[test]
    fn module_names() {
        assert!(is_module_name("tasks"));
        assert!(is_module_name("my_app.tasks2"));
        for bad in ["", "my-app", "a..b", ".a", "2x", "a b"] {
            assert!(!is_module_name(bad), "{bad:?}");
        }
    }
}
