//! Revocation, client side: add the id to the sorted set `dbtask:{revoke}:ids` (scored by the
//! time the revocation expires, expired members pruned in the same transaction) and announce
//! it on `dbtask:{revoke}`, in one MULTI/EXEC. Workers load the set at start and follow the
//! channel, so a revocation reaches every worker, also one started later.

use std::sync::Arc;
use std::time::Duration;

use dbtask_protocol::{now_unix, RevokeNotice, REVOKED_SET_KEY, REVOKE_CHANNEL};

use crate::connection::{redis_error, Inner};
use crate::error::ClientError;

pub(crate) async fn revoke(
    inner: Arc<Inner>,
    id: String,
    terminate: bool,
    ttl: Duration,
) -> Result<(), ClientError> {
    inner.check_open()?;
    let now = now_unix();
    let notice = RevokeNotice {
        id,
        terminate,
        expires: now + ttl.as_secs_f64(),
    };
    let json = serde_json::to_vec(&notice).expect("a RevokeNotice always serializes");
    let mut pipe = redis::pipe();
    pipe.atomic()
        // GT: revoking again never shortens an earlier, longer revocation.
        .cmd("ZADD")
        .arg(REVOKED_SET_KEY)
        .arg("GT")
        .arg(notice.expires)
        .arg(&notice.id)
        .ignore()
        .cmd("ZREMRANGEBYSCORE")
        .arg(REVOKED_SET_KEY)
        .arg("-inf")
        .arg(now)
        .ignore()
        .publish(REVOKE_CHANNEL, json)
        .ignore();
    let mut conn = inner.redis.clone();
    pipe.exec_async(&mut conn)
        .await
        .map_err(|e| redis_error(&e, &inner.redis_safe))
}
