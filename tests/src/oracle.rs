//! The exactly-once oracle: compares the hub with the edge record by record, by identity
//! (site, source partition, source offset) and by bytes, never by counts alone.
//!
//! Each scenario of the correctness suite prints its [`Tally`] as
//! `scenario=<name> produced=N hub=N lost=N dup=N reported_lost=N`.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Context;

use crate::kafka::{self, with_provenance, Rec, Stored};

/// One hub record with where it landed and the provenance it carries (the last triple).
#[derive(Debug, Clone)]
pub struct Landed {
    pub hub_partition: i32,
    pub hub_offset: i64,
    pub origin: String,
    pub source_partition: i32,
    pub source_offset: i64,
    pub rec: Rec,
}

/// Every record of every partition of `hub_topic`, with its provenance.
pub fn read_hub(hub: &str, hub_topic: &str, hub_partitions: i32) -> anyhow::Result<Vec<Landed>> {
    let mut landed = Vec::new();
    for q in 0..hub_partitions {
        for stored in kafka::read_partition(hub, hub_topic, q)? {
            landed.push(provenance(q, stored).with_context(|| {
                format!("hub record in {hub_topic}/{q} without provenance headers")
            })?);
        }
    }
    Ok(landed)
}

fn provenance(hub_partition: i32, stored: Stored) -> Option<Landed> {
    let last = |name: &str| {
        stored
            .rec
            .headers
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| String::from_utf8(v.clone()?).ok())
    };
    Some(Landed {
        hub_partition,
        hub_offset: stored.offset,
        origin: last("spoke-origin")?,
        source_partition: last("spoke-partition")?.parse().ok()?,
        source_offset: last("spoke-offset")?.parse().ok()?,
        rec: stored.rec,
    })
}

/// What a scenario's hub holds against what its edge produced.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Tally {
    pub produced: usize,
    pub hub: usize,
    /// Edge records not in the hub.
    pub lost: usize,
    /// Hub copies beyond the first of an edge record.
    pub dup: usize,
    /// Hub records whose bytes differ from the edge record they name.
    pub corrupt: usize,
}

impl Tally {
    pub fn line(&self, scenario: &str, reported_lost: u64) -> String {
        format!(
            "scenario={scenario} produced={} hub={} lost={} dup={} reported_lost={reported_lost}",
            self.produced, self.hub, self.lost, self.dup
        )
    }
}

/// Compares `site`'s records of `topic` (all `source_partitions` of it) at the edge with
/// `landed`, and checks that each source partition's records are in one hub partition in
/// source order. Returns the tally and a description of every order or placement fault.
pub fn compare(
    edge: &str,
    site: &str,
    topic: &str,
    source_partitions: i32,
    landed: &[Landed],
) -> anyhow::Result<(Tally, Vec<String>)> {
    let mut tally = Tally::default();
    let mut faults = Vec::new();
    let mut by_identity: BTreeMap<(i32, i64), Vec<&Landed>> = BTreeMap::new();
    for l in landed.iter().filter(|l| l.origin == site) {
        tally.hub += 1;
        by_identity
            .entry((l.source_partition, l.source_offset))
            .or_default()
            .push(l);
    }
    for p in 0..source_partitions {
        let source = kafka::read_partition(edge, topic, p)?;
        tally.produced += source.len();
        let offsets: BTreeSet<i64> = source.iter().map(|s| s.offset).collect();
        for s in &source {
            match by_identity.get(&(p, s.offset)) {
                None => tally.lost += 1,
                Some(copies) => {
                    tally.dup += copies.len() - 1;
                    let expected = with_provenance(&s.rec, site, p, s.offset);
                    tally.corrupt += copies.iter().filter(|c| c.rec != expected).count();
                }
            }
        }
        let mine: Vec<&Landed> = landed
            .iter()
            .filter(|l| l.origin == site && l.source_partition == p)
            .collect();
        let placed: BTreeSet<i32> = mine.iter().map(|l| l.hub_partition).collect();
        if placed.len() > 1 {
            faults.push(format!(
                "source partition {p} is spread over hub partitions {placed:?}"
            ));
        }
        for q in placed {
            let mut in_q: Vec<&&Landed> = mine.iter().filter(|l| l.hub_partition == q).collect();
            in_q.sort_by_key(|l| l.hub_offset);
            if let Some(pair) = in_q
                .windows(2)
                .find(|w| w[1].source_offset <= w[0].source_offset)
            {
                faults.push(format!(
                    "source partition {p} out of order in hub partition {q}: source offset {} \
                     at hub offset {} after {} at {}",
                    pair[1].source_offset,
                    pair[1].hub_offset,
                    pair[0].source_offset,
                    pair[0].hub_offset
                ));
            }
        }
        let strangers = mine
            .iter()
            .filter(|l| !offsets.contains(&l.source_offset))
            .count();
        if strangers > 0 {
            faults.push(format!(
                "{strangers} hub records name source offsets of partition {p} the edge does not hold"
            ));
        }
    }
    if tally.corrupt > 0 {
        faults.push(format!(
            "{} hub records differ from their edge record",
            tally.corrupt
        ));
    }
    Ok((tally, faults))
}
