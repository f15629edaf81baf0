//! Named failpoints: places in the code where a test can pause or crash the process exactly,
//! for windows a random `kill -9` would almost never hit (between a write and its flush, a
//! send and its acknowledgement).
//!
//! Compiled in only with the `failpoints` feature, which `scripts/test` builds the binaries
//! with and packages never have; without it [`hit`] is an empty inline function. A test arms
//! them through the environment: `SPOKE_FAILPOINTS="name=action;other=action"`, where an
//! action is `pause(MS)`, `abort`, `pause(MS)->abort` (pause, then crash), or `error` (the
//! operation at a point asked with [`fails`] fails). Every hit of an armed point is written
//! to stderr first, so the test can see that it was reached.

/// Runs what `SPOKE_FAILPOINTS` arms at `name`, if anything.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn hit(_name: &str) {}

#[cfg(feature = "failpoints")]
pub fn hit(name: &str) {
    let _ = fails(name);
}

/// As [`hit`], for async code: a pause sleeps the task, not the worker thread, so that
/// tasks it woke (a QUIC connection's driver sending what was just written) run meanwhile.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub async fn reached(_name: &str) {}

#[cfg(feature = "failpoints")]
pub async fn reached(name: &str) {
    for step in armed::actions(name) {
        eprintln!("failpoint {name}: {step:?}");
        match step {
            armed::Step::Pause(duration) => tokio::time::sleep(duration).await,
            armed::Step::Abort => std::process::abort(),
            armed::Step::Error => {}
        }
    }
}

/// Runs what `SPOKE_FAILPOINTS` arms at `name`; whether it says the operation there fails.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn fails(_name: &str) -> bool {
    false
}

#[cfg(feature = "failpoints")]
pub fn fails(name: &str) -> bool {
    let mut failed = false;
    for step in armed::actions(name) {
        eprintln!("failpoint {name}: {step:?}");
        match step {
            armed::Step::Pause(duration) => std::thread::sleep(duration),
            // What a power cut or `kill -9` leaves: no destructors, no flush.
            armed::Step::Abort => std::process::abort(),
            armed::Step::Error => failed = true,
        }
    }
    failed
}

#[cfg(any(feature = "failpoints", test))]
mod armed {
    use std::collections::HashMap;
    use std::sync::OnceLock;
    use std::time::Duration;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Step {
        Pause(Duration),
        Abort,
        Error,
    }

    #[cfg_attr(not(feature = "failpoints"), allow(dead_code))]
    pub fn actions(name: &str) -> Vec<Step> {
        static ARMED: OnceLock<HashMap<String, Vec<Step>>> = OnceLock::new();
        ARMED
            .get_or_init(|| parse(&std::env::var("SPOKE_FAILPOINTS").unwrap_or_default()))
            .get(name)
            .cloned()
            .unwrap_or_default()
    }

    /// Parses `name=action;...`; a malformed entry is reported and ignored, since a test
    /// that misspells one then sees its point never reached.
    pub fn parse(spec: &str) -> HashMap<String, Vec<Step>> {
        let mut armed = HashMap::new();
        for entry in spec.split(';').map(str::trim).filter(|e| !e.is_empty()) {
            let parsed = entry.split_once('=').and_then(|(name, action)| {
                let steps: Option<Vec<Step>> = action.split("->").map(step).collect();
                Some((name.trim().to_owned(), steps?))
            });
            match parsed {
                Some((name, steps)) => {
                    armed.insert(name, steps);
                }
                None => eprintln!("SPOKE_FAILPOINTS: cannot parse {entry:?}; ignored"),
            }
        }
        armed
    }

    fn step(text: &str) -> Option<Step> {
        let text = text.trim();
        match text {
            "abort" => return Some(Step::Abort),
            "error" => return Some(Step::Error),
            _ => {}
        }
        let millis = text.strip_prefix("pause(")?.strip_suffix(')')?;
        Some(Step::Pause(Duration::from_millis(
            millis.trim().parse().ok()?,
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::armed::{parse, Step};
    use std::time::Duration;

    #[test]
    fn specs_parse_into_steps_and_bad_entries_are_dropped() {
        let armed =
            parse("tail.before_flush=pause(250)->abort; ship.sent = abort;bad;x=pause(q);w=error");
        assert_eq!(
            armed.get("tail.before_flush"),
            Some(&vec![Step::Pause(Duration::from_millis(250)), Step::Abort])
        );
        assert_eq!(armed.get("ship.sent"), Some(&vec![Step::Abort]));
        assert_eq!(armed.get("w"), Some(&vec![Step::Error]));
        assert_eq!(armed.len(), 3);
    }
}
