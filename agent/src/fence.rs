//! The fence between relays: after batches went to one relay process, a session with another
//! starts only `relay.fence_delay` after the last of them (or the last heartbeat), because
//! without broker transactions the first relay may still have records on their way to the hub.
//!
//! The fence must be timed by a clock that neither jumps nor stops across a restart: the wall
//! clock steps (NTP, a hardware clock that boots in the past or the future), which would make
//! the wait hours long or cut it short. So the file records, beside the wall-clock time, the
//! kernel's boot id and the boot-time clock (`/proc/uptime`, which counts suspend and never
//! steps). Within one boot the wait is timed by that clock; after a reboot, when the time
//! that passed cannot be known, the agent waits the whole fence delay: never longer than the
//! delay, never shorter than what is left of it.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// How far ahead of now a fence claims batches may be sent; it is renewed when less than
/// half of this is left.
pub const SLACK: Duration = Duration::from_millis(1000);

/// The relay process batches last went to, and until when they may have been sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub relay: String,
    pub until: Instant,
}

/// A point in time by every clock the fence uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instant {
    /// Wall clock, ms since the Unix epoch.
    pub wall_ms: u64,
    /// The kernel's boot id, if it could be read.
    pub boot_id: Option<String>,
    /// Time since boot in ms (CLOCK_BOOTTIME), if it could be read.
    pub uptime_ms: Option<u64>,
}

impl Instant {
    pub fn now() -> Instant {
        Instant {
            wall_ms: crate::now_ms(),
            boot_id: std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
                .ok()
                .map(|id| id.trim().to_owned())
                .filter(|id| !id.is_empty() && !id.contains(char::is_whitespace)),
            uptime_ms: std::fs::read_to_string("/proc/uptime")
                .ok()
                .and_then(|text| parse_uptime_ms(&text)),
        }
    }

    /// This instant moved on by `by`.
    pub fn after(&self, by: Duration) -> Instant {
        let ms = u64::try_from(by.as_millis()).unwrap_or(u64::MAX);
        Instant {
            wall_ms: self.wall_ms.saturating_add(ms),
            boot_id: self.boot_id.clone(),
            uptime_ms: self.uptime_ms.map(|uptime| uptime.saturating_add(ms)),
        }
    }

    /// How long this instant is after `now`: by the boot-time clock within one boot, else by
    /// the wall clock; zero once it passed.
    pub fn left_after(&self, now: &Instant) -> Duration {
        let ms = now
            .until(self)
            .unwrap_or_else(|| i128::from(self.wall_ms) - i128::from(now.wall_ms));
        Duration::from_millis(u64::try_from(ms.max(0)).unwrap_or(u64::MAX))
    }

    /// How long from `self` until `later`, if it can be known: by the boot-time clock within
    /// one boot, else not at all.
    fn until(&self, later: &Instant) -> Option<i128> {
        match (
            &self.boot_id,
            &later.boot_id,
            self.uptime_ms,
            later.uptime_ms,
        ) {
            (Some(a), Some(b), Some(from), Some(to)) if a == b => {
                Some(i128::from(to) - i128::from(from))
            }
            _ => None,
        }
    }
}

fn parse_uptime_ms(text: &str) -> Option<u64> {
    let seconds: f64 = text.split_whitespace().next()?.parse().ok()?;
    (seconds.is_finite() && seconds >= 0.0).then_some((seconds * 1000.0) as u64)
}

/// How long a session with `relay` must still wait at `now` under `fence`.
pub fn wait(fence: &Fence, relay: &str, now: &Instant, fence_delay: Duration) -> Duration {
    if fence.relay == relay {
        return Duration::ZERO;
    }
    let delay_ms = i128::try_from(fence_delay.as_millis()).unwrap_or(i128::MAX);
    let left_ms = match now.until(&fence.until) {
        // Within one boot: exact, whatever the wall clock did.
        Some(ahead) => ahead + delay_ms,
        // A fence from another boot, or one without the boot-time clock (written by an older
        // agent, or /proc unreadable): how much time passed is unknown, so all of it.
        None if fence.until.boot_id.is_some() && now.boot_id.is_some() => delay_ms,
        None => i128::from(fence.until.wall_ms) - i128::from(now.wall_ms) + delay_ms,
    };
    Duration::from_millis(u64::try_from(left_ms.clamp(0, delay_ms)).unwrap_or(0))
}

/// Beside the spool directory: `spool` → `spool.fence`.
pub fn path(spool: &Path) -> PathBuf {
    spool.with_extension("fence")
}

/// A missing or unreadable file means no fence: the first session of a fresh install. Reads
/// `v2 WALL_MS BOOT_ID UPTIME_MS RELAY` and the older `WALL_MS RELAY`.
pub fn read(path: &Path) -> Option<Fence> {
    parse(&std::fs::read_to_string(path).ok()?)
}

fn parse(text: &str) -> Option<Fence> {
    let text = text.trim_end();
    if let Some(rest) = text.strip_prefix("v2 ") {
        let mut fields = rest.splitn(4, ' ');
        let wall_ms = fields.next()?.parse().ok()?;
        let boot_id = fields.next()?;
        let uptime_ms = fields.next()?;
        let relay = fields.next()?;
        return Some(Fence {
            relay: relay.to_owned(),
            until: Instant {
                wall_ms,
                boot_id: (boot_id != "-").then(|| boot_id.to_owned()),
                uptime_ms: uptime_ms.parse().ok(),
            },
        });
    }
    let (wall_ms, relay) = text.split_once(' ')?;
    Some(Fence {
        relay: relay.to_owned(),
        until: Instant {
            wall_ms: wall_ms.parse().ok()?,
            boot_id: None,
            uptime_ms: None,
        },
    })
}

fn format(fence: &Fence) -> String {
    let until = &fence.until;
    format!(
        "v2 {} {} {} {}\n",
        until.wall_ms,
        until.boot_id.as_deref().unwrap_or("-"),
        until
            .uptime_ms
            .map_or_else(|| "-".to_owned(), |ms| ms.to_string()),
        fence.relay
    )
}

/// Written to a temporary file, synced, renamed, and the directory synced: a crash leaves the
/// old or the new one, and once this returns a power cut cannot take the rename back.
pub fn write(path: &Path, fence: &Fence) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("fence.tmp");
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(format(fence).as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    let dir = path
        .parent()
        .filter(|dir| !dir.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    const DELAY: Duration = Duration::from_secs(15);

    fn at(wall_ms: u64, boot: &str, uptime_ms: u64) -> Instant {
        Instant {
            wall_ms,
            boot_id: Some(boot.into()),
            uptime_ms: Some(uptime_ms),
        }
    }

    fn fence(until: Instant) -> Fence {
        Fence {
            relay: "relay-a".into(),
            until,
        }
    }

    #[test]
    fn within_one_boot_the_wait_ignores_the_wall_clock() {
        let f = fence(at(1_000_000, "boot", 50_000));
        let five_s_later = |wall_ms| at(wall_ms, "boot", 55_000);
        // The wall clock as it should be, an hour ahead, and 1,000 s behind.
        for wall_ms in [1_005_000, 1_005_000 + 3_600_000, 1_005_000 - 1_000_000] {
            assert_eq!(
                wait(&f, "relay-b", &five_s_later(wall_ms), DELAY),
                Duration::from_secs(10),
                "wall clock at {wall_ms}"
            );
        }
        assert_eq!(
            wait(&f, "relay-b", &at(0, "boot", 70_000), DELAY),
            Duration::ZERO
        );
        assert_eq!(
            wait(&f, "relay-a", &five_s_later(1_005_000), DELAY),
            Duration::ZERO,
            "the same relay needs no fence"
        );
    }

    #[test]
    fn after_a_reboot_the_whole_delay_is_waited_never_more() {
        let f = fence(at(1_000_000, "old-boot", 50_000));
        // However far the wall clock moved, and even if uptime happens to be larger.
        for wall_ms in [0, 1_000_000, 9_999_999_999] {
            assert_eq!(
                wait(&f, "relay-b", &at(wall_ms, "new-boot", 90_000), DELAY),
                DELAY
            );
        }
    }

    #[test]
    fn a_fence_of_an_older_agent_is_timed_by_the_wall_clock_within_the_delay() {
        let f = parse("1000000 relay-a").expect("old format");
        let now = |wall_ms| at(wall_ms, "boot", 1);
        assert_eq!(
            wait(&f, "relay-b", &now(1_005_000), DELAY),
            Duration::from_secs(10)
        );
        assert_eq!(
            wait(&f, "relay-b", &now(1_000_000 - 900_000), DELAY),
            DELAY,
            "a clock 15 minutes behind waits the delay, not 15 minutes"
        );
        assert_eq!(wait(&f, "relay-b", &now(2_000_000), DELAY), Duration::ZERO);
    }

    #[test]
    fn renewal_is_timed_by_the_boot_clock_too() {
        let until = at(1_000_000, "boot", 50_000);
        // The wall clock went back 15 minutes: by it the fence would last that much more.
        let now = at(1_000_000 - 900_000, "boot", 49_800);
        assert_eq!(until.left_after(&now), Duration::from_millis(200));
        assert_eq!(until.left_after(&at(0, "boot", 60_000)), Duration::ZERO);
    }

    #[test]
    fn fences_round_trip_through_the_file_format() {
        let f = Fence {
            relay: "host:7000/123-456".into(),
            until: at(
                1_700_000_000_000,
                "f87aff26-1a1b-42ed-965b-7fe715d2938e",
                3_123_420,
            ),
        };
        assert_eq!(parse(&format(&f)), Some(f));
        let unknown = Fence {
            relay: "r".into(),
            until: Instant {
                wall_ms: 5,
                boot_id: None,
                uptime_ms: None,
            },
        };
        assert_eq!(parse(&format(&unknown)), Some(unknown));
        assert_eq!(parse("v2 garbage"), None);
        assert_eq!(parse(""), None);
        assert_eq!(parse_uptime_ms("3123.42 2717.29\n"), Some(3_123_420));
    }
}
