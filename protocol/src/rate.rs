//! Rate limits: the `rate_limit` option's text and the interval between two starts.

/// A task's rate limit: at most `count` starts per `period_secs`, across all workers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub count: u64,
    pub period_secs: f64,
}

impl Rate {
    /// Parses `"100/s"`, `"10/m"`, `"1000/h"` (also `sec`, `min`, `hour`, and a bare number,
    /// which means per second as in Celery).
    pub fn parse(text: &str) -> Result<Rate, String> {
        let bad = || {
            format!(
                "invalid rate_limit {text:?}: use \"<count>/s\", \"<count>/m\" or \"<count>/h\" with a whole count of at least 1, e.g. \"100/s\""
            )
        };
        let (count, unit) = match text.trim().split_once('/') {
            Some((c, u)) => (c.trim(), u.trim()),
            None => (text.trim(), "s"),
        };
        let count: u64 = count.parse().map_err(|_| bad())?;
        let period_secs = match unit {
            "s" | "sec" | "second" => 1.0,
            "m" | "min" | "minute" => 60.0,
            "h" | "hour" => 3600.0,
            _ => return Err(bad()),
        };
        if count == 0 {
            return Err(bad());
        }
        Ok(Rate { count, period_secs })
    }

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
            Rate::parse("100/s").unwrap(),
            Rate {
                count: 100,
                period_secs: 1.0
            }
        );
        assert_eq!(Rate::parse("10/m").unwrap().period_secs, 60.0);
        assert_eq!(Rate::parse("1000/h").unwrap().interval_micros(), 3_600_000);
        assert_eq!(Rate::parse("5").unwrap().interval_micros(), 200_000);
        for bad in ["", "0/s", "x/s", "10/d", "-1/s", "1.5/s"] {
            assert!(
                Rate::parse(bad).unwrap_err().contains("invalid rate_limit"),
                "{bad}"
            );
        }
    }
}
