//! Revocation: the revoked task ids, kept in this worker's memory and loaded from Redis.
//!
//! Clients add a revoked id to the sorted set `dbtask:{revoke}:ids` (scored by the Unix time the
//! revocation expires) and publish a [`RevokeNotice`] on `dbtask:{revoke}`. A worker subscribes
//! to the channel first, then loads the set (so nothing published in between is missed), and
//! follows the channel from then on; after a lost connection it subscribes and loads again.
//! Checking a task is a lookup in memory: no Redis round trip per task.
//!
//! A running task is watched with a [`Watch`], which fires once its id is revoked with
//! `terminate` (or, for a task queued for a Python thread and not started, at all): every
//! notice wakes every watch, which then looks its own id up. Watching costs no allocation and
//! no registration (revocations are rare; tasks are not).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use dbtask_protocol::{now_unix, RevokeNotice};
use futures::StreamExt;
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use crate::store::{Notices, RevocationFeed, Store, StoreError};

/// How often expired revocations are dropped from memory.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

#[derive(Default)]
struct State {
    /// Revoked id -> Unix time its revocation expires.
    revoked: HashMap<String, f64>,
    /// The ids among them revoked with terminate -> Unix time that expires.
    terminated: HashMap<String, f64>,
}

/// The revoked set of this worker. Cheap to clone.
#[derive(Clone)]
pub struct Revocations {
    state: Arc<Mutex<State>>,
    /// Woken by each notice.
    notices: Arc<Notify>,
}

/// Fires when the task it watches is revoked (with `terminate`, or at all).
pub struct Watch<'a> {
    revocations: &'a Revocations,
    task_id: &'a str,
}

impl Watch<'_> {
    /// Completes once the task is revoked with terminate (never otherwise), including by a
    /// notice that came before this call.
    pub async fn terminated(&self) {
        self.revoked(false).await;
    }

    /// Completes once the task is revoked with terminate, or with `any`, revoked at all; true
    /// for a terminate. Includes a notice that came before this call.
    pub async fn revoked(&self, any: bool) -> bool {
        loop {
            let notified = self.revocations.notices.notified();
            tokio::pin!(notified);
            // Registered before the look-up: a notice in between still wakes it.
            notified.as_mut().enable();
            if self.revocations.is_terminated(self.task_id) {
                return true;
            }
            if any && self.revocations.is_revoked(self.task_id) {
                return false;
            }
            notified.await;
        }
    }
}

impl Revocations {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Subscribes to `dbtask:{revoke}`, loads `dbtask:{revoke}:ids`, and keeps following the channel
    /// on a background task (reconnecting with backoff) for as long as the runtime lives.
    pub async fn start(store: &Store) -> Result<Revocations, StoreError> {
        let feed = RevocationFeed::open(store);
        let revocations = Revocations {
            state: Arc::new(Mutex::new(State::default())),
            notices: Arc::new(Notify::new()),
        };
        let notices = revocations.subscribe_and_load(&feed).await?;
        info!(
            revoked = revocations.lock().revoked.len(),
            "loaded the revoked task ids"
        );
        tokio::spawn(revocations.clone().follow(feed, notices));
        Ok(revocations)
    }

    async fn subscribe_and_load(&self, feed: &RevocationFeed) -> Result<Notices, StoreError> {
        let (notices, members) = feed.subscribe_and_load().await?;
        let mut state = self.lock();
        for (id, expires) in members {
            let at = state.revoked.entry(id).or_insert(expires);
            *at = at.max(expires);
        }
        Ok(notices)
    }

    async fn follow(self, feed: RevocationFeed, mut notices: Notices) {
        let mut prune = tokio::time::interval(PRUNE_EVERY);
        prune.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            loop {
                tokio::select! {
                    notice = notices.next() => match notice {
                        Some(payload) => self.notice(&payload),
                        None => break,
                    },
                    _ = prune.tick() => self.prune(),
                }
            }
            crate::monitor::counts::REDIS.error();
            warn!(url = %feed.url(), "lost the Redis subscription to revocations; reconnecting");
            let mut delay = Duration::from_millis(100);
            notices = loop {
                tokio::time::sleep(delay).await;
                match self.subscribe_and_load(&feed).await {
                    Ok(notices) => break notices,
                    Err(e) => {
                        crate::monitor::counts::REDIS.error();
                        warn!(url = %feed.url(), error = %e, "cannot follow revocations yet; retrying");
                        delay = (delay * 2).min(Duration::from_secs(5));
                    }
                }
            };
            crate::monitor::counts::REDIS.reconnect();
            info!(url = %feed.url(), "following revocations again");
        }
    }

    fn notice(&self, payload: &[u8]) {
        let notice: RevokeNotice = match serde_json::from_slice(payload) {
            Ok(notice) => notice,
            Err(e) => {
                warn!(error = %e, "ignoring an unreadable message on the revoke channel");
                return;
            }
        };
        debug!(task_id = %notice.id, terminate = notice.terminate, "task revoked");
        let mut state = self.lock();
        let at = state
            .revoked
            .entry(notice.id.clone())
            .or_insert(notice.expires);
        *at = at.max(notice.expires);
        if notice.terminate {
            let at = state.terminated.entry(notice.id).or_insert(notice.expires);
            *at = at.max(notice.expires);
        }
        drop(state);
        self.notices.notify_waiters();
    }

    fn prune(&self) {
        let now = now_unix();
        let mut state = self.lock();
        state.revoked.retain(|_, expires| *expires > now);
        state.terminated.retain(|_, expires| *expires > now);
    }

    /// True if `task_id` is revoked (and the revocation has not expired).
    pub fn is_revoked(&self, task_id: &str) -> bool {
        let state = self.lock();
        if state.revoked.is_empty() {
            return false;
        }
        state
            .revoked
            .get(task_id)
            .is_some_and(|expires| *expires > now_unix())
    }

    /// True if `task_id` is revoked with terminate (and that has not expired).
    fn is_terminated(&self, task_id: &str) -> bool {
        let state = self.lock();
        !state.terminated.is_empty()
            && state
                .terminated
                .get(task_id)
                .is_some_and(|expires| *expires > now_unix())
    }

    /// Watches the running task `task_id` for a revocation with terminate.
    pub fn watch<'a>(&'a self, task_id: &'a str) -> Watch<'a> {
        Watch {
            revocations: self,
            task_id,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;

    fn empty() -> Revocations {
        Revocations {
            state: Arc::new(Mutex::new(State::default())),
            notices: Arc::new(Notify::new()),
        }
    }

    fn notice(id: &str, terminate: bool, expires: f64) -> Vec<u8> {
        serde_json::to_vec(&RevokeNotice {
            id: id.into(),
            terminate,
            expires,
        })
        .unwrap()
    }

    #[test]
    fn a_notice_revokes_until_it_expires() {
        let r = empty();
        assert!(!r.is_revoked("a"));
        r.notice(&notice("a", false, now_unix() + 60.0));
        r.notice(&notice("old", false, now_unix() - 1.0));
        r.notice(b"not json");
        assert!(r.is_revoked("a"));
        assert!(
            !r.is_revoked("old"),
            "an expired revocation no longer applies"
        );
        r.prune();
        assert_eq!(r.lock().revoked.len(), 1);
        // A shorter second revocation never shortens the first.
        r.notice(&notice("a", false, now_unix() - 1.0));
        assert!(r.is_revoked("a"));
    }

    #[test]
    fn terminate_fires_the_watch_of_a_running_task_only() {
        let r = empty();
        let running = r.watch("run");
        let other = r.watch("other");
        r.notice(&notice("run", false, now_unix() + 60.0));
        assert!(
            running.terminated().now_or_never().is_none(),
            "no terminate asked"
        );
        r.notice(&notice("run", true, now_unix() + 60.0));
        assert!(running.terminated().now_or_never().is_some());
        assert!(other.terminated().now_or_never().is_none());
        // A watch made after the notice fires too (the task started in between).
        assert!(r.watch("run").terminated().now_or_never().is_some());
    }

    #[tokio::test]
    async fn a_waiting_watch_is_woken_by_a_terminate_notice() {
        let r = empty();
        let watch = r.watch("run");
        let terminated = watch.terminated();
        tokio::pin!(terminated);
        assert!(futures::poll!(terminated.as_mut()).is_pending());
        r.notice(&notice("other", true, now_unix() + 60.0));
        assert!(
            futures::poll!(terminated.as_mut()).is_pending(),
            "another task's terminate: still waiting"
        );
        r.notice(&notice("run", true, now_unix() + 60.0));
        tokio::time::timeout(Duration::from_secs(1), terminated)
            .await
            .expect("the notice wakes the waiting watch");
    }
}
