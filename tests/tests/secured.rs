//! Secured Kafka (#21): a hub reachable only over TLS, through a real TLS terminator with a
//! CA of its own (tansu 0.6's own TLS does not work), an edge cluster that requires client
//! certificates (mutual TLS, the same terminator), and SASL against a broker that really
//! authenticates.

use std::time::Duration;

use spoke_tests::kafka::{self, Rec};
use spoke_tests::oracle;
use spoke_tests::pki::{Authority, Identity, Validity};
use spoke_tests::sasl_front::{Credential, SaslFront};
use spoke_tests::site::{AgentOptions, Env, RelayOptions, SITE};
use spoke_tests::tls_terminator::TlsTerminator;
use spoke_tests::token_endpoint::TokenEndpoint;
use spoke_tests::{admin, eventually, process};

const REPLICATION_TIMEOUT: Duration = Duration::from_secs(180);
const HUB_TOPIC: &str = "branch-042.orders";

fn produce_orders(env: &Env, partitions: i32, per_partition: usize) -> anyhow::Result<()> {
    kafka::create_topic(&env.edge.bootstrap(), "orders", partitions)?;
    let producer = kafka::producer(&env.edge.bootstrap())?;
    for p in 0..partitions {
        let records: Vec<Rec> = (0..per_partition)
            .map(|i| Rec {
                key: Some(format!("k{}", i % 17).into_bytes()),
                value: Some(format!("{{\"p\":{p},\"n\":{i}}}").into_bytes()),
                headers: vec![("n".into(), Some(i.to_le_bytes().to_vec()))],
                timestamp: Some(1_700_000_000_000 + i as i64),
            })
            .collect();
        kafka::produce(&producer, "orders", p, &records)?;
    }
    Ok(())
}

fn acked(env: &Env) -> f64 {
    admin::scrape(&env.agent_admin())
        .map(|m| admin::sum(&m, "spoke_agent_records_acked_total", &[]))
        .unwrap_or(0.0)
}

/// `[hub.tls]` naming `ca`'s certificate.
fn hub_tls(env: &Env, ca: &Authority) -> anyhow::Result<RelayOptions> {
    let ca_file = env.path("hub-ca.pem");
    std::fs::write(&ca_file, ca.cert_pem())?;
    Ok(RelayOptions {
        hub_extra: format!("[hub.tls]\nca_file = \"{}\"", ca_file.display()),
        ..RelayOptions::default()
    })
}

/// `spoke-relay check` with the relay's config under `options`: whether it passed, and
/// what it printed.
fn relay_check(env: &Env, options: &RelayOptions) -> anyhow::Result<(bool, String)> {
    let config = env.relay_config_with(&["orders"], options)?;
    let vars: Vec<(&str, &str)> = options
        .env
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let config = config.display().to_string();
    let out = process::run_with_env("spoke-relay", &["check", "--config", &config], &vars)?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.success(), text))
}

/// `spoke-agent check` with the agent's config under `options`: whether it passed, and what
/// it printed.
fn agent_check(env: &Env, options: &AgentOptions) -> anyhow::Result<(bool, String)> {
    let config = env.agent_config(options)?.display().to_string();
    let out = process::run("spoke-agent", &["check", "--config", &config])?;
    Ok((
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    ))
}

/// Every record the edge holds is in the hub exactly once: read after the test's own
/// plaintext access to the hub broker was restored.
fn assert_exactly_once(env: &mut Env, scenario: &str, partitions: i32) -> anyhow::Result<()> {
    env.hub.serve_directly()?;
    let landed = oracle::read_hub(&env.hub.bootstrap(), HUB_TOPIC, partitions)?;
    let (tally, faults) =
        oracle::compare(&env.edge.bootstrap(), SITE, "orders", partitions, &landed)?;
    println!("{}", tally.line(scenario, 0));
    anyhow::ensure!(faults.is_empty(), "{}", faults.join("\n"));
    anyhow::ensure!(
        tally.lost == 0 && tally.dup == 0 && tally.corrupt == 0 && tally.hub == tally.produced,
        "{tally:?}"
    );
    Ok(())
}

#[test]
fn a_hub_behind_tls_gets_every_record_exactly_once() -> anyhow::Result<()> {
    let ca = Authority::new("hub-ca")?;
    let server = ca.issue_server("hub", &["localhost"], true, Validity::current())?;
    let mut env = Env::with_tls_hub(&server)?;
    produce_orders(&env, 2, 300)?;
    let (passed, said) = relay_check(&env, &hub_tls(&env, &ca)?)?;
    println!("{said}");
    anyhow::ensure!(
        passed
            && said.contains("ok   hub 127.0.0.1:")
            && said.contains("(SSL)")
            && said.contains("ok   offsets topic spoke.offsets: does not exist yet")
            && said.contains("ok   hub transactions: not checked"),
        "check must pass, and say what it could not check:\n{said}"
    );
    let relay = env.start_relay_with(&["orders"], &hub_tls(&env, &ca)?)?;
    let agent = env.start_agent(&AgentOptions::include(&["orders"]))?;
    eventually("600 records acknowledged", REPLICATION_TIMEOUT, || {
        Ok(acked(&env) >= 600.0)
    })?;
    let log = relay.log();
    anyhow::ensure!(
        log.contains("features=") && log.contains("ssl") && log.contains("sasl_scram"),
        "the relay logs librdkafka's build with TLS and SCRAM:\n{}",
        log.lines()
            .find(|l| l.contains("starting"))
            .unwrap_or_default()
    );
    drop(agent);
    drop(relay);
    assert_exactly_once(&mut env, "hub-over-tls", 2)
}

/// A wrong CA, an expired broker certificate and one for another host name are each
/// refused, and the relay's log says the broker's certificate did not verify; nothing
/// reaches the hub meanwhile, and once the configuration (or the broker's certificate) is
/// right, everything does, exactly once. (librdkafka says "certificate verify failed" for
/// all three; which of them it is, is for `check` to tell.)
#[test]
fn a_hub_certificate_that_does_not_verify_is_refused_and_nothing_is_lost() -> anyhow::Result<()> {
    let ca = Authority::new("hub-ca")?;
    let good = ca.issue_server("hub", &["localhost"], true, Validity::current())?;
    let mut env = Env::with_tls_hub(&good)?;
    produce_orders(&env, 1, 200)?;
    let terminator = env
        .hub_tls
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("no terminator"))?;
    let mut agent = env.start_agent(&AgentOptions::include(&["orders"]))?;

    let refused = |options: &RelayOptions, server: &Identity, verdict: &str| {
        terminator.present(server)?;
        let (passed, said) = relay_check(&env, options)?;
        println!("{said}");
        anyhow::ensure!(
            !passed
                && said.contains(&format!(
                    "FAIL hub 127.0.0.1:{}: {verdict}",
                    terminator.listen.port()
                )),
            "check must say {verdict:?}:\n{said}"
        );
        let failed_before = terminator.handshakes_failed();
        let relay = env.start_relay_with(&["orders"], options)?;
        eventually(
            "the relay to refuse the hub's certificate",
            Duration::from_secs(60),
            || {
                Ok(terminator.handshakes_failed() > failed_before
                    && relay.log().contains("certificate verify failed"))
            },
        )?;
        // Long enough for a session to have been tried.
        std::thread::sleep(Duration::from_secs(3));
        anyhow::ensure!(acked(&env) == 0.0, "nothing may be acknowledged");
        drop(relay);
        Ok(())
    };
    let other_ca = Authority::new("someone-else")?;
    refused(
        &hub_tls(&env, &other_ca)?,
        &good,
        "the broker's certificate is not signed by a CA in",
    )?;
    let expired = ca.issue_server("hub", &["localhost"], true, Validity::expired())?;
    refused(
        &hub_tls(&env, &ca)?,
        &expired,
        "the broker's certificate has expired",
    )?;
    let misnamed = ca.issue_server("hub", &["hub.example"], false, Validity::current())?;
    refused(
        &hub_tls(&env, &ca)?,
        &misnamed,
        "the broker's certificate does not name 127.0.0.1",
    )?;
    // And a hub nobody listens for.
    let unreachable = RelayOptions {
        hub_extra: String::new(),
        ..RelayOptions::default()
    };
    let config = env.relay_config_with(&["orders"], &unreachable)?;
    let text = std::fs::read_to_string(&config)?.replace(
        &format!("bootstrap = \"{}\"", env.hub.bootstrap()),
        "bootstrap = \"127.0.0.1:1\"",
    );
    std::fs::write(&config, text)?;
    let out = process::run(
        "spoke-relay",
        &["check", "--config", &config.display().to_string()],
    )?;
    let said = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(
        !out.status.success() && said.contains("FAIL hub 127.0.0.1:1: unreachable"),
        "check must call the hub unreachable:\n{said}"
    );

    terminator.present(&good)?;
    let relay = env.start_relay_with(&["orders"], &hub_tls(&env, &ca)?)?;
    eventually("200 records acknowledged", REPLICATION_TIMEOUT, || {
        Ok(acked(&env) >= 200.0)
    })?;
    agent.stop()?;
    drop(relay);
    assert_exactly_once(&mut env, "hub-tls-fixed", 1)
}

/// Both clusters require SCRAM (tansu's `--authentication`): the agent's password comes
/// from a file, the relay's from the environment. Everything arrives exactly once, and no
/// password shows in either process's log, `/status` or `/metrics`.
#[test]
fn scram_on_both_clusters_with_secrets_from_a_file_and_the_environment() -> anyhow::Result<()> {
    const EDGE_PASSWORD: &str = "edge-Secret-4f1c";
    const HUB_PASSWORD: &str = "hub-Secret-9a7e";
    let mut env = Env::new()?;
    produce_orders(&env, 2, 200)?;
    env.edge
        .require_scram(&[("spoke-agent", EDGE_PASSWORD, "scram256")])?;
    env.hub
        .require_scram(&[("spoke-relay", HUB_PASSWORD, "scram512")])?;
    let password_file = env.path("edge.password");
    std::fs::write(&password_file, format!("{EDGE_PASSWORD}\n"))?;
    let agent_options = AgentOptions {
        source_extra: format!(
            "[source.sasl]\nmechanism = \"SCRAM-SHA-256\"\nusername = \"spoke-agent\"\npassword_file = \"{}\"",
            password_file.display()
        ),
        ..AgentOptions::include(&["orders"])
    };
    let relay_options = |password_variable: &str| {
        RelayOptions {
        hub_extra: format!(
            "[hub.sasl]\nmechanism = \"SCRAM-SHA-512\"\nusername = \"spoke-relay\"\npassword = \"${{{password_variable}}}\""
        ),
        env: vec![
            ("SPOKE_TEST_HUB_PASSWORD".into(), HUB_PASSWORD.into()),
            ("SPOKE_TEST_WRONG_PASSWORD".into(), "not-the-password".into()),
        ],
        ..RelayOptions::default()
    }
    };

    // A wrong password first: refused, and nothing is lost once it is right.
    let (passed, said) = relay_check(&env, &relay_options("SPOKE_TEST_WRONG_PASSWORD"))?;
    anyhow::ensure!(
        !passed
            && said.contains("FAIL hub 127.0.0.1:",)
            && said.contains("authentication refused, SCRAM-SHA-512 as spoke-relay"),
        "check must say the hub refused the password:\n{said}"
    );
    let (passed, right) = relay_check(&env, &relay_options("SPOKE_TEST_HUB_PASSWORD"))?;
    anyhow::ensure!(
        passed && right.contains("(SASL_PLAINTEXT, SCRAM-SHA-512 as spoke-relay)"),
        "check must pass:\n{right}"
    );
    let relay = env.start_relay_with(&["orders"], &relay_options("SPOKE_TEST_WRONG_PASSWORD"))?;
    let agent = env.start_agent(&agent_options)?;
    eventually(
        "the hub to refuse the relay",
        Duration::from_secs(60),
        || {
            Ok(relay.log().contains("Authentication failed")
                || relay.log().contains("authentication failed"))
        },
    )?;
    anyhow::ensure!(acked(&env) == 0.0, "nothing may be acknowledged");
    drop(relay);
    let relay = env.start_relay_with(&["orders"], &relay_options("SPOKE_TEST_HUB_PASSWORD"))?;
    eventually("400 records acknowledged", REPLICATION_TIMEOUT, || {
        Ok(acked(&env) >= 400.0)
    })?;

    let mut seen = vec![("check".to_owned(), format!("{said}{right}"))];
    for (name, address, log) in [
        ("agent", env.agent_admin(), agent.log()),
        ("relay", env.relay_admin(), relay.log()),
    ] {
        for path in ["/status", "/metrics"] {
            let (_, body) = admin::get(&address, path)?;
            seen.push((format!("{name} {path}"), body));
        }
        seen.push((format!("{name} log"), log));
    }
    for (what, text) in &seen {
        for secret in [EDGE_PASSWORD, HUB_PASSWORD] {
            anyhow::ensure!(!text.contains(secret), "{what} shows a password");
        }
    }
    drop(agent);
    drop(relay);
    for broker in [&mut env.edge, &mut env.hub] {
        broker.authentication = false;
        broker.restart()?;
    }
    assert_exactly_once(&mut env, "scram-both-sides", 2)
}

/// The edge cluster takes only clients with a certificate from its own CA (mutual TLS, a
/// listener with `ssl.client.auth=required`). Without `[source.tls]` cert_file and key_file,
/// and with a certificate from another CA, `check` says which it is and the agent reads
/// nothing; with the right certificate everything arrives exactly once.
#[test]
fn an_edge_cluster_that_requires_client_certificates_is_read_over_mutual_tls() -> anyhow::Result<()>
{
    let edge_ca = Authority::new("edge-ca")?;
    let server = edge_ca.issue_server("edge", &["localhost"], true, Validity::current())?;
    let mut env = Env::new()?;
    produce_orders(&env, 2, 200)?;
    // From here on the edge broker is reachable (as its metadata says) only through TLS.
    let tls_port = spoke_tests::free_port()?;
    env.edge.advertise_at(tls_port)?;
    let terminator = TlsTerminator::start_mutual(
        ([127, 0, 0, 1], tls_port).into(),
        ([127, 0, 0, 1], env.edge.port).into(),
        &server,
        &edge_ca.cert_pem(),
    )?;
    let ca_file = env.path("edge-ca.pem");
    std::fs::write(&ca_file, edge_ca.cert_pem())?;
    let client_dir = env.path("edge-clients");
    std::fs::create_dir_all(&client_dir)?;
    let right = edge_ca
        .issue_site("spoke-agent", Validity::current(), 11)?
        .write(&client_dir, "right")?;
    let foreign = Authority::new("someone-else")?
        .issue_site("spoke-agent", Validity::current(), 12)?
        .write(&client_dir, "foreign")?;
    let source_tls = |client: Option<&(std::path::PathBuf, std::path::PathBuf)>| {
        let identity = client.map_or(String::new(), |(cert, key)| {
            format!(
                "cert_file = \"{}\"\nkey_file = \"{}\"\n",
                cert.display(),
                key.display()
            )
        });
        AgentOptions {
            source_extra: format!(
                "[source.tls]\nca_file = \"{}\"\n{identity}",
                ca_file.display()
            ),
            ..AgentOptions::include(&["orders"])
        }
    };
    let relay = env.start_relay(&["orders"])?;
    let subject = format!("local cluster 127.0.0.1:{tls_port}");

    let (passed, said) = agent_check(&env, &source_tls(None))?;
    println!("{said}");
    anyhow::ensure!(
        !passed
            && said.contains(&format!(
                "FAIL {subject}: the broker requires a client certificate (mutual TLS), and \
                 none is configured"
            )),
        "check must say a client certificate is required:\n{said}"
    );
    let (passed, said) = agent_check(&env, &source_tls(Some(&foreign)))?;
    println!("{said}");
    anyhow::ensure!(
        !passed
            && said.contains(&format!(
                "FAIL {subject}: the broker refuses this client's certificate"
            )),
        "check must say the broker refuses the certificate:\n{said}"
    );
    let (passed, said) = agent_check(&env, &source_tls(Some(&right)))?;
    println!("{said}");
    anyhow::ensure!(
        passed && said.contains(&format!("ok   {subject}: 1 broker(s) answered (SSL)")),
        "check must pass:\n{said}"
    );

    let refused_before = terminator.handshakes_failed();
    let mut agent = env.start_agent(&source_tls(None))?;
    eventually(
        "the edge to refuse the agent",
        Duration::from_secs(60),
        || Ok(terminator.handshakes_failed() > refused_before),
    )?;
    std::thread::sleep(Duration::from_secs(3));
    anyhow::ensure!(
        acked(&env) == 0.0,
        "nothing may be read without a certificate"
    );
    agent.stop()?;
    let agent = env.start_agent(&source_tls(Some(&right)))?;
    eventually("400 records acknowledged", REPLICATION_TIMEOUT, || {
        Ok(acked(&env) >= 400.0)
    })?;
    drop(agent);
    drop(relay);
    drop(terminator);
    env.edge.serve_directly()?;
    assert_exactly_once(&mut env, "edge-mutual-tls", 2)
}

/// SASL/PLAIN over TLS to the hub, a wrong password and then the right one: tansu cannot
/// check PLAIN (its SASL library is built without it), so a SASL authenticator speaking
/// Kafka's SaslHandshake/SaslAuthenticate stands between the TLS terminator and the broker.
#[test]
fn plain_over_tls_to_the_hub_is_refused_with_a_wrong_password_and_works_with_the_right(
) -> anyhow::Result<()> {
    const PASSWORD: &str = "plain-Secret-77d2";
    let ca = Authority::new("hub-ca")?;
    let server = ca.issue_server("hub", &["localhost"], true, Validity::current())?;
    let mut env = Env::new()?;
    produce_orders(&env, 2, 150)?;
    let tls_port = spoke_tests::free_port()?;
    env.hub.advertise_at(tls_port)?;
    let front = SaslFront::start(
        ([127, 0, 0, 1], spoke_tests::free_port()?).into(),
        ([127, 0, 0, 1], env.hub.port).into(),
        vec![Credential::Plain {
            user: "spoke-relay".into(),
            password: PASSWORD.into(),
        }],
    )?;
    let terminator =
        TlsTerminator::start(([127, 0, 0, 1], tls_port).into(), front.listen, &server)?;
    let options = |password: &str| -> anyhow::Result<RelayOptions> {
        let tls = hub_tls(&env, &ca)?;
        Ok(RelayOptions {
            hub_extra: format!(
                "{}\n[hub.sasl]\nmechanism = \"PLAIN\"\nusername = \"spoke-relay\"\npassword = \"${{SPOKE_TEST_HUB_PASSWORD}}\"",
                tls.hub_extra
            ),
            env: vec![("SPOKE_TEST_HUB_PASSWORD".into(), password.into())],
            ..tls
        })
    };
    let (passed, said) = relay_check(&env, &options("not-the-password")?)?;
    println!("{said}");
    anyhow::ensure!(
        !passed
            && said.contains(&format!(
                "FAIL hub 127.0.0.1:{tls_port}: authentication refused, PLAIN as spoke-relay"
            )),
        "check must say the hub refused the password:\n{said}"
    );
    let (passed, right) = relay_check(&env, &options(PASSWORD)?)?;
    println!("{right}");
    anyhow::ensure!(
        passed && right.contains("(SASL_SSL, PLAIN as spoke-relay)"),
        "check must pass:\n{right}"
    );
    let relay = env.start_relay_with(&["orders"], &options("not-the-password")?)?;
    let agent = env.start_agent(&AgentOptions::include(&["orders"]))?;
    let refused_before = front.refused();
    eventually(
        "the hub to refuse the relay",
        Duration::from_secs(60),
        || Ok(front.refused() > refused_before),
    )?;
    std::thread::sleep(Duration::from_secs(3));
    anyhow::ensure!(acked(&env) == 0.0, "nothing may be acknowledged");
    drop(relay);
    let relay = env.start_relay_with(&["orders"], &options(PASSWORD)?)?;
    eventually("300 records acknowledged", REPLICATION_TIMEOUT, || {
        Ok(acked(&env) >= 300.0)
    })?;
    for (what, text) in [
        ("check", format!("{said}{right}")),
        ("relay log", relay.log()),
    ] {
        anyhow::ensure!(!text.contains(PASSWORD), "{what} shows the password");
    }
    drop(agent);
    drop(relay);
    drop(terminator);
    drop(front);
    assert_exactly_once(&mut env, "plain-over-tls", 2)
}

/// OAUTHBEARER with OIDC client credentials on the edge: librdkafka fetches a token from the
/// identity provider's token endpoint with the client id and the secret from a file, and
/// presents it to the broker. tansu refuses every OAUTHBEARER token, so the SASL
/// authenticator stands in front of it and accepts exactly the token the endpoint issued.
#[test]
fn oauthbearer_with_oidc_client_credentials_reads_the_edge() -> anyhow::Result<()> {
    const CLIENT_SECRET: &str = "oidc-Secret-5e01";
    let endpoint = TokenEndpoint::start("spoke-agent", CLIENT_SECRET, "spoke-agent")?;
    let mut env = Env::new()?;
    produce_orders(&env, 2, 150)?;
    let front_port = spoke_tests::free_port()?;
    env.edge.advertise_at(front_port)?;
    let front = SaslFront::start(
        ([127, 0, 0, 1], front_port).into(),
        ([127, 0, 0, 1], env.edge.port).into(),
        vec![Credential::Bearer {
            token: endpoint.token.clone(),
        }],
    )?;
    let secret_file = env.path("oidc.secret");
    let options = |secret: &str| -> anyhow::Result<AgentOptions> {
        std::fs::write(&secret_file, format!("{secret}\n"))?;
        Ok(AgentOptions {
            source_extra: format!(
                "[source.sasl]\nmechanism = \"OAUTHBEARER\"\ntoken_endpoint = \"{}\"\nclient_id = \"spoke-agent\"\nclient_secret_file = \"{}\"",
                endpoint.url(),
                secret_file.display()
            ),
            ..AgentOptions::include(&["orders"])
        })
    };
    let relay = env.start_relay(&["orders"])?;
    let (passed, said) = agent_check(&env, &options("not-the-secret")?)?;
    println!("{said}");
    anyhow::ensure!(
        !passed
            && said.contains(&format!(
                "FAIL local cluster 127.0.0.1:{front_port}: no OAUTHBEARER token from the token \
                 endpoint"
            ))
            && endpoint.refused() > 0
            && endpoint.issued() == 0,
        "a wrong client secret must get no token, and check must fail:\n{said}"
    );
    let (passed, right) = agent_check(&env, &options(CLIENT_SECRET)?)?;
    println!("{right}");
    anyhow::ensure!(
        passed
            && right.contains(&format!(
                "ok   local cluster 127.0.0.1:{front_port}: 1 broker(s) answered (SASL_PLAINTEXT, OAUTHBEARER)"
            ))
            && endpoint.issued() > 0
            && front.accepted() > 0,
        "check must pass with a token from the endpoint:\n{right}"
    );
    let agent = env.start_agent(&options(CLIENT_SECRET)?)?;
    eventually("300 records acknowledged", REPLICATION_TIMEOUT, || {
        Ok(acked(&env) >= 300.0)
    })?;
    for (what, text) in [
        ("check", format!("{said}{right}")),
        ("agent log", agent.log()),
        (
            "agent /status",
            admin::get(&env.agent_admin(), "/status")?.1,
        ),
    ] {
        for secret in [CLIENT_SECRET, endpoint.token.as_str()] {
            anyhow::ensure!(!text.contains(secret), "{what} shows a secret");
        }
    }
    drop(agent);
    drop(relay);
    drop(front);
    env.edge.serve_directly()?;
    assert_exactly_once(&mut env, "oauthbearer-oidc", 2)
}
