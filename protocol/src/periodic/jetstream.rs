//! Periodic schedules in the task stream (feature `nats`): read one, list them, create or
//! replace one only when it changed, remove one, fire one tick now. One copy for the worker
//! (which applies the schedules its task modules declare) and the client.

use async_nats::jetstream::context::{Context, PublishErrorKind};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream::{LastRawMessageErrorKind, Stream};
use async_nats::HeaderMap;
use futures::TryStreamExt;

use super::{
    periodic_subject, tick_id, tick_time, PeriodicError, PeriodicSpec, MIN_PERIODIC_NATS_VERSION,
    PERIODIC_SUBJECT_WILDCARD,
};
use crate::signing::{MessageKey, HEADER_SIGNATURE};
use crate::{now_unix, task_headers, Route, HEADER_TASK, HEADER_TASK_ID};

type Cause = Box<dyn std::error::Error + Send + Sync>;

/// What went wrong with a schedule in the stream.
#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    /// The server refused the schedule's pattern or zone (its words).
    #[error("nats-server refused the schedule {name:?}: {reason}")]
    Refused { name: String, reason: String },
    /// A stored schedule does not read back as one of dbtask's.
    #[error("schedule {name:?}: {source}")]
    Stored {
        name: String,
        #[source]
        source: PeriodicError,
    },
    /// Talking to JetStream failed.
    #[error("cannot {what}: {source}")]
    Nats {
        what: &'static str,
        #[source]
        source: Cause,
    },
}

fn nats(what: &'static str) -> impl FnOnce(Cause) -> ScheduleError {
    move |source| ScheduleError::Nats { what, source }
}

/// Whether nats-server `version` (e.g. `2.14.6`) runs repeating schedules; the error says what
/// to do when it does not.
pub fn check_version(version: &str) -> Result<(), String> {
    let mut parts = version.trim().trim_start_matches('v').split(['.', '-']);
    let mut next = || {
        parts
            .next()
            .and_then(|p| p.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let found = (next(), next(), next());
    if found >= MIN_PERIODIC_NATS_VERSION {
        return Ok(());
    }
    let (major, minor, _) = MIN_PERIODIC_NATS_VERSION;
    Err(format!(
        "periodic tasks need nats-server {major}.{minor} or later (repeating message schedules), \
         and this server is {version}: upgrade nats-server (countdowns and etas keep working on 2.12)"
    ))
}

/// A schedule as stored: its spec, its stream sequence and when it was stored (Unix seconds).
#[derive(Debug)]
pub struct Stored {
    pub spec: PeriodicSpec,
    pub sequence: u64,
    pub stored_at: f64,
    /// Its `Dbtask-Signature` header, if it was signed (`--message-key`).
    pub signature: Option<String>,
}

/// What [`apply`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Created,
    Replaced,
    /// The stored schedule is the same: left alone, so an `every` keeps its rhythm.
    Unchanged,
}

/// The schedule `name`, `None` when there is none.
pub async fn read(stream: &Stream, name: &str) -> Result<Option<Stored>, ScheduleError> {
    match stream
        .get_last_raw_message_by_subject(&periodic_subject(name))
        .await
    {
        Ok(m) => {
            let header = |h: &str| m.headers.get(h).map(|v| v.as_str());
            let spec = PeriodicSpec::from_stored(header, &m.payload).map_err(|source| {
                ScheduleError::Stored {
                    name: name.to_owned(),
                    source,
                }
            })?;
            Ok(Some(Stored {
                spec,
                sequence: m.sequence,
                stored_at: m.time.unix_timestamp_nanos() as f64 / 1e9,
                signature: header(HEADER_SIGNATURE).map(str::to_owned),
            }))
        }
        Err(e) if matches!(e.kind(), LastRawMessageErrorKind::NoMessageFound) => Ok(None),
        Err(e) => Err(nats("read a schedule")(e.into())),
    }
}

/// Every schedule, by name.
pub async fn list(stream: &Stream) -> Result<Vec<Stored>, ScheduleError> {
    let mut subjects: Vec<String> = stream
        .info_with_subjects(PERIODIC_SUBJECT_WILDCARD)
        .await
        .map_err(|e| nats("list the schedules")(e.into()))?
        .map_ok(|(subject, _)| subject)
        .try_collect()
        .await
        .map_err(|e| nats("list the schedules")(e.into()))?;
    subjects.sort();
    let mut out = Vec::with_capacity(subjects.len());
    for subject in subjects {
        let name = subject
            .strip_prefix(super::PERIODIC_SUBJECT_PREFIX)
            .and_then(|s| s.strip_prefix('.'))
            .unwrap_or(&subject);
        if let Some(stored) = read(stream, name).await? {
            out.push(stored);
        }
    }
    Ok(out)
}

/// The headers of the schedule message: the schedule's own, the task id and name every task
/// message carries, and with `key` the signature every tick then carries (the server copies
/// the headers and body to each tick, delivered on the schedule's target subject).
fn schedule_headers(spec: &PeriodicSpec, key: Option<&MessageKey>, body: &[u8]) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (name, value) in spec.headers() {
        headers.insert(name, value.as_str());
    }
    headers.insert(HEADER_TASK_ID, format!("{}:tick", spec.name));
    headers.insert(HEADER_TASK, spec.task.as_str());
    if let Some(key) = key {
        key.sign_headers(&mut headers, &spec.subject(), body);
    }
    headers
}

/// Creates the schedule, or replaces a different one of the same name; an identical one is
/// left alone (republishing an `every` would restart its count), unless it was signed
/// otherwise than `key` would sign it. The publish expects the sequence just read, so two
/// workers applying the same change replace it once.
pub async fn apply(
    js: &Context,
    stream: &Stream,
    spec: &PeriodicSpec,
    key: Option<&MessageKey>,
) -> Result<Applied, ScheduleError> {
    let body = spec.body();
    let headers = schedule_headers(spec, key, &body);
    let signature = headers.get(HEADER_SIGNATURE).map(|v| v.as_str().to_owned());
    for _ in 0..3 {
        let current = read(stream, &spec.name).await.or_else(|e| match e {
            // A stored schedule dbtask cannot read is replaced.
            ScheduleError::Stored { .. } => Ok(None),
            e => Err(e),
        })?;
        let (applied, expected) = match &current {
            Some(stored) if stored.spec == *spec && stored.signature == signature => {
                return Ok(Applied::Unchanged)
            }
            Some(stored) => (Applied::Replaced, stored.sequence),
            None => (Applied::Created, 0),
        };
        let publish = PublishMessage::build()
            .payload(body.clone().into())
            .headers(headers.clone())
            .expected_last_subject_sequence(expected);
        let sent = async { js.send_publish(spec.subject(), publish).await?.await };
        match sent.await {
            Ok(_) => return Ok(applied),
            // Another worker or client got there first: read it again.
            Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => continue,
            Err(e) => return Err(refused_or(&spec.name, e)),
        }
    }
    Err(nats("store the schedule")(
        "it kept changing under us: another process is replacing it in a loop".into(),
    ))
}

fn refused_or(name: &str, e: async_nats::jetstream::context::PublishError) -> ScheduleError {
    let text = e.to_string();
    let hint = if text.contains("time zone is invalid") {
        "does the server's host have tzdata for this zone?"
    } else if text.contains("schedules pattern is invalid") {
        "the server takes weekdays 0-6 and only dates that exist, such as not 31 2"
    } else {
        return nats("store the schedule")(e.into());
    };
    ScheduleError::Refused {
        name: name.to_owned(),
        reason: format!("{text} ({hint})"),
    }
}

/// Removes the schedule `name`; false when there was none. Ticks already queued still run.
pub async fn remove(stream: &Stream, name: &str) -> Result<bool, ScheduleError> {
    let purged = stream
        .purge()
        .filter(periodic_subject(name))
        .await
        .map_err(|e| nats("remove the schedule")(e.into()))?;
    Ok(purged.purged > 0)
}

/// Publishes one tick of `spec` now (its queue, its headers; signed with `key`) and returns
/// the tick's id; a second call within the same second is dropped by JetStream's duplicate
/// window.
pub async fn fire(
    js: &Context,
    spec: &PeriodicSpec,
    key: Option<&MessageKey>,
) -> Result<String, ScheduleError> {
    let id = tick_id(&spec.name, tick_time(now_unix()));
    let message = spec.message(id.clone());
    let route = Route {
        subject: spec.target(),
        schedule: None,
    };
    let mut headers = HeaderMap::new();
    for (name, value) in task_headers(&message, &route, &id) {
        headers.insert(name, value);
    }
    for (name, value) in spec.tick_headers() {
        headers.insert(name, value.as_str());
    }
    let body = message.encode();
    if let Some(key) = key {
        key.sign_headers(&mut headers, &route.subject, &body);
    }
    let sent = async {
        js.publish_with_headers(route.subject.clone(), headers, body.into())
            .await?
            .await
    };
    sent.await.map_err(|e| nats("publish the tick")(e.into()))?;
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_before_2_14_are_refused_with_what_to_do() {
        assert!(check_version("2.14.0").is_ok());
        assert!(check_version("v2.15.1-beta.2").is_ok());
        assert!(check_version("3.0.0").is_ok());
        let err = check_version("2.12.3").unwrap_err();
        assert!(
            err.contains("2.14 or later") && err.contains("2.12.3"),
            "{err}"
        );
        assert!(check_version("2.9.25").is_err());
    }
}
