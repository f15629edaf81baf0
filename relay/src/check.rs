//! `spoke-relay check`: connects to the hub as the service would and says, one line per
//! check, what works and how to fix what does not: the connection (TLS, authentication),
//! the relay's permissions on the topics it writes and reads, and transactions.

use std::time::Duration;

use rdkafka::error::RDKafkaErrorCode;
use spoke_kafka::check::{check_cluster, Verdict};
use spoke_kafka::topics::{Operation, Permissions, TopicDescription};

use crate::config::{self, Loaded, Transactions};
use crate::hub::{Hub, TransactionSupport, TRANSACTION_ACLS};

/// At most this many of the sites' existing hub topics have their permissions checked: a
/// missing ACL is usually a missing prefix, which the first few show.
const HUB_TOPICS_CHECKED: usize = 20;

const OFFSETS_NEEDS: &[Operation] = &[Operation::Read, Operation::Write, Operation::Describe];
const DEAD_LETTER_NEEDS: &[Operation] = &[
    Operation::Write,
    Operation::Describe,
    Operation::DescribeConfigs,
];
const HUB_TOPIC_NEEDS: &[Operation] = &[
    Operation::Write,
    Operation::Read,
    Operation::Describe,
    Operation::DescribeConfigs,
];

/// Runs every check against the hub; stops after the connection check if that fails.
pub fn run(loaded: &Loaded, timeout: Duration) -> Vec<Verdict> {
    let hub_config = &loaded.config.hub;
    let connection = check_cluster(
        "hub",
        &hub_config.bootstrap,
        &loaded.hub_kafka,
        hub_config.tls.as_ref(),
        timeout,
    );
    if !connection.ok {
        return vec![connection];
    }
    let mut verdicts = vec![connection];
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            verdicts.push(Verdict::failed(
                "check",
                format!("cannot start an async runtime: {error}"),
                "see the system's limits on threads",
            ));
            return verdicts;
        }
    };
    let hub = match Hub::new(hub_config, &loaded.hub_kafka) {
        Ok(hub) => hub,
        Err(error) => {
            verdicts.push(Verdict::failed(
                "hub",
                error.to_string(),
                "correct the [hub] settings it names",
            ));
            return verdicts;
        }
    };
    runtime.block_on(async {
        verdicts.extend(permissions(loaded, &hub).await);
        verdicts.push(transactions(loaded, &hub, timeout).await);
    });
    verdicts
}

async fn permissions(loaded: &Loaded, hub: &Hub) -> Vec<Verdict> {
    let hub_config = &loaded.config.hub;
    let offsets = hub_config.offsets_topic.clone();
    let dead_letter = hub_config.dead_letter_topic.clone();
    let existing = match hub.topic_names().await {
        Ok(names) => names,
        Err(error) => {
            return vec![Verdict::failed(
                "hub topics",
                error.to_string(),
                "grant the relay's principal Describe on the hub's topics",
            )]
        }
    };
    let sites: Vec<&str> = loaded.config.sites.keys().map(String::as_str).collect();
    let site_topics: Vec<String> = existing
        .iter()
        .filter(|name| **name != offsets && **name != dead_letter && !name.starts_with("__"))
        .filter(|name| {
            sites
                .iter()
                .any(|site| of_site(&hub_config.topic, site, name))
        })
        .take(HUB_TOPICS_CHECKED)
        .cloned()
        .collect();
    let mut asked = vec![offsets.clone(), dead_letter.clone()];
    asked.extend(site_topics.iter().cloned());
    let permissions = match hub.permissions(asked).await {
        Ok(permissions) => permissions,
        Err(error) => {
            return vec![Verdict::failed(
                "hub topics",
                error.to_string(),
                "grant the relay's principal Describe on its topics",
            )]
        }
    };
    let describe = |topic: &str| permissions.topics.get(topic);
    let creatable = permissions.cluster.map(|p| p.allows(Operation::Create));
    let mut verdicts = vec![
        topic_verdict(
            "offsets topic",
            &offsets,
            describe(&offsets),
            OFFSETS_NEEDS,
            creatable,
        ),
        topic_verdict(
            "dead-letter topic",
            &dead_letter,
            describe(&dead_letter),
            DEAD_LETTER_NEEDS,
            creatable,
        ),
    ];
    let refused: Vec<Verdict> = site_topics
        .iter()
        .map(|topic| {
            topic_verdict(
                "hub topic",
                topic,
                describe(topic),
                HUB_TOPIC_NEEDS,
                creatable,
            )
        })
        .filter(|verdict| !verdict.ok)
        .collect();
    if refused.is_empty() {
        verdicts.push(Verdict::ok(
            "hub topics",
            match (
                site_topics.len(),
                site_topics.first().and_then(|t| describe(t)),
            ) {
                (0, _) => "none of the sites' hub topics exists yet; the relay creates them \
                           (needs Create on them)"
                    .to_owned(),
                (
                    n,
                    Some(TopicDescription {
                        permissions: None, ..
                    }),
                ) => format!(
                    "{n} existing; the hub does not report permissions (KIP-430), so their \
                     ACLs are not checked"
                ),
                (n, _) => format!("{n} existing, each allows {}", listed(HUB_TOPIC_NEEDS)),
            },
        ));
    }
    verdicts.extend(refused);
    verdicts
}

/// Whether `topic` is one of `site`'s hub topics under `template` (`hub.topic`).
fn of_site(template: &str, site: &str, topic: &str) -> bool {
    let rendered = config::hub_topic(template, site, "\u{0}");
    let Some((prefix, suffix)) = rendered.split_once('\u{0}') else {
        return false;
    };
    topic.len() > prefix.len() + suffix.len()
        && topic.starts_with(prefix)
        && topic.ends_with(suffix)
}

fn topic_verdict(
    what: &str,
    topic: &str,
    described: Option<&TopicDescription>,
    needs: &[Operation],
    creatable: Option<bool>,
) -> Verdict {
    let subject = format!("{what} {topic}");
    let grant = |ops: &[Operation]| {
        format!(
            "grant the relay's principal {} on topic `{topic}` (docs/operations.md, Secured Kafka)",
            listed(ops)
        )
    };
    let Some(described) = described else {
        return Verdict::failed(
            subject,
            "the hub did not describe it",
            "ask again; see the hub's log",
        );
    };
    match described.error {
        Some(RDKafkaErrorCode::UnknownTopicOrPartition) => match creatable {
            Some(false) => Verdict::ok(
                subject,
                "does not exist yet; the relay creates it, which needs Create on it \
                 (not granted on the cluster, so it must be on the topic or a prefix)",
            ),
            _ => Verdict::ok(subject, "does not exist yet; the relay creates it"),
        },
        Some(RDKafkaErrorCode::TopicAuthorizationFailed) => {
            Verdict::failed(subject, "not authorized to describe it", grant(needs))
        }
        Some(code) => Verdict::failed(
            subject,
            format!("the hub refuses to describe it: {code}"),
            "see the hub's log",
        ),
        None => match described.permissions {
            None => Verdict::ok(
                subject,
                "exists; the hub does not report permissions (KIP-430), so its ACLs are not \
                 checked",
            ),
            Some(permissions) => judge(subject, permissions, needs, grant),
        },
    }
}

fn judge(
    subject: String,
    permissions: Permissions,
    needs: &[Operation],
    grant: impl Fn(&[Operation]) -> String,
) -> Verdict {
    let missing = permissions.missing(needs);
    if missing.is_empty() {
        Verdict::ok(subject, format!("allows {}", listed(needs)))
    } else {
        Verdict::failed(
            subject,
            format!("missing ACL: {}", listed(&missing)),
            grant(&missing),
        )
    }
}

fn listed(ops: &[Operation]) -> String {
    ops.iter()
        .map(Operation::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

async fn transactions(loaded: &Loaded, hub: &Hub, timeout: Duration) -> Verdict {
    let setting = loaded.config.hub.transactions;
    let subject = "hub transactions";
    if setting == Transactions::Off {
        return Verdict::ok(subject, "not used (hub.transactions = \"off\")");
    }
    let offsets = &loaded.config.hub.offsets_topic;
    // The probe commits an offset of the offsets topic, which the relay creates at start.
    match hub.topic_names().await {
        Ok(names) if !names.contains(offsets) => {
            return Verdict::ok(
                subject,
                format!("not checked: the offsets topic {offsets} does not exist yet"),
            )
        }
        _ => {}
    }
    // A hub that does not answer holds the probe for its transaction timeout.
    let probed = tokio::time::timeout(timeout * 4, hub.probe_transaction_support(offsets)).await;
    match (probed, setting) {
        (Ok(Ok(TransactionSupport::Supported)), _) => Verdict::ok(
            subject,
            "supported: sessions commit records and checkpoints atomically",
        ),
        (Ok(Ok(TransactionSupport::Unsupported(error))), Transactions::Auto) => Verdict::ok(
            subject,
            format!("not supported by the hub ({error}): sessions are fenced by relay.fence_delay instead"),
        ),
        (Ok(Ok(TransactionSupport::Unsupported(error))), _) => Verdict::failed(
            subject,
            format!("hub.transactions = \"on\", but the hub has none ({error})"),
            "set hub.transactions = \"auto\", which fences sessions by relay.fence_delay on such a hub",
        ),
        (Ok(Ok(TransactionSupport::NotAuthorized(error))), _) => {
            Verdict::failed(subject, format!("refused: {error}"), TRANSACTION_ACLS)
        }
        (Ok(Err(error)), _) => Verdict::failed(subject, error.to_string(), "see the hub's log"),
        (Err(_), _) => Verdict::failed(
            subject,
            format!("no answer within {}s", (timeout * 4).as_secs()),
            "see the hub's log; its transaction coordinator may be unavailable",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sites_hub_topics_are_told_from_others_by_the_template() {
        assert!(of_site("{site}.{topic}", "store-1", "store-1.orders"));
        assert!(!of_site("{site}.{topic}", "store-1", "store-12.orders"));
        assert!(!of_site("{site}.{topic}", "store-1", "store-1."));
        assert!(of_site("edge.{topic}.{site}", "b", "edge.x.b"));
        assert!(!of_site("edge.{topic}.{site}", "b", "edge.x.c"));
    }

    #[test]
    fn a_missing_acl_is_named_with_the_grant_that_fixes_it() {
        let read_only = Permissions::of(&[Operation::Read, Operation::Describe]);
        let verdict = topic_verdict(
            "hub topic",
            "store-1.orders",
            Some(&TopicDescription {
                error: None,
                id: None,
                permissions: Some(read_only),
            }),
            HUB_TOPIC_NEEDS,
            None,
        );
        assert!(!verdict.ok);
        let said = verdict.to_string();
        assert!(
            said.contains("missing ACL: Write, DescribeConfigs"),
            "{said}"
        );
        assert!(
            said.contains(
                "grant the relay's principal Write, DescribeConfigs on topic `store-1.orders`"
            ),
            "{said}"
        );
        let refused = topic_verdict(
            "offsets topic",
            "spoke.offsets",
            Some(&TopicDescription {
                error: Some(RDKafkaErrorCode::TopicAuthorizationFailed),
                id: None,
                permissions: None,
            }),
            OFFSETS_NEEDS,
            None,
        );
        assert!(!refused.ok);
        assert!(refused
            .to_string()
            .contains("not authorized to describe it"));
        let granted = topic_verdict(
            "offsets topic",
            "spoke.offsets",
            Some(&TopicDescription {
                error: None,
                id: None,
                permissions: Some(Permissions::of(OFFSETS_NEEDS)),
            }),
            OFFSETS_NEEDS,
            None,
        );
        assert!(granted.ok, "{granted}");
    }
}
