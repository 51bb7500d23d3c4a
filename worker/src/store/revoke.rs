//! The Redis side of revocations: the `dbtask:revoke` channel and the `dbtask:revoked` set.
//! What a revocation means for a task is decided in `revoke/`; the connection, the keys and
//! the commands live here, with the rest of the worker's Redis access.

use std::time::Duration;

use dbtask_protocol::{now_unix, REVOKED_SET_KEY, REVOKE_CHANNEL};
use futures::stream::{BoxStream, StreamExt};

use super::{Cause, StoreError};
use crate::config::redact_url;

/// How long subscribing and loading the set may take before it counts as a failure.
const LOAD_TIMEOUT: Duration = Duration::from_secs(10);

/// The notices published on `dbtask:revoke` (each a JSON `RevokeNotice`), as raw payloads.
pub type Notices = BoxStream<'static, Vec<u8>>;

/// Where revocations are read from: one Redis server, on connections of its own (a
/// subscription cannot share the store's multiplexed connection).
pub struct RevocationFeed {
    client: redis::Client,
    url: String,
}

impl RevocationFeed {
    pub fn open(redis_url: &str) -> Result<RevocationFeed, StoreError> {
        let url = redact_url(redis_url);
        let client = redis::Client::open(redis_url).map_err(|e| StoreError::BadUrl {
            url: url.clone(),
            source: e.into(),
        })?;
        Ok(RevocationFeed { client, url })
    }

    /// The server's URL, fit for logs.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Subscribes to the channel first, then reads the ids still revoked with the Unix time
    /// each revocation expires: a notice published in between is in the stream, not lost.
    /// The stream ends when the connection drops.
    pub async fn subscribe_and_load(&self) -> Result<(Notices, Vec<(String, f64)>), StoreError> {
        let connect = async {
            let mut pubsub = self.client.get_async_pubsub().await?;
            pubsub.subscribe(REVOKE_CHANNEL).await?;
            let mut conn = self.client.get_multiplexed_async_connection().await?;
            let members: Vec<(String, f64)> = redis::cmd("ZRANGEBYSCORE")
                .arg(REVOKED_SET_KEY)
                .arg(now_unix())
                .arg("+inf")
                .arg("WITHSCORES")
                .query_async(&mut conn)
                .await?;
            Ok::<_, redis::RedisError>((pubsub, members))
        };
        let unreachable = |source| StoreError::Unreachable {
            url: self.url.clone(),
            source,
        };
        let (pubsub, members) = tokio::time::timeout(LOAD_TIMEOUT, connect)
            .await
            .map_err(|_| unreachable(Cause::TimedOut(None)))?
            .map_err(|e| {
                unreachable(Cause::While {
                    context: "loading the revoked task ids",
                    source: e,
                })
            })?;
        let notices = pubsub
            .into_on_message()
            .map(|msg| msg.get_payload_bytes().to_vec())
            .boxed();
        Ok((notices, members))
    }
}
