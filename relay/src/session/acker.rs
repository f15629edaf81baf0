//! The hub's confirmations back to the agent: in the order batches arrived, `Rejected` before
//! the `Ack` of a batch with refused records, and with transactions each batch committed
//! (data and checkpoint together) before it is acknowledged.

use rdkafka::producer::Producer;
use spoke_proto::{Ack, Frame, Goodbye, GoodbyeCode, Negotiated, Rejected};
use spoke_transport::wire::write_frame_within;
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::warn;

use super::checkpoints::CheckpointWriter;
use super::reader::{Outcome, Produced};
use super::{SessionError, SiteSession};
use crate::handoff::Pending;
use crate::hub::{HubError, TRANSACTION_TIMEOUT};
use crate::producer::{InFlight, SessionProducer};

/// Awaits the hub's confirmations in arrival order and answers the agent. With transactions
/// it also commits each batch (data and checkpoint together) before acknowledging it.
pub(super) async fn acknowledge(
    mut send: quinn::SendStream,
    mut confirmations: mpsc::Receiver<Outcome>,
    mut progress: CheckpointWriter<'_>,
    version: Negotiated,
) -> Result<(), SessionError> {
    // An agent that stops taking our frames (no flow-control credit) while keeping the
    // connection alive would otherwise hold this session, and all queued behind it, forever:
    // every write below is bounded by `stall`.
    let stall = progress.session.context.limits.read_timeout;
    while let Some(outcome) = confirmations.recv().await {
        let frame = match outcome {
            Outcome::Produced(batch) => {
                confirm(&mut send, &mut progress, version, stall, batch).await?
            }
            Outcome::Refused(nack) => Frame::Nack(nack),
        };
        write_frame_within(&mut send, frame, stall).await?;
    }
    progress.finish().await;
    let goodbye = Goodbye {
        code: GoodbyeCode::Shutdown,
        reason: "all batches confirmed".into(),
    };
    write_frame_within(&mut send, Frame::Goodbye(goodbye), stall).await?;
    let _ = send.finish();
    Ok(())
}

/// Answers one batch once the hub has all of it: with transactions committed (data and
/// checkpoint together), its records and their dead-letter copies landed, the checkpoints
/// advanced, and refused records reported (a `Rejected` before the `Ack`); the `Ack`.
async fn confirm(
    send: &mut quinn::SendStream,
    progress: &mut CheckpointWriter<'_>,
    version: Negotiated,
    stall: Duration,
    batch: Produced,
) -> Result<Frame, SessionError> {
    let Produced {
        seq,
        topic,
        partition,
        next_offset,
        deliveries,
        rejected,
        dead_letters,
        base,
        transaction,
    } = batch;
    if let Some(base) = base {
        progress.track(&topic, partition, base);
    }
    if progress.session.transactional {
        progress.advance(&topic, partition, next_offset, &[]);
        progress.write((topic.clone(), partition));
        commit(progress.session.producer).await?;
        progress.committed();
    }
    let records = deliveries.len() as u64;
    let landed = landed(deliveries, dead_letters).await?;
    let session = progress.session;
    session.context.fleet.records(session.site, records);
    progress.advance(&topic, partition, next_offset, &landed);
    if !session.transactional {
        write_progress(progress, topic, partition, rejected.is_some());
    }
    // A reader may begin the next transaction.
    drop(transaction);
    if let Some(rejected) = rejected {
        report_rejected(session, &rejected);
        if version.rejected() {
            write_frame_within(send, Frame::Rejected(*rejected), stall).await?;
            // The window between telling the agent and acknowledging the batch.
            spoke_process::failpoint::reached("session.rejected_sent").await;
        }
    }
    Ok(Frame::Ack(Ack { seq, next_offset }))
}

/// Where each of a batch's records landed, in order, once all of them and the dead-letter
/// copies of the refused ones did; the first failure ends the session.
async fn landed(
    deliveries: Vec<Pending>,
    dead_letters: Vec<InFlight>,
) -> Result<Vec<(i32, i64)>, SessionError> {
    let mut landed = Vec::with_capacity(deliveries.len());
    for delivery in deliveries {
        landed.push(delivery.landed().await.map_err(SessionError::Delivery)?);
    }
    for delivery in dead_letters {
        delivery.await.map_err(SessionError::Delivery)?;
    }
    Ok(landed)
}

/// Without transactions, writes the partition's checkpoint when it is due, and at once after
/// a batch with refused records.
fn write_progress(
    progress: &mut CheckpointWriter<'_>,
    topic: String,
    partition: i32,
    some_rejected: bool,
) {
    if some_rejected {
        // The resume scan reads the hub topic, not the dead-letter one: only a checkpoint
        // past them keeps a reconnect from dead-lettering them again. (The failpoint loses
        // this write, as a crash before its delivery would.)
        if !spoke_process::failpoint::fails("session.rejects_checkpoint") {
            progress.write((topic, partition));
        }
    } else {
        progress.write_if_due((topic, partition));
    }
}

/// Logs and counts records the hub refused; the agent learns of them from the `Rejected`
/// frame (protocol version 4) and counts them as lost.
pub(super) fn report_rejected(session: SiteSession<'_>, rejected: &Rejected) {
    let records: u64 = rejected.ranges.iter().map(|r| u64::from(r.records)).sum();
    session
        .context
        .fleet
        .dead_lettered(&rejected.reason, records);
    let ranges: Vec<String> = rejected
        .ranges
        .iter()
        .map(|r| format!("{}..{}", r.first_offset, r.last_offset))
        .collect();
    warn!(
        topic = %rejected.topic,
        partition = rejected.partition,
        records,
        reason = %rejected.reason,
        offsets = %ranges.join(","),
        dead_letter_topic = %session.context.rejects.dead_letter_topic,
        "the hub refuses these records; they went to the dead-letter topic"
    );
}

/// Commits the open transaction. Any failure aborts it and ends the session: librdkafka
/// lacks KIP-890, so an unclear outcome is never retried or guessed at; the next session
/// starts a new producer (fencing this one) and computes its resume point afresh.
pub(super) async fn commit(producer: &SessionProducer) -> Result<(), SessionError> {
    let committing = producer.transactions().clone();
    let result =
        tokio::task::spawn_blocking(move || committing.commit_transaction(TRANSACTION_TIMEOUT))
            .await
            .map_err(HubError::from)?;
    if let Err(error) = result {
        let aborting = producer.transactions().clone();
        let aborted =
            tokio::task::spawn_blocking(move || aborting.abort_transaction(TRANSACTION_TIMEOUT))
                .await;
        warn!(%error, aborted = matches!(aborted, Ok(Ok(()))), "hub transaction failed; aborting the session");
        return Err(SessionError::Transaction(error));
    }
    Ok(())
}
