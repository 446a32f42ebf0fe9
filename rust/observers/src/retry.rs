//! Per-observer retry policy: how many attempts and how long to wait between them.

use std::time::Duration;

use rand::Rng;

use crate::config::{BackoffStrategy, RetryConfig};

/// A compiled retry policy. `attempt` numbers are 1-based: attempt 1 is the first try.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub backoff: BackoffStrategy,
    pub initial_delay: Duration,
    pub max_delay: Duration,
    pub jitter: bool,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy::from(&RetryConfig::default())
    }
}

impl From<&RetryConfig> for RetryPolicy {
    fn from(c: &RetryConfig) -> Self {
        RetryPolicy {
            max_attempts: c.max_attempts.max(1),
            backoff: c.backoff_strategy,
            initial_delay: Duration::from_millis(c.initial_delay_ms),
            max_delay: Duration::from_millis(c.max_delay_ms.max(c.initial_delay_ms)),
            jitter: c.jitter,
        }
    }
}

impl RetryPolicy {
    /// The nominal delay before attempt `failed_attempt + 1`, without jitter.
    pub fn base_delay(&self, failed_attempt: u32) -> Duration {
        let n = failed_attempt.max(1);
        let delay = match self.backoff {
            BackoffStrategy::Fixed => self.initial_delay,
            BackoffStrategy::Linear => self.initial_delay.saturating_mul(n),
            BackoffStrategy::Exponential => {
                // Cap the shift so the multiplication cannot overflow.
                self.initial_delay.saturating_mul(1u32 << (n - 1).min(20))
            }
        };
        delay.min(self.max_delay)
    }

    /// The delay to sleep after `failed_attempt` failed. With jitter, a uniformly drawn value
    /// in [base/2, base] ("equal jitter"), so retries from many events spread out while the
    /// schedule stays recognisable in logs.
    pub fn delay_after(&self, failed_attempt: u32) -> Duration {
        let base = self.base_delay(failed_attempt);
        if !self.jitter || base.is_zero() {
            return base;
        }
        let half = base / 2;
        let extra = rand::rng().random_range(0..=half.as_micros() as u64);
        half + Duration::from_micros(extra)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(backoff: BackoffStrategy) -> RetryPolicy {
        RetryPolicy {
            max_attempts: 5,
            backoff,
            initial_delay: Duration::from_millis(200),
            max_delay: Duration::from_millis(1000),
            jitter: false,
        }
    }

    #[test]
    fn schedules_follow_the_strategy_and_cap() {
        let ms = |p: &RetryPolicy| {
            (1..=5)
                .map(|a| p.base_delay(a).as_millis())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            ms(&policy(BackoffStrategy::Fixed)),
            [200, 200, 200, 200, 200]
        );
        assert_eq!(
            ms(&policy(BackoffStrategy::Linear)),
            [200, 400, 600, 800, 1000]
        );
        assert_eq!(
            ms(&policy(BackoffStrategy::Exponential)),
            [200, 400, 800, 1000, 1000]
        );
    }

    #[test]
    fn jitter_stays_within_half_to_full() {
        let mut p = policy(BackoffStrategy::Exponential);
        p.jitter = true;
        for _ in 0..1000 {
            let d = p.delay_after(2);
            assert!(
                d >= Duration::from_millis(200) && d <= Duration::from_millis(400),
                "{d:?}"
            );
        }
    }

    #[test]
    fn huge_attempt_numbers_do_not_overflow() {
        let p = policy(BackoffStrategy::Exponential);
        assert_eq!(p.base_delay(u32::MAX), Duration::from_millis(1000));
    }
}
