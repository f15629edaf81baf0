//! The wall clock as both binaries stamp what they report (`/status`, the fleet view, fences).

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch. A clock set before 1970 reads 0 rather than failing:
/// the stamps are for operators and ages, and a process must not stop over them.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn now_is_after_this_code_was_written_and_does_not_go_back_between_two_reads() {
        // 2024-01-01T00:00:00Z.
        let first = now_ms();
        assert!(first > 1_704_067_200_000, "{first}");
        assert!(now_ms() >= first);
    }
}
