//! The Hello's answer: the resume point of each partition the agent names, scanned from the
//! hub (exactly once) and sent in the Welcome before any batch.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::Duration;

use futures_util::stream::{StreamExt, TryStreamExt};
use regex::Regex;
use spoke_proto::{Frame, Hello, ResumePoint, Welcome};
use spoke_transport::wire::write_frame_within;
use tracing::{debug, info};

use super::checkpoints::CheckpointWriter;
use super::{SessionError, SiteSession};
use crate::checkpoint::Checkpoint;
use crate::config::{hub_topic, Acl, Delivery};
use crate::hub::HubError;

/// How long a session of a just-started relay waits for the checkpoint view.
pub(super) const CHECKPOINTS_WAIT: Duration = Duration::from_secs(10);
/// Resume scans of one Hello that run at once: each asks the hub for watermarks, and one with
/// records to read opens a consumer of its own.
pub(super) const RESUME_SCANS_AT_ONCE: usize = 8;
/// The hub topics of `wanted` that exist now, with their partition counts. Each hub topic's
/// layout is resolved once, here or at its first batch, and the session scans and places
/// records by it (`Partitions::layouts`).
pub(super) async fn existing_layouts(
    session: SiteSession<'_>,
    wanted: &[(String, i32)],
) -> Result<HashMap<String, i32>, SessionError> {
    let SiteSession { site, context, .. } = session;
    let mut layouts = HashMap::new();
    if context.delivery != Delivery::ExactlyOnce {
        return Ok(layouts);
    }
    let targets: BTreeSet<String> = wanted
        .iter()
        .map(|(topic, _)| hub_topic(&context.topic_template, site, topic))
        .filter(|target| crate::hub_limits::check_topic_name(target).is_ok())
        .collect();
    for target in targets {
        let count = context.hub.current_partitions(&target).await?;
        if count > 0 {
            layouts.insert(target, count);
        }
    }
    Ok(layouts)
}

/// The resume point of each of `wanted` (none without exactly-once). The scans run side by
/// side, a few at a time: each asks the hub a round trip or two, and the agent waits for all
/// of them before its first batch.
pub(super) async fn resume_scans(
    session: SiteSession<'_>,
    wanted: Vec<(String, i32)>,
    layouts: &HashMap<String, i32>,
) -> Result<Vec<(String, i32, Option<crate::resume::Resume>)>, SessionError> {
    let SiteSession { site, context, .. } = session;
    let scans =
        futures_util::stream::iter(wanted.into_iter().map(|(topic, partition)| async move {
            let found = match context.delivery {
                Delivery::ExactlyOnce => {
                    let target = hub_topic(&context.topic_template, site, &topic);
                    let known = context.checkpoints.get(site, &topic, partition, &target);
                    if crate::hub_limits::check_topic_name(&target).is_err() {
                        // Nothing of it can be in the hub: its records went to the
                        // dead-letter topic, as far as the checkpoint says.
                        let progress = known.unwrap_or(Checkpoint {
                            hub_topic: target,
                            next_offset: 0,
                            scan_from: Default::default(),
                        });
                        let found = crate::resume::Resume {
                            next_offset: progress.next_offset,
                            progress,
                            scanned: 0,
                        };
                        return Ok((topic, partition, Some(found)));
                    }
                    let count = layouts.get(&target).copied().unwrap_or(0);
                    let found = context
                        .hub
                        .resume_point(site, &target, partition, known, count)
                        .await?;
                    Some(found)
                }
                Delivery::AtLeastOnce => None,
            };
            Ok::<_, HubError>((topic, partition, found))
        }))
        .buffered(RESUME_SCANS_AT_ONCE)
        .try_collect::<Vec<_>>()
        .await?;
    Ok(scans)
}

/// Answers the Hello: a Welcome with the resume point of each partition it names that the site
/// may write, as the hub holds them. Returns the resume points, and the hub topics' layouts the
/// scans resolved.
pub(super) async fn welcome(
    session: SiteSession<'_>,
    allow: &[Regex],
    hello: &Hello,
    send: &mut quinn::SendStream,
    progress: &mut CheckpointWriter<'_>,
) -> Result<(HashMap<(String, i32), i64>, HashMap<String, i32>), SessionError> {
    let context = session.context;
    let mut resume = HashMap::new();
    let mut resume_points = Vec::new();
    if context.delivery == Delivery::ExactlyOnce {
        context.checkpoints.wait_caught_up(CHECKPOINTS_WAIT).await;
    }
    // A partition listed twice gets one resume scan and one resume point.
    let mut seen = HashSet::new();
    let wanted: Vec<(String, i32)> = hello
        .partitions
        .iter()
        .filter(|tp| Acl::allows(allow, &tp.topic) && seen.insert((&tp.topic, tp.partition)))
        .map(|tp| (tp.topic.clone(), tp.partition))
        .collect();
    let layouts = existing_layouts(session, &wanted).await?;
    let scans = resume_scans(session, wanted, &layouts).await?;
    for (topic, partition, found) in scans {
        let next_offset = match found {
            Some(found) => {
                context.checkpoints.counted_scan(found.scanned);
                debug!(%topic, partition, next_offset = found.next_offset, scanned = found.scanned, "resume point");
                // Written now, before any data: the next session's scan then starts at this
                // session's beginning even if no later checkpoint makes it to the hub.
                progress.start(&topic, partition, found.progress);
                found.next_offset
            }
            None => 0,
        };
        resume_points.push(ResumePoint {
            topic: topic.clone(),
            partition,
            next_offset,
        });
        resume.insert((topic, partition), next_offset);
    }
    info!(
        partitions = resume_points.len(),
        welcome_after_ms = session.hello_at.elapsed().as_millis(),
        "site connected"
    );
    let welcome = Welcome {
        version: session.version.number(),
        relay: context.relay_name.clone(),
        resume: resume_points,
    };
    write_frame_within(send, Frame::Welcome(welcome), context.limits.read_timeout).await?;
    Ok((resume, layouts))
}
