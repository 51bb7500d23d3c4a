//! The Redis side of workflows: chord counters and group member lists. What a workflow does
//! next is decided in `canvas/`; the keys, the script and the commands live here, with the
//! rest of the worker's Redis access.

use dbtask_protocol::canvas::{chord_fired_key, chord_key, group_key};
use dbtask_protocol::ChordRef;

use super::Store;

/// Records one chord member's result and says whether this member fires the callback.
/// KEYS: hash, fired flag. ARGV: index, result JSON, size, ttl. Returns the results in member
/// order when this member (or an earlier delivery of it) completed the chord, else nil.
const CHORD_SCRIPT: &str = r#"
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[4])
local size = tonumber(ARGV[3])
if redis.call('HLEN', KEYS[1]) < size then return false end
if not redis.call('SET', KEYS[2], ARGV[1], 'NX', 'EX', ARGV[4]) then
  if redis.call('GET', KEYS[2]) ~= ARGV[1] then return false end
end
local out = {}
for i = 0, size - 1 do out[#out + 1] = redis.call('HGET', KEYS[1], tostring(i)) end
return out
"#;

impl Store {
    /// Records `chord`'s member result (JSON) for `ttl` seconds, atomically. Returns every
    /// member's result in order when this member completes the chord and is the one that
    /// fires its callback (first writer wins; a redelivery of that same member fires again,
    /// so the callback's publish must be deduplicated), else `None`. Waits out Redis outages.
    pub async fn count_chord_member(
        &self,
        chord: &ChordRef,
        result: &str,
        ttl: u64,
    ) -> Option<Vec<Vec<u8>>> {
        self.retrying("count a chord member", || async {
            let mut conn = self.conn().await?;
            let fired = redis::cmd("EVAL")
                .arg(CHORD_SCRIPT)
                .arg(2)
                .arg(chord_key(&chord.id))
                .arg(chord_fired_key(&chord.id))
                .arg(chord.index)
                .arg(result)
                .arg(chord.size)
                .arg(ttl)
                .query_async(&mut conn)
                .await
                .map_err(|e| self.redis_error(e))?;
            self.replicated(&mut conn).await?;
            Ok(fired)
        })
        .await
    }

    /// Stores each group's member list (`(group id, JSON list)`) for `ttl` seconds, in one
    /// pipeline. Waits out Redis outages.
    pub async fn record_groups(&self, groups: &[(String, String)], ttl: u64) {
        self.retrying("record a group", || async {
            let mut pipe = redis::pipe();
            for (id, members) in groups {
                pipe.set_ex(group_key(id), members.as_str(), ttl).ignore();
            }
            let mut conn = self.conn().await?;
            pipe.exec_async(&mut conn)
                .await
                .map_err(|e| self.redis_error(e))?;
            self.replicated(&mut conn).await
        })
        .await
    }
}
