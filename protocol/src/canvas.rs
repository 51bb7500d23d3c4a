//! Workflows on the wire: signatures (a task call as plain data), chains, groups and chords.
//!
//! A workflow is a tree of [`Signature`]s whose every task node already has its id (the client
//! assigns them all up front, so every result handle is known before anything runs and every
//! later publish can be deduplicated by `Nats-Msg-Id`). [`expand`] turns a signature into the
//! task messages to publish now; the rest of the workflow rides inside those messages
//! (`chain`: the steps after this one, `chord`: the chord this task completes a member of,
//! `link` / `link_error`: callbacks) and is expanded by the worker that finishes the task.
//!
//! The same [`expand`] runs in the client (first publish) and in the worker (next steps), so
//! both agree on what a workflow becomes.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::{
    validate_queue, validate_task_id, validate_task_name, ProtocolError, Route, TaskMessage,
    MAX_PRIORITY, PROTOCOL_VERSION,
};

/// Queue of a signature that names none.
pub const DEFAULT_QUEUE: &str = "default";

/// Redis key prefix of chord counters: `dbtask:{chord:<chord id>}` is a hash `member index ->
/// result JSON`; `dbtask:{chord:<chord id>}:fired` holds the index of the member that fired it.
/// The braces are a Redis Cluster hash tag: the chord's script touches both keys, so they
/// must hash to one slot.
pub const CHORD_KEY_PREFIX: &str = "dbtask:{chord:";
/// Redis key prefix of groups: `dbtask:{group:<group id>}` holds the JSON list of the members'
/// result ids (a nested list for a member that is itself a group).
pub const GROUP_KEY_PREFIX: &str = "dbtask:{group:";

/// Error type recorded on a chord's result when one of its members failed.
pub const CHORD_ERROR: &str = "dbtask.ChordError";

pub fn chord_key(chord_id: &str) -> String {
    format!("{CHORD_KEY_PREFIX}{chord_id}}}")
}

pub fn chord_fired_key(chord_id: &str) -> String {
    format!("{CHORD_KEY_PREFIX}{chord_id}}}:fired")
}

pub fn group_key(group_id: &str) -> String {
    format!("{GROUP_KEY_PREFIX}{group_id}}}")
}

/// What a signature stands for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// One task call.
    #[default]
    Task,
    /// `steps` one after the other, each result prepended to the next step's arguments.
    Chain,
    /// `members` in parallel.
    Group,
    /// `members` in parallel, then `body` with the ordered list of their results.
    Chord,
}

impl Kind {
    fn is_task(&self) -> bool {
        *self == Kind::Task
    }
}

/// Options of a signature.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SignatureOptions {
    /// Queue to publish to (a task signature records its task's queue).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    /// Run no earlier than this many seconds after being published.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub countdown: Option<f64>,
    /// Priority (kept with the signature; queues decide what it means).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u8>,
    /// The task id (task signatures) or the group / chord id, assigned by the client.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
    /// Immutable (`si`): the parent's result is not prepended.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub immutable: bool,
}

fn empty_array() -> Box<RawValue> {
    RawValue::from_string("[]".to_owned()).expect("literal JSON")
}

fn empty_object() -> Box<RawValue> {
    RawValue::from_string("{}".to_owned()).expect("literal JSON")
}

fn is_empty_array(v: &RawValue) -> bool {
    v.get().trim() == "[]"
}

fn is_empty_object(v: &RawValue) -> bool {
    v.get().trim() == "{}"
}

/// A task call, chain, group or chord as plain JSON data.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Signature {
    #[serde(default, skip_serializing_if = "Kind::is_task")]
    pub kind: Kind,
    /// Registered task name (task signatures).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub task: String,
    #[serde(default = "empty_array", skip_serializing_if = "is_empty_array")]
    pub args: Box<RawValue>,
    #[serde(default = "empty_object", skip_serializing_if = "is_empty_object")]
    pub kwargs: Box<RawValue>,
    #[serde(default)]
    pub options: SignatureOptions,
    /// Chain steps.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<Signature>,
    /// Group members, chord header.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<Signature>,
    /// Chord callback.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<Box<Signature>>,
    /// Published with this task's result when it succeeds (task signatures).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub link: Vec<Signature>,
    /// Published with `(task id, error)` when it fails (task signatures).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub link_error: Vec<Signature>,
}

impl Signature {
    /// The id this signature's result is read from (task id, group id or chord id).
    pub fn id(&self) -> Option<&str> {
        self.options.task_id.as_deref()
    }

    /// Ids of the tasks whose records hold this signature's outcome: the task itself, a chain's
    /// last step, a chord's callback, every member of a group.
    pub fn final_ids(&self) -> Vec<String> {
        let mut out = Vec::new();
        self.collect_final_ids(&mut out);
        out
    }

    fn collect_final_ids(&self, out: &mut Vec<String>) {
        match self.kind {
            Kind::Task => out.extend(self.options.task_id.clone()),
            Kind::Chain => {
                if let Some(last) = self.steps.last() {
                    last.collect_final_ids(out)
                }
            }
            Kind::Group => self.members.iter().for_each(|m| m.collect_final_ids(out)),
            Kind::Chord => {
                if let Some(body) = &self.body {
                    body.collect_final_ids(out)
                }
            }
        }
    }

    /// What `dbtask:{group:<id>}` stores for a member: its result id, or the list of a nested
    /// group's.
    fn result_ref(&self) -> serde_json::Value {
        match self.kind {
            Kind::Task => serde_json::Value::from(self.options.task_id.clone().unwrap_or_default()),
            Kind::Chain => self
                .steps
                .last()
                .map(Signature::result_ref)
                .unwrap_or_default(),
            Kind::Group => self.members.iter().map(Signature::result_ref).collect(),
            Kind::Chord => self
                .body
                .as_deref()
                .map(Signature::result_ref)
                .unwrap_or_default(),
        }
    }
}

/// The chord a task completes a member of (carried along a member's chain to its last step).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChordRef {
    /// The chord id (the key of its counter).
    pub id: String,
    /// This member's position in the header.
    pub index: u32,
    /// Members in the header.
    pub size: u32,
    /// Published once every member succeeded, with the ordered list of their results.
    pub callback: Signature,
    /// The chord this chord is itself a member of, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outer: Option<Box<ChordRef>>,
}

/// The workflow a task message carries on to what comes after it.
#[derive(Debug, Clone, Default)]
pub struct Carry {
    pub chain: Vec<Signature>,
    pub chord: Option<ChordRef>,
}

/// What expanding a signature gives: messages to publish now, and groups to record first.
#[derive(Debug, Default)]
pub struct Expanded {
    pub messages: Vec<TaskMessage>,
    /// `(group id, JSON list of member result ids)` for `dbtask:{group:<id>}`.
    pub groups: Vec<(String, String)>,
}

impl Expanded {
    /// Where each message goes (its priority level, or a message schedule), in order.
    pub fn routes(&self, now: f64) -> impl Iterator<Item = Route> + '_ {
        self.messages
            .iter()
            .map(move |m| m.route(m.queue.as_deref().unwrap_or(DEFAULT_QUEUE), now))
    }
}

/// `[value, ...args]`: `args` is a JSON array (checked when decoded).
pub fn prepend_args(values: &[&RawValue], args: &RawValue) -> Box<RawValue> {
    let rest = args.get().trim();
    let inner = rest
        .strip_prefix('[')
        .and_then(|r| r.strip_suffix(']'))
        .unwrap_or("")
        .trim();
    let mut out =
        String::with_capacity(rest.len() + values.iter().map(|v| v.get().len() + 1).sum::<usize>());
    out.push('[');
    for (i, v) in values.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(v.get());
    }
    if !inner.is_empty() {
        if !values.is_empty() {
            out.push(',');
        }
        out.push_str(inner);
    }
    out.push(']');
    RawValue::from_string(out).expect("an array of JSON values is JSON")
}

fn bad(why: String) -> ProtocolError {
    ProtocolError::Malformed(why)
}

/// Turns `sig` into the messages to publish now. `parent`: the result to prepend to the
/// arguments of the first task(s) (unless immutable); `carry`: what follows `sig`.
pub fn expand(
    sig: &Signature,
    parent: Option<&RawValue>,
    carry: Carry,
    now: f64,
    out: &mut Expanded,
) -> Result<(), ProtocolError> {
    match sig.kind {
        Kind::Task => {
            validate_task_name(&sig.task)?;
            let id = sig.id().ok_or_else(|| {
                bad(format!(
                    "signature of task {} has no options.task_id: the client assigns ids before publishing",
                    sig.task
                ))
            })?;
            validate_task_id(id)?;
            let queue = sig.options.queue.as_deref().unwrap_or(DEFAULT_QUEUE);
            validate_queue(queue)?;
            if !sig.args.get().trim_start().starts_with('[') {
                return Err(bad(format!("args of signature {id} must be a JSON array")));
            }
            if !sig.kwargs.get().trim_start().starts_with('{') {
                return Err(bad(format!(
                    "kwargs of signature {id} must be a JSON object"
                )));
            }
            if sig.options.priority.is_some_and(|p| p > MAX_PRIORITY) {
                return Err(bad(format!(
                    "priority of signature {id} must be 0 to {MAX_PRIORITY}"
                )));
            }
            let args = match parent {
                Some(p) if !sig.options.immutable => prepend_args(&[p], &sig.args),
                _ => sig.args.clone(),
            };
            out.messages.push(TaskMessage {
                v: PROTOCOL_VERSION,
                id: id.to_owned(),
                task: sig.task.clone(),
                args,
                kwargs: sig.kwargs.clone(),
                queue: Some(queue.to_owned()),
                eta: sig.options.countdown.map(|c| now + c.max(0.0)),
                expires: None,
                retries: 0,
                priority: sig.options.priority,
                sent_at: Some(now),
                chain: carry.chain,
                chord: carry.chord,
                link: sig.link.clone(),
                link_error: sig.link_error.clone(),
                parent_id: None,
                root_id: None,
                ignore_result: None,
            });
            Ok(())
        }
        Kind::Chain => {
            let Some((first, rest)) = sig.steps.split_first() else {
                return Err(bad("a chain needs at least one step".into()));
            };
            let mut chain = rest.to_vec();
            chain.extend(carry.chain);
            expand(
                first,
                parent,
                Carry {
                    chain,
                    chord: carry.chord,
                },
                now,
                out,
            )
        }
        Kind::Group => {
            let id = sig
                .id()
                .ok_or_else(|| bad("a group has no options.task_id (its group id)".into()))?;
            validate_task_id(id)?;
            if !carry.chain.is_empty() {
                return Err(bad(format!(
                    "group {id} is followed by more steps: a group followed by a task is a chord"
                )));
            }
            if carry.chord.is_some() {
                return Err(bad(format!(
                    "group {id} is a member of a chord header: put its members in the header instead"
                )));
            }
            let refs =
                serde_json::Value::Array(sig.members.iter().map(Signature::result_ref).collect());
            out.groups.push((id.to_owned(), refs.to_string()));
            for member in &sig.members {
                expand(member, parent, Carry::default(), now, out)?;
            }
            Ok(())
        }
        Kind::Chord => {
            let id = sig
                .id()
                .ok_or_else(|| bad("a chord has no options.task_id (its chord id)".into()))?;
            validate_task_id(id)?;
            let body = sig
                .body
                .as_deref()
                .ok_or_else(|| bad(format!("chord {id} has no body (callback)")))?;
            let callback = if carry.chain.is_empty() {
                body.clone()
            } else {
                let mut steps = vec![body.clone()];
                steps.extend(carry.chain);
                Signature {
                    kind: Kind::Chain,
                    task: String::new(),
                    args: empty_array(),
                    kwargs: empty_object(),
                    options: SignatureOptions::default(),
                    steps,
                    members: Vec::new(),
                    body: None,
                    link: Vec::new(),
                    link_error: Vec::new(),
                }
            };
            if sig.members.is_empty() {
                let nothing = empty_array();
                return expand(
                    &callback,
                    Some(&nothing),
                    Carry {
                        chain: Vec::new(),
                        chord: carry.chord,
                    },
                    now,
                    out,
                );
            }
            let size = u32::try_from(sig.members.len())
                .map_err(|_| bad(format!("chord {id} has too many members")))?;
            let outer = carry.chord.map(Box::new);
            for (index, member) in sig.members.iter().enumerate() {
                if member.kind == Kind::Group {
                    return Err(bad(format!(
                        "member {index} of chord {id} is a group: put its members in the header instead"
                    )));
                }
                let chord = ChordRef {
                    id: id.to_owned(),
                    index: index as u32,
                    size,
                    callback: callback.clone(),
                    outer: outer.clone(),
                };
                expand(
                    member,
                    parent,
                    Carry {
                        chain: Vec::new(),
                        chord: Some(chord),
                    },
                    now,
                    out,
                )?;
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sig(json: &str) -> Signature {
        serde_json::from_str(json).unwrap()
    }

    fn raw(s: &str) -> Box<RawValue> {
        RawValue::from_string(s.to_owned()).unwrap()
    }

    #[test]
    fn prepending_keeps_raw_json() {
        assert_eq!(prepend_args(&[&raw("3")], &raw("[]")).get(), "[3]");
        assert_eq!(
            prepend_args(&[&raw("3")], &raw(" [ 1, {\"a\": 2} ] ")).get(),
            "[3,1, {\"a\": 2}]"
        );
        assert_eq!(
            prepend_args(&[&raw("\"id\""), &raw("{\"type\":\"E\"}")], &raw("[9]")).get(),
            "[\"id\",{\"type\":\"E\"},9]"
        );
    }

    #[test]
    fn a_task_signature_round_trips_compactly() {
        let s = sig(r#"{"task":"add","args":[1],"options":{"task_id":"a","queue":"q"}}"#);
        let wire = serde_json::to_string(&s).unwrap();
        assert_eq!(
            wire,
            r#"{"task":"add","args":[1],"options":{"queue":"q","task_id":"a"}}"#
        );
    }

    #[test]
    fn a_chain_publishes_its_first_step_with_the_rest_attached() {
        let s = sig(r#"{"kind":"chain","steps":[
            {"task":"add","args":[1,2],"options":{"task_id":"s1"}},
            {"task":"add","args":[3],"options":{"task_id":"s2"}},
            {"task":"add","args":[4],"options":{"task_id":"s3","immutable":true}}]}"#);
        let mut out = Expanded::default();
        expand(&s, None, Carry::default(), 0.0, &mut out).unwrap();
        assert_eq!(out.messages.len(), 1);
        let m = &out.messages[0];
        assert_eq!(m.id, "s1");
        assert_eq!(m.args.get(), "[1,2]");
        assert_eq!(m.chain.len(), 2);
        assert_eq!(s.final_ids(), vec!["s3".to_owned()]);

        // The worker expands the next step with the result prepended.
        let mut next = Expanded::default();
        let (first, rest) = m.chain.split_first().unwrap();
        let carry = Carry {
            chain: rest.to_vec(),
            chord: None,
        };
        expand(first, Some(&raw("3")), carry, 0.0, &mut next).unwrap();
        assert_eq!(next.messages[0].args.get(), "[3,3]");
        assert_eq!(next.messages[0].chain.len(), 1);
        let mut last = Expanded::default();
        expand(
            &next.messages[0].chain[0],
            Some(&raw("6")),
            Carry::default(),
            0.0,
            &mut last,
        )
        .unwrap();
        assert_eq!(last.messages[0].args.get(), "[4]", "immutable");
        // A plain task message carries no workflow keys.
        let wire = String::from_utf8(last.messages[0].encode()).unwrap();
        for key in ["chain", "chord", "link"] {
            assert!(!wire.contains(key), "{wire}");
        }
    }

    #[test]
    fn a_chord_gives_every_member_its_index_and_the_callback() {
        let s = sig(r#"{"kind":"chord","options":{"task_id":"c"},
            "members":[{"task":"add","args":[1,2],"options":{"task_id":"m0"}},
                       {"kind":"chain","steps":[{"task":"add","args":[3,4],"options":{"task_id":"m1a"}},
                                                {"task":"add","args":[1],"options":{"task_id":"m1b"}}]}],
            "body":{"task":"tsum","options":{"task_id":"cb"}}}"#);
        let mut out = Expanded::default();
        expand(&s, None, Carry::default(), 0.0, &mut out).unwrap();
        assert_eq!(out.messages.len(), 2);
        let c0 = out.messages[0].chord.as_ref().unwrap();
        assert_eq!((c0.index, c0.size, c0.id.as_str()), (0, 2, "c"));
        assert_eq!(c0.callback.id(), Some("cb"));
        // The chain member carries the chord to its last step.
        assert_eq!(out.messages[1].id, "m1a");
        assert_eq!(out.messages[1].chord.as_ref().unwrap().index, 1);
        assert_eq!(out.messages[1].chain.len(), 1);
        assert_eq!(s.final_ids(), vec!["cb".to_owned()]);
    }

    #[test]
    fn an_empty_chord_runs_its_callback_with_an_empty_list() {
        let s = sig(
            r#"{"kind":"chord","options":{"task_id":"c"},"body":{"task":"tsum","args":[5],"options":{"task_id":"cb"}}}"#,
        );
        let mut out = Expanded::default();
        expand(&s, None, Carry::default(), 0.0, &mut out).unwrap();
        assert_eq!(out.messages.len(), 1);
        assert_eq!(out.messages[0].args.get(), "[[],5]");
    }

    #[test]
    fn a_group_records_its_members_and_refuses_what_cannot_work() {
        let s = sig(r#"{"kind":"group","options":{"task_id":"g"},"members":[
            {"task":"add","options":{"task_id":"a"}},
            {"kind":"chain","steps":[{"task":"add","options":{"task_id":"b1"}},{"task":"add","options":{"task_id":"b2"}}]}]}"#);
        let mut out = Expanded::default();
        expand(&s, None, Carry::default(), 0.0, &mut out).unwrap();
        assert_eq!(
            out.groups,
            vec![("g".to_owned(), r#"["a","b2"]"#.to_owned())]
        );
        assert_eq!(out.messages.len(), 2);

        let no_id = sig(r#"{"task":"add"}"#);
        let err = expand(
            &no_id,
            None,
            Carry::default(),
            0.0,
            &mut Expanded::default(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("task_id"), "{err}");
        let carry = Carry {
            chain: vec![no_id],
            chord: None,
        };
        let err = expand(&s, None, carry, 0.0, &mut Expanded::default()).unwrap_err();
        assert!(err.to_string().contains("chord"), "{err}");
    }
}
