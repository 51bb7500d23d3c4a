//! Periodic tasks on the wire: a schedule is one NATS message schedule (ADR-51, nats-server
//! 2.14+) on `dbtask.sched.~periodic.<name>` whose body is a task message and whose headers
//! say when it fires and how its ticks are run; the server publishes one copy per tick to the
//! task's queue. This module owns the schedule's checks, its message (and reading it back),
//! the tick ids, the catch-up rule and the Redis keys; the client and the worker both use it.

#[cfg(feature = "nats")]
pub mod jetstream;
mod rule;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

pub use rule::{parse_next, tick_id, tick_time, Rule, DEFAULT_TZ};

use crate::{
    priority_subject, validate_queue, validate_task_name, TaskMessage, DEFAULT_PRIORITY,
    HEADER_SCHEDULE, HEADER_SCHEDULE_TARGET, MAX_PRIORITY,
};

/// Oldest nats-server with repeating (cron, `@every`) message schedules and their time zones.
pub const MIN_PERIODIC_NATS_VERSION: (u64, u64, u64) = (2, 14, 0);

/// Subjects of periodic schedules, inside the task stream's `dbtask.sched.>`: the `~` keeps
/// them apart from every queue's delayed tasks (`dbtask.sched.<queue>.<id>`; no queue name has
/// a `~`).
pub const PERIODIC_SUBJECT_PREFIX: &str = "dbtask.sched.~periodic";
/// Wildcard over every periodic schedule, to list them.
pub const PERIODIC_SUBJECT_WILDCARD: &str = "dbtask.sched.~periodic.>";

/// Header of the schedule and of each tick: the schedule's name.
pub const HEADER_PERIODIC: &str = "Dbtask-Periodic";
/// `latest` (the default: a tick delivered once its successor is due is skipped) or `all`.
pub const HEADER_CATCH_UP: &str = "Dbtask-Catch-Up";
/// Present when a tick must not start while the previous one runs: how many seconds the
/// running mark lasts at most (so that a lost worker cannot block the schedule forever).
pub const HEADER_SKIP_IF_RUNNING: &str = "Dbtask-Skip-If-Running";
/// Seconds after its tick time that a tick expires (REVOKED `dbtask.Expired` if later).
pub const HEADER_EXPIRES_AFTER: &str = "Dbtask-Expires-After";
/// The zone of a cron schedule (ADR-51, nats-server 2.14); never sent for `UTC`.
pub const HEADER_SCHEDULE_TIME_ZONE: &str = "Nats-Schedule-Time-Zone";
/// Set by the server on each tick: the subject of the schedule that fired it.
pub const HEADER_SCHEDULER: &str = "Nats-Scheduler";
/// Set by the server on each tick: when the schedule fires next (RFC 3339).
pub const HEADER_SCHEDULE_NEXT: &str = "Nats-Schedule-Next";

/// Longest schedule name: its tick ids (`<name>:tick:<time>`, 22 more characters) stay task ids.
pub const MAX_SCHEDULE_NAME_LEN: usize = 100;

/// The subject holding the schedule `name`.
pub fn periodic_subject(name: &str) -> String {
    format!("{PERIODIC_SUBJECT_PREFIX}.{name}")
}

/// Redis hash of what the workers saw of schedule `name`: `last_id`, `last_at`, `next_at`.
/// Every key of a schedule carries the hash tag `{periodic:<name>}`: the script that admits a
/// tick touches three of them, which must hash to one Redis Cluster slot.
pub fn periodic_key(name: &str) -> String {
    format!("dbtask:{{periodic:{name}}}")
}

/// Redis key holding the tick id of schedule `name` that runs now (`skip_if_running`).
pub fn periodic_running_key(name: &str) -> String {
    format!("dbtask:{{periodic:{name}}}:running")
}

/// Redis key claiming tick `tick_id` of schedule `name` for the delivered message (its
/// stream sequence) that runs it.
pub fn tick_claim_key(name: &str, tick_id: &str) -> String {
    format!("dbtask:{{periodic:{name}}}:tick:{tick_id}")
}

/// What a tick delivered late does (`catch_up=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CatchUp {
    /// Only the latest missed tick runs: one delivered once its successor was due is skipped.
    #[default]
    Latest,
    /// Every tick runs, however late.
    All,
}

impl CatchUp {
    pub fn as_str(self) -> &'static str {
        match self {
            CatchUp::Latest => "latest",
            CatchUp::All => "all",
        }
    }

    fn parse(value: &str) -> Result<CatchUp, PeriodicError> {
        match value {
            "latest" => Ok(CatchUp::Latest),
            "all" => Ok(CatchUp::All),
            other => Err(PeriodicError::CatchUp(other.to_owned())),
        }
    }
}

/// Why a schedule was refused; the message is the `ValueError` a caller sees.
#[derive(Debug, thiserror::Error)]
pub enum PeriodicError {
    #[error("invalid schedule name {0:?}: use 1 to 100 characters among A-Z a-z 0-9 _ - and single dots inside")]
    Name(String),
    #[error("every must be a whole number of seconds, 1 or more, not {0}")]
    Every(f64),
    #[error("invalid cron {0:?}: {1}")]
    Cron(String, String),
    #[error("unknown time zone {0:?}: use an IANA name such as \"Europe/Paris\" or \"UTC\"")]
    Tz(String),
    #[error("{0}")]
    Rule(&'static str),
    #[error("catch_up must be \"latest\" or \"all\", not {0:?}")]
    CatchUp(String),
    #[error("{0} must be a whole number of seconds, 1 or more")]
    Seconds(&'static str),
    #[error("{0}")]
    Signature(#[from] crate::ProtocolError),
    #[error("priority must be 0 to {MAX_PRIORITY}, not {0}")]
    Priority(u8),
    #[error("not a schedule declaration: {0}")]
    Json(#[source] serde_json::Error),
    #[error("the stored schedule cannot be read: {0}")]
    Stored(String),
}

/// A schedule as the Python side hands it over (JSON), before its checks.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Declaration {
    name: String,
    task: String,
    #[serde(default)]
    args: Option<Box<RawValue>>,
    #[serde(default)]
    kwargs: Option<Box<RawValue>>,
    #[serde(default)]
    queue: Option<String>,
    #[serde(default)]
    priority: Option<u8>,
    #[serde(default)]
    every: Option<f64>,
    #[serde(default)]
    cron: Option<String>,
    #[serde(default)]
    tz: Option<String>,
    #[serde(default)]
    expires: Option<f64>,
    #[serde(default)]
    catch_up: Option<String>,
    #[serde(default)]
    skip_if_running: Option<f64>,
}

/// A checked schedule: what it sends, when, and how its ticks run.
#[derive(Debug, Clone, PartialEq)]
pub struct PeriodicSpec {
    pub name: String,
    pub task: String,
    /// JSON array text.
    pub args: String,
    /// JSON object text.
    pub kwargs: String,
    pub queue: String,
    pub priority: Option<u8>,
    pub rule: Rule,
    /// Seconds after its tick that a tick expires.
    pub expires: Option<u64>,
    pub catch_up: CatchUp,
    /// Seconds the running mark lasts at most; `None`: ticks may overlap.
    pub skip_if_running: Option<u64>,
}

/// The schedule's listing for `schedules()`, as JSON for the Python side.
#[derive(Debug, Serialize)]
pub struct Listing<'a> {
    pub name: &'a str,
    pub task: &'a str,
    pub args: &'a RawValue,
    pub kwargs: &'a RawValue,
    pub queue: &'a str,
    pub priority: Option<u8>,
    pub every: Option<u64>,
    pub cron: Option<&'a str>,
    pub tz: &'a str,
    pub expires: Option<u64>,
    pub catch_up: &'static str,
    pub skip_if_running: Option<u64>,
    pub next_run: Option<f64>,
    pub last_run_id: Option<&'a str>,
    pub last_run_at: Option<f64>,
}

fn whole_seconds(value: Option<f64>, what: &'static str) -> Result<Option<u64>, PeriodicError> {
    match value {
        None => Ok(None),
        Some(v) if v.is_finite() && v >= 1.0 && v.fract() == 0.0 && v <= 1e9 => Ok(Some(v as u64)),
        Some(_) => Err(PeriodicError::Seconds(what)),
    }
}

/// Schedule names become subject tokens and Redis keys: a safe alphabet, dots only between
/// non-empty parts.
pub fn validate_schedule_name(name: &str) -> Result<(), PeriodicError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_SCHEDULE_NAME_LEN
        && name.split('.').all(|part| {
            !part.is_empty()
                && part
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'))
        });
    if ok {
        Ok(())
    } else {
        Err(PeriodicError::Name(name.to_owned()))
    }
}

fn json_text(
    value: Option<Box<RawValue>>,
    open: char,
    what: &str,
) -> Result<String, PeriodicError> {
    let text = value.map_or_else(
        || {
            if open == '[' {
                "[]".into()
            } else {
                "{}".into()
            }
        },
        |v| v.get().to_owned(),
    );
    if !text.trim_start().starts_with(open) {
        return Err(PeriodicError::Stored(format!(
            "`{what}` has the wrong JSON type"
        )));
    }
    Ok(text)
}

impl PeriodicSpec {
    /// Reads and checks a declaration (the JSON the Python side builds).
    pub fn from_json(json: &str) -> Result<PeriodicSpec, PeriodicError> {
        let d: Declaration = serde_json::from_str(json).map_err(PeriodicError::Json)?;
        validate_schedule_name(&d.name)?;
        validate_task_name(&d.task)?;
        let queue = d.queue.unwrap_or_else(|| "default".to_owned());
        validate_queue(&queue)?;
        if let Some(p) = d.priority.filter(|p| *p > MAX_PRIORITY) {
            return Err(PeriodicError::Priority(p));
        }
        let catch_up = CatchUp::parse(d.catch_up.as_deref().unwrap_or("latest"))?;
        Ok(PeriodicSpec {
            rule: Rule::new(d.every, d.cron.as_deref(), d.tz.as_deref())?,
            args: json_text(d.args, '[', "args")?,
            kwargs: json_text(d.kwargs, '{', "kwargs")?,
            name: d.name,
            task: d.task,
            queue,
            priority: d.priority.filter(|p| *p != DEFAULT_PRIORITY),
            expires: whole_seconds(d.expires, "expires")?,
            catch_up,
            skip_if_running: whole_seconds(d.skip_if_running, "skip_if_running")?,
        })
    }

    /// The subject holding this schedule.
    pub fn subject(&self) -> String {
        periodic_subject(&self.name)
    }

    /// The subject its ticks go to: the queue at the schedule's priority level.
    pub fn target(&self) -> String {
        priority_subject(&self.queue, self.priority.unwrap_or(DEFAULT_PRIORITY))
    }

    /// The schedule message's headers: when and where it fires, then [`Self::tick_headers`].
    /// No `Nats-Msg-Id`: the server copies none to the ticks anyway, and a replaced schedule
    /// must not be dropped as a duplicate.
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        let mut headers = vec![
            (HEADER_SCHEDULE, self.rule.header()),
            (HEADER_SCHEDULE_TARGET, self.target()),
        ];
        if let Rule::Cron { tz, .. } = &self.rule {
            if tz != DEFAULT_TZ {
                headers.push((HEADER_SCHEDULE_TIME_ZONE, tz.clone()));
            }
        }
        headers.extend(self.tick_headers());
        headers
    }

    /// The headers each tick carries (the server copies them from the schedule): its name and
    /// how its ticks run.
    pub fn tick_headers(&self) -> Vec<(&'static str, String)> {
        let mut headers = vec![
            (HEADER_PERIODIC, self.name.clone()),
            (HEADER_CATCH_UP, self.catch_up.as_str().to_owned()),
        ];
        if let Some(secs) = self.skip_if_running {
            headers.push((HEADER_SKIP_IF_RUNNING, secs.to_string()));
        }
        if let Some(secs) = self.expires {
            headers.push((HEADER_EXPIRES_AFTER, secs.to_string()));
        }
        headers
    }

    /// The task message every tick carries. Its id is the schedule's own (`<name>:tick`);
    /// the worker gives each tick its [`tick_id`].
    pub fn message(&self, id: String) -> TaskMessage {
        let raw = |s: &str| RawValue::from_string(s.to_owned()).expect("checked JSON");
        TaskMessage {
            queue: Some(self.queue.clone()),
            priority: self.priority,
            ..TaskMessage::new(id, self.task.clone(), raw(&self.args), raw(&self.kwargs))
        }
    }

    /// The body of the schedule message.
    pub fn body(&self) -> Vec<u8> {
        self.message(format!("{}:tick", self.name)).encode()
    }

    /// Reads a stored schedule message back (`header` looks a header up by name).
    pub fn from_stored<'h>(
        header: impl Fn(&str) -> Option<&'h str>,
        body: &[u8],
    ) -> Result<PeriodicSpec, PeriodicError> {
        let stored = |what: &str| PeriodicError::Stored(format!("it has no {what} header"));
        let name = header(HEADER_PERIODIC).ok_or_else(|| stored(HEADER_PERIODIC))?;
        let rule = header(HEADER_SCHEDULE).ok_or_else(|| stored(HEADER_SCHEDULE))?;
        let msg = TaskMessage::decode(body).map_err(|e| PeriodicError::Stored(e.to_string()))?;
        let number = |h: &str| header(h).and_then(|v| v.parse::<u64>().ok());
        Ok(PeriodicSpec {
            name: name.to_owned(),
            rule: Rule::from_header(rule, header(HEADER_SCHEDULE_TIME_ZONE))?,
            args: msg.args.get().to_owned(),
            kwargs: msg.kwargs.get().to_owned(),
            queue: msg.queue.clone().unwrap_or_else(|| "default".to_owned()),
            priority: msg.priority,
            task: msg.task,
            expires: number(HEADER_EXPIRES_AFTER),
            catch_up: CatchUp::parse(header(HEADER_CATCH_UP).unwrap_or("latest"))?,
            skip_if_running: number(HEADER_SKIP_IF_RUNNING),
        })
    }

    /// The listing of this schedule, with its next run and the last tick the workers saw.
    pub fn listing<'a>(
        &'a self,
        next_run: Option<f64>,
        last: (Option<&'a str>, Option<f64>),
    ) -> Listing<'a> {
        let raw = |s: &'a str| -> &'a RawValue { serde_json::from_str(s).expect("checked JSON") };
        let (every, cron, tz) = match &self.rule {
            Rule::Every(secs) => (Some(*secs), None, DEFAULT_TZ),
            Rule::Cron { pattern, tz } => (None, Some(pattern.as_str()), tz.as_str()),
        };
        Listing {
            name: &self.name,
            task: &self.task,
            args: raw(&self.args),
            kwargs: raw(&self.kwargs),
            queue: &self.queue,
            priority: self.priority,
            every,
            cron,
            tz,
            expires: self.expires,
            catch_up: self.catch_up.as_str(),
            skip_if_running: self.skip_if_running,
            next_run,
            last_run_id: last.0,
            last_run_at: last.1,
        }
    }
}

/// Whether a tick whose successor is due at `next` (from `Nats-Schedule-Next`) is skipped when
/// delivered at `now`: with [`CatchUp::Latest`], a tick delivered once its successor is due
/// has been overtaken (the successor is in the stream, or arrives at once), so only the latest
/// of the ticks missed while no worker ran goes on to run.
pub fn tick_is_overtaken(catch_up: CatchUp, next: Option<f64>, now: f64) -> bool {
    catch_up == CatchUp::Latest && next.is_some_and(|next| next <= now)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: &str) -> Result<PeriodicSpec, PeriodicError> {
        PeriodicSpec::from_json(json)
    }

    #[test]
    fn a_declaration_becomes_the_schedule_message_and_reads_back() {
        let s = spec(r#"{"name": "reports.daily", "task": "app.report", "args": [1, "x"], "kwargs": {"a": null},
            "queue": "q", "priority": 7, "cron": "0 9 * * *", "tz": "Europe/Paris", "expires": 60,
            "skip_if_running": 3600}"#).unwrap();
        assert_eq!(s.subject(), "dbtask.sched.~periodic.reports.daily");
        assert_eq!(s.target(), "dbtask.tasks.q.p7");
        let headers = s.headers();
        let get = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(get(HEADER_SCHEDULE), Some("0 0 9 * * *"));
        assert_eq!(get(HEADER_SCHEDULE_TIME_ZONE), Some("Europe/Paris"));
        assert_eq!(get(HEADER_SCHEDULE_TARGET), Some("dbtask.tasks.q.p7"));
        assert_eq!(get(HEADER_SKIP_IF_RUNNING), Some("3600"));
        let body = s.body();
        let msg = TaskMessage::decode(&body).unwrap();
        assert_eq!(
            (msg.id.as_str(), msg.args.get()),
            ("reports.daily:tick", r#"[1, "x"]"#)
        );
        assert_eq!(PeriodicSpec::from_stored(get, &body).unwrap(), s);
    }

    #[test]
    fn every_in_utc_sends_no_zone_and_defaults_hold() {
        let s = spec(r#"{"name": "tick", "task": "t", "every": 1}"#).unwrap();
        assert_eq!(
            (s.queue.as_str(), s.catch_up, s.skip_if_running),
            ("default", CatchUp::Latest, None)
        );
        assert!(s
            .headers()
            .iter()
            .all(|(n, _)| *n != HEADER_SCHEDULE_TIME_ZONE));
        assert_eq!(s.target(), "dbtask.tasks.default");
    }

    #[test]
    fn bad_declarations_say_why() {
        for (json, says) in [
            (
                r#"{"name": "a b", "task": "t", "every": 1}"#,
                "invalid schedule name",
            ),
            (
                r#"{"name": "a..b", "task": "t", "every": 1}"#,
                "invalid schedule name",
            ),
            (
                r#"{"name": "a", "task": "t", "every": 1, "queue": "bad q"}"#,
                "invalid queue name",
            ),
            (
                r#"{"name": "a", "task": "t", "every": 0}"#,
                "whole number of seconds",
            ),
            (
                r#"{"name": "a", "task": "t", "every": 1, "catch_up": "some"}"#,
                "catch_up",
            ),
            (
                r#"{"name": "a", "task": "t", "every": 1, "skip_if_running": 0.5}"#,
                "skip_if_running",
            ),
            (
                r#"{"name": "a", "task": "t", "every": 1, "priority": 12}"#,
                "priority",
            ),
            (
                r#"{"name": "a", "task": "t", "every": 1, "colour": 1}"#,
                "unknown field",
            ),
        ] {
            let err = spec(json).unwrap_err().to_string();
            assert!(err.contains(says), "{json}: {err}");
        }
    }

    #[test]
    fn only_the_latest_missed_tick_runs_unless_all_are_kept() {
        assert!(tick_is_overtaken(CatchUp::Latest, Some(10.0), 10.5));
        assert!(!tick_is_overtaken(CatchUp::Latest, Some(10.0), 9.99));
        assert!(!tick_is_overtaken(CatchUp::All, Some(10.0), 50.0));
        // A tick fired by `dbtask schedule run` has no successor.
        assert!(!tick_is_overtaken(CatchUp::Latest, None, 50.0));
    }
}
