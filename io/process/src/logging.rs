//! Logs on stderr: human-readable by default (colour only on a terminal), JSON for log
//! shippers; `SPOKE_LOG` sets the filter.

use std::io::IsTerminal;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

pub fn init(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SPOKE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,librdkafka=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// An error and its causes on one line, as `{:#}` prints them, without the causes an error's
/// own message already ends with: most of spoke's errors name their cause in their message
/// (so that a log line of the error alone says it) and also return it as their source.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut line = error.to_string();
    let mut cause = error.source();
    while let Some(error) = cause {
        let message = error.to_string();
        if !line.ends_with(&message) {
            line.push_str(": ");
            line.push_str(&message);
        }
        cause = error.source();
    }
    line
}

/// Lets one log line through per interval and counts the ones it held back: for errors that
/// repeat as fast as a retry loop runs or as a peer (an attacker, say) can cause them, where
/// a line per event would bury the log. Shared by reference between tasks and threads.
#[derive(Debug)]
pub struct LogLimiter {
    interval: Duration,
    state: Mutex<LimiterState>,
}

#[derive(Debug)]
struct LimiterState {
    last: Option<Instant>,
    suppressed: u64,
}

impl LogLimiter {
    pub const fn new(interval: Duration) -> Self {
        Self {
            interval,
            state: Mutex::new(LimiterState {
                last: None,
                suppressed: 0,
            }),
        }
    }

    /// `Some(lines held back since the last one let through)` when a line may be logged now.
    pub fn allow(&self) -> Option<u64> {
        self.allow_at(Instant::now())
    }

    fn allow_at(&self, now: Instant) -> Option<u64> {
        // Only a time and a count: a panic elsewhere while it was held leaves nothing to repair.
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let within = state
            .last
            .is_some_and(|last| now.saturating_duration_since(last) < self.interval);
        if within {
            state.suppressed += 1;
            return None;
        }
        state.last = Some(now);
        Some(std::mem::take(&mut state.suppressed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limiter_lets_one_line_per_interval_through_and_counts_the_rest() {
        let limiter = LogLimiter::new(Duration::from_secs(10));
        let start = Instant::now();
        let at = |secs| start + Duration::from_secs(secs);
        assert_eq!(limiter.allow_at(at(0)), Some(0), "the first line passes");
        assert_eq!(limiter.allow_at(at(0)), None);
        assert_eq!(limiter.allow_at(at(9)), None);
        assert_eq!(
            limiter.allow_at(at(10)),
            Some(2),
            "a whole interval later, with the count of the lines held back"
        );
        assert_eq!(limiter.allow_at(at(19)), None, "the interval starts again");
        assert_eq!(limiter.allow_at(at(25)), Some(1));
        assert_eq!(limiter.allow_at(at(25)), None);
        assert_eq!(
            limiter.allow_at(at(40)),
            Some(1),
            "the count starts again too"
        );
    }

    #[test]
    fn the_limiter_uses_the_real_clock_and_holds_back_a_line_right_after_one() {
        let limiter = LogLimiter::new(Duration::from_secs(3600));
        assert_eq!(limiter.allow(), Some(0));
        assert_eq!(limiter.allow(), None);
        assert_eq!(limiter.allow(), None);
    }

    #[test]
    fn threads_sharing_a_limiter_let_one_line_through_between_them() {
        let limiter = LogLimiter::new(Duration::from_secs(3600));
        let passed: usize = std::thread::scope(|scope| {
            let threads: Vec<_> = (0..4)
                .map(|_| scope.spawn(|| (0..100).filter(|_| limiter.allow().is_some()).count()))
                .collect();
            threads
                .into_iter()
                .map(|t| t.join().expect("no panic"))
                .sum()
        });
        assert_eq!(passed, 1);
        limiter.state.lock().expect("not poisoned").last = None;
        assert_eq!(limiter.allow(), Some(399), "every other call was counted");
    }

    #[derive(Debug, thiserror::Error)]
    enum Outer {
        #[error("cannot read /etc/spoke/agent.toml: {source}")]
        Repeats { source: std::io::Error },
        #[error("spool at /var/lib/spoke")]
        Names { source: std::io::Error },
    }

    fn io_error() -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::NotFound, "No such file or directory")
    }

    #[test]
    fn a_cause_the_message_already_ends_with_is_not_repeated() {
        let error = Outer::Repeats { source: io_error() };
        assert_eq!(
            error_chain(&error),
            "cannot read /etc/spoke/agent.toml: No such file or directory"
        );
    }

    #[test]
    fn a_cause_the_message_does_not_name_is_appended() {
        let error = Outer::Names { source: io_error() };
        assert_eq!(
            error_chain(&error),
            "spool at /var/lib/spoke: No such file or directory"
        );
    }
}
