//! The `--http-addr` endpoint: HTTP/1.1 (hyper) on the worker's own tokio runtime. Four
//! paths, GET (or HEAD) only: `/metrics`, `/livez`, `/readyz`, and `/` listing them.
//! Unauthenticated: it binds where it is told, 127.0.0.1 unless in a container.

use std::convert::Infallible;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ACCEPT, ALLOW, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::Semaphore;
use tracing::{debug, warn};

use super::metrics::Format;
use super::Monitor;

/// Connections served at once; one more is closed at once. A scraper and two probes need
/// three.
const MAX_CONNECTIONS: usize = 32;
/// A client has this long to send its request's headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Why `--http-addr` cannot be served.
#[derive(Debug, thiserror::Error)]
#[error("cannot serve --http-addr {addr}: {source}{hint}")]
pub struct BindError {
    addr: String,
    source: io::Error,
    hint: &'static str,
}

/// Binds `addr` (`HOST:PORT`, checked by `Config::validate`), before anything slow starts: a
/// port in use fails the start at once.
pub fn bind(addr: &str) -> Result<std::net::TcpListener, BindError> {
    let failed = |source: io::Error| {
        let hint = match source.kind() {
            io::ErrorKind::AddrInUse => {
                " (another process listens there: stop it or choose another port)"
            }
            io::ErrorKind::AddrNotAvailable => " (not an address of this machine)",
            io::ErrorKind::PermissionDenied => {
                " (ports below 1024 need privileges: choose a port above 1024)"
            }
            _ if source.raw_os_error().is_none() => " (is the host name right?)",
            _ => "",
        };
        BindError {
            addr: addr.to_owned(),
            source,
            hint,
        }
    };
    let listener = std::net::TcpListener::bind(addr).map_err(failed)?;
    listener.set_nonblocking(true).map_err(failed)?;
    Ok(listener)
}

/// Serves the endpoint until the runtime stops. Call within the tokio runtime.
pub async fn serve(listener: std::net::TcpListener, monitor: Arc<Monitor>) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(e) => {
            warn!(error = %e, "cannot serve --http-addr: no /metrics, /livez nor /readyz");
            return;
        }
    };
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors, typically: wait instead of spinning.
                warn!(error = %e, "cannot accept a connection on --http-addr");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            debug!(%peer, "too many connections on --http-addr: closing this one");
            continue;
        };
        let monitor = Arc::clone(&monitor);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let monitor = Arc::clone(&monitor);
                async move { Ok::<_, Infallible>(respond(&monitor, request).await) }
            });
            let served = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(e) = served {
                debug!(%peer, error = %e, "--http-addr connection ended on an error");
            }
            drop(slot);
        });
    }
}

type Reply = Response<Full<Bytes>>;

fn reply(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Reply {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn json(ok: bool, value: &impl serde::Serialize) -> Reply {
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut body = serde_json::to_vec(value)
        .unwrap_or_else(|e| format!("{{\"error\":\"cannot write the answer: {e}\"}}").into_bytes());
    body.push(b'\n');
    reply(status, "application/json", body)
}

const INDEX: &str = "dbtask-worker\n\n/metrics  Prometheus metrics\n/livez    200 while the event loops progress, else 503\n/readyz   200 when connected to NATS and Redis and serving, else 503 (JSON says why)\n";

async fn respond(monitor: &Monitor, request: Request<Incoming>) -> Reply {
    let head = request.method() == Method::HEAD;
    if request.method() != Method::GET && !head {
        let mut refused = reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "only GET and HEAD\n",
        );
        refused
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return refused;
    }
    let mut response = match request.uri().path() {
        "/metrics" => {
            let format = if accepts_openmetrics(&request) {
                Format::OpenMetrics
            } else {
                Format::Prometheus
            };
            match monitor.scrape(format).await {
                Some(text) => reply(StatusCode::OK, format.content_type(), text),
                None => reply(
                    StatusCode::NOT_FOUND,
                    "text/plain; charset=utf-8",
                    "no metrics\n",
                ),
            }
        }
        "/livez" => {
            let live = monitor.liveness();
            json(live.live, &live)
        }
        "/readyz" => {
            let ready = monitor.readiness().await;
            json(ready.ready, &ready)
        }
        "/" => reply(StatusCode::OK, "text/plain; charset=utf-8", INDEX),
        _ => reply(StatusCode::NOT_FOUND, "text/plain; charset=utf-8", INDEX),
    };
    if head {
        *response.body_mut() = Full::new(Bytes::new());
    }
    response
}

/// Whether the scraper prefers OpenMetrics (Prometheus asks for it first, with the plain text
/// format as a fallback; both are fine).
fn accepts_openmetrics(request: &Request<Incoming>) -> bool {
    request
        .headers()
        .get_all(ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .next()
        .is_some_and(|first| first.trim().starts_with("application/openmetrics-text"))
}
