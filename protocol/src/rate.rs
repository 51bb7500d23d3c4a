//! Rate limits: the `rate_limit` option's text and the interval between two starts.

/// A task's rate limit: at most `count` starts per `period_secs`, across all workers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub count: u64,
    pub period_secs: f64,
}

/// Why a `rate_limit` text was refused. Each variant keeps the text; a count that is not a
/// whole number keeps the parser's error as its source.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RateError {
    #[error("invalid rate_limit {text:?}: the count is not a whole number ({source}); {HOW}")]
    Count {
        text: String,
        source: std::num::ParseIntError,
    },
    #[error("invalid rate_limit {text:?}: the count must be at least 1; {HOW}")]
    Zero { text: String },
    #[error("invalid rate_limit {text:?}: unknown unit {unit:?}; {HOW}")]
    Unit { text: String, unit: String },
}

/// What every [`RateError`] message ends with: what to write instead.
const HOW: &str = "use \"<count>/s\", \"<count>/m\" or \"<count>/h\" with a whole count of at least 1, e.g. \"100/s\"";

impl std::str::FromStr for Rate {
    type Err = RateError;

    /// Parses `"100/s"`, `"10/m"`, `"1000/h"` (also `sec`, `min`, `hour`, and a bare number,
    /// which means per second as in Celery).
    fn from_str(text: &str) -> Result<Rate, RateError> {
        let (count, unit) = match text.trim().split_once('/') {
            Some((c, u)) => (c.trim(), u.trim()),
            None => (text.trim(), "s"),
        };
        let count: u64 = count.parse().map_err(|source| RateError::Count {
            text: text.to_owned(),
            source,
        })?;
        let period_secs = match unit {
            "s" | "sec" | "second" => 1.0,
            "m" | "min" | "minute" => 60.0,
            "h" | "hour" => 3600.0,
            _ => {
                return Err(RateError::Unit {
                    text: text.to_owned(),
                    unit: unit.to_owned(),
                })
            }
        };
        if count == 0 {
            return Err(RateError::Zero {
                text: text.to_owned(),
            });
        }
        Ok(Rate { count, period_secs })
    }
}

impl Rate {
    /// Time between two starts, in microseconds.
    pub fn interval_micros(&self) -> u64 {
        ((self.period_secs * 1e6) / self.count as f64)
            .round()
            .max(1.0) as u64
    }
}

#[cfg(test)]
mod tests {
    use crate::*;

    #[test]
    fn rates_parse_or_explain() {
        assert_eq!(
            "100/s".parse::<Rate>().unwrap(),
            Rate {
                count: 100,
                period_secs: 1.0
            }
        );
        assert_eq!("10/m".parse::<Rate>().unwrap().period_secs, 60.0);
        assert_eq!(
            "1000/h".parse::<Rate>().unwrap().interval_micros(),
            3_600_000
        );
        assert_eq!("5".parse::<Rate>().unwrap().interval_micros(), 200_000);
        for bad in ["", "0/s", "x/s", "10/d", "-1/s", "1.5/s"] {
            assert!(
                bad.parse::<Rate>()
                    .unwrap_err()
                    .to_string()
                    .contains("invalid rate_limit"),
                "{bad}"
            );
        }
        assert!(matches!(
            "1.5/s".parse::<Rate>(),
            Err(RateError::Count { source, .. }) if source.to_string().contains("invalid digit")
        ));
        assert!(matches!("0/s".parse::<Rate>(), Err(RateError::Zero { .. })));
        assert!(matches!(
            "10/d".parse::<Rate>(),
            Err(RateError::Unit { unit, .. }) if unit == "d"
        ));
    }
}
