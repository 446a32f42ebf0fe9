//! The one retry type: how many attempts and how long to wait between them.
//!
//! [`RetryPolicy`] is used for everything that is tried again — an observer's actions (the
//! policy the observer declares), a publish, a connect, a pull, an acknowledgement — and
//! [`Backoff`] walks a policy for loops that retry until they succeed (a reconnect). Nothing
//! retries inside something else that retries: a change is sent at most `max_attempts` times
//! in all.

use std::time::Duration;

use rand::Rng;

use crate::config::{BackoffStrategy, RetryConfig};

/// A publish an application makes itself (`fraiseql.publish`, `RedisPublisher::publish`): 4
/// attempts, the same event id each time.
pub const PUBLISH_RETRY: RetryPolicy =
    RetryPolicy::exponential(4, Duration::from_millis(100), Duration::from_secs(2));

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
    /// Doubling delays from `initial` up to `max`, with jitter, for `max_attempts` attempts.
    pub const fn exponential(max_attempts: u32, initial: Duration, max: Duration) -> Self {
        RetryPolicy {
            max_attempts,
            backoff: BackoffStrategy::Exponential,
            initial_delay: initial,
            max_delay: max,
            jitter: true,
        }
    }

    /// A loop that retries until it succeeds (reconnects, pulls): doubling delays from
    /// `initial` up to `max`, with jitter so that many instances do not retry in step.
    pub const fn forever(initial: Duration, max: Duration) -> Self {
        Self::exponential(u32::MAX, initial, max)
    }

    /// Runs `attempt` (given its 1-based number) until it succeeds, fails with an error that
    /// `retryable` says is final, or the attempts are used up; sleeps [`Self::delay_after`]
    /// between attempts. The error is the last one, with the attempts made.
    pub async fn run<T, E, Fut>(
        &self,
        mut attempt: impl FnMut(u32) -> Fut,
        retryable: impl Fn(&E) -> bool,
    ) -> Result<T, (E, u32)>
    where
        Fut: std::future::Future<Output = Result<T, E>>,
    {
        let mut n = 1;
        loop {
            match attempt(n).await {
                Ok(v) => return Ok(v),
                Err(e) if n >= self.max_attempts || !retryable(&e) => return Err((e, n)),
                Err(_) => {
                    tokio::time::sleep(self.delay_after(n)).await;
                    n += 1;
                }
            }
        }
    }

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

/// Walks a [`RetryPolicy`] for a loop that retries until it succeeds: each failure makes the
/// next delay longer, a success starts over.
#[derive(Debug, Clone)]
pub struct Backoff {
    policy: RetryPolicy,
    failures: u32,
}

impl Backoff {
    pub fn new(policy: RetryPolicy) -> Self {
        Backoff {
            policy,
            failures: 0,
        }
    }

    /// How long to wait after one more failure.
    pub fn next_delay(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        self.policy.delay_after(self.failures)
    }

    /// After a success: the next failure waits the initial delay again.
    pub fn reset(&mut self) {
        self.failures = 0;
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
    fn a_backoff_doubles_up_to_the_cap_and_starts_over_after_a_success() {
        let mut p = policy(BackoffStrategy::Exponential);
        p.max_attempts = u32::MAX;
        let mut b = Backoff::new(p);
        let delays: Vec<_> = (0..5).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(delays, [200, 400, 800, 1000, 1000]);
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(200));
    }

    #[tokio::test(start_paused = true)]
    async fn run_stops_at_max_attempts_or_a_final_error() {
        let p = policy(BackoffStrategy::Fixed);
        let mut calls = 0;
        let out: Result<(), (&str, u32)> = p
            .run(
                |_| {
                    calls += 1;
                    async { Err("down") }
                },
                |_| true,
            )
            .await;
        assert_eq!(out, Err(("down", 5)));
        assert_eq!(calls, 5);
        let out: Result<(), (&str, u32)> = p.run(|_| async { Err("final") }, |_| false).await;
        assert_eq!(out, Err(("final", 1)));
        let out: Result<u32, (&str, u32)> = p
            .run(
                |n| async move {
                    if n < 3 {
                        Err("again")
                    } else {
                        Ok(n)
                    }
                },
                |_| true,
            )
            .await;
        assert_eq!(out, Ok(3));
    }

    #[test]
    fn huge_attempt_numbers_do_not_overflow() {
        let p = policy(BackoffStrategy::Exponential);
        assert_eq!(p.base_delay(u32::MAX), Duration::from_millis(1000));
    }
}
