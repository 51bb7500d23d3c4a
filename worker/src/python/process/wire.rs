//! What the worker and its pool processes say to each other over their socket: frames of a
//! little-endian `u32` length and a JSON body. The arguments and the return value travel as
//! the raw JSON they already are (no decoding in the parent, one `json.loads` in the child).

use std::borrow::Cow;
use std::io::{self, Read, Write};

use dbtask_protocol::TaskError;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::python::CallOutcome;

/// Largest frame either side accepts: a task message is at most 2 GiB by the config's own
/// bound, and a result at most `max_result_bytes`; anything longer is a broken peer.
const MAX_FRAME: u32 = i32::MAX as u32;

/// From the worker to a pool process.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum ToChild<'a> {
    /// Run this job, then answer with [`FromChild::Done`].
    #[serde(borrow)]
    Job(JobFrame<'a>),
    /// Raise `SoftTimeLimitExceeded` in the job `task_id`, if it still runs (on the control
    /// socket).
    #[serde(borrow)]
    Soft(Cow<'a, str>),
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct JobFrame<'a> {
    #[serde(borrow)]
    pub id: Cow<'a, str>,
    #[serde(borrow)]
    pub task: Cow<'a, str>,
    #[serde(borrow)]
    pub args: &'a RawValue,
    #[serde(borrow)]
    pub kwargs: &'a RawValue,
    pub attempt: u32,
    pub retries: u32,
    /// The rest of the request (`dbtask.current_task().request`).
    #[serde(borrow, default)]
    pub queue: Cow<'a, str>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta: Option<f64>,
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub parent_id: Option<Cow<'a, str>>,
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub root_id: Option<Cow<'a, str>>,
    /// The message's trace context (OpenTelemetry on).
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<Cow<'a, str>>,
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub tracestate: Option<Cow<'a, str>>,
}

/// From a pool process to the worker.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum FromChild {
    /// Imported the task modules: ready for jobs.
    Ready,
    /// Could not start (the interpreter or an import failed): why, and the process exits.
    Failed(String),
    /// The job `id` ended so.
    Done { id: String, outcome: Outcome },
    /// The running job stored a state of its own (`update_state`); its `Done` follows.
    State(crate::python::state::StateUpdate),
}

impl FromChild {
    /// Whether `frame` is a [`FromChild::State`], without decoding it.
    pub(crate) fn is_state(frame: &[u8]) -> bool {
        frame.starts_with(br#"{"State""#)
    }
}

/// [`CallOutcome`] as it crosses the socket.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Outcome {
    Success(Box<RawValue>),
    Failure(TaskError),
    Retry {
        countdown: Option<f64>,
        max_retries: Option<u32>,
        error: TaskError,
        explicit: bool,
    },
}

impl From<CallOutcome> for Outcome {
    fn from(outcome: CallOutcome) -> Outcome {
        match outcome {
            CallOutcome::Success(value) => Outcome::Success(value),
            CallOutcome::Failure(error) => Outcome::Failure(error),
            CallOutcome::Retry(r) => Outcome::Retry {
                countdown: r.countdown,
                max_retries: r.max_retries,
                error: r.error,
                explicit: r.explicit,
            },
        }
    }
}

impl From<Outcome> for CallOutcome {
    fn from(outcome: Outcome) -> CallOutcome {
        match outcome {
            Outcome::Success(value) => CallOutcome::Success(value),
            Outcome::Failure(error) => CallOutcome::Failure(error),
            Outcome::Retry {
                countdown,
                max_retries,
                error,
                explicit,
            } => CallOutcome::Retry(crate::retry::Request {
                countdown,
                max_retries,
                error,
                explicit,
            }),
        }
    }
}

/// `value` as one frame, appended to `out` (cleared first).
pub(crate) fn encode(value: &impl Serialize, out: &mut Vec<u8>) -> io::Result<()> {
    out.clear();
    out.extend_from_slice(&[0; 4]);
    serde_json::to_writer(&mut *out, value)?;
    let len = u32::try_from(out.len() - 4)
        .ok()
        .filter(|len| *len <= MAX_FRAME)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "frame too large"))?;
    out[..4].copy_from_slice(&len.to_le_bytes());
    Ok(())
}

fn frame_len(header: [u8; 4]) -> io::Result<usize> {
    let len = u32::from_le_bytes(header);
    if len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes announced: the peer is broken"),
        ));
    }
    Ok(len as usize)
}

/// Reads one frame's body into `buf`; `Ok(false)` at a clean end of the stream.
pub(crate) fn read_blocking(reader: &mut impl Read, buf: &mut Vec<u8>) -> io::Result<bool> {
    let mut header = [0; 4];
    match reader.read_exact(&mut header) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(false),
        Err(e) => return Err(e),
    }
    buf.resize(frame_len(header)?, 0);
    reader.read_exact(buf)?;
    Ok(true)
}

/// [`read_blocking`] for the worker's side of the socket.
pub(crate) async fn read(
    reader: &mut (impl AsyncRead + Unpin),
    buf: &mut Vec<u8>,
) -> io::Result<bool> {
    let mut header = [0; 4];
    match reader.read_exact(&mut header).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(false),
        Err(e) => return Err(e),
    }
    buf.resize(frame_len(header)?, 0);
    reader.read_exact(buf).await?;
    Ok(true)
}

/// Writes one frame (blocking), for the pool process's side.
pub(crate) fn write_blocking(writer: &mut impl Write, value: &impl Serialize) -> io::Result<()> {
    let mut out = Vec::new();
    encode(value, &mut out)?;
    writer.write_all(&out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_and_its_outcome_cross_unchanged() {
        let args = RawValue::from_string("[1, \"two\", {\"x\": null}]".into()).unwrap();
        let kwargs = RawValue::from_string("{}".into()).unwrap();
        let job = ToChild::Job(JobFrame {
            id: "t1".into(),
            task: "tasks.add".into(),
            args: &args,
            kwargs: &kwargs,
            attempt: 2,
            retries: 1,
            queue: "math".into(),
            eta: Some(1.5),
            parent_id: None,
            root_id: Some("r1".into()),
            traceparent: None,
            tracestate: None,
        });
        let mut out = Vec::new();
        encode(&job, &mut out).unwrap();
        let mut body = Vec::new();
        assert!(read_blocking(&mut &out[..], &mut body).unwrap());
        match serde_json::from_slice::<ToChild>(&body).unwrap() {
            ToChild::Job(back) => {
                assert_eq!(back.args.get(), args.get(), "raw JSON kept as it was");
                assert_eq!((back.attempt, back.retries), (2, 1));
            }
            other => panic!("{other:?}"),
        }
        let error = TaskError::new("ValueError", "no");
        let retry = Outcome::Retry {
            countdown: Some(1.5),
            max_retries: None,
            error: error.clone(),
            explicit: false,
        };
        write_blocking(
            &mut out,
            &FromChild::Done {
                id: "t1".into(),
                outcome: retry,
            },
        )
        .unwrap();
        assert!(matches!(
            CallOutcome::from(Outcome::Failure(error)),
            CallOutcome::Failure(_)
        ));
    }

    #[test]
    fn an_empty_stream_is_a_clean_end_and_a_cut_frame_an_error() {
        let mut buf = Vec::new();
        assert!(!read_blocking(&mut &[][..], &mut buf).unwrap());
        assert!(read_blocking(&mut &[5, 0, 0, 0, b'{'][..], &mut buf).is_err());
        assert!(read_blocking(&mut &[0xff, 0xff, 0xff, 0xff][..], &mut buf).is_err());
    }
}
