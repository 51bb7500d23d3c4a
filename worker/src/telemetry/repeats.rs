//! Repeated warnings and errors, summarised: a flood of bad messages must not bury the log.
//!
//! Per log statement (its callsite), the first [`BURST`] WARN or ERROR lines of a window of
//! [`WINDOW`] are written, so that a few failing tasks each keep their own line (with their
//! task id); the ones after those in the window are only counted, and when the window ends one
//! line says how many there were:
//! `12345 more like this in the last 10 s: <the first line's message>`. The next one after
//! that is written again in full. INFO and below pass untouched at the cost of one comparison;
//! a WARN or ERROR takes one short lock.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::callsite::Identifier;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer};

/// How long the lines after the first one of a kind are counted before they are summarised.
pub const WINDOW: Duration = Duration::from_secs(10);
/// Lines of one kind written in full per window before the rest are only counted.
pub const BURST: u32 = 10;
/// How often ended windows are looked for.
const TICK: Duration = Duration::from_secs(1);
/// The target of the summary lines (never themselves summarised).
pub const TARGET: &str = "dbtask_worker::log_repeats";

struct Kind {
    started: Instant,
    written: u32,
    suppressed: u64,
    level: Level,
    message: String,
}

#[derive(Default)]
struct Counts {
    kinds: HashMap<Identifier, Kind>,
}

impl Counts {
    /// Whether an event of `callsite` is written now; `message` is asked for only when it is.
    fn admit(
        &mut self,
        callsite: Identifier,
        level: Level,
        now: Instant,
        message: impl FnOnce() -> String,
    ) -> bool {
        match self.kinds.get_mut(&callsite) {
            Some(kind) if now.duration_since(kind.started) < WINDOW => {
                if kind.written < BURST {
                    kind.written += 1;
                    return true;
                }
                kind.suppressed += 1;
                false
            }
            _ => {
                self.kinds.insert(
                    callsite,
                    Kind {
                        started: now,
                        written: 1,
                        suppressed: 0,
                        level,
                        message: message(),
                    },
                );
                true
            }
        }
    }

    /// The windows that ended by `now` and counted lines: (level, count, seconds, message).
    /// Ended windows are forgotten, so the next line of their kind is written in full.
    fn ended(&mut self, now: Instant) -> Vec<(Level, u64, u64, String)> {
        let mut out = Vec::new();
        self.kinds.retain(|_, kind| {
            let age = now.duration_since(kind.started);
            if age < WINDOW {
                return true;
            }
            if kind.suppressed > 0 {
                out.push((
                    kind.level,
                    kind.suppressed,
                    age.as_secs().max(1),
                    std::mem::take(&mut kind.message),
                ));
            }
            false
        });
        out
    }
}

/// The layer that counts repeats; [`RepeatLimit::start`] also starts the thread that writes
/// the summaries.
#[derive(Clone)]
pub struct RepeatLimit {
    /// `None`: every line is written (the summary thread could not start).
    counts: Option<Arc<Mutex<Counts>>>,
}

impl RepeatLimit {
    /// The layer, and a thread that writes the summaries of ended windows (it wakes once a
    /// second and takes the lock only when something was counted).
    pub fn start() -> RepeatLimit {
        let shared = Arc::new(Mutex::new(Counts::default()));
        let counts = Arc::downgrade(&shared);
        let spawned = std::thread::Builder::new()
            .name("dbtask-log-repeats".into())
            .spawn(move || loop {
                std::thread::sleep(TICK);
                let Some(counts) = counts.upgrade() else {
                    return;
                };
                let ended = match counts.lock() {
                    Ok(mut c) if !c.kinds.is_empty() => c.ended(Instant::now()),
                    _ => continue,
                };
                drop(counts);
                for (level, count, secs, message) in ended {
                    summarise(level, count, secs, &message);
                }
            });
        match spawned {
            Ok(_) => RepeatLimit {
                counts: Some(shared),
            },
            Err(e) => {
                eprintln!("dbtask-worker: cannot start the thread that summarises repeated log lines ({e}); they are written in full");
                RepeatLimit { counts: None }
            }
        }
    }
}

fn summarise(level: Level, count: u64, secs: u64, message: &str) {
    if level == Level::ERROR {
        tracing::error!(target: TARGET, repeated = count, seconds = secs, "{count} more like this in the last {secs} s: {message}");
    } else {
        tracing::warn!(target: TARGET, repeated = count, seconds = secs, "{count} more like this in the last {secs} s: {message}");
    }
}

impl<S: Subscriber> Layer<S> for RepeatLimit {
    fn event_enabled(&self, event: &Event<'_>, _ctx: Context<'_, S>) -> bool {
        let meta = event.metadata();
        // Levels compare by verbosity: WARN > ERROR, INFO > WARN.
        if *meta.level() > Level::WARN || meta.target() == TARGET {
            return true;
        }
        let Some(Ok(mut counts)) = self.counts.as_ref().map(|c| c.lock()) else {
            return true;
        };
        counts.admit(meta.callsite(), *meta.level(), Instant::now(), || {
            let mut visitor = MessageOf(String::new());
            event.record(&mut visitor);
            visitor.0
        })
    }
}

/// Reads the `message` field of an event.
struct MessageOf(String);

impl Visit for MessageOf {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0 = value.to_owned();
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Site;
    impl tracing::callsite::Callsite for Site {
        fn set_interest(&self, _: tracing::subscriber::Interest) {}
        fn metadata(&self) -> &tracing::Metadata<'_> {
            unreachable!("the counts compare callsite identities only")
        }
    }
    static A: Site = Site;
    static B: Site = Site;

    #[test]
    fn the_first_lines_of_a_window_are_written_the_rest_counted_then_summarised() {
        let mut counts = Counts::default();
        let t0 = Instant::now();
        let a = || Identifier(&A);
        assert!(counts.admit(a(), Level::ERROR, t0, || "bad body".into()));
        for _ in 1..BURST {
            assert!(counts.admit(a(), Level::ERROR, t0, || unreachable!()));
        }
        for i in 1..=5 {
            assert!(!counts.admit(
                a(),
                Level::ERROR,
                t0 + Duration::from_secs(i),
                || unreachable!()
            ));
        }
        // Another kind has its own window.
        assert!(counts.admit(Identifier(&B), Level::WARN, t0, String::new));
        assert!(counts.ended(t0 + Duration::from_secs(9)).is_empty());
        let ended = counts.ended(t0 + WINDOW);
        assert_eq!(ended, vec![(Level::ERROR, 5, 10, "bad body".to_owned())]);
        // B counted nothing: forgotten without a summary. A starts over, in full.
        assert!(counts.kinds.is_empty());
        assert!(counts.admit(a(), Level::ERROR, t0 + WINDOW, || "again".into()));
    }
}
