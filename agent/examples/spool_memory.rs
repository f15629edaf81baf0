//! The spool's resident memory while a backlog accumulates, as during a long outage: appends
//! incompressible chunks of CHUNK_BYTES (default 220,000, a 1 MiB chunk of JSON) until
//! TOTAL_MIB (default 400) are spooled, flushing every 20 as the tailer does, then reads them
//! back and removes them as the shipper does, printing the RSS as it goes. In between it
//! reopens the spool, as an agent restarting with a backlog does; with `cold`, after dropping
//! the kernel's page cache (root only), as after a reboot.
//!
//!     cargo run --release -p spoke-agent --example spool_memory [CHUNK_BYTES [TOTAL_MIB [cold]]]

use std::time::Instant;

use spoke_agent::spool::{Chunk, SledSpool, SourcePartition, Spool};

fn rss_mib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kib| kib.parse::<u64>().ok())
        .map_or(0, |kib| kib / 1024)
}

fn main() -> anyhow::Result<()> {
    let _ = spoke_agent::malloc::tune();
    let mut args = std::env::args().skip(1);
    let chunk_bytes: usize = args.next().map_or(Ok(220_000), |a| a.parse())?;
    let total_mib: usize = args.next().map_or(Ok(400), |a| a.parse())?;
    let cold = args.next().as_deref() == Some("cold");
    let dir = tempfile::tempdir()?;
    let spool = SledSpool::open(dir.path())?;
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let payload: bytes::Bytes = (0..chunk_bytes)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect::<Vec<u8>>()
        .into();
    let partitions: Vec<SourcePartition> = (0..3)
        .map(|partition| SourcePartition {
            topic: "t".into(),
            partition,
        })
        .collect();
    let chunks = (total_mib * 1024 * 1024 / chunk_bytes).max(1);
    let report_every = (chunks / 8).max(1);
    println!("start: RSS {} MiB", rss_mib());
    let started = Instant::now();
    for i in 0..chunks {
        let first = (i / partitions.len()) as i64 * 100;
        spool.append(&Chunk {
            partition: partitions[i % partitions.len()].clone(),
            first_offset: first,
            last_offset: first + 99,
            next_offset: first + 100,
            record_count: 100,
            codec: 1,
            dictionary: None,
            uncompressed_len: u32::try_from(chunk_bytes * 4).unwrap_or(u32::MAX),
            spooled_at_ms: 0,
            payload: payload.clone(),
        })?;
        if i % 20 == 19 {
            spool.flush()?;
        }
        if (i + 1) % report_every == 0 {
            println!(
                "{:>6} chunks, {:>5} MiB spooled, RSS {:>5} MiB",
                i + 1,
                ((i + 1) * chunk_bytes) >> 20,
                rss_mib()
            );
        }
    }
    spool.flush()?;
    let written = started.elapsed();
    // As an agent restarting with a backlog; after a reboot, with nothing in the page cache.
    drop(spool);
    if cold {
        std::fs::write("/proc/sys/vm/drop_caches", "3")
            .map_err(|e| anyhow::anyhow!("dropping the page cache (needs root): {e}"))?;
    }
    let started = Instant::now();
    let spool = SledSpool::open(dir.path())?;
    println!(
        "reopened in {:.1} s, RSS {} MiB",
        started.elapsed().as_secs_f64(),
        rss_mib()
    );
    let started = Instant::now();
    let mut read = 0;
    for partition in &partitions {
        loop {
            let batch = spool.chunks_from(partition, 0, 16)?;
            let Some(last) = batch.last() else { break };
            read += batch.iter().map(|c| c.payload.len()).sum::<usize>();
            spool.remove_acked(partition, last.next_offset)?;
        }
        spool.flush()?;
        println!("{partition} read and removed, RSS {} MiB", rss_mib());
    }
    let mib = (chunks * chunk_bytes) as f64 / (1024.0 * 1024.0);
    println!(
        "wrote {mib:.0} MiB at {:.0} MiB/s, read and removed {} MiB at {:.0} MiB/s; end RSS {} MiB",
        mib / written.as_secs_f64(),
        read >> 20,
        mib / started.elapsed().as_secs_f64(),
        rss_mib()
    );
    Ok(())
}
