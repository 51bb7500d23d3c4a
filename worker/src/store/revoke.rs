//! The Redis side of revocations: the `dbtask:{revoke}` channel and the `dbtask:{revoke}:ids` set.
//! What a revocation means for a task is decided in `revoke/`; the connection, the keys and
//! the commands live here, with the rest of the worker's Redis access.

use std::time::Duration;

use dbtask_protocol::{now_unix, REVOKED_SET_KEY, REVOKE_CHANNEL};
use futures::stream::{BoxStream, StreamExt};

use dbtask_protocol::redis_conn::PubSubSource;

use super::{Cause, Store, StoreError};

/// How long subscribing and loading the set may take before it counts as a failure.
const LOAD_TIMEOUT: Duration = Duration::from_secs(10);

/// The notices published on `dbtask:{revoke}` (each a JSON `RevokeNotice`), as raw payloads.
pub type Notices = BoxStream<'static, Vec<u8>>;

/// Where revocations are read from: the store's Redis (a server, a Sentinel master or any
/// node of a Cluster), on a pub/sub connection of its own (a subscription cannot share the
/// store's multiplexed connection); the set is read through the store.
///
/// Classic pub/sub (`SUBSCRIBE`) on every kind of Redis, also a Cluster, where task
/// notifications are sharded: a revocation is a broadcast (every worker wants every one), it is
/// rare (a person or a program cancelling a task), and any node will do, so a worker keeps
/// following it when one node dies. A sharded channel would put every worker's subscription on
/// the one shard that owns the `{revoke}` slot and need the re-subscription dance of a moved
/// slot for no gain. See docs/deployment.md, "Redis".
pub struct RevocationFeed {
    source: PubSubSource,
    store: Store,
}

impl RevocationFeed {
    pub fn open(store: &Store) -> RevocationFeed {
        RevocationFeed {
            source: store.pubsub_source().clone(),
            store: store.clone(),
        }
    }

    /// The server's URL, fit for logs.
    pub fn url(&self) -> &str {
        self.store.url()
    }

    /// Subscribes to the channel first, then reads the ids still revoked with the Unix time
    /// each revocation expires: a notice published in between is in the stream, not lost.
    /// The stream ends when the connection drops.
    pub async fn subscribe_and_load(&self) -> Result<(Notices, Vec<(String, f64)>), StoreError> {
        let unreachable = |source| StoreError::Unreachable {
            url: self.store.url().to_owned(),
            source,
        };
        let connect = async {
            let mut conn = self.store.conn().await?;
            let subscribed = async {
                let mut pubsub = self.source.connect().await?;
                pubsub.subscribe(REVOKE_CHANNEL).await?;
                let members: Vec<(String, f64)> = redis::cmd("ZRANGEBYSCORE")
                    .arg(REVOKED_SET_KEY)
                    .arg(now_unix())
                    .arg("+inf")
                    .arg("WITHSCORES")
                    .query_async(&mut conn)
                    .await?;
                Ok::<_, redis::RedisError>((pubsub, members))
            };
            subscribed.await.map_err(|e| {
                unreachable(Cause::While {
                    context: "loading the revoked task ids",
                    source: e,
                })
            })
        };
        let (pubsub, members) = tokio::time::timeout(LOAD_TIMEOUT, connect)
            .await
            .map_err(|_| unreachable(Cause::TimedOut(None)))??;
        let notices = pubsub
            .into_on_message()
            .map(|msg| msg.get_payload_bytes().to_vec())
            .boxed();
        Ok((notices, members))
    }
}
