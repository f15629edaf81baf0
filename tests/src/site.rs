//! One edge site and one hub: two brokers, a PKI, and config files for relay and agent.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use anyhow::{bail, Context};
use tempfile::TempDir;

use crate::broker::Broker;
use crate::process::{self, Spoke};

pub const SITE: &str = "branch-042";

/// Where an [`Env`]'s two sides run: both on this namespace's loopback, or the edge side
/// (edge broker, agent) and the hub side (hub broker, relays) in the two namespaces of an
/// emulated WAN link, so that everything the agent ships crosses the link.
#[derive(Debug, Clone)]
pub struct Placement {
    pub edge_ns: Option<String>,
    pub hub_ns: Option<String>,
    pub edge_host: Ipv4Addr,
    pub hub_host: Ipv4Addr,
}

impl Placement {
    pub fn loopback() -> Placement {
        Placement {
            edge_ns: None,
            hub_ns: None,
            edge_host: Ipv4Addr::LOCALHOST,
            hub_host: Ipv4Addr::LOCALHOST,
        }
    }

    pub fn across(link: &spoke_wan::Link) -> Placement {
        Placement {
            edge_ns: Some(link.edge().name().to_owned()),
            hub_ns: Some(link.hub().name().to_owned()),
            edge_host: link.edge().addr(),
            hub_host: link.hub().addr(),
        }
    }
}

/// Runs `f` inside namespace `ns` (or right here when there is none); processes and
/// librdkafka clients it starts stay there.
fn within<T: Send>(
    ns: Option<&str>,
    f: impl FnOnce() -> anyhow::Result<T> + Send,
) -> anyhow::Result<T> {
    match ns {
        None => f(),
        Some(name) => Ok(spoke_wan::run_in(name, || {
            f().map_err(|e| std::io::Error::other(format!("{e:#}")))
        })?),
    }
}

/// A test environment. Dropping it stops every process and removes every file.
#[derive(Debug)]
pub struct Env {
    pub placement: Placement,
    pub edge: Broker,
    /// Before the hub: the delaying proxy every hub client goes through, if there is one.
    pub hub_proxy: Option<crate::tcp_delay::DelayProxy>,
    /// Before the hub: the TLS terminator every hub client goes through, if there is one.
    pub hub_tls: Option<crate::tls_terminator::TlsTerminator>,
    pub hub: Broker,
    pub relay_port: u16,
    /// A second relay's QUIC and admin ports, for failover scenarios.
    pub relay_b_port: u16,
    pub relay_b_admin: u16,
    /// Admin endpoints, on free ports so tests can run side by side.
    pub relay_admin: u16,
    pub agent_admin: u16,
    pki: PathBuf,
    // Last, so the processes above are gone before their files.
    pub dir: TempDir,
}

/// What stands between the hub broker and its clients.
enum HubFront<'a> {
    Direct,
    Delay,
    Tls(&'a crate::pki::Identity),
}

/// What the agent's config says, beyond the defaults.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    pub include: Vec<String>,
    pub exclude: Vec<String>,
    pub extra: String,
    /// List both relays as endpoints.
    pub both_relays: bool,
    /// Lines inside `[relay]`, e.g. `fence_delay = "2s"`.
    pub relay_extra: String,
    /// Lines inside `[spool]`, e.g. `max_bytes = "64KiB"`.
    pub spool_extra: String,
    /// Lines at the end of `[source]`, e.g. a `[source.sasl]` table.
    pub source_extra: String,
}

impl AgentOptions {
    pub fn include(patterns: &[&str]) -> Self {
        Self {
            include: patterns.iter().map(|p| (*p).to_owned()).collect(),
            exclude: Vec::new(),
            extra: String::new(),
            both_relays: false,
            relay_extra: String::new(),
            spool_extra: String::new(),
            source_extra: String::new(),
        }
    }
}

/// What the relay's config says beyond the honest site's table.
#[derive(Debug, Clone, Default)]
pub struct RelayOptions {
    /// Lines appended inside `[tls]`, e.g. a deny list.
    pub tls_extra: String,
    /// Tables appended at the end: more `[sites.NAME]`, limits.
    pub extra: String,
    /// Lines inside `[hub]`, e.g. `max_record_bytes = "8KiB"`.
    pub hub_extra: String,
    /// Extra environment variables, e.g. `SPOKE_FAILPOINTS`.
    pub env: Vec<(String, String)>,
}

impl Env {
    pub fn new() -> anyhow::Result<Env> {
        Self::placed(Placement::loopback())
    }

    /// An environment whose edge and hub sides run where `placement` says. Admin endpoints
    /// stay on each side's own loopback: reach them with [`Env::on_edge`] / [`Env::on_hub`].
    pub fn placed(placement: Placement) -> anyhow::Result<Env> {
        Self::build(placement, HubFront::Direct)
    }

    /// On loopback, with the hub behind a [`crate::tcp_delay::DelayProxy`] (no delay until
    /// the test sets one): a slow hub.
    pub fn with_slow_hub() -> anyhow::Result<Env> {
        Self::build(Placement::loopback(), HubFront::Delay)
    }

    /// On loopback, with the hub reachable only through a
    /// [`crate::tls_terminator::TlsTerminator`] presenting `server`'s certificate. The test's
    /// own plaintext clients cannot read it then: [`Broker::serve_directly`] lets them.
    pub fn with_tls_hub(server: &crate::pki::Identity) -> anyhow::Result<Env> {
        Self::build(Placement::loopback(), HubFront::Tls(server))
    }

    fn build(placement: Placement, front: HubFront<'_>) -> anyhow::Result<Env> {
        let mut dir = tempfile::Builder::new().prefix("spoke-e2e-").tempdir()?;
        // For post-mortems: keep brokers' databases, configs and logs.
        if std::env::var_os("SPOKE_KEEP_TEST_DIR").is_some() {
            dir.disable_cleanup(true);
            eprintln!("test files kept in {}", dir.path().display());
        }
        let path = dir.path();
        let edge = within(placement.edge_ns.as_deref(), || {
            Broker::start_on(path, "edge", placement.edge_host)
        })?;
        let (mut hub_proxy, mut hub_tls) = (None, None);
        let hub = match front {
            HubFront::Direct => within(placement.hub_ns.as_deref(), || {
                Broker::start_on(path, "hub", placement.hub_host)
            })?,
            HubFront::Delay => {
                let proxy_port = crate::free_port()?;
                let hub = Broker::start_behind(path, "hub", proxy_port)?;
                hub_proxy = Some(crate::tcp_delay::DelayProxy::start(
                    ([127, 0, 0, 1], proxy_port).into(),
                    ([127, 0, 0, 1], hub.port).into(),
                )?);
                hub
            }
            HubFront::Tls(server) => {
                let tls_port = crate::free_port()?;
                let hub = Broker::start_behind(path, "hub", tls_port)?;
                hub_tls = Some(crate::tls_terminator::TlsTerminator::start(
                    ([127, 0, 0, 1], tls_port).into(),
                    ([127, 0, 0, 1], hub.port).into(),
                    server,
                )?);
                hub
            }
        };
        let pki = dir.path().join("pki");
        let pki_str = pki.to_str().context("non-UTF-8 temp path")?;
        let out = process::run("spoke-relay", &["pki", "init", "--out", pki_str])?;
        if !out.status.success() {
            bail!("pki init failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let out = process::run(
            "spoke-relay",
            &["pki", "issue", "--site", SITE, "--out", pki_str],
        )?;
        if !out.status.success() {
            bail!("pki issue failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(Env {
            placement,
            edge,
            hub_proxy,
            hub_tls,
            hub,
            relay_port: crate::free_port()?,
            relay_admin: crate::free_port()?,
            relay_b_port: crate::free_port()?,
            relay_b_admin: crate::free_port()?,
            agent_admin: crate::free_port()?,
            pki,
            dir,
        })
    }

    /// Runs `f` on the edge side (the agent's and the edge broker's namespace).
    pub fn on_edge<T: Send>(
        &self,
        f: impl FnOnce() -> anyhow::Result<T> + Send,
    ) -> anyhow::Result<T> {
        within(self.placement.edge_ns.as_deref(), f)
    }

    /// Runs `f` on the hub side (the relays' and the hub broker's namespace).
    pub fn on_hub<T: Send>(
        &self,
        f: impl FnOnce() -> anyhow::Result<T> + Send,
    ) -> anyhow::Result<T> {
        within(self.placement.hub_ns.as_deref(), f)
    }

    pub fn agent_admin(&self) -> String {
        format!("127.0.0.1:{}", self.agent_admin)
    }

    pub fn relay_admin(&self) -> String {
        format!("127.0.0.1:{}", self.relay_admin)
    }

    /// Issues a client certificate for another site name, signed by the same CA.
    pub fn issue_cert(&self, site: &str) -> anyhow::Result<(PathBuf, PathBuf)> {
        self.issue_cert_printing(site)
            .map(|(cert, key, _)| (cert, key))
    }

    /// As [`Env::issue_cert`], also returning what `pki issue` printed (the paths written and
    /// the certificate's `sha256:` and `serial:` deny-list entries).
    pub fn issue_cert_printing(&self, site: &str) -> anyhow::Result<(PathBuf, PathBuf, String)> {
        let pki = self.pki.to_str().context("non-UTF-8 temp path")?;
        let out = process::run(
            "spoke-relay",
            &["pki", "issue", "--site", site, "--out", pki],
        )?;
        if !out.status.success() {
            bail!("pki issue failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok((
            self.pki.join(format!("{site}.pem")),
            self.pki.join(format!("{site}.key")),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        ))
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The directory `spoke-relay pki init` wrote the CA and relay certificate into.
    pub fn pki(&self) -> &std::path::Path {
        &self.pki
    }

    /// Records hub topic `hub_topic` holds in its partitions `0..partitions` (high minus low
    /// watermark, summed; 0 while the topic does not exist). Reads the hub from here: inside a
    /// WAN placement, call it within [`Env::on_hub`].
    pub fn hub_held(&self, hub_topic: &str, partitions: i32) -> anyhow::Result<i64> {
        crate::kafka::records_held(&self.hub.bootstrap(), hub_topic, partitions)
    }

    /// [`Env::hub_held`] of [`SITE`]'s edge topic `topic`, that is of hub topic
    /// `{SITE}.{topic}`.
    pub fn hub_count(&self, topic: &str, partitions: i32) -> anyhow::Result<i64> {
        self.hub_held(&format!("{SITE}.{topic}"), partitions)
    }

    /// [`crate::kafka::assert_all_replicated`] between this environment's edge and hub for
    /// [`SITE`]'s `topic`, partitions `0..partitions`: every record in the hub, in order, byte
    /// for byte, with its provenance headers. Returns the number of records compared.
    pub fn assert_all_replicated(&self, topic: &str, partitions: i32) -> anyhow::Result<usize> {
        crate::kafka::assert_all_replicated(
            &self.edge.bootstrap(),
            &self.hub.bootstrap(),
            SITE,
            topic,
            partitions,
        )
    }

    pub fn relay_config(&self, allow: &[&str]) -> anyhow::Result<PathBuf> {
        self.relay_config_with(allow, &RelayOptions::default())
    }

    pub fn relay_config_with(
        &self,
        allow: &[&str],
        options: &RelayOptions,
    ) -> anyhow::Result<PathBuf> {
        let pki = self.pki.display();
        let allow = toml_list(allow);
        let text = format!(
            r#"listen = "{relay_host}:{port}"
[tls]
cert = "{pki}/relay.pem"
key = "{pki}/relay.key"
client_ca = "{pki}/ca.pem"
{tls_extra}
[hub]
bootstrap = "{hub}"
{hub_extra}
[sites.{SITE}]
allow = {allow}
[admin]
listen = "127.0.0.1:{admin}"
{extra}
"#,
            tls_extra = options.tls_extra,
            hub_extra = options.hub_extra,
            extra = options.extra,
            port = self.relay_port,
            relay_host = self.placement.hub_host,
            admin = self.relay_admin,
            hub = self.hub.bootstrap(),
        );
        let path = self.path("relay.toml");
        std::fs::write(&path, text)?;
        Ok(path)
    }

    pub fn agent_config(&self, options: &AgentOptions) -> anyhow::Result<PathBuf> {
        let pki = self.pki.display();
        let text = format!(
            r#"site = "{SITE}"
[source]
bootstrap = "{edge}"
include = {include}
exclude = {exclude}
{source_extra}
[spool]
path = "{spool}"
{spool_extra}
[relay]
endpoints = {endpoints}
server_name = "localhost"
ca = "{pki}/ca.pem"
cert = "{pki}/{SITE}.pem"
key = "{pki}/{SITE}.key"
{relay_extra}
[admin]
listen = "127.0.0.1:{admin}"
{extra}
"#,
            admin = self.agent_admin,
            edge = self.edge.bootstrap(),
            include = toml_list(&options.include),
            exclude = toml_list(&options.exclude),
            spool = self.path("spool").display(),
            endpoints = if options.both_relays {
                format!(
                    "[\"{host}:{}\", \"{host}:{}\"]",
                    self.relay_port,
                    self.relay_b_port,
                    host = self.placement.hub_host
                )
            } else {
                format!("[\"{}:{}\"]", self.placement.hub_host, self.relay_port)
            },
            extra = options.extra,
            relay_extra = options.relay_extra,
            spool_extra = options.spool_extra,
            source_extra = options.source_extra,
        );
        let path = self.path("agent.toml");
        std::fs::write(&path, text)?;
        Ok(path)
    }

    /// The second relay: same hub, same CA, its own ports.
    pub fn start_relay_b(&self, allow: &[&str]) -> anyhow::Result<Spoke> {
        let text = std::fs::read_to_string(self.relay_config(allow)?)?
            .replace(
                &format!("{}:{}\"", self.placement.hub_host, self.relay_port),
                &format!("{}:{}\"", self.placement.hub_host, self.relay_b_port),
            )
            .replace(
                &format!("127.0.0.1:{}\"", self.relay_admin),
                &format!("127.0.0.1:{}\"", self.relay_b_admin),
            );
        let path = self.path("relay-b.toml");
        std::fs::write(&path, text)?;
        let config = path.to_str().context("non-UTF-8 temp path")?;
        self.on_hub(|| {
            Spoke::start(
                "spoke-relay",
                &["run", "--config", config],
                self.path("relay-b.log"),
            )
        })
    }

    pub fn start_relay(&self, allow: &[&str]) -> anyhow::Result<Spoke> {
        self.start_relay_with(allow, &RelayOptions::default())
    }

    pub fn start_relay_with(
        &self,
        allow: &[&str],
        options: &RelayOptions,
    ) -> anyhow::Result<Spoke> {
        let config = self.relay_config_with(allow, options)?;
        let config = config.to_str().context("non-UTF-8 temp path")?;
        let env: Vec<(&str, &str)> = options
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        self.on_hub(|| {
            Spoke::start_with_env(
                "spoke-relay",
                &["run", "--config", config],
                self.path("relay.log"),
                &env,
            )
        })
    }

    pub fn start_agent(&self, options: &AgentOptions) -> anyhow::Result<Spoke> {
        self.start_agent_with_env(options, &[])
    }

    /// The agent with extra environment variables, e.g. `SPOKE_FAILPOINTS` to arm failpoints
    /// (the binaries `scripts/test` builds have them compiled in).
    pub fn start_agent_with_env(
        &self,
        options: &AgentOptions,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Spoke> {
        self.start_agent_under(&[], options, env)
    }

    /// The agent run by `wrapper` (e.g. strace); stop it with [`Spoke::stop_wrapped`].
    pub fn start_agent_under(
        &self,
        wrapper: &[&str],
        options: &AgentOptions,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Spoke> {
        let config = self.agent_config(options)?;
        let config = config.to_str().context("non-UTF-8 temp path")?;
        self.on_edge(|| {
            Spoke::start_under(
                wrapper,
                "spoke-agent",
                &["run", "--config", config],
                self.path("agent.log"),
                env,
            )
        })
    }
}

fn toml_list<S: AsRef<str>>(items: &[S]) -> String {
    let quoted: Vec<String> = items
        .iter()
        .map(|s| {
            format!(
                "\"{}\"",
                s.as_ref().replace('\\', "\\\\").replace('"', "\\\"")
            )
        })
        .collect();
    format!("[{}]", quoted.join(", "))
}
