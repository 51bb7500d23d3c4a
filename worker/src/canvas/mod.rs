//! Workflows in the worker: what happens after a task that carries a chain, a chord membership
//! or callbacks reaches its final state.
//!
//! Called by the handler after the outcome is stored and before the ack. Everything here is
//! safe to repeat (a crash before the ack redelivers the message, which runs this again):
//! - publishes carry `Nats-Msg-Id` = the next task's id, assigned by the client up front, so
//!   JetStream drops a second publish inside its duplicate window;
//! - a chord member stores its result in its own slot of `dbtask:{chord:<id>}` (a redelivery
//!   overwrites it, never counts twice); the member whose write completes the hash and wins
//!   `SET dbtask:{chord:<id>}:fired <index> NX` publishes the callback (it, or a redelivery of
//!   the same member, and nobody else);
//! - failure records are plain overwrites of the same keys.
//!
//! A task without workflow fields never gets here: no extra Redis round trip on the hot path.

use std::time::Duration;

use bytes::Bytes;
use dbtask_protocol::canvas::{expand, prepend_args, Carry, Expanded, CHORD_ERROR};
use dbtask_protocol::{
    error_types, now_unix, ChordRef, ResultRecord, Route, Signature, TaskError, TaskMessage,
    TaskState, Trace,
};
use serde_json::value::RawValue;
use tracing::{debug, error, info, warn};

use crate::broker::{task_header_map, BatchError, Broker, Outgoing};
use crate::record::Origin;
use crate::store::{Store, Writer};

/// How many times a publish is tried before the message is handed back to NATS.
const PUBLISH_ATTEMPTS: u32 = 3;

/// The workflow fields of a task message, taken out before the task runs.
#[derive(Debug, Default)]
pub struct Flow {
    chain: Vec<Signature>,
    chord: Option<ChordRef>,
    link: Vec<Signature>,
    link_error: Vec<Signature>,
    /// The workflow's first task (`None`: this task is).
    root_id: Option<String>,
}

impl Flow {
    /// A copy of the workflow fields of `msg` (which keeps them, e.g. for a retry's
    /// republish); `None` for a plain task.
    pub fn of(msg: &TaskMessage) -> Option<Flow> {
        if msg.chain.is_empty()
            && msg.chord.is_none()
            && msg.link.is_empty()
            && msg.link_error.is_empty()
        {
            return None;
        }
        Some(Flow {
            chain: msg.chain.clone(),
            chord: msg.chord.clone(),
            link: msg.link.clone(),
            link_error: msg.link_error.clone(),
            root_id: msg.root_id.clone(),
        })
    }
}

/// Why the workflow step could not be completed now (the message is handed back and retried).
#[derive(Debug, thiserror::Error)]
pub enum CanvasError {
    #[error("cannot publish a workflow step: {0}")]
    Publish(#[from] BatchError),
    #[error("the result writer has stopped")]
    Stopped,
}

/// What the workflow code needs from the worker.
pub struct Canvas<'a> {
    pub broker: &'a Broker,
    pub store: &'a Store,
    pub writer: &'a Writer,
    pub result_ttl: u64,
    /// Largest message to publish (`max_message_bytes`).
    pub max_message_bytes: usize,
    /// The trace context the next steps carry (OpenTelemetry on): the finished task's span.
    pub trace: Option<&'a Trace>,
}

impl Canvas<'_> {
    /// Runs the workflow after `record` (SUCCESS, FAILURE or REVOKED) was stored for the task.
    /// Other states (a retry scheduled) leave the workflow riding in the message.
    pub async fn after(&self, flow: &Flow, record: &ResultRecord) -> Result<(), CanvasError> {
        let now = now_unix();
        let mut out = Expanded::default();
        let mut failures: Vec<ResultRecord> = Vec::new();
        match record.state {
            TaskState::Success => {
                let null = RawValue::from_string("null".to_owned()).expect("literal JSON");
                let result: &RawValue = record.result.as_deref().unwrap_or(&null);
                if let Some((next, rest)) = flow.chain.split_first() {
                    let carry = Carry {
                        chain: rest.to_vec(),
                        chord: flow.chord.clone(),
                    };
                    if let Err(e) = expand(next, Some(result), carry, now, &mut out) {
                        let err = TaskError::new(
                            error_types::MALFORMED,
                            format!("the next step of the chain cannot be published: {e}"),
                        );
                        self.fail_chain(flow, record, &err, &mut failures);
                    }
                } else if let Some(chord) = &flow.chord {
                    if let Some(results) = self.count_member(chord, result).await {
                        info!(chord_id = %chord.id, size = chord.size, task_id = %record.id, "chord complete: publishing its callback");
                        let carry = Carry {
                            chain: Vec::new(),
                            chord: chord.outer.as_deref().cloned(),
                        };
                        if let Err(e) =
                            expand(&chord.callback, Some(&results), carry, now, &mut out)
                        {
                            let err = TaskError::new(
                                error_types::MALFORMED,
                                format!("the chord callback cannot be published: {e}"),
                            );
                            fail_chord(chord, record, &err, &mut failures);
                        }
                    }
                }
                for link in &flow.link {
                    if let Err(e) = expand(link, Some(result), Carry::default(), now, &mut out) {
                        warn!(task_id = %record.id, error = %e, "dropping a link callback that cannot be published");
                    }
                }
            }
            TaskState::Failure | TaskState::Revoked => {
                let error = record.error.clone().unwrap_or_else(|| {
                    TaskError::new(
                        "dbtask.TaskRevoked",
                        format!("task {} was revoked", record.id),
                    )
                });
                self.fail_chain(flow, record, &error, &mut failures);
                if let Some(chord) = &flow.chord {
                    fail_chord(chord, record, &error, &mut failures);
                }
                let id_json = serde_json::to_string(&record.id).expect("a string serializes");
                let err_json = serde_json::to_string(&error).expect("an error serializes");
                let id_raw = RawValue::from_string(id_json).expect("JSON");
                let err_raw = RawValue::from_string(err_json).expect("JSON");
                for callback in &flow.link_error {
                    let mut callback = callback.clone();
                    if !callback.options.immutable {
                        callback.args = prepend_args(&[&id_raw, &err_raw], &callback.args);
                        callback.options.immutable = true;
                    }
                    if let Err(e) = expand(&callback, None, Carry::default(), now, &mut out) {
                        warn!(task_id = %record.id, error = %e, "dropping a link_error callback that cannot be published");
                    }
                }
            }
            _ => return Ok(()),
        }
        // What each next task's request says of where it comes from.
        let root = flow.root_id.as_deref().unwrap_or(&record.id);
        for next in &mut out.messages {
            next.parent_id = Some(record.id.clone());
            next.root_id = Some(root.to_owned());
        }
        self.refuse_oversized(&mut out, record, &mut failures);
        for failure in &failures {
            debug!(task_id = %failure.id, cause = %record.id, "recording a workflow failure");
            self.writer
                .write(failure)
                .await
                .map_err(|_| CanvasError::Stopped)?;
        }
        self.publish(out).await
    }

    /// A failed step stops the chain: the chain's result (its last step's outcome) records the
    /// same error, so that `get()` on it raises instead of waiting forever.
    fn fail_chain(
        &self,
        flow: &Flow,
        record: &ResultRecord,
        error: &TaskError,
        failures: &mut Vec<ResultRecord>,
    ) {
        let Some(last) = flow.chain.last() else {
            return;
        };
        for id in last.final_ids() {
            failures.push(Origin::workflow(record.worker.as_deref()).ended(
                id,
                None,
                TaskState::Failure,
                0,
                error.clone(),
            ));
        }
        // The chord this chain belongs to can never complete either.
        if let Some(chord) = &flow.chord {
            fail_chord(chord, record, error, failures);
        }
    }

    /// Stores this member's result; the ordered results when the chord is complete and this
    /// member fires it.
    async fn count_member(&self, chord: &ChordRef, result: &RawValue) -> Option<Box<RawValue>> {
        if chord.index >= chord.size {
            // Only a hand-made message can say this; counting it would corrupt the chord.
            error!(chord_id = %chord.id, index = chord.index, size = chord.size, "chord member index out of range: not counted");
            return None;
        }
        let reply = self
            .store
            .count_chord_member(chord, result.get(), self.result_ttl.max(1))
            .await;
        let results = reply?;
        let mut list = Vec::with_capacity(results.iter().map(|r| r.len() + 1).sum::<usize>() + 2);
        list.push(b'[');
        for (i, r) in results.iter().enumerate() {
            if i > 0 {
                list.push(b',');
            }
            list.extend_from_slice(r);
        }
        list.push(b']');
        match String::from_utf8(list).map(RawValue::from_string) {
            Ok(Ok(raw)) => Some(raw),
            _ => {
                error!(chord_id = %chord.id, "the stored chord results are not JSON: the callback cannot run");
                None
            }
        }
    }

    /// A next step whose message would be larger than `max_message_bytes` (a chord's callback
    /// with many large results, say) is not published: its result, and its chain's, records
    /// `dbtask.TooLarge` instead of the message being refused forever.
    fn refuse_oversized(
        &self,
        out: &mut Expanded,
        record: &ResultRecord,
        failures: &mut Vec<ResultRecord>,
    ) {
        let limit = self.max_message_bytes;
        let (fits, too_big): (Vec<TaskMessage>, Vec<TaskMessage>) =
            std::mem::take(&mut out.messages)
                .into_iter()
                .partition(|m| m.encode().len() <= limit);
        out.messages = fits;
        for m in too_big {
            let why = format!(
                "workflow step {} ({}) after task {} would be a message of more than max_message_bytes ({limit}): return smaller results, or store them elsewhere and return references",
                m.id, m.task, record.id
            );
            warn!(task_id = %m.id, task = %m.task, cause = %record.id, "workflow step too large to publish");
            let error = TaskError::new(error_types::TOO_LARGE, why);
            let mut ids = vec![m.id.clone()];
            if let Some(last) = m.chain.last() {
                ids.extend(last.final_ids());
            }
            for id in ids {
                failures.push(Origin::workflow(record.worker.as_deref()).ended(
                    id,
                    Some(&m.task),
                    TaskState::Failure,
                    0,
                    error.clone(),
                ));
            }
            if let Some(chord) = &m.chord {
                let member = Origin::workflow(record.worker.as_deref()).record(
                    m.id.clone(),
                    Some(&m.task),
                    TaskState::Failure,
                    0,
                );
                fail_chord(chord, &member, &error, failures);
            }
        }
    }

    /// Records the groups, then publishes every message (all sent, then all confirmed).
    async fn publish(&self, out: Expanded) -> Result<(), CanvasError> {
        if !out.groups.is_empty() {
            self.store
                .record_groups(&out.groups, self.result_ttl.max(1))
                .await;
        }
        if out.messages.is_empty() {
            return Ok(());
        }
        let routes: Vec<Route> = out.routes(now_unix()).collect();
        let batch: Vec<Outgoing> = out
            .messages
            .iter()
            .zip(routes)
            .map(|(m, route)| {
                let mut headers = task_header_map(m, &route, &m.id);
                dbtask_protocol::nats::add_trace(&mut headers, self.trace);
                Outgoing {
                    id: m.id.clone(),
                    subject: route.subject,
                    headers,
                    body: Bytes::from(m.encode()),
                }
            })
            .collect();
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.broker.publish_batch(&batch).await {
                Ok(()) => return Ok(()),
                Err(e) if attempt < PUBLISH_ATTEMPTS => {
                    warn!(error = %e, attempt, "cannot publish a workflow step; trying again");
                    tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// A member failed: the chord's callback never runs and its result (and that of every chord
/// it is itself a member of) records a `dbtask.ChordError` naming the member.
fn fail_chord(
    chord: &ChordRef,
    record: &ResultRecord,
    error: &TaskError,
    failures: &mut Vec<ResultRecord>,
) {
    let message = format!(
        "chord {} failed: member {} (task {}, id {}) raised {}: {}",
        chord.id,
        chord.index,
        record.task.as_deref().unwrap_or("?"),
        record.id,
        error.exc_type,
        error.message
    );
    let mut current = Some(chord);
    while let Some(c) = current {
        for id in c.callback.final_ids() {
            failures.push(Origin::workflow(record.worker.as_deref()).ended(
                id,
                None,
                TaskState::Failure,
                0,
                TaskError {
                    exc_type: CHORD_ERROR.to_owned(),
                    message: message.clone(),
                    traceback: error.traceback.clone(),
                },
            ));
        }
        current = c.outer.as_deref();
    }
}
