//! The protocol's plain descriptions mapped onto async-nats types, one small function each: a
//! stream description onto a stream config, a task message's headers onto a header map. The
//! client has its own twin of each (`stream_config` and `task_headers` in client-py/src/).

use async_nats::jetstream::stream;
use async_nats::HeaderMap;
use dbtask_protocol::{task_headers, Retention, Route, Storage, StreamSpec, TaskMessage};

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
        ..Default::default()
    }
}

/// The headers of `message` published under `route` (see [`task_headers`]).
pub fn task_header_map(message: &TaskMessage, route: &Route, msg_id: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (name, value) in task_headers(message, route, msg_id) {
        headers.insert(name, value);
    }
    headers
}
