//! tansu brokers with sqlite storage (the memory engine skips records: shared/KAFKA.md).

use std::net::{Ipv4Addr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// Finds the tansu binary, installing it with cargo (once, under a lock) when missing.
/// If it cannot be had the error says why: a test never skips silently.
pub fn tansu_binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = find_tansu() {
        return Ok(path);
    }
    let status = Command::new("flock")
        .args([
            "/tmp/spoke-tansu-install.lock",
            "sh",
            "-c",
            "command -v tansu >/dev/null || [ -x \"$HOME/.cargo/bin/tansu\" ] || \
             cargo install tansu --locked --features dynostore,libsql",
        ])
        .status()
        .context("running cargo install tansu")?;
    if !status.success() {
        bail!("tansu broker is not installed and `cargo install tansu --locked --features dynostore,libsql` failed ({status}); run scripts/install-tansu to see why");
    }
    find_tansu().context(
        "cargo install tansu succeeded but no tansu binary was found in PATH or ~/.cargo/bin",
    )
}

fn find_tansu() -> Option<PathBuf> {
    if let Ok(explicit) = std::env::var("TANSU") {
        return Some(PathBuf::from(explicit));
    }
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join("tansu")).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        candidates.push(Path::new(&home).join(".cargo/bin/tansu"));
    }
    candidates.into_iter().find(|p| p.is_file())
}

/// tansu 0.6's sqlite schema has no index on `header (topition, offset_id)`, so every
/// fetch scans the whole header table once per record: reading becomes quadratic in the number
/// of stored headers, and the hub, where every record carries three provenance headers, stalls
/// for minutes (measured: 11k records with headers read in 25 s without the index, 1 s with
/// it). The index changes no broker behaviour, only the query plan. The schema exists once the
/// broker listens; sqlite's WAL lets this run beside the broker.
pub fn index_headers(db: &Path) -> anyhow::Result<()> {
    let script = "import sqlite3, sys\n\
        c = sqlite3.connect(sys.argv[1], timeout=30)\n\
        c.execute('create index if not exists spoke_header_record on header (topition, offset_id)')\n\
        c.commit()\n";
    run_sqlite(script, db, &[], "indexing tansu's header table").map(drop)
}

/// Runs a python3 `script` on tansu's sqlite database `db` (its `sys.argv[1]`, then `args`);
/// returns what it printed. tansu has no API for these edits, and python3's sqlite3 is on
/// every machine the tests run on, unlike the sqlite3 shell.
fn run_sqlite(script: &str, db: &Path, args: &[&str], what: &str) -> anyhow::Result<String> {
    let out = Command::new("python3")
        .args(["-c", script])
        .arg(db)
        .args(args)
        .output()
        .with_context(|| format!("running python3 for {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} in {}: {}",
            db.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// One tansu broker process on a free loopback port.
#[derive(Debug)]
pub struct Broker {
    pub name: String,
    /// The address it listens on and advertises.
    pub host: Ipv4Addr,
    pub port: u16,
    /// The port it advertises (and clients use): its own, or a proxy's in front of it.
    pub advertised_port: u16,
    /// Whether clients must authenticate (SASL SCRAM; [`Broker::require_scram`]).
    pub authentication: bool,
    db: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Broker {
    pub fn start(dir: &Path, name: &str) -> anyhow::Result<Broker> {
        Self::start_on(dir, name, Ipv4Addr::LOCALHOST)
    }

    /// A broker on `host`, e.g. one side of an emulated WAN link. Call it from a thread in the
    /// namespace that owns `host`: the process inherits it (so does a [`Broker::restart`]:
    /// call that from the same namespace).
    pub fn start_on(dir: &Path, name: &str, host: Ipv4Addr) -> anyhow::Result<Broker> {
        let port = crate::free_port()?;
        Self::launch_new(dir, name, host, port, port)
    }

    /// A broker on loopback that advertises `advertised_port`, where a proxy in front of it
    /// listens: every client then talks to it through the proxy.
    pub fn start_behind(dir: &Path, name: &str, advertised_port: u16) -> anyhow::Result<Broker> {
        let port = crate::free_port()?;
        Self::launch_new(dir, name, Ipv4Addr::LOCALHOST, port, advertised_port)
    }

    fn launch_new(
        dir: &Path,
        name: &str,
        host: Ipv4Addr,
        port: u16,
        advertised_port: u16,
    ) -> anyhow::Result<Broker> {
        let mut broker = Broker {
            name: name.to_owned(),
            host,
            port,
            advertised_port,
            authentication: false,
            db: dir.join(format!("{name}.db")),
            log: dir.join(format!("{name}.log")),
            child: None,
        };
        broker.launch()?;
        Ok(broker)
    }

    pub fn bootstrap(&self) -> String {
        format!("{}:{}", self.host, self.advertised_port)
    }

    fn launch(&mut self) -> anyhow::Result<()> {
        let tansu = tansu_binary()?;
        let url = format!("tcp://{}:{}", self.host, self.port);
        let advertised = format!("tcp://{}:{}", self.host, self.advertised_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new(&tansu)
            .arg("broker")
            .args([
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &advertised,
            ])
            .arg("--storage-engine")
            .arg(format!("sqlite:///{}", self.db.display()))
            .args(self.authentication.then_some("--authentication"))
            .env(
                "RUST_LOG",
                std::env::var("SPOKE_TEST_TANSU_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", tansu.display()))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect((self.host, self.port)).is_err() {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    bail!(
                        "broker {} exited at start ({status}); log: {}",
                        self.name,
                        self.log_tail()
                    );
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "broker {} did not listen on {} in time",
                    self.name,
                    self.port
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        index_headers(&self.db)
    }

    /// SIGTERM and wait: sqlite keeps records and offsets across restarts.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            crate::process::terminate(&mut child, Duration::from_secs(10))?;
        }
        Ok(())
    }

    /// Creates SCRAM users (name, password, `scram256` or `scram512`) and restarts the broker
    /// requiring authentication: tansu 0.6 implements SCRAM-SHA-256 and -512 (not PLAIN),
    /// and takes new users only while it does not require authentication itself.
    pub fn require_scram(&mut self, users: &[(&str, &str, &str)]) -> anyhow::Result<()> {
        let tansu = tansu_binary()?;
        let broker = format!("tcp://{}:{}", self.host, self.port);
        for (name, password, mechanism) in users {
            let out = Command::new(&tansu)
                .args(["user", "create", "--broker", &broker, "--mechanism"])
                .args([mechanism, name, password])
                .output()
                .context("running tansu user create")?;
            if !out.status.success() {
                bail!(
                    "tansu user create {name}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        self.authentication = true;
        self.restart()
    }

    /// Restarts the broker advertising its own port, so that clients that bypass the proxy
    /// in front of it (the test's oracle reading a TLS-fronted hub) can read it.
    pub fn serve_directly(&mut self) -> anyhow::Result<()> {
        self.advertise_at(self.port)
    }

    /// Restarts the broker advertising `port` on its host, e.g. a TLS terminator's that a
    /// test puts in front of it once the test's own plaintext work is done.
    pub fn advertise_at(&mut self, port: u16) -> anyhow::Result<()> {
        self.advertised_port = port;
        self.restart()
    }

    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop()?;
        self.launch()
    }

    /// Deletes the records of `topic`/`partition` below `offset` while the broker is stopped,
    /// the measured way to make a retention gap on tansu (shared/KAFKA.md: it enforces no
    /// retention). Restart the broker afterwards.
    pub fn delete_records_below(
        &self,
        topic: &str,
        partition: i32,
        offset: i64,
    ) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.child.is_none(),
            "stop the broker before editing its database"
        );
        let script = "import sqlite3, sys\n\
            db, topic, partition, below = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])\n\
            c = sqlite3.connect(db, timeout=30)\n\
            tp = c.execute('select tp.id from topition tp join topic t on tp.topic = t.id where t.name = ? and tp.partition = ?', (topic, partition)).fetchone()[0]\n\
            c.execute('delete from header where topition = ? and offset_id < ?', (tp, below))\n\
            c.execute('delete from record where topition = ? and offset_id < ?', (tp, below))\n\
            c.commit()\n";
        let (partition, offset) = (partition.to_string(), offset.to_string());
        run_sqlite(
            script,
            &self.db,
            &[topic, &partition, &offset],
            "deleting records",
        )
        .map(drop)
    }

    /// Deletes `topic` with everything stored for it while the broker is stopped: what
    /// DeleteTopics does on a correct broker. tansu 0.6's own DeleteTopics cannot stand in:
    /// its `topic_delete_by.sql` deletes every topic of the cluster (the subquery selects
    /// the cluster, not the topic), and librdkafka 2.12.1 then crashes on tansu's answer to a
    /// fetch for a vanished topic (a zero topic id with a current-leader tag: `strcmp(NULL)`
    /// in `rd_kafka_metadata_update_op`). Restart the broker afterwards.
    pub fn delete_topic_offline(&self, topic: &str) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.child.is_none(),
            "stop the broker before editing its database"
        );
        let script = "import sqlite3, sys\n\
            c = sqlite3.connect(sys.argv[1], timeout=30)\n\
            t = c.execute('select id from topic where name = ?', (sys.argv[2],)).fetchone()[0]\n\
            tps = 'select id from topition where topic = %d' % t\n\
            c.execute('delete from txn_produce_offset where txn_topition in (select id from txn_topition where topition in (%s))' % tps)\n\
            for table in ['consumer_offset', 'watermark', 'header', 'record', 'txn_offset_commit_tp', 'txn_topition', 'producer_detail']:\n\
            \x20   c.execute('delete from %s where topition in (%s)' % (table, tps))\n\
            c.execute('delete from topic_configuration where topic = ?', (t,))\n\
            c.execute('delete from topition where topic = ?', (t,))\n\
            c.execute('delete from topic where id = ?', (t,))\n\
            c.commit()\n";
        run_sqlite(script, &self.db, &[topic], "deleting a topic").map(drop)
    }

    /// What an operator does to a topic: deletes it and creates it anew with `partitions`
    /// (deleted with the broker stopped, see [`Broker::delete_topic_offline`]; created over
    /// Kafka once it is back).
    pub fn recreate_topic(&mut self, topic: &str, partitions: i32) -> anyhow::Result<()> {
        self.stop()?;
        self.delete_topic_offline(topic)?;
        self.restart()?;
        crate::kafka::create_topic(&self.bootstrap(), topic, partitions)
    }

    /// Records of `topic` in the broker's database, read from sqlite rather than over Kafka:
    /// for a broker whose clients are slowed down on purpose.
    pub fn stored_records(&self, topic: &str) -> anyhow::Result<i64> {
        let script = "import sqlite3, sys\n\
            c = sqlite3.connect('file:' + sys.argv[1] + '?mode=ro', uri=True, timeout=30)\n\
            print(c.execute('select count(*) from record r join topition tp on r.topition = tp.id join topic t on tp.topic = t.id where t.name = ?', (sys.argv[2],)).fetchone()[0])\n";
        Ok(run_sqlite(script, &self.db, &[topic], "counting records")?
            .trim()
            .parse()?)
    }

    pub fn log_tail(&self) -> String {
        crate::process::tail_of(&self.log, 4000)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
