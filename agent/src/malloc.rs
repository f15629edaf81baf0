//! glibc's allocator, set for a small edge box before the agent starts any thread.
//!
//! Two of glibc's defaults cost the agent memory it holds on to without using it:
//! - up to 8 arenas per core, one taken by each thread that allocates: librdkafka's broker
//!   threads, sled's flusher and tokio's workers each hold chunk-sized buffers in an arena of
//!   their own, and the free space of one arena serves no other thread;
//! - a threshold for `mmap` that rises (up to 32 MiB) each time a large mapped buffer is freed,
//!   after which chunk-sized buffers come from the heap, whose pages stay with the process
//!   while any later allocation sits above them.
//!
//! With two arenas and a fixed 128 KiB threshold, a 100,000-record backlog at 20 Mbit/s peaked
//! at 55.4 MiB of RSS where it reached 77.7 MiB with the defaults (docs/benchmarks.md).
//!
//! An operator who sets glibc's allocator through the environment (`MALLOC_ARENA_MAX`,
//! `GLIBC_TUNABLES=glibc.malloc...`) keeps what they set.

/// Arenas: two, so that the tailer and the shipper rarely wait for each other's lock, and
/// glibc's per-thread caches serve most small allocations without any lock.
pub const ARENA_MAX: i32 = 2;
/// Allocations from this size on are mapped, and unmapped when freed: chunk buffers, zstd's
/// windows and librdkafka's fetch buffers go back to the system when done with.
pub const MMAP_THRESHOLD: i32 = 128 * 1024;
/// Free memory at the top of the heap beyond this is returned to the system.
pub const TRIM_THRESHOLD: i32 = 128 * 1024;

/// What [`tune`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tuning {
    /// The agent's settings are in force.
    Applied,
    /// The environment sets the allocator (the named variable); it was left alone.
    LeftToEnvironment(String),
    /// glibc refused a setting (the named one); the others may be in force.
    Refused(&'static str),
    /// Not glibc: nothing to set.
    NotGlibc,
}

/// Sets glibc's allocator as the module documentation says, unless the environment does.
/// Call it first thing in `main`, before any thread starts: glibc's `mallopt` is not safe
/// to call while other threads allocate.
pub fn tune() -> Tuning {
    if let Some(variable) = set_by_environment(std::env::vars_os()) {
        return Tuning::LeftToEnvironment(variable);
    }
    apply()
}

/// The first variable of `vars` through which the environment sets glibc's allocator.
fn set_by_environment(
    vars: impl IntoIterator<Item = (std::ffi::OsString, std::ffi::OsString)>,
) -> Option<String> {
    vars.into_iter().find_map(|(name, value)| {
        let name = name.to_string_lossy();
        let sets_malloc = name.starts_with("MALLOC_")
            || (name == "GLIBC_TUNABLES" && value.to_string_lossy().contains("glibc.malloc."));
        sets_malloc.then(|| name.into_owned())
    })
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn apply() -> Tuning {
    let settings = [
        ("arena_max", libc::M_ARENA_MAX, ARENA_MAX),
        ("mmap_threshold", libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD),
        ("trim_threshold", libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD),
    ];
    for (name, parameter, value) in settings {
        // SAFETY: mallopt takes two integers and no pointer; the caller runs this before any
        // other thread exists (see `tune`), which is what glibc asks of it.
        #[allow(unsafe_code)]
        let accepted = unsafe { libc::mallopt(parameter, value) } == 1;
        if !accepted {
            return Tuning::Refused(name);
        }
    }
    Tuning::Applied
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn apply() -> Tuning {
    Tuning::NotGlibc
}

#[cfg(test)]
mod tests {
    use std::ffi::OsString;

    use super::*;

    fn env(vars: &[(&str, &str)]) -> Vec<(OsString, OsString)> {
        vars.iter()
            .map(|(name, value)| (OsString::from(name), OsString::from(value)))
            .collect()
    }

    #[test]
    fn an_operators_malloc_setting_is_left_alone() {
        let vars = env(&[("PATH", "/usr/bin"), ("MALLOC_ARENA_MAX", "4")]);
        assert_eq!(
            set_by_environment(vars).as_deref(),
            Some("MALLOC_ARENA_MAX")
        );
        let vars = env(&[("GLIBC_TUNABLES", "glibc.malloc.arena_max=8")]);
        assert_eq!(set_by_environment(vars).as_deref(), Some("GLIBC_TUNABLES"));
    }

    #[test]
    fn other_settings_do_not_count_as_the_operators() {
        let vars = env(&[
            ("PATH", "/usr/bin"),
            ("GLIBC_TUNABLES", "glibc.rtld.optional_static_tls=512"),
            ("MY_MALLOC_ARENA_MAX", "4"),
        ]);
        assert_eq!(set_by_environment(vars), None);
    }

    #[test]
    fn glibc_accepts_the_settings() {
        // Other test threads may allocate meanwhile; these settings are safe to race with
        // in practice, and the test only shows that glibc knows and accepts all three.
        let expected = if cfg!(all(target_os = "linux", target_env = "gnu")) {
            Tuning::Applied
        } else {
            Tuning::NotGlibc
        };
        assert_eq!(apply(), expected);
    }
}
