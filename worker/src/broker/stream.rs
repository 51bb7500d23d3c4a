//! The streams on the server, made from their one description ([`StreamSpec`]) with the
//! worker's settings, or brought in line with it: the task stream at every start, the
//! dead-letter stream when it exists (it is made on the first dead letter, see `dead.rs`).
//!
//! What NATS lets a stream change in place is changed and logged: subjects added, message
//! schedules enabled, the duplicate window, the largest message size, the replica count (on a
//! cluster: JetStream copies the messages to the new peers, or drops the extra copies, without
//! losing any). What it does not (retention, storage) stops the worker with an error saying
//! what differs and what to do. Settings dbtask does not describe (an operator's `max_age`,
//! `max_bytes`, placement...) are left as they are. The decision is [`reconcile`], a pure
//! function of the description and the stored configuration.

use std::sync::atomic::Ordering;

use async_nats::jetstream::{self, stream};
use dbtask_protocol::{Retention, Storage, StreamSpec};
use tracing::{info, warn};

use super::{Broker, BrokerError, Cause, Incompatible};
use crate::config::Config;

/// One setting the worker changes on an existing stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Subjects a stream made by an older dbtask lacks, e.g. `dbtask.sched.>`.
    Subjects(Vec<String>),
    /// Message schedules (countdowns, etas, retries; nats-server 2.12+).
    Schedules,
    DuplicateWindow {
        from: std::time::Duration,
        to: std::time::Duration,
    },
    MaxMessageSize {
        from: i32,
        to: i32,
    },
    Replicas {
        from: usize,
        to: usize,
    },
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Change::Subjects(added) => write!(f, "subjects +{}", added.join(",")),
            Change::Schedules => f.write_str("allow_msg_schedules false -> true"),
            Change::DuplicateWindow { from, to } => write!(
                f,
                "duplicate_window {}s -> {}s",
                from.as_secs_f64(),
                to.as_secs_f64()
            ),
            Change::MaxMessageSize { from, to } => write!(f, "max_msg_size {from} -> {to}"),
            Change::Replicas { from, to } => write!(f, "replicas {from} -> {to}"),
        }
    }
}

/// What to send to bring a stream in line with its description: the stored configuration
/// with `changes` applied (empty: nothing to send).
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub config: stream::Config,
    pub changes: Vec<Change>,
}

fn retention(r: Retention) -> stream::RetentionPolicy {
    match r {
        Retention::WorkQueue => stream::RetentionPolicy::WorkQueue,
        Retention::Limits => stream::RetentionPolicy::Limits,
    }
}

fn storage(s: Storage) -> stream::StorageType {
    match s {
        Storage::File => stream::StorageType::File,
        Storage::Memory => stream::StorageType::Memory,
    }
}

/// A stream made with no replica count has one.
fn replicas(config: &stream::Config) -> usize {
    config.num_replicas.max(1)
}

/// How the stored configuration `found` must change to match `spec`, or what about it cannot.
pub fn reconcile(spec: &StreamSpec, found: &stream::Config) -> Result<Plan, Incompatible> {
    if found.retention != retention(spec.retention) {
        return Err(Incompatible::Retention {
            found: found.retention,
            wanted: retention(spec.retention),
        });
    }
    if found.storage != storage(spec.storage) {
        return Err(Incompatible::Storage {
            found: found.storage,
            wanted: storage(spec.storage),
        });
    }
    let mut config = found.clone();
    let mut changes = Vec::new();
    let missing: Vec<String> = spec
        .subjects
        .iter()
        .filter(|s| !found.subjects.iter().any(|f| f == *s))
        .map(|s| (*s).to_owned())
        .collect();
    if !missing.is_empty() {
        config.subjects.extend(missing.iter().cloned());
        changes.push(Change::Subjects(missing));
    }
    if spec.allow_msg_schedules && !found.allow_message_schedules {
        config.allow_message_schedules = true;
        changes.push(Change::Schedules);
    }
    if let Some(window) = spec.duplicate_window {
        if found.duplicate_window != window {
            config.duplicate_window = window;
            changes.push(Change::DuplicateWindow {
                from: found.duplicate_window,
                to: window,
            });
        }
    }
    if spec.max_msg_size.is_some() && found.max_message_size != spec.max_msg_size_i32() {
        config.max_message_size = spec.max_msg_size_i32();
        changes.push(Change::MaxMessageSize {
            from: found.max_message_size,
            to: spec.max_msg_size_i32(),
        });
    }
    if replicas(found) != spec.replicas {
        config.num_replicas = spec.replicas;
        changes.push(Change::Replicas {
            from: replicas(found),
            to: spec.replicas,
        });
    }
    Ok(Plan { config, changes })
}

/// The task stream as this worker makes it: [`StreamSpec::tasks`] with the duplicate window,
/// largest message and replicas of `config`.
pub fn task_spec(config: &Config) -> StreamSpec {
    StreamSpec {
        duplicate_window: Some(config.duplicate_window()),
        max_msg_size: Some(config.max_message_bytes),
        ..StreamSpec::tasks().with_replicas(config.stream_replicas)
    }
}

/// Whether to make a stream that does not exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Missing {
    Create,
    Leave,
}

impl Broker {
    /// Creates the task stream ([`task_spec`]), or brings an existing one in line with it (see
    /// the module's documentation); does the same to the dead-letter stream if it exists. The
    /// stream is read back and checked, because a server that does not know an option accepts
    /// it silently. Returns the task stream's info.
    pub async fn ensure_stream(&self, config: &Config) -> Result<stream::Info, BrokerError> {
        self.stream_replicas
            .store(config.stream_replicas, Ordering::Relaxed);
        let tasks = self
            .ensure(&task_spec(config), Missing::Create)
            .await?
            .ok_or_else(|| BrokerError::Stream {
                stream: dbtask_protocol::TASK_STREAM,
                url: self.url.clone(),
                source: Cause::said(
                    "the stream kept appearing and disappearing while it was being created",
                ),
            })?;
        let dead = StreamSpec::dead_letters().with_replicas(config.stream_replicas);
        self.ensure(&dead, Missing::Leave).await?;
        Ok(tasks)
    }

    /// `spec`'s stream, made (with `Missing::Create`) or brought in line; `None`: missing.
    async fn ensure(
        &self,
        spec: &StreamSpec,
        missing: Missing,
    ) -> Result<Option<stream::Info>, BrokerError> {
        let mut found = None;
        // Two rounds: the stream may appear between our look-up and our create.
        for _ in 0..2 {
            match self.js.get_stream(spec.name).await {
                Ok(existing) => {
                    found = Some(existing.cached_info().clone());
                    break;
                }
                Err(e) if is_stream_not_found(&e) => {}
                Err(e) => return Err(self.stream_error(spec, Cause::of(e))),
            }
            if missing == Missing::Leave {
                return Ok(None);
            }
            match self.js.create_stream(super::stream_config(spec)).await {
                Ok(created) => {
                    info!(
                        stream = spec.name,
                        replicas = spec.replicas,
                        url = self.url,
                        "created the stream"
                    );
                    let created = created.cached_info().clone();
                    self.check_applied(spec, &created.config)?;
                    return Ok(Some(created));
                }
                Err(e) if is_name_in_use(&e) => continue,
                Err(e) => return Err(self.create_error(spec, e)),
            }
        }
        let Some(found) = found else {
            return Ok(None);
        };
        let plan =
            reconcile(spec, &found.config).map_err(|reason| BrokerError::IncompatibleStream {
                stream: spec.name,
                url: self.url.clone(),
                reason,
            })?;
        if plan.changes.is_empty() {
            return Ok(Some(found));
        }
        let updated = self
            .js
            .update_stream(&plan.config)
            .await
            .map_err(|e| self.create_error(spec, e))?;
        let changed = plan
            .changes
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        let fewer = plan
            .changes
            .iter()
            .any(|c| matches!(c, Change::Replicas { from, to } if to < from));
        if fewer {
            // One worker started without the flag would take the cluster's copies away.
            warn!(
                stream = spec.name,
                url = self.url,
                changed,
                "updated the stream to this worker's settings, with FEWER replicas: a server lost now can lose tasks; give every worker (and client) the same --stream-replicas"
            );
        } else {
            info!(
                stream = spec.name,
                url = self.url,
                changed,
                "updated the stream to this worker's settings"
            );
        }
        self.check_applied(spec, &updated.config)?;
        Ok(Some(updated))
    }

    /// The server answers a create or an update with what it stored: anything of `spec` still
    /// missing there was silently ignored (an older server).
    fn check_applied(&self, spec: &StreamSpec, stored: &stream::Config) -> Result<(), BrokerError> {
        let incompatible = |reason| BrokerError::IncompatibleStream {
            stream: spec.name,
            url: self.url.clone(),
            reason,
        };
        let plan = reconcile(spec, stored).map_err(incompatible)?;
        if plan.changes.contains(&Change::Schedules) {
            return Err(incompatible(Incompatible::NoSchedules));
        }
        if !plan.changes.is_empty() {
            let kept = plan
                .changes
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ");
            return Err(incompatible(Incompatible::Kept(kept)));
        }
        Ok(())
    }

    fn stream_error(&self, spec: &StreamSpec, source: Cause) -> BrokerError {
        BrokerError::Stream {
            stream: spec.name,
            url: self.url.clone(),
            source,
        }
    }

    /// Also an update's error (async-nats' `UpdateStreamError` is the same type).
    fn create_error(
        &self,
        spec: &StreamSpec,
        e: jetstream::context::CreateStreamError,
    ) -> BrokerError {
        let code = match e.kind() {
            jetstream::context::CreateStreamErrorKind::JetStream(js) => Some(js.error_code()),
            _ => None,
        };
        self.replicas_or(spec, code, Cause::of(e))
    }

    /// A refused replica count says so, and what to do; anything else is a plain stream error.
    fn replicas_or(
        &self,
        spec: &StreamSpec,
        code: Option<jetstream::ErrorCode>,
        source: Cause,
    ) -> BrokerError {
        use jetstream::ErrorCode;
        let replicas_refused = spec.replicas > 1
            && code.is_some_and(|c| {
                c == ErrorCode::STREAM_REPLICAS_NOT_SUPPORTED
                    || c == ErrorCode::INSUFFICIENT_RESOURCES
                    || c == ErrorCode::CLUSTER_NO_PEERS
                    || c == ErrorCode::STREAM_REPLICAS_NOT_UPDATABLE
            });
        if replicas_refused {
            BrokerError::Replicas {
                stream: spec.name,
                url: self.url.clone(),
                replicas: spec.replicas,
                source,
            }
        } else {
            self.stream_error(spec, source)
        }
    }
}

fn is_stream_not_found(err: &jetstream::context::GetStreamError) -> bool {
    matches!(
        err.kind(),
        jetstream::context::GetStreamErrorKind::JetStream(e)
            if e.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
    )
}

fn is_name_in_use(err: &jetstream::context::CreateStreamError) -> bool {
    matches!(
        err.kind(),
        jetstream::context::CreateStreamErrorKind::JetStream(e)
            if e.error_code() == jetstream::ErrorCode::STREAM_NAME_EXIST
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn stored(spec: &StreamSpec) -> stream::Config {
        super::super::stream_config(spec)
    }

    #[test]
    fn a_stream_made_from_its_spec_needs_no_change() {
        for spec in [
            StreamSpec::tasks(),
            StreamSpec::tasks().with_replicas(3),
            StreamSpec::dead_letters(),
        ] {
            let plan = reconcile(&spec, &stored(&spec)).unwrap();
            assert_eq!(plan.changes, []);
        }
    }

    #[test]
    fn replicas_and_limits_change_in_place_and_other_settings_stay() {
        let mut found = stored(&StreamSpec::tasks());
        found.max_age = Duration::from_secs(3600);
        found.subjects.retain(|s| s != "dbtask.sched.>");
        found.allow_message_schedules = false;
        let spec = StreamSpec {
            duplicate_window: Some(Duration::from_secs(60)),
            ..StreamSpec::tasks().with_replicas(3)
        };
        let plan = reconcile(&spec, &found).unwrap();
        assert_eq!(
            plan.changes,
            [
                Change::Subjects(vec!["dbtask.sched.>".into()]),
                Change::Schedules,
                Change::DuplicateWindow {
                    from: Duration::from_secs(120),
                    to: Duration::from_secs(60)
                },
                Change::Replicas { from: 1, to: 3 },
            ]
        );
        assert_eq!(plan.config.num_replicas, 3);
        assert_eq!(plan.config.max_age, Duration::from_secs(3600), "kept");
        assert!(plan.config.allow_message_schedules);
        assert_eq!(
            plan.changes
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            "subjects +dbtask.sched.>, allow_msg_schedules false -> true, duplicate_window 120s -> 60s, replicas 1 -> 3"
        );
        // Scaling down is a change too; a stream made with no replica count has one.
        let mut r3 = stored(&StreamSpec::tasks().with_replicas(3));
        assert_eq!(
            reconcile(&StreamSpec::tasks(), &r3).unwrap().changes,
            [Change::Replicas { from: 3, to: 1 }]
        );
        r3.num_replicas = 0;
        assert_eq!(reconcile(&StreamSpec::tasks(), &r3).unwrap().changes, []);
    }

    #[test]
    fn the_dead_letter_stream_keeps_an_operators_limits() {
        let mut found = stored(&StreamSpec::dead_letters());
        found.max_message_size = 4096;
        found.duplicate_window = Duration::from_secs(30);
        assert_eq!(
            reconcile(&StreamSpec::dead_letters(), &found)
                .unwrap()
                .changes,
            []
        );
    }

    #[test]
    fn retention_and_storage_cannot_change() {
        let mut memory = stored(&StreamSpec::tasks());
        memory.storage = stream::StorageType::Memory;
        let err = reconcile(&StreamSpec::tasks(), &memory).unwrap_err();
        assert_eq!(
            err,
            Incompatible::Storage {
                found: stream::StorageType::Memory,
                wanted: stream::StorageType::File
            }
        );
        assert!(err.to_string().contains("storage cannot change"), "{err}");
        let mut limits = stored(&StreamSpec::tasks());
        limits.retention = stream::RetentionPolicy::Limits;
        let err = reconcile(&StreamSpec::tasks(), &limits).unwrap_err();
        assert!(err.to_string().contains("not WorkQueue"), "{err}");
    }
}
