//! The periodic schedules declared by the task modules, applied to the task stream at start
//! (each worker does it; unchanged schedules are left alone, changed ones replaced; a schedule
//! whose declaration was removed stays until `dbtask schedule remove`).

use dbtask_protocol::periodic::jetstream::{apply, check_version, Applied, ScheduleError};
use dbtask_protocol::periodic::{PeriodicError, PeriodicSpec};
use dbtask_protocol::TASK_STREAM;
use tracing::info;

use super::Broker;

/// Why the declared schedules could not be applied; the worker does not start.
#[derive(Debug, thiserror::Error)]
pub enum PeriodicSetupError {
    #[error("the periodic schedule {name:?} declared in the task modules is invalid: {source}")]
    Invalid {
        name: String,
        #[source]
        source: PeriodicError,
    },
    #[error("the task modules declare periodic schedules ({names}), but NATS at {url}: {reason}")]
    TooOld {
        names: String,
        url: String,
        reason: String,
    },
    #[error("cannot apply the periodic schedules on NATS at {url}: {source}")]
    Apply {
        url: String,
        #[source]
        source: ScheduleError,
    },
}

impl Broker {
    /// Checks every declaration (name, JSON), then creates or replaces the schedules that
    /// changed. Nothing happens, and no version is asked for, when there are none.
    pub async fn apply_schedules(
        &self,
        declared: &[(String, String)],
    ) -> Result<(), PeriodicSetupError> {
        if declared.is_empty() {
            return Ok(());
        }
        let specs = declared
            .iter()
            .map(|(name, json)| {
                PeriodicSpec::from_json(json).map_err(|source| PeriodicSetupError::Invalid {
                    name: name.clone(),
                    source,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if let Err(reason) = check_version(self.server_version()) {
            let names = declared
                .iter()
                .map(|(n, _)| n.as_str())
                .collect::<Vec<_>>()
                .join(", ");
            return Err(PeriodicSetupError::TooOld {
                names,
                url: self.url.clone(),
                reason,
            });
        }
        let failed = |source| PeriodicSetupError::Apply {
            url: self.url.clone(),
            source,
        };
        let stream = self.js.get_stream(TASK_STREAM).await.map_err(|e| {
            failed(ScheduleError::Nats {
                what: "read the task stream",
                source: e.into(),
            })
        })?;
        for spec in &specs {
            let applied = apply(&self.js, &stream, spec, self.message_key())
                .await
                .map_err(failed)?;
            if applied != Applied::Unchanged {
                info!(schedule = %spec.name, task = %spec.task, queue = %spec.queue, rule = %spec.rule.header(), ?applied, "periodic schedule applied");
            }
        }
        Ok(())
    }
}
