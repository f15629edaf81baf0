//! The relay under measurement: a real `spoke-relay` process (from `SPOKE_BIN_DIR`, else beside
//! the simulator's binary), its configuration, and the certificates of the fleet. A failover
//! run starts two of them, alike but for their ports, config file and log.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use quinn::crypto::rustls::QuicClientConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use spoke_tests::pki::{Authority, Identity, Validity};
use spoke_tests::process::Spoke;

/// What goes into the relay's configuration besides the fleet's needs.
#[derive(Debug, Clone, Default)]
pub struct RelaySetup {
    /// Lines inside `[hub]`.
    pub hub_extra: String,
    /// Lines inside `[limits]`, after the ones sized for the fleet.
    pub limits_extra: String,
    /// TOML appended at the end (other tables).
    pub extra: String,
    /// The relay is killed, and the run fails, past this many threads or this resident
    /// memory: a relay with a producer (and threads) per site would otherwise take the
    /// machine's last process ids (pid_max) or memory, and everyone else's with them.
    pub max_threads: u64,
    pub max_rss_mib: u64,
}

impl RelaySetup {
    /// Whether the relay stays within the caps; kills it when it does not.
    fn within_caps(&self, process: &mut Spoke) -> anyhow::Result<()> {
        let Some(pid) = process.pid() else {
            return Ok(());
        };
        let Ok(sample) = crate::procfs::sample(&pid.to_string()) else {
            return Ok(());
        };
        let rss_mib = sample.rss_kib / 1024;
        let over_threads = self.max_threads > 0 && sample.threads > self.max_threads;
        let over_rss = self.max_rss_mib > 0 && rss_mib > self.max_rss_mib;
        if over_threads || over_rss {
            process.kill9()?;
            bail!(
                "the relay went over the simulator's cap (threads {} of at most {}, RSS {rss_mib} MiB \
                 of at most {} MiB) and was killed",
                sample.threads,
                self.max_threads,
                self.max_rss_mib
            );
        }
        Ok(())
    }
}

/// The relay process and how to start it again on the same port (the storm).
#[derive(Debug)]
pub struct Relay {
    pub port: u16,
    pub admin: u16,
    config: PathBuf,
    log: PathBuf,
    process: Option<Spoke>,
    pub starts: u32,
    /// Killed on purpose and not started again (the failover): its absence is no failure.
    pub killed: bool,
    setup: RelaySetup,
}

impl Relay {
    /// Writes the configuration for `sites` simulated sites as `{name}.toml` and starts the
    /// relay, logging to `{name}.log`; returns once it listens.
    pub fn start(
        dir: &Path,
        name: &str,
        hub_bootstrap: &str,
        sites: usize,
        hub_topic: &str,
        setup: &RelaySetup,
    ) -> anyhow::Result<Relay> {
        let port = spoke_tests::free_port()?;
        let admin = spoke_tests::free_port()?;
        // Room for every site plus reconnects whose old connection the relay has not yet
        // timed out (a storm), and the handshakes the simulator runs at once.
        let max_connections = sites * 2 + 100;
        let text = format!(
            r#"listen = "127.0.0.1:{port}"
[tls]
cert = "{dir}/relay.pem"
key = "{dir}/relay.key"
client_ca = "{dir}/ca.pem"
[hub]
bootstrap = "{hub_bootstrap}"
topic = "{hub_topic}"
{hub_extra}
[sites."*"]
allow = ["{topic}"]
[admin]
listen = "127.0.0.1:{admin}"
[limits]
max_connections = {max_connections}
max_handshakes = 1000
{limits_extra}
{extra}
"#,
            dir = dir.display(),
            hub_topic = hub_topic.replace('\\', "\\\\").replace('"', "\\\""),
            hub_extra = setup.hub_extra,
            topic = crate::records::TOPIC,
            limits_extra = setup.limits_extra,
            extra = setup.extra,
        );
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(&config, text).with_context(|| format!("writing {}", config.display()))?;
        let mut relay = Relay {
            port,
            admin,
            config,
            log: dir.join(format!("{name}.log")),
            process: None,
            starts: 0,
            killed: false,
            setup: setup.clone(),
        };
        relay.launch()?;
        Ok(relay)
    }

    fn launch(&mut self) -> anyhow::Result<()> {
        let config = self.config.to_str().context("non-UTF-8 temp path")?;
        let process = Spoke::start(
            "spoke-relay",
            &["run", "--config", config],
            self.log.clone(),
        )?;
        let pid = process.pid().context("relay exited at once")?;
        self.process = Some(process);
        self.starts += 1;
        let deadline = Instant::now() + Duration::from_secs(60);
        while !crate::procfs::udp_bound(&pid.to_string(), self.port).unwrap_or(false) {
            if let Some(process) = self.process.as_mut() {
                self.setup.within_caps(process)?;
            }
            if !self.is_running() {
                bail!("the relay exited at start; log:\n{}", self.log_tail());
            }
            if Instant::now() > deadline {
                bail!("the relay did not listen on UDP {} in 60 s", self.port);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().and_then(Spoke::pid)
    }

    pub fn is_running(&mut self) -> bool {
        self.process.as_mut().is_some_and(Spoke::is_running)
    }

    /// Fails if the relay exited, or went over the caps (then it is killed); a relay killed on
    /// purpose passes.
    pub fn check(&mut self) -> anyhow::Result<()> {
        if self.killed {
            return Ok(());
        }
        if let Some(process) = self.process.as_mut() {
            self.setup.within_caps(process)?;
        }
        if self.is_running() {
            return Ok(());
        }
        let log = self.log_tail();
        let lines: Vec<&str> = log.lines().collect();
        bail!(
            "the relay exited; its log ends:\n{}",
            lines[lines.len().saturating_sub(15)..].join("\n")
        )
    }

    /// SIGKILL, then the same configuration on the same port again: a relay crash and restart.
    pub fn kill_and_restart(&mut self) -> anyhow::Result<()> {
        if let Some(process) = self.process.as_mut() {
            process.kill9()?;
        }
        self.process = None;
        self.launch()
    }

    /// SIGKILL, and no restart: a relay host lost for good (the failover).
    pub fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(process) = self.process.as_mut() {
            process.kill9()?;
        }
        self.process = None;
        self.killed = true;
        Ok(())
    }

    /// SIGTERM and a clean exit.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        match self.process.as_mut() {
            Some(process) => process.stop(),
            None => Ok(()),
        }
    }

    pub fn log_tail(&self) -> String {
        spoke_tests::process::tail_of(&self.log, 4000)
    }
}

/// The CA and the relay's certificate, written where the relay configuration points.
pub fn write_pki(dir: &Path) -> anyhow::Result<Authority> {
    let ca = Authority::new("spoke-sim CA")?;
    std::fs::write(dir.join("ca.pem"), ca.cert_pem())?;
    ca.issue_relay("spoke-sim relay")?.write(dir, "relay")?;
    Ok(ca)
}

/// A client configuration per site name, each with its own certificate, made on `threads`
/// threads (certificate issuing is the slow part at 10,000 sites).
pub fn site_clients(
    ca: &Authority,
    names: &[String],
    threads: usize,
) -> anyhow::Result<Vec<quinn::ClientConfig>> {
    let ca_pem = ca.cert_pem();
    // The agent's transport: its windows, keep-alive and congestion controller.
    let transport = Arc::new(spoke_transport::transport::transport_config(Some(
        Duration::from_secs(5),
    )));
    let chunk = names.len().div_ceil(threads.max(1)).max(1);
    let validity = Validity::current();
    std::thread::scope(|scope| {
        let workers: Vec<_> = names
            .chunks(chunk)
            .enumerate()
            .map(|(part, names)| {
                let (ca_pem, transport) = (&ca_pem, transport.clone());
                scope.spawn(move || {
                    names
                        .iter()
                        .enumerate()
                        .map(|(i, name)| {
                            let serial = (part * chunk + i) as u64 + 1;
                            let identity = ca.issue_site(name, validity, serial)?;
                            client_config(ca_pem, &identity, transport.clone())
                        })
                        .collect::<anyhow::Result<Vec<_>>>()
                })
            })
            .collect();
        let mut clients = Vec::with_capacity(names.len());
        for worker in workers {
            let made = worker
                .join()
                .map_err(|_| anyhow::anyhow!("a certificate thread panicked"))??;
            clients.extend(made);
        }
        Ok(clients)
    })
}

fn client_config(
    ca_pem: &str,
    identity: &Identity,
    transport: Arc<quinn::TransportConfig>,
) -> anyhow::Result<quinn::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(ca.context("CA PEM")?)?;
    }
    let chain = CertificateDer::pem_slice_iter(identity.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .context("site certificate PEM")?;
    let key = PrivateKeyDer::from_pem_slice(identity.key_pem.as_bytes()).context("site key PEM")?;
    let mut crypto = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)?;
    crypto.alpn_protocols = vec![spoke_proto::ALPN.to_vec()];
    let quic = QuicClientConfig::try_from(crypto)?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    config.transport_config(transport);
    Ok(config)
}
