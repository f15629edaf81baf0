//! What a process costs, read from /proc: resident memory, threads, CPU time, and its TCP
//! connections to one remote port (the relay's connections to the hub).

use std::collections::HashSet;

use anyhow::Context;

/// One reading of a process's /proc files.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sample {
    pub rss_kib: u64,
    /// Peak resident memory since the process started.
    pub hwm_kib: u64,
    pub threads: u64,
    /// utime + stime, in clock ticks.
    pub cpu_ticks: u64,
}

/// `pid` is a number or `self`.
pub fn sample(pid: &str) -> anyhow::Result<Sample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let field = |name: &str| -> anyhow::Result<u64> {
        let line = status
            .lines()
            .find(|l| l.starts_with(name))
            .with_context(|| format!("no {name} in /proc/{pid}/status"))?;
        line.split_whitespace()
            .nth(1)
            .context("empty status field")?
            .parse()
            .with_context(|| format!("{name} in /proc/{pid}/status"))
    };
    Ok(Sample {
        rss_kib: field("VmRSS:")?,
        hwm_kib: field("VmHWM:")?,
        threads: field("Threads:")?,
        cpu_ticks: cpu_ticks(pid)?,
    })
}

fn cpu_ticks(pid: &str) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name may hold spaces and parentheses: fields resume after the last ')'.
    let rest = stat.rsplit_once(')').context("malformed stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of stat(5), counted from the state (field 3) at index 0.
    let utime: u64 = fields.get(11).context("no utime")?.parse()?;
    let stime: u64 = fields.get(12).context("no stime")?.parse()?;
    Ok(utime + stime)
}

/// Clock ticks per second of the CPU times in /proc (`getconf CLK_TCK`; 100 on every Linux
/// this runs on, which is the fallback).
pub fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(100.0)
}

/// Socket inodes the process holds open.
fn socket_inodes(pid: &str) -> anyhow::Result<HashSet<u64>> {
    let mut inodes = HashSet::new();
    let dir = format!("/proc/{pid}/fd");
    for entry in std::fs::read_dir(&dir).with_context(|| format!("listing {dir}"))? {
        // An fd closed between the listing and the readlink is simply gone.
        let Ok(entry) = entry else { continue };
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        let target = target.to_string_lossy();
        if let Some(inode) = target
            .strip_prefix("socket:[")
            .and_then(|rest| rest.strip_suffix(']'))
            .and_then(|inode| inode.parse().ok())
        {
            inodes.insert(inode);
        }
    }
    Ok(inodes)
}

/// One line of /proc/net/{tcp,tcp6,udp,udp6}.
struct NetEntry {
    local_port: u16,
    remote_port: u16,
    state: u8,
    inode: u64,
    /// UDP tables only: datagrams dropped at this socket (its receive buffer was full).
    drops: u64,
}

fn net_entries(pid: &str, table: &str) -> anyhow::Result<Vec<NetEntry>> {
    let path = format!("/proc/{pid}/net/{table}");
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        // No IPv6 in this namespace.
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(error).with_context(|| format!("reading {path}")),
    };
    let port = |address: &str| -> Option<u16> {
        u16::from_str_radix(address.rsplit_once(':')?.1, 16).ok()
    };
    Ok(text
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            Some(NetEntry {
                local_port: port(fields.get(1)?)?,
                remote_port: port(fields.get(2)?)?,
                state: u8::from_str_radix(fields.get(3)?, 16).ok()?,
                inode: fields.get(9)?.parse().ok()?,
                drops: fields.get(12).and_then(|d| d.parse().ok()).unwrap_or(0),
            })
        })
        .collect())
}

const TCP_ESTABLISHED: u8 = 1;

/// The process's established TCP connections to `remote_port`, and all of its established
/// TCP connections.
pub fn tcp_established(pid: &str, remote_port: u16) -> anyhow::Result<(usize, usize)> {
    let inodes = socket_inodes(pid)?;
    let (mut to_port, mut all) = (0, 0);
    for table in ["tcp", "tcp6"] {
        for entry in net_entries(pid, table)? {
            if entry.state == TCP_ESTABLISHED && inodes.contains(&entry.inode) {
                all += 1;
                if entry.remote_port == remote_port {
                    to_port += 1;
                }
            }
        }
    }
    Ok((to_port, all))
}

/// Whether the process holds a UDP socket bound to `port`: the relay listens.
pub fn udp_bound(pid: &str, port: u16) -> anyhow::Result<bool> {
    let inodes = socket_inodes(pid)?;
    for table in ["udp", "udp6"] {
        if net_entries(pid, table)?
            .iter()
            .any(|entry| entry.local_port == port && inodes.contains(&entry.inode))
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// UDP datagrams the kernel dropped, system-wide (`InErrors`, `RcvbufErrors` of
/// /proc/net/snmp): a full socket buffer at the relay or a client endpoint looks like loss.
pub fn udp_drops() -> anyhow::Result<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/net/snmp").context("reading /proc/net/snmp")?;
    let mut lines = text.lines().filter(|l| l.starts_with("Udp:"));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        anyhow::bail!("no Udp lines in /proc/net/snmp");
    };
    let field = |name: &str| -> anyhow::Result<u64> {
        let index = names
            .split_whitespace()
            .position(|n| n == name)
            .with_context(|| format!("no {name} in /proc/net/snmp"))?;
        Ok(values
            .split_whitespace()
            .nth(index)
            .context("short Udp line")?
            .parse()?)
    };
    Ok((field("InErrors")?, field("RcvbufErrors")?))
}

/// The process whose command line holds every one of `parts` (e.g. the tansu broker
/// listening on a given port), if exactly one does.
pub fn find_process(parts: &[&str]) -> Option<u32> {
    let mut found = std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .filter_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            parts.iter().all(|p| cmdline.contains(p)).then_some(pid)
        });
    let first = found.next()?;
    found.next().is_none().then_some(first)
}

/// Datagrams dropped at the process's UDP sockets because their receive buffers were full
/// (since each socket was opened).
pub fn udp_socket_drops(pid: &str) -> anyhow::Result<u64> {
    let inodes = socket_inodes(pid)?;
    let mut drops = 0;
    for table in ["udp", "udp6"] {
        drops += net_entries(pid, table)?
            .iter()
            .filter(|entry| inodes.contains(&entry.inode))
            .map(|entry| entry.drops)
            .sum::<u64>();
    }
    Ok(drops)
}

/// Open file descriptors of the process.
pub fn open_fds(pid: &str) -> anyhow::Result<usize> {
    let dir = format!("/proc/{pid}/fd");
    Ok(std::fs::read_dir(&dir)
        .with_context(|| format!("listing {dir}"))?
        .count())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_can_be_measured() -> anyhow::Result<()> {
        let sample = sample("self")?;
        assert!(sample.rss_kib > 0 && sample.threads > 0);
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let _client = std::net::TcpStream::connect(("127.0.0.1", port))?;
        let _server = listener.accept()?;
        let (to_port, all) = tcp_established("self", port)?;
        assert_eq!(
            to_port, 1,
            "the client side's remote port is the listener's"
        );
        assert!(all >= 2);
        let udp = std::net::UdpSocket::bind("127.0.0.1:0")?;
        assert!(udp_bound("self", udp.local_addr()?.port())?);
        udp_drops()?;
        assert_eq!(udp_socket_drops("self")?, 0);
        Ok(())
    }
}
