//! Network namespaces and TUN devices, through the `ip` tool and setns(2).

use std::ffi::OsStr;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use crate::WanError;

/// Every namespace this module creates is named `spk-<pid>-...`, so a later run can tell
/// which ones a dead process left behind.
pub(crate) const PREFIX: &str = "spk-";

/// The interface name inside each namespace.
pub const DEVICE: &str = "wan0";

/// A network namespace this process created; dropping it deletes it.
#[derive(Debug)]
pub struct Namespace {
    name: String,
    addr: Ipv4Addr,
}

impl Namespace {
    pub(crate) fn create(name: &str, addr: Ipv4Addr) -> Result<Namespace, WanError> {
        ip(["netns", "add", name])?;
        let ns = Namespace {
            name: name.to_owned(),
            addr,
        };
        ip(["-n", name, "link", "set", "lo", "up"])?;
        // IPv4 only: IPv6 would send router solicitations and MLD reports across the link,
        // packets a test counting its own datagrams did not send.
        for scope in ["all", "default"] {
            let key = format!("net.ipv6.conf.{scope}.disable_ipv6=1");
            let status = ns
                .command("sysctl")
                .args(["-qw", &key])
                .stdin(Stdio::null())
                .status()
                .map_err(WanError::IpSpawn)?;
            if !status.success() {
                return Err(WanError::Ip {
                    args: format!("netns exec {name} sysctl -w {key}"),
                    stderr: status.to_string(),
                });
            }
        }
        Ok(ns)
    }

    /// Moves the TUN device `device` in, renames it [`DEVICE`], and addresses it
    /// point-to-point towards `peer`.
    pub(crate) fn adopt(&self, device: &str, peer: Ipv4Addr) -> Result<(), WanError> {
        let ns = self.name.as_str();
        ip(["link", "set", device, "netns", ns])?;
        ip(["-n", ns, "link", "set", device, "name", DEVICE])?;
        let local = self.addr.to_string();
        let peer = peer.to_string();
        ip([
            "-n", ns, "addr", "add", &local, "peer", &peer, "dev", DEVICE,
        ])?;
        // A TUN device queues 500 packets by default: 60 ms at 100 Mbit/s. A forwarder thread
        // descheduled for longer on a busy machine would turn into loss the spec never asked
        // for, so give the kernel side room.
        ip(["-n", ns, "link", "set", DEVICE, "txqueuelen", "10000", "up"])?;
        Ok(())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// This side's address on [`DEVICE`].
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// `ip netns exec <name> <program>`: add arguments, then spawn or run it.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name]).arg(program);
        command
    }

    /// Runs `f` on a thread that has joined this namespace and returns its result. A socket
    /// lives in the namespace it was created in, so sockets made by `f` can be used from any
    /// thread (and any runtime) of this process afterwards.
    pub fn enter<T, F>(&self, f: F) -> Result<T, WanError>
    where
        T: Send,
        F: FnOnce() -> std::io::Result<T> + Send,
    {
        run_in(&self.name, f)
    }
}

/// [`Namespace::enter`] by name, for code that holds only the name (a test environment's
/// processes outlive no `Link`, but must be started and reached inside its namespaces).
/// Threads and processes started by `f` stay in the namespace.
pub fn run_in<T, F>(name: &str, f: F) -> Result<T, WanError>
where
    T: Send,
    F: FnOnce() -> std::io::Result<T> + Send,
{
    let enter_error = |source| WanError::Enter {
        name: name.to_owned(),
        source,
    };
    let file = std::fs::File::open(format!("/run/netns/{name}")).map_err(enter_error)?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(|e| enter_error(std::io::Error::from(e)))?;
                f().map_err(|source| WanError::Inside {
                    name: name.to_owned(),
                    source,
                })
            })
            .join()
            .unwrap_or_else(|_| {
                Err(enter_error(std::io::Error::other(
                    "panicked inside the namespace",
                )))
            })
    })
}

impl Drop for Namespace {
    fn drop(&mut self) {
        // Processes still running inside keep the namespace alive until they exit; the name
        // is gone either way.
        if let Err(error) = ip(["netns", "del", &self.name]) {
            eprintln!("wan: {error}");
        }
    }
}

/// A TUN device (IFF_TUN | IFF_NO_PI) in this process's namespace, not yet configured.
pub(crate) struct Tun {
    name: String,
    device: tun::Device,
}

impl std::fmt::Debug for Tun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tun").field("name", &self.name).finish()
    }
}

impl Tun {
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn into_device(self) -> tun::Device {
        self.device
    }
}

pub(crate) fn tun_device(name: &str) -> Result<Tun, WanError> {
    let mut config = tun::Configuration::default();
    config.tun_name(name).layer(tun::Layer::L3);
    // Addresses and state are set with `ip` once the device is in its namespace.
    config.platform_config(|p| {
        p.ensure_root_privileges(false);
    });
    let device = tun::create(&config).map_err(|source| WanError::Tun {
        name: name.to_owned(),
        source,
    })?;
    Ok(Tun {
        name: name.to_owned(),
        device,
    })
}

/// Deletes namespaces named by [`PREFIX`] whose creating process no longer exists (a test
/// killed by SIGKILL never runs its guards).
pub(crate) fn sweep_stale() {
    let Ok(output) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = ip(["netns", "del", name]);
        }
    }
}

fn ip<const N: usize>(args: [&str; N]) -> Result<(), WanError> {
    let output = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(WanError::IpSpawn)?;
    if !output.status.success() {
        return Err(WanError::Ip {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(())
}
