//! Header names, the `Nats-Schedule` value format, and the one builder of a task message's
//! headers, which the client and the worker both turn into a `HeaderMap` with the one
//! `nats::task_header_map` (feature `nats`).

use crate::{Route, TaskMessage};

/// Header carrying the task id: JetStream drops a second publish of the same id inside the
/// stream's duplicate window, so a client that retries a publish never enqueues a task twice.
pub const HEADER_MSG_ID: &str = "Nats-Msg-Id";
/// Header carrying the task name, so that a worker can name the task in its logs and its
/// FAILURE record even when the body does not decode.
pub const HEADER_TASK: &str = "Dbtask-Task";
/// Header carrying the task id (duplicate of the body's `id`, for the same reason).
pub const HEADER_TASK_ID: &str = "Dbtask-Id";

/// W3C Trace Context header carrying the producer's trace and span (OpenTelemetry): set by a
/// client with `opentelemetry-api` installed and a span current, and by a worker on the
/// retries and workflow steps it publishes (docs/tracing.md).
pub const HEADER_TRACEPARENT: &str = "traceparent";
/// W3C Trace Context vendor state, beside [`HEADER_TRACEPARENT`] when there is any.
pub const HEADER_TRACESTATE: &str = "tracestate";
/// Longest `traceparent` / `tracestate` value carried (W3C: a traceparent is 55 characters,
/// a tracestate at most 32 members of 256 characters; 4 KiB covers both with room).
pub const MAX_TRACE_HEADER: usize = 4096;

/// The trace context a task message carries in its headers (W3C Trace Context), as the text
/// the propagator wrote: dbtask passes it along and never parses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trace {
    pub parent: String,
    pub state: Option<String>,
}

impl Trace {
    /// A trace context to put in headers: each value 1 to [`MAX_TRACE_HEADER`] visible ASCII
    /// characters or spaces (what a header value may hold); else why not.
    pub fn new(parent: String, state: Option<String>) -> Result<Trace, String> {
        let check = |name: &str, v: &str| {
            if v.is_empty()
                || v.len() > MAX_TRACE_HEADER
                || !v.bytes().all(|b| (b' '..=b'~').contains(&b))
            {
                Err(format!(
                    "{name} must be 1 to {MAX_TRACE_HEADER} printable ASCII characters (W3C Trace Context), not {:?}",
                    v.chars().take(80).collect::<String>()
                ))
            } else {
                Ok(())
            }
        };
        check(HEADER_TRACEPARENT, &parent)?;
        let state = state.filter(|s| !s.is_empty());
        if let Some(s) = &state {
            check(HEADER_TRACESTATE, s)?;
        }
        Ok(Trace { parent, state })
    }

    /// The header pairs: `traceparent`, and `tracestate` when there is one.
    pub fn headers(&self) -> impl Iterator<Item = (&'static str, &str)> {
        std::iter::once((HEADER_TRACEPARENT, self.parent.as_str()))
            .chain(self.state.as_deref().map(|s| (HEADER_TRACESTATE, s)))
    }
}

/// Header of a message schedule (ADR-51): `@at <RFC 3339 UTC time>`.
pub const HEADER_SCHEDULE: &str = "Nats-Schedule";
/// Header naming the subject a message schedule publishes to.
pub const HEADER_SCHEDULE_TARGET: &str = "Nats-Schedule-Target";

/// The latest eta a message schedule can hold: 9999-12-31T23:59:59Z, the last second RFC 3339
/// (four-digit years) can write. A later one (`countdown=1e20`) is refused where it is given.
pub const MAX_ETA: f64 = 253_402_300_799.0;

/// The `Nats-Schedule` header value running a message at Unix time `eta`:
/// `@at 2026-01-02T03:04:05.678Z` (RFC 3339, UTC, millisecond precision).
pub fn schedule_at(eta: f64) -> String {
    let ms = (eta.max(0.0) * 1000.0).round() as i64;
    let (secs, ms) = (ms.div_euclid(1000), ms.rem_euclid(1000));
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Days since 1970-01-01 to a civil date (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "@at {year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{ms:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// Headers a dead letter carries besides the original ones.
pub mod dead_headers {
    /// Why the message was dead-lettered.
    pub const REASON: &str = "Dbtask-Dead-Reason";
    /// The subject the message was originally published to (where a replay sends it).
    pub const SUBJECT: &str = "Dbtask-Dead-Subject";
    /// Its sequence in the task stream.
    pub const STREAM_SEQ: &str = "Dbtask-Dead-Stream-Seq";
    /// How many times it was delivered.
    pub const DELIVERIES: &str = "Dbtask-Dead-Deliveries";
    /// When it was dead-lettered (Unix seconds).
    pub const AT: &str = "Dbtask-Dead-At";
    /// The worker that dead-lettered it.
    pub const WORKER: &str = "Dbtask-Dead-Worker";
}

/// The headers of `message` published under `route`: `Nats-Msg-Id` (`msg_id`: the task id for
/// a first publish, so that JetStream drops a duplicate inside the stream's duplicate window),
/// the task id and name (for a worker that cannot read the body), then the route's schedule
/// headers. Borrowed pairs, no allocation: each side inserts them into its own header map.
pub fn task_headers<'a>(
    message: &'a TaskMessage,
    route: &'a Route,
    msg_id: &'a str,
) -> impl Iterator<Item = (&'static str, &'a str)> + 'a {
    [
        (HEADER_MSG_ID, msg_id),
        (HEADER_TASK_ID, message.id.as_str()),
        (HEADER_TASK, message.task.as_str()),
    ]
    .into_iter()
    .chain(route.headers())
}

#[cfg(test)]
mod tests {
    use crate::*;

    #[test]
    fn schedule_header_is_rfc3339_utc() {
        assert_eq!(schedule_at(0.0), "@at 1970-01-01T00:00:00.000Z");
        assert_eq!(
            schedule_at(1_700_000_000.25),
            "@at 2023-11-14T22:13:20.250Z"
        );
        assert_eq!(schedule_at(951_825_600.0), "@at 2000-02-29T12:00:00.000Z");
        assert_eq!(schedule_subject("q", "a.b"), "dbtask.sched.q.a.b");
    }

    #[test]
    fn a_task_message_carries_its_ids_its_name_and_its_schedule() {
        let mut msg = TaskMessage::decode(br#"{"id": "t1", "task": "add", "eta": 20.0}"#).unwrap();
        let route = msg.route("q", 10.0);
        let headers: Vec<_> = task_headers(&msg, &route, &msg.id).collect();
        assert_eq!(
            headers,
            [
                (HEADER_MSG_ID, "t1"),
                (HEADER_TASK_ID, "t1"),
                (HEADER_TASK, "add"),
                (HEADER_SCHEDULE, "@at 1970-01-01T00:00:19.700Z"),
                (HEADER_SCHEDULE_TARGET, "dbtask.tasks.q"),
            ]
        );
        msg.eta = None;
        let route = msg.route("q", 10.0);
        let retry_id = retry_msg_id(&msg.id, 1);
        let headers: Vec<_> = task_headers(&msg, &route, &retry_id).collect();
        assert_eq!(
            headers,
            [
                (HEADER_MSG_ID, "t1:retry:1"),
                (HEADER_TASK_ID, "t1"),
                (HEADER_TASK, "add")
            ]
        );
    }

    #[test]
    fn a_trace_context_is_carried_as_given_when_a_header_can_hold_it() {
        let parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_owned();
        let t = Trace::new(parent.clone(), Some("congo=t61rcWkgMzE".into())).unwrap();
        let headers: Vec<_> = t.headers().collect();
        assert_eq!(
            headers,
            [
                (HEADER_TRACEPARENT, parent.as_str()),
                (HEADER_TRACESTATE, "congo=t61rcWkgMzE")
            ]
        );
        assert_eq!(
            Trace::new(parent.clone(), Some(String::new()))
                .unwrap()
                .state,
            None
        );
        assert!(Trace::new("00-a\r\nX: y".into(), None).is_err());
        assert!(Trace::new(String::new(), None).is_err());
        assert!(Trace::new(parent, Some("é".into())).is_err());
    }
}
