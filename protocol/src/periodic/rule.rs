//! When a schedule fires: every N seconds, or on a cron pattern in an IANA time zone; the
//! next run after a given time; and a tick's time and id. Pure functions of their inputs.

use std::str::FromStr;

use chrono::{DateTime, TimeZone, Utc};
use chrono_tz::Tz;
use croner::parser::{CronParser, Seconds, Year};

use super::PeriodicError;

/// The time zone a schedule without one uses.
pub const DEFAULT_TZ: &str = "UTC";

/// When a schedule fires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rule {
    /// Every so many whole seconds (at least 1), counted from when the schedule was stored.
    Every(u64),
    /// A 6-field cron pattern (seconds first), evaluated in the IANA zone `tz`.
    Cron { pattern: String, tz: String },
}

impl Rule {
    /// `every` (seconds) or `cron` (5 fields, converted by prefixing `0` for the seconds, or
    /// 6 fields), exactly one of them, with `tz` (an IANA name; only for cron).
    pub fn new(
        every: Option<f64>,
        cron: Option<&str>,
        tz: Option<&str>,
    ) -> Result<Rule, PeriodicError> {
        let tz = tz.unwrap_or(DEFAULT_TZ);
        match (every, cron) {
            (Some(_), Some(_)) => Err(PeriodicError::Rule("give either every= or cron=, not both")),
            (None, None) => Err(PeriodicError::Rule(
                "give every= (seconds) or cron= (a crontab line)",
            )),
            (Some(every), None) => {
                if tz != DEFAULT_TZ {
                    return Err(PeriodicError::Rule(
                        "tz= applies to cron= schedules only: every= counts seconds whatever the zone",
                    ));
                }
                let whole =
                    every.is_finite() && every >= 1.0 && every.fract() == 0.0 && every <= 1e9;
                if !whole {
                    return Err(PeriodicError::Every(every));
                }
                Ok(Rule::Every(every as u64))
            }
            (None, Some(cron)) => {
                check_tz(tz)?;
                Ok(Rule::Cron {
                    pattern: cron_pattern(cron)?,
                    tz: tz.to_owned(),
                })
            }
        }
    }

    /// The `Nats-Schedule` header value: `@every 30s` or the 6-field pattern.
    pub fn header(&self) -> String {
        match self {
            Rule::Every(secs) => format!("@every {secs}s"),
            Rule::Cron { pattern, .. } => pattern.clone(),
        }
    }

    /// The rule from a stored `Nats-Schedule` value and `Nats-Schedule-Time-Zone` header.
    pub fn from_header(value: &str, tz: Option<&str>) -> Result<Rule, PeriodicError> {
        match value.strip_prefix("@every ") {
            Some(rest) => {
                let secs = rest
                    .strip_suffix('s')
                    .and_then(|s| s.parse::<u64>().ok())
                    .ok_or_else(|| PeriodicError::Stored(format!("unknown interval {value:?}")))?;
                Ok(Rule::Every(secs))
            }
            None => Rule::new(None, Some(value), tz),
        }
    }

    /// The first run strictly after `now` (Unix seconds). For `every`, runs fall on whole
    /// seconds `stored_at + k * every` rounded up, as the server fires them; `None` when the
    /// pattern never matches again.
    pub fn next_after(&self, now: f64, stored_at: f64) -> Option<f64> {
        match self {
            Rule::Every(secs) => {
                let step = *secs as f64;
                let first = (stored_at + step).ceil();
                if now < first {
                    return Some(first);
                }
                let k = ((now - first) / step).floor() + 1.0;
                Some(first + k * step)
            }
            Rule::Cron { pattern, tz } => {
                let cron = parser().parse(pattern).ok()?;
                let tz = Tz::from_str(tz).ok()?;
                let start = Utc
                    .timestamp_opt(now.floor() as i64, 0)
                    .single()?
                    .with_timezone(&tz);
                let next = cron.find_next_occurrence(&start, false).ok()?;
                Some(next.timestamp() as f64)
            }
        }
    }
}

fn parser() -> CronParser {
    CronParser::builder()
        .seconds(Seconds::Required)
        .year(Year::Disallowed)
        .build()
}

/// A crontab line as the server's 6-field pattern: 5 fields get `0` seconds. Only what both
/// the server and this check understand passes: numbers, month and weekday names, `*`, `,`,
/// `-` and `/`.
fn cron_pattern(cron: &str) -> Result<String, PeriodicError> {
    let fields: Vec<&str> = cron.split_whitespace().collect();
    let pattern = match fields.len() {
        5 => format!("0 {}", fields.join(" ")),
        6 => fields.join(" "),
        n => {
            return Err(PeriodicError::Cron(
                cron.to_owned(),
                format!(
                    "it has {n} fields: use 5 (minute hour day month weekday) or 6 (seconds first)"
                ),
            ))
        }
    };
    // Each value between `,` `-` `/` is `*`, a number or a three-letter month or day name
    // (croner checks which field takes names): `L`, `W`, `#`, `?` are croner's, not the server's.
    let plain = |v: &str| {
        v == "*"
            || (!v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
            || (v.len() == 3 && v.bytes().all(|b| b.is_ascii_alphabetic()))
    };
    if let Some(bad) = pattern.split([' ', ',', '-', '/']).find(|v| !plain(v)) {
        return Err(PeriodicError::Cron(
            cron.to_owned(),
            format!("{bad:?} is not allowed: use numbers, month and weekday names, * , - and /"),
        ));
    }
    parser()
        .parse(&pattern)
        .map_err(|e| PeriodicError::Cron(cron.to_owned(), e.to_string()))?;
    Ok(pattern)
}

fn check_tz(tz: &str) -> Result<(), PeriodicError> {
    if tz.is_empty() || Tz::from_str(tz).is_err() {
        return Err(PeriodicError::Tz(tz.to_owned()));
    }
    Ok(())
}

/// The time of a tick the server stored at `published` (Unix seconds): its whole second
/// (ticks land on whole seconds, a millisecond or two late).
pub fn tick_time(published: f64) -> i64 {
    published.floor() as i64
}

/// The task id of the tick of schedule `name` at `tick` (Unix seconds):
/// `<name>:tick:20261207T160844Z`. Two copies of one tick get one id, so it runs once.
pub fn tick_id(name: &str, tick: i64) -> String {
    let at = Utc
        .timestamp_opt(tick, 0)
        .single()
        .unwrap_or(DateTime::<Utc>::UNIX_EPOCH);
    format!("{name}:tick:{}", at.format("%Y%m%dT%H%M%SZ"))
}

/// `Nats-Schedule-Next` (RFC 3339, with the zone's offset for a cron in a zone) as Unix
/// seconds; `None` when absent or unreadable.
pub fn parse_next(value: &str) -> Option<f64> {
    DateTime::parse_from_rfc3339(value.trim())
        .ok()
        .map(|t| t.timestamp() as f64 + f64::from(t.timestamp_subsec_millis()) / 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_takes_whole_seconds_from_one_up() {
        assert_eq!(Rule::new(Some(30.0), None, None).unwrap(), Rule::Every(30));
        assert_eq!(
            Rule::new(Some(30.0), None, None).unwrap().header(),
            "@every 30s"
        );
        for bad in [0.0, -1.0, 0.5, 1.5, f64::NAN, f64::INFINITY] {
            assert!(
                matches!(
                    Rule::new(Some(bad), None, None),
                    Err(PeriodicError::Every(_))
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn five_fields_get_zero_seconds_and_others_are_refused() {
        let rule = Rule::new(None, Some("0 * * * *"), Some("Europe/Paris")).unwrap();
        assert_eq!(rule.header(), "0 0 * * * *");
        assert_eq!(
            Rule::new(None, Some("*/5 * * * * *"), None)
                .unwrap()
                .header(),
            "*/5 * * * * *"
        );
        assert_eq!(
            Rule::new(None, Some("0 9 * * mon-fri"), None)
                .unwrap()
                .header(),
            "0 0 9 * * mon-fri"
        );
        for bad in [
            "* * * *",
            "* * * * * * *",
            "",
            "61 * * * *",
            "* * * * 1#2",
            "0 0 L * *",
            "0 0 15W * *",
            "0 0 ? * *",
            "0 0 * * 5L",
            "0 0 * * MONDAY",
        ] {
            let err = Rule::new(None, Some(bad), None).unwrap_err();
            assert!(matches!(err, PeriodicError::Cron(..)), "{bad}: {err}");
        }
    }

    #[test]
    fn zones_both_and_neither_are_checked() {
        assert!(matches!(
            Rule::new(None, Some("* * * * *"), Some("Mars/Base")),
            Err(PeriodicError::Tz(_))
        ));
        assert!(matches!(
            Rule::new(None, Some("* * * * *"), Some("")),
            Err(PeriodicError::Tz(_))
        ));
        assert!(matches!(
            Rule::new(Some(1.0), Some("* * * * *"), None),
            Err(PeriodicError::Rule(_))
        ));
        assert!(matches!(
            Rule::new(None, None, None),
            Err(PeriodicError::Rule(_))
        ));
        assert!(matches!(
            Rule::new(Some(5.0), None, Some("Europe/Paris")),
            Err(PeriodicError::Rule(_))
        ));
    }

    #[test]
    fn next_runs_follow_the_rule_and_the_zone() {
        // 2026-12-07T16:08:04.796Z stored, every 2 s: 16:08:07, :09, ...
        let stored = 1_796_659_684.796;
        let every = Rule::Every(2);
        assert_eq!(every.next_after(stored, stored), Some(1_796_659_687.0));
        assert_eq!(
            every.next_after(1_796_659_687.0, stored),
            Some(1_796_659_689.0)
        );
        assert_eq!(
            every.next_after(1_796_659_688.5, stored),
            Some(1_796_659_689.0)
        );
        // Every minute: the next whole minute.
        let minute = Rule::new(None, Some("* * * * *"), None).unwrap();
        assert_eq!(
            minute.next_after(1_796_659_684.796, 0.0),
            Some(1_796_659_740.0)
        );
        // 09:00 in Paris is 08:00 UTC in winter, 07:00 UTC in summer.
        let paris = Rule::new(None, Some("0 9 * * *"), Some("Europe/Paris")).unwrap();
        let winter = 1_796_659_684.0; // 2026-12-07
        assert_eq!(paris.next_after(winter, 0.0), Some(1_796_716_800.0));
        let summer = 1_783_000_000.0; // 2026-07-02T13:46:40Z
        assert_eq!(paris.next_after(summer, 0.0), Some(1_783_062_000.0));
    }

    #[test]
    fn tick_ids_name_the_schedule_and_the_second() {
        assert_eq!(tick_time(1_796_659_687.001_2), 1_796_659_687);
        assert_eq!(
            tick_id("cleanup", 1_796_659_687),
            "cleanup:tick:20261207T160807Z"
        );
        assert_eq!(
            parse_next("2026-12-07T17:08:09+01:00"),
            Some(1_796_659_689.0)
        );
        assert_eq!(parse_next("2026-12-07T16:08:09Z"), Some(1_796_659_689.0));
        assert_eq!(parse_next("purge"), None);
    }

    #[test]
    fn a_stored_rule_reads_back() {
        let every = Rule::Every(30);
        assert_eq!(Rule::from_header(&every.header(), None).unwrap(), every);
        let cron = Rule::new(None, Some("0 9 * * *"), Some("Europe/Paris")).unwrap();
        assert_eq!(
            Rule::from_header(&cron.header(), Some("Europe/Paris")).unwrap(),
            cron
        );
    }
}
