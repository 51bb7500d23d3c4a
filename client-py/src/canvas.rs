//! Workflows from the client: a signature tree (JSON made by `dbtask._canvas`, every id
//! already assigned) expanded by the protocol crate into the task messages to publish now.
//! Groups are recorded in Redis (`dbtask:{group:<id>}`) before their members are published, so a
//! `GroupResult` can be restored from its id as soon as it exists.

use std::time::Duration;

use dbtask_protocol as protocol;
use protocol::canvas::{expand, group_key, Carry, Expanded, Signature};

use crate::connection::{redis_error, Inner, Publishing};
use crate::error::ClientError;
use crate::publish::{publish_all, Outgoing};

/// The messages and groups of a workflow, checked and encoded.
pub(crate) struct Prepared {
    outs: Vec<Outgoing>,
    groups: Vec<(String, String)>,
}

pub(crate) fn prepare(
    signature_json: &str,
    trace: Option<&protocol::Trace>,
) -> Result<Prepared, ClientError> {
    let sig: Signature = serde_json::from_str(signature_json)
        .map_err(|e| ClientError::value(format!("not a dbtask signature: {e}")).because(e))?;
    let mut expanded = Expanded::default();
    expand(
        &sig,
        None,
        Carry::default(),
        protocol::now_unix(),
        &mut expanded,
    )?;
    let routes: Vec<protocol::Route> = expanded.routes(protocol::now_unix()).collect();
    let outs = expanded
        .messages
        .into_iter()
        .zip(routes)
        .map(|(message, route)| Outgoing::new(message, route).with_trace(trace))
        .collect();
    Ok(Prepared {
        outs,
        groups: expanded.groups,
    })
}

/// Records the groups, then publishes every message (all written, then all confirmed).
pub(crate) async fn publish(
    publishing: Publishing,
    prepared: Prepared,
    group_ttl: Duration,
) -> Result<(), ClientError> {
    let inner = publishing.inner();
    if !prepared.groups.is_empty() {
        let mut pipe = redis::pipe();
        for (id, members) in &prepared.groups {
            pipe.set_ex(group_key(id), members.as_str(), group_ttl.as_secs().max(1))
                .ignore();
        }
        let mut conn = inner.redis.clone();
        pipe.exec_async(&mut conn)
            .await
            .map_err(|e| redis_error(&e, &inner.redis_safe))?;
    }
    if !prepared.outs.is_empty() {
        publish_all(publishing, prepared.outs).await?;
    }
    Ok(())
}

/// The JSON list of a group's member result ids, `None` when the group is unknown (or expired).
pub(crate) async fn get_group(
    inner: &Inner,
    group_id: &str,
) -> Result<Option<String>, ClientError> {
    let mut conn = inner.redis.clone();
    redis::cmd("GET")
        .arg(group_key(group_id))
        .query_async::<Option<String>>(&mut conn)
        .await
        .map_err(|e| redis_error(&e, &inner.redis_safe))
}
