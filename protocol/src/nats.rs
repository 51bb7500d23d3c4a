//! The protocol's plain descriptions mapped onto async-nats types, for the worker and the
//! client alike (the optional `nats` feature, which both enable): a stream description onto a
//! stream config, a task message's headers onto a header map; and what a connect error means.

use async_nats::jetstream::stream;
use async_nats::{ConnectError, ConnectErrorKind, HeaderMap};

use crate::{
    task_headers, Retention, Route, Storage, StreamSpec, TaskMessage, Trace, HEADER_TRACEPARENT,
    HEADER_TRACESTATE,
};

/// The async-nats configuration of the stream `spec` describes.
pub fn stream_config(spec: &StreamSpec) -> stream::Config {
    stream::Config {
        name: spec.name.to_owned(),
        description: Some(spec.description.to_owned()),
        subjects: spec.subjects.iter().map(|s| (*s).to_owned()).collect(),
        retention: match spec.retention {
            Retention::WorkQueue => stream::RetentionPolicy::WorkQueue,
            Retention::Limits => stream::RetentionPolicy::Limits,
        },
        storage: match spec.storage {
            Storage::File => stream::StorageType::File,
            Storage::Memory => stream::StorageType::Memory,
        },
        allow_message_schedules: spec.allow_msg_schedules,
        duplicate_window: spec.duplicate_window.unwrap_or_default(),
        max_message_size: spec.max_msg_size_i32(),
        num_replicas: spec.replicas,
        ..Default::default()
    }
}

/// The headers of `message` published under `route` with `Nats-Msg-Id` `msg_id` (see
/// [`task_headers`]).
pub fn task_header_map(message: &TaskMessage, route: &Route, msg_id: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (name, value) in task_headers(message, route, msg_id) {
        headers.insert(name, value);
    }
    headers
}

/// Adds `trace` (when there is one) to a task message's headers.
pub fn add_trace(headers: &mut HeaderMap, trace: Option<&Trace>) {
    if let Some(trace) = trace {
        for (name, value) in trace.headers() {
            headers.insert(name, value);
        }
    }
}

/// The trace context of a delivered message, if its headers carry a valid one.
pub fn trace_of(headers: Option<&HeaderMap>) -> Option<Trace> {
    let headers = headers?;
    let parent = headers.get(HEADER_TRACEPARENT)?.as_str().to_owned();
    let state = headers
        .get(HEADER_TRACESTATE)
        .map(|v| v.as_str().to_owned());
    Trace::new(parent, state).ok()
}

/// Whether a connect error comes from TLS: async-nats reports a failed handshake as an I/O
/// error, with rustls' error inside.
pub fn is_tls_error(err: &ConnectError) -> bool {
    if err.kind() == ConnectErrorKind::Tls {
        return true;
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(err);
    while let Some(e) = source {
        if e.is::<async_nats::rustls::Error>()
            || e.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .is_some_and(|inner| inner.is::<async_nats::rustls::Error>())
        {
            return true;
        }
        source = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_task_stream_maps_onto_a_work_queue_with_its_limits() {
        let config = stream_config(&StreamSpec::tasks());
        assert_eq!(config.name, crate::TASK_STREAM);
        assert_eq!(config.subjects, ["dbtask.tasks.>", "dbtask.sched.>"]);
        assert_eq!(config.retention, stream::RetentionPolicy::WorkQueue);
        assert_eq!(config.storage, stream::StorageType::File);
        assert!(config.allow_message_schedules);
        assert_eq!(config.max_message_size, 1024 * 1024);
        assert_eq!(config.duplicate_window, crate::DEFAULT_DUPLICATE_WINDOW);
        assert_eq!(config.num_replicas, 1);
        let r3 = stream_config(&StreamSpec::tasks().with_replicas(3));
        assert_eq!(r3.num_replicas, 3);
        let dead = stream_config(&StreamSpec::dead_letters());
        assert_eq!(dead.max_message_size, -1);
        assert_eq!(dead.retention, stream::RetentionPolicy::Limits);
    }

    #[test]
    fn a_header_map_holds_every_task_header() {
        let msg = TaskMessage::decode(br#"{"id": "t1", "task": "add", "eta": 20.0}"#).unwrap();
        let route = msg.route("q", 10.0);
        let map = task_header_map(&msg, &route, "t1:retry:1");
        for (name, value) in task_headers(&msg, &route, "t1:retry:1") {
            assert_eq!(map.get(name).map(|v| v.as_str()), Some(value), "{name}");
        }
    }
}
