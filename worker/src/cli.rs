//! Command-line flags of `dbtask-worker`.
//!
//! Every flag also reads a `DBTASK_*` environment variable (clap merges the two into one layer:
//! a flag wins over its variable). Every value is optional here so that
//! [`Cli::load_config`] can tell "not given" from "given", and apply them over the config file.

use std::path::PathBuf;

use clap::Parser;

use crate::config::{Config, ConfigError, PoolKind};
use crate::telemetry::LogFormat;

/// Runs Python tasks from NATS JetStream and stores their results in Redis.
///
/// Settings come from built-in defaults, then the `--config` TOML file, then `DBTASK_*`
/// environment variables, then these flags (each one overrides the previous).
#[derive(Debug, Default, Parser)]
#[command(
    name = "dbtask-worker",
    version = concat!(env!("CARGO_PKG_VERSION"), " (Python ", env!("DBTASK_BUILT_FOR_PYTHON"), ")"),
    about,
    long_about = None
)]
pub struct Cli {
    /// TOML config file (every option below has the same name there, with `_` for `-`)
    #[arg(long, env = "DBTASK_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Queues to consume, comma-separated [default: default]
    #[arg(
        short = 'Q',
        long,
        env = "DBTASK_QUEUES",
        value_name = "QUEUES",
        value_delimiter = ','
    )]
    pub queues: Vec<String>,

    /// Python module to import for its tasks (repeatable; the current directory is on sys.path)
    #[arg(
        short = 'A',
        long = "app",
        env = "DBTASK_APPS",
        value_name = "MODULE",
        value_delimiter = ','
    )]
    pub apps: Vec<String>,

    /// Django settings module (myproject.settings): set up Django and import every installed app's tasks module; -A is then optional
    #[arg(long, env = "DBTASK_DJANGO", value_name = "SETTINGS")]
    pub django: Option<String>,

    /// Tasks run at the same time (Python threads for sync tasks, asyncio slots for async ones) [default: 16]
    #[arg(short = 'c', long, env = "DBTASK_CONCURRENCY", value_name = "N")]
    pub concurrency: Option<usize>,

    /// NATS server URL, or seed servers of a cluster separated by commas; credentials as nats://user:password@host:port [default: nats://127.0.0.1:4222]
    #[arg(
        long,
        env = "DBTASK_NATS_URL",
        value_name = "URL",
        hide_env_values = true
    )]
    pub nats_url: Option<String>,

    /// Redis URL, e.g. redis://:password@host:6379/0 [default: redis://127.0.0.1:6379]
    #[arg(
        long,
        env = "DBTASK_REDIS_URL",
        value_name = "URL",
        hide_env_values = true
    )]
    pub redis_url: Option<String>,

    /// Python interpreter of the virtualenv to use [default: $VIRTUAL_ENV/bin/python]
    #[arg(long, env = "DBTASK_PYTHON", value_name = "PATH")]
    pub python: Option<PathBuf>,

    /// Log level (error, warn, info, debug, trace) or a tracing filter directive [default: info]
    #[arg(long, env = "DBTASK_LOG_LEVEL", value_name = "LEVEL")]
    pub log_level: Option<String>,

    /// Log format on stderr: text (for people) or json (one object per line) [default: text]
    #[arg(long, env = "DBTASK_LOG_FORMAT", value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,

    /// Seconds running tasks get to finish after SIGTERM/SIGINT before they are handed back [default: 30]
    #[arg(long, env = "DBTASK_SHUTDOWN_TIMEOUT", value_name = "SECS")]
    pub shutdown_timeout: Option<f64>,

    /// Seconds without an ack (or in-progress ack) before NATS redelivers a task [default: 30]
    #[arg(long, env = "DBTASK_ACK_WAIT", value_name = "SECS")]
    pub ack_wait: Option<f64>,

    /// Seconds a result stays in Redis [default: 86400]
    #[arg(long, env = "DBTASK_RESULT_TTL", value_name = "SECS")]
    pub result_ttl: Option<u64>,

    /// Store a STARTED state before a task runs (tasks can also ask for it themselves) [default: false]
    #[arg(long, env = "DBTASK_TRACK_STARTED", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub track_started: Option<bool>,

    /// Keep each task's args and kwargs in its result record [default: false]
    #[arg(long, env = "DBTASK_RESULT_EXTENDED", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub result_extended: Option<bool>,

    /// Deliveries of one message charged to it (not those lost while it waited in a worker that died) before it is dead-lettered [default: 10]
    #[arg(long, env = "DBTASK_MAX_DELIVER", value_name = "N")]
    pub max_deliver: Option<i64>,

    /// Unacked messages per queue across all its workers before NATS stops delivering [default: 10000]
    #[arg(long, env = "DBTASK_MAX_ACK_PENDING", value_name = "N")]
    pub max_ack_pending: Option<i64>,

    /// Most messages asked from NATS in one pull request [default: 256]
    #[arg(long, env = "DBTASK_FETCH_BATCH", value_name = "N")]
    pub fetch_batch: Option<usize>,

    /// Messages held waiting for a free slot, on top of the running tasks (0: none) [default: 128]
    #[arg(long, env = "DBTASK_PREFETCH", value_name = "N")]
    pub prefetch: Option<usize>,

    /// Seconds during which NATS drops a second publish of the same task id [default: 120]
    #[arg(long, env = "DBTASK_DUPLICATE_WINDOW", value_name = "SECS")]
    pub duplicate_window: Option<f64>,

    /// Largest task message accepted, in bytes [default: 1048576]
    #[arg(long, env = "DBTASK_MAX_MESSAGE_BYTES", value_name = "BYTES")]
    pub max_message_bytes: Option<usize>,

    /// Largest task result stored, in bytes; a bigger one fails as dbtask.TooLarge [default: 8388608]
    #[arg(long, env = "DBTASK_MAX_RESULT_BYTES", value_name = "BYTES")]
    pub max_result_bytes: Option<usize>,

    /// Default hard time limit of a task in seconds, 0 for none (a task's time_limit wins) [default: 0]
    #[arg(long, env = "DBTASK_TIME_LIMIT", value_name = "SECS")]
    pub time_limit: Option<f64>,

    /// Default soft time limit of a task in seconds, 0 for none (a task's soft_time_limit wins) [default: 0]
    #[arg(long, env = "DBTASK_SOFT_TIME_LIMIT", value_name = "SECS")]
    pub soft_time_limit: Option<f64>,

    /// Consume priority levels 0-9 of each queue, highest first (false: the default level only) [default: true]
    #[arg(long, env = "DBTASK_PRIORITIES", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub priorities: Option<bool>,

    /// What runs sync tasks: threads, or processes (one task at a time each, killed at a hard time limit) [default: threads]
    #[arg(long, env = "DBTASK_POOL", value_name = "POOL")]
    pub pool: Option<PoolKind>,

    /// With --pool processes: replace a child process after N tasks [default: 0, never]
    #[arg(long, env = "DBTASK_MAX_TASKS_PER_CHILD", value_name = "N")]
    pub max_tasks_per_child: Option<u64>,

    /// With --pool processes: replace a child process after the task that took it past MiB of resident memory [default: 0, never]
    #[arg(long, env = "DBTASK_MAX_MEMORY_PER_CHILD", value_name = "MiB")]
    pub max_memory_per_child: Option<u64>,

    /// Directory of the crash journal (which held tasks run), so that after a crash only those are charged a delivery [default: $RUNTIME_DIRECTORY, else $XDG_RUNTIME_DIR/dbtask, else dbtask-<uid> in the temp dir]
    #[arg(long, env = "DBTASK_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    // NATS TLS and credentials (docs/security.md).
    /// CA certificate (PEM) that signed the NATS server's certificate; TLS is then required
    #[arg(long, env = "DBTASK_NATS_TLS_CA", value_name = "FILE")]
    pub nats_tls_ca: Option<PathBuf>,

    /// Client certificate (PEM) for a NATS server that verifies clients (mutual TLS)
    #[arg(long, env = "DBTASK_NATS_TLS_CERT", value_name = "FILE")]
    pub nats_tls_cert: Option<PathBuf>,

    /// Private key (PEM) of --nats-tls-cert
    #[arg(long, env = "DBTASK_NATS_TLS_KEY", value_name = "FILE")]
    pub nats_tls_key: Option<PathBuf>,

    /// NATS credentials file (user JWT and nkey seed) for a server in operator/JWT mode
    #[arg(long, env = "DBTASK_NATS_CREDS", value_name = "FILE")]
    pub nats_creds: Option<PathBuf>,

    /// File holding an nkey user seed (SU...) for a server with nkey users
    #[arg(long, env = "DBTASK_NATS_NKEY", value_name = "FILE")]
    pub nats_nkey: Option<PathBuf>,

    /// File holding the key task messages must be signed with (HMAC-SHA256; at least 32 bytes): unsigned or wrongly signed messages are dead-lettered unrun (docs/security.md)
    #[arg(long, env = "DBTASK_MESSAGE_KEY", value_name = "FILE")]
    pub message_key: Option<PathBuf>,

    /// Serve /metrics (Prometheus), /livez and /readyz on HOST:PORT, e.g. 127.0.0.1:9808 (unauthenticated: 0.0.0.0 only in a container) [default: off]
    #[arg(long, env = "DBTASK_HTTP_ADDR", value_name = "HOST:PORT")]
    pub http_addr: Option<String>,

    /// Seconds the asyncio loop or the tokio runtime may go without progress before /livez fails and the systemd watchdog stops being fed [default: 30]
    #[arg(long, env = "DBTASK_LIVENESS_TIMEOUT", value_name = "SECS")]
    pub liveness_timeout: Option<f64>,

    /// Publish task and worker lifecycle events on NATS (dbtask.events.>), as Celery's -E [default: false]
    #[arg(short = 'E', long, env = "DBTASK_EVENTS", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub events: Option<bool>,

    /// Seconds between two worker.heartbeat events (with --events) [default: 5]
    #[arg(long, env = "DBTASK_HEARTBEAT_INTERVAL", value_name = "SECS")]
    pub heartbeat_interval: Option<f64>,

    /// Answer `dbtask inspect` and `dbtask control` requests on NATS [default: true]
    #[arg(long, env = "DBTASK_CONTROL", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub control: Option<bool>,

    /// Copies of each message in the task and dead-letter streams on a NATS cluster (1-5; 3 survives the loss of a server) [default: 1]
    #[arg(long, env = "DBTASK_STREAM_REPLICAS", value_name = "N")]
    pub stream_replicas: Option<usize>,

    // Redis TLS (docs/deployment.md, "Redis").
    /// CA certificate (PEM) to trust for a rediss:// Redis instead of the system CA store
    #[arg(long, env = "DBTASK_REDIS_CA", value_name = "FILE")]
    pub redis_ca: Option<PathBuf>,

    /// Client certificate (PEM) for a Redis that verifies clients (mutual TLS); needs --redis-key
    #[arg(long, env = "DBTASK_REDIS_CERT", value_name = "FILE")]
    pub redis_cert: Option<PathBuf>,

    /// Private key (PEM) of --redis-cert
    #[arg(long, env = "DBTASK_REDIS_KEY", value_name = "FILE")]
    pub redis_key: Option<PathBuf>,

    /// Print the effective configuration as TOML (passwords hidden) and exit
    #[arg(long)]
    pub print_config: bool,
}

impl Cli {
    /// The configuration: defaults, overridden by the `--config` file, overridden by env vars
    /// and flags; validated.
    pub fn load_config(&self) -> Result<Config, ConfigError> {
        let mut config = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        self.apply_to(&mut config);
        config.validate()?;
        Ok(config)
    }

    /// Applies the values given as flags or environment variables over `config`.
    pub fn apply_to(&self, config: &mut Config) {
        fn set<T: Clone>(target: &mut T, value: &Option<T>) {
            if let Some(v) = value {
                *target = v.clone();
            }
        }
        if !self.queues.is_empty() {
            config.queues = self.queues.clone();
        }
        if !self.apps.is_empty() {
            config.apps = self.apps.clone();
        }
        if self.django.is_some() {
            config.django.clone_from(&self.django);
        }
        set(&mut config.concurrency, &self.concurrency);
        set(&mut config.nats_url, &self.nats_url);
        set(&mut config.redis_url, &self.redis_url);
        if let Some(p) = &self.python {
            config.python = Some(p.clone());
        }
        set(&mut config.log_level, &self.log_level);
        set(&mut config.log_format, &self.log_format);
        set(&mut config.shutdown_timeout, &self.shutdown_timeout);
        set(&mut config.ack_wait, &self.ack_wait);
        set(&mut config.result_ttl, &self.result_ttl);
        set(&mut config.track_started, &self.track_started);
        set(&mut config.result_extended, &self.result_extended);
        set(&mut config.max_deliver, &self.max_deliver);
        set(&mut config.max_ack_pending, &self.max_ack_pending);
        set(&mut config.fetch_batch, &self.fetch_batch);
        set(&mut config.prefetch, &self.prefetch);
        set(&mut config.duplicate_window, &self.duplicate_window);
        set(&mut config.max_message_bytes, &self.max_message_bytes);
        set(&mut config.max_result_bytes, &self.max_result_bytes);
        set(&mut config.time_limit, &self.time_limit);
        set(&mut config.soft_time_limit, &self.soft_time_limit);
        set(&mut config.priorities, &self.priorities);
        set(&mut config.pool, &self.pool);
        set(&mut config.max_tasks_per_child, &self.max_tasks_per_child);
        set(&mut config.max_memory_per_child, &self.max_memory_per_child);
        set(&mut config.events, &self.events);
        set(&mut config.heartbeat_interval, &self.heartbeat_interval);
        set(&mut config.control, &self.control);
        if self.state_dir.is_some() {
            config.state_dir.clone_from(&self.state_dir);
        }
        if self.message_key.is_some() {
            config.message_key.clone_from(&self.message_key);
        }
        if self.http_addr.is_some() {
            config.http_addr.clone_from(&self.http_addr);
        }
        set(&mut config.liveness_timeout, &self.liveness_timeout);
        set(&mut config.stream_replicas, &self.stream_replicas);

        // NATS TLS and credentials.
        for (target, value) in [
            (&mut config.nats_tls_ca, &self.nats_tls_ca),
            (&mut config.nats_tls_cert, &self.nats_tls_cert),
            (&mut config.nats_tls_key, &self.nats_tls_key),
            (&mut config.nats_creds, &self.nats_creds),
            (&mut config.nats_nkey, &self.nats_nkey),
            (&mut config.redis_ca, &self.redis_ca),
            (&mut config.redis_cert, &self.redis_cert),
            (&mut config.redis_key, &self.redis_key),
        ] {
            if value.is_some() {
                target.clone_from(value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;
    use std::io::Write;

    fn cli(args: &[&str]) -> Cli {
        let mut argv = vec!["dbtask-worker"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv).unwrap()
    }

    fn file(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f
    }

    #[test]
    fn file_overrides_defaults_and_flags_override_file() {
        let f = file(
            r#"
            queues = ["math", "io"]
            apps = ["from_file"]
            concurrency = 4
            redis_url = "redis://file:6379"
            ack_wait = 12.5
            log_format = "json"
            track_started = true
            "#,
        );
        let path = f.path().to_str().unwrap();

        // The file alone: its keys win over defaults, the rest keep their defaults.
        let c = cli(&["--config", path]).load_config().unwrap();
        assert_eq!(c.queues, ["math", "io"]);
        assert_eq!(c.apps, ["from_file"]);
        assert_eq!(c.concurrency, 4);
        assert_eq!(c.redis_url, "redis://file:6379");
        assert_eq!(c.ack_wait, 12.5);
        assert_eq!(c.log_format, LogFormat::Json);
        assert!(c.track_started);
        assert_eq!(c.nats_url, Config::default().nats_url);
        assert_eq!(c.result_ttl, 86_400);

        // Flags win over the file, field by field.
        let c = cli(&[
            "--config",
            path,
            "--concurrency",
            "9",
            "-Q",
            "only",
            "-A",
            "from_flag",
            "--log-format",
            "text",
            "--track-started=false",
        ])
        .load_config()
        .unwrap();
        assert_eq!(c.concurrency, 9);
        assert_eq!(c.queues, ["only"]);
        assert_eq!(c.apps, ["from_flag"]);
        assert_eq!(c.log_format, LogFormat::Text);
        assert!(!c.track_started);
        assert_eq!(
            c.redis_url, "redis://file:6379",
            "not given as a flag: the file's value stays"
        );
    }

    #[test]
    fn missing_config_file_names_the_path() {
        let err = cli(&["--config", "/nonexistent/w.toml"])
            .load_config()
            .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/w.toml"), "{err}");
    }

    #[test]
    fn every_flag_has_help_and_an_env_var() {
        let cmd = Cli::command();
        cmd.clone().debug_assert();
        for arg in cmd.get_arguments() {
            let id = arg.get_id().as_str();
            if matches!(id, "help" | "version" | "print_config") {
                continue;
            }
            assert!(arg.get_help().is_some(), "--{id} has no help");
            let env = arg
                .get_env()
                .unwrap_or_else(|| panic!("--{id} has no env var"));
            assert!(
                env.to_string_lossy().starts_with("DBTASK_"),
                "--{id}: {env:?}"
            );
        }
    }

    #[test]
    fn lists_split_on_commas_and_repeat() {
        let cli =
            Cli::try_parse_from(["w", "--queues", "math,default", "-A", "a.b", "-A", "c"]).unwrap();
        assert_eq!(cli.queues, ["math", "default"]);
        assert_eq!(cli.apps, ["a.b", "c"]);
    }

    #[test]
    fn django_settings_come_from_the_file_or_the_flag_and_make_apps_optional() {
        let f = file("django = \"from_file.settings\"\n");
        let path = f.path().to_str().unwrap();
        let c = cli(&["--config", path]).load_config().unwrap();
        assert_eq!(c.django.as_deref(), Some("from_file.settings"));
        assert!(c.apps.is_empty());
        let c = cli(&["--config", path, "--django", "shop.settings", "-A", "extra"])
            .load_config()
            .unwrap();
        assert_eq!(c.django.as_deref(), Some("shop.settings"));
        assert_eq!(c.apps, ["extra"]);
        assert_eq!(c.python_config().django.as_deref(), Some("shop.settings"));
    }

    #[test]
    fn track_started_is_a_flag_with_an_optional_value() {
        let on = Cli::try_parse_from(["w", "--track-started"]).unwrap();
        assert_eq!(on.track_started, Some(true));
        let off = Cli::try_parse_from(["w", "--track-started=false"]).unwrap();
        assert_eq!(off.track_started, Some(false));
        let unset = Cli::try_parse_from(["w"]).unwrap();
        assert_eq!(unset.track_started, None);
    }

    // NATS TLS and credentials.
    #[test]
    fn nats_security_files_come_from_flags_and_are_checked_by_name() {
        let ca = file("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n");
        let ca = ca.path().to_str().unwrap();
        let c = cli(&["-A", "tasks", "--nats-tls-ca", ca])
            .load_config()
            .unwrap();
        assert_eq!(c.nats_tls_ca.as_deref(), Some(std::path::Path::new(ca)));
        assert!(c.to_redacted_toml().contains("nats_tls_ca"));

        let err = cli(&["-A", "tasks", "--nats-tls-ca", "/nonexistent/ca.pem"])
            .load_config()
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "invalid setting `nats_tls_ca`: --nats-tls-ca /nonexistent/ca.pem: file not found"
        );
        let err = cli(&["-A", "tasks", "--nats-nkey", ca])
            .load_config()
            .unwrap_err()
            .to_string();
        assert!(err.contains("--nats-nkey"), "{err}");
        assert!(err.contains("nkey user seed"), "{err}");
        assert!(
            !err.contains("MIIB"),
            "a file's contents are never shown: {err}"
        );
    }
}
