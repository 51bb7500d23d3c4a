//! The `dbtask-worker` binary's settings: precedence defaults < file < env < flags, checked
//! through `--print-config` (which exits before Python or any server is involved).

use std::io::Write;
use std::process::{Command, Output};

use dbtask_worker::Config;

/// The binary with a clean slate: no `DBTASK_*` variable inherited from the caller.
fn worker() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dbtask-worker"));
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("DBTASK_") {
            cmd.env_remove(name);
        }
    }
    cmd
}

fn effective(output: Output) -> Config {
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    Config::from_toml(&String::from_utf8(output.stdout).unwrap()).unwrap()
}

#[test]
fn flags_beat_env_which_beats_the_file_which_beats_defaults() {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(
        br#"
        queues = ["from_file"]
        apps = ["file_tasks"]
        concurrency = 4
        result_ttl = 100
        ack_wait = 7
        redis_url = "redis://file-host:6379"
        "#,
    )
    .unwrap();

    let config = effective(
        worker()
            .env("DBTASK_CONFIG", file.path())
            .env("DBTASK_CONCURRENCY", "5")
            .env("DBTASK_RESULT_TTL", "200")
            .env("DBTASK_QUEUES", "a,b")
            .env("DBTASK_TRACK_STARTED", "true")
            .args(["--concurrency", "6", "--print-config"])
            .output()
            .unwrap(),
    );
    assert_eq!(config.concurrency, 6, "flag over env over file");
    assert_eq!(config.result_ttl, 200, "env over file");
    assert_eq!(config.queues, ["a", "b"], "env over file, split on commas");
    assert!(config.track_started, "env over default");
    assert_eq!(config.ack_wait, 7.0, "file over default");
    assert_eq!(config.apps, ["file_tasks"]);
    assert_eq!(config.redis_url, "redis://file-host:6379");
    assert_eq!(config.fetch_batch, 256, "default");
    assert_eq!(config.nats_url, "nats://127.0.0.1:4222", "default");
}

#[test]
fn secrets_never_reach_the_output() {
    let output = worker()
        .env("DBTASK_REDIS_URL", "redis://:hunter2@127.0.0.1:6379")
        .args([
            "--nats-url",
            "nats://u:hunter2@127.0.0.1:4222",
            "-A",
            "tasks",
            "--print-config",
        ])
        .output()
        .unwrap();
    let config = effective(output.clone());
    assert_eq!(config.redis_url, "redis://:***@127.0.0.1:6379");
    assert_eq!(config.nats_url, "nats://u:***@127.0.0.1:4222");

    let help = worker()
        .env("DBTASK_REDIS_URL", "redis://:hunter2@h")
        .arg("--help")
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&help.stdout).contains("hunter2"));
}

#[test]
fn bad_settings_stop_with_one_clear_line_and_exit_code_2() {
    for (args, expected) in [
        (
            vec!["-A", "tasks", "--concurrency", "0"],
            "invalid setting `concurrency`: must be at least 1",
        ),
        (
            vec!["-A", "tasks", "-Q", "a.b"],
            "invalid queue name \"a.b\"",
        ),
        (vec![], "no task module to import: pass -A MODULE"),
        (
            vec!["-A", "tasks", "--config", "/nonexistent/w.toml"],
            "cannot read config file /nonexistent/w.toml",
        ),
    ] {
        let out = worker().args(&args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.starts_with("dbtask-worker: error: "), "{stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    }
}

#[test]
fn help_lists_every_flag() {
    let out = worker().arg("--help").output().unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    for flag in [
        "--queues",
        "--app",
        "--concurrency",
        "--nats-url",
        "--redis-url",
        "--config",
        "--log-level",
        "--log-format",
        "--shutdown-timeout",
        "--python",
        "--ack-wait",
        "--result-ttl",
        "--track-started",
        "--max-deliver",
        "--max-ack-pending",
        "--fetch-batch",
        "--duplicate-window",
        "--max-message-bytes",
        "--max-result-bytes",
    ] {
        assert!(help.contains(flag), "{flag} missing from --help:\n{help}");
    }
}
