//! spoke binaries as child processes, with their logs kept for failure reports.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// Where the workspace's binaries are: `SPOKE_BIN_DIR`, else the profile directory this test
/// binary was built into. `scripts/test` builds them first.
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let dir = match std::env::var_os("SPOKE_BIN_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let exe = std::env::current_exe()?;
            let dir = exe.parent().context("test binary has no directory")?;
            // Test binaries live in `target/<profile>/deps`, tools like spoke-bench beside
            // the spoke binaries.
            if dir.ends_with("deps") {
                dir.parent()
                    .context("test binary directory has no parent")?
                    .to_owned()
            } else {
                dir.to_owned()
            }
        }
    };
    let path = dir.join(name);
    if !path.is_file() {
        bail!(
            "{} not found; build it first with `cargo build --bins` (or set SPOKE_BIN_DIR)",
            path.display()
        );
    }
    Ok(path)
}

/// Runs a spoke binary to completion (pki, check).
pub fn run(name: &str, args: &[&str]) -> anyhow::Result<Output> {
    run_with_env(name, args, &[])
}

/// As [`run`], with extra environment variables.
pub fn run_with_env(name: &str, args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<Output> {
    let output = Command::new(binary(name)?)
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {name}"))?;
    Ok(output)
}

/// A long-running spoke process. Its stderr goes to a log file that [`Spoke::log`] returns
/// and whose tail is printed when the guard is dropped (nextest shows it for failed tests).
#[derive(Debug)]
pub struct Spoke {
    name: String,
    log: PathBuf,
    child: Option<Child>,
    /// Started under a wrapper (e.g. `faketime`), which may not pass a kill on to the process
    /// it started: dropping the guard kills that process too.
    wrapped: bool,
}

impl Spoke {
    pub fn start(name: &str, args: &[&str], log: PathBuf) -> anyhow::Result<Spoke> {
        Self::start_with_env(name, args, log, &[])
    }

    /// As [`Spoke::start`], with extra environment variables (e.g. `SPOKE_FAILPOINTS`).
    pub fn start_with_env(
        name: &str,
        args: &[&str],
        log: PathBuf,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Spoke> {
        Self::start_under(&[], name, args, log, env)
    }

    /// As [`Spoke::start_with_env`], run by `wrapper` (e.g. `strace -f -o FILE`): the guard
    /// then owns the wrapper, and [`Spoke::stop_wrapped`] stops the spoke process inside it.
    pub fn start_under(
        wrapper: &[&str],
        name: &str,
        args: &[&str],
        log: PathBuf,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Spoke> {
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let program = binary(name)?;
        let mut command = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut command = Command::new(first);
                command.args(rest).arg(&program);
                command
            }
            None => Command::new(&program),
        };
        let child = command
            .args(args)
            .env(
                "SPOKE_LOG",
                std::env::var("SPOKE_LOG")
                    .unwrap_or_else(|_| "info,spoke_agent=debug,librdkafka=warn".into()),
            )
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Spoke {
            name: name.to_owned(),
            log,
            child: Some(child),
            wrapped: !wrapper.is_empty(),
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then wait for a clean exit; fails if the process needed SIGKILL or exited
    /// with an error.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let status = terminate(&mut child, Duration::from_secs(30))?;
        if !status.success() {
            bail!(
                "{} exited with {status}; log:\n{}",
                self.name,
                tail_of(&self.log, 6000)
            );
        }
        Ok(())
    }

    /// SIGTERM to the processes the wrapper started, then waits for the wrapper to end.
    pub fn stop_wrapped(&mut self) -> anyhow::Result<()> {
        let pid = self.pid().context("process already stopped")?;
        let status = Command::new("pkill")
            .args(["-TERM", "-P", &pid.to_string()])
            .status()?;
        anyhow::ensure!(status.success(), "pkill -P {pid} found nothing to stop");
        if let Some(mut child) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(30);
            while child.try_wait()?.is_none() {
                if Instant::now() > deadline {
                    child.kill()?;
                    bail!("{} did not stop within 30 s", self.name);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Ok(())
    }

    /// SIGKILL to the processes the wrapper started, then to the wrapper.
    pub fn kill9_wrapped(&mut self) -> anyhow::Result<()> {
        let pid = self.pid().context("process already stopped")?;
        let status = Command::new("pkill")
            .args(["-KILL", "-P", &pid.to_string()])
            .status()?;
        anyhow::ensure!(status.success(), "pkill -P {pid} found nothing to kill");
        self.kill9()
    }

    /// SIGKILL: no chance to flush, drain or say goodbye.
    pub fn kill9(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// Sends a signal by name (`STOP`, `CONT`, `HUP`, ...).
    pub fn signal(&self, name: &str) -> anyhow::Result<()> {
        let pid = self.pid().context("process already stopped")?;
        let status = Command::new("kill")
            .args([&format!("-{name}"), &pid.to_string()])
            .status()?;
        anyhow::ensure!(status.success(), "kill -{name} {pid} failed");
        Ok(())
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

static PRINT_LOGS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Stops printing child logs when their guards drop: for tools (the benchmark) whose output
/// is not captured by a test runner.
pub fn quiet_logs() {
    PRINT_LOGS.store(false, std::sync::atomic::Ordering::Relaxed);
}

impl Drop for Spoke {
    fn drop(&mut self) {
        if let (true, Some(pid)) = (self.wrapped, self.pid()) {
            // A failed test drops its guards: without this the wrapped process outlives it.
            let _ = Command::new("pkill")
                .args(["-KILL", "-P", &pid.to_string()])
                .status();
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // The test runner shows a test's output only when it fails: that is when this helps.
        if !PRINT_LOGS.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        eprintln!(
            "----- {} log ({}) -----\n{}",
            self.name,
            self.log.display(),
            tail_of(&self.log, 20_000)
        );
    }
}

/// SIGTERM, wait up to `grace`, then SIGKILL.
pub fn terminate(child: &mut Child, grace: Duration) -> anyhow::Result<std::process::ExitStatus> {
    let pid = child.id().to_string();
    let _ = Command::new("kill").args(["-TERM", &pid]).status();
    let deadline = Instant::now() + grace;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() > deadline {
            child.kill()?;
            let status = child.wait()?;
            bail!("process {pid} ignored SIGTERM for {grace:?} and was killed ({status})");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The last `max` bytes of a log file, for error messages.
pub fn tail_of(path: &Path, max: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let start = text.len().saturating_sub(max);
    let start = (start..text.len())
        .find(|i| text.is_char_boundary(*i))
        .unwrap_or(0);
    text[start..].to_owned()
}
