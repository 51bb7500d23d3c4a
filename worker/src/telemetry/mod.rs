//! Logs: tracing events on stderr, as text for people or JSON for machines.
//!
//! Events are a static message plus fields (`task_id`, `task`, `attempt`, `queue`, ...), so
//! that the JSON form can be filtered without parsing prose. Both forms are safe from what a
//! message carries: text fields have their control characters escaped ([`escape`]), JSON
//! escapes them itself; and a flood of one warning or error is summarised ([`repeats`]).

pub mod escape;
pub mod repeats;

use std::io::IsTerminal;

use serde::{Deserialize, Serialize};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// How logs are written on stderr.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    // One human-readable line per event. (Plain comments: doc comments would turn clap's
    // --help into its long multi-paragraph form.)
    #[default]
    Text,
    // One JSON object per event.
    Json,
}

const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

/// The filter for a `log_level` setting. A bare level applies to the worker's own events while
/// libraries stay at `warn` (async-nats logs every reconnect at info; the worker logs those
/// itself); anything with `=` or `,` is taken as a full tracing filter directive.
pub fn filter_for(level: &str) -> Result<EnvFilter, String> {
    let level = level.trim();
    let directives = if level.contains('=') || level.contains(',') {
        level.to_owned()
    } else {
        let lower = level.to_ascii_lowercase();
        match lower.as_str() {
            "off" | "error" | "warn" => lower,
            "info" | "debug" | "trace" => format!("warn,dbtask_worker={lower}"),
            _ => {
                return Err(format!(
                    "unknown log level {level:?}: use one of {} or a filter such as info,dbtask_worker=debug",
                    LEVELS.join(", ")
                ))
            }
        }
    };
    EnvFilter::try_new(&directives).map_err(|e| format!("invalid log filter {directives:?}: {e}"))
}

static FORMAT: std::sync::OnceLock<LogFormat> = std::sync::OnceLock::new();

/// The format the logs were set up with (text before [`init`]).
pub fn format() -> LogFormat {
    FORMAT.get().copied().unwrap_or_default()
}

/// Installs the global subscriber for a `log_level` setting (see [`filter_for`]) and a format.
/// Call once, before anything logs.
pub fn init(log_level: &str, format: LogFormat) {
    let _ = FORMAT.set(format);
    let filter = filter_for(log_level).unwrap_or_else(|_| EnvFilter::new("info"));
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(false);
    let registry = tracing_subscriber::registry()
        .with(filter)
        .with(repeats::RepeatLimit::start());
    // A second init (tests) keeps the first subscriber; that is fine.
    let _ = match format {
        LogFormat::Text => registry
            .with(
                layer
                    .fmt_fields(escape::EscapedFields)
                    .with_ansi(std::io::stderr().is_terminal()),
            )
            .try_init(),
        LogFormat::Json => registry
            .with(layer.json().flatten_event(true).with_current_span(false))
            .try_init(),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_and_directives() {
        for level in LEVELS {
            filter_for(level).unwrap();
        }
        filter_for("INFO").unwrap();
        filter_for("info,async_nats=debug").unwrap();
        assert!(filter_for("loud")
            .unwrap_err()
            .contains("unknown log level"));
        assert!(filter_for("a=notalevel").is_err());
    }
}
