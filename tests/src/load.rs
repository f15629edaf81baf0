//! A steady producer at the edge: the honest site's traffic while a test attacks the relay.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::kafka::{self, Rec};

/// Small JSON telemetry records with keys and some headers, numbered `i`.
pub fn telemetry(i: usize) -> Rec {
    Rec {
        key: (i % 7 != 0).then(|| format!("sensor-{}", i % 97).into_bytes()),
        value: Some(
            format!(
                "{{\"seq\":{i},\"temp\":{}.{},\"ok\":{}}}",
                10 + i % 25,
                i % 10,
                i % 3 != 0
            )
            .into_bytes(),
        ),
        headers: if i % 5 == 0 {
            vec![("trace".into(), Some(i.to_be_bytes().to_vec()))]
        } else {
            Vec::new()
        },
        timestamp: Some(1_760_000_000_000 + i as i64),
    }
}

/// Produces `rate` records per second, in batches of a tenth of a second, spread over the
/// topic's partitions in turn, until [`SteadyLoad::finish`]. When producing falls behind
/// (a busy machine) it catches up, so the offered load over a window stays `rate`.
#[derive(Debug)]
pub struct SteadyLoad {
    stop: Arc<AtomicBool>,
    produced: Arc<AtomicUsize>,
    thread: std::thread::JoinHandle<anyhow::Result<()>>,
}

impl SteadyLoad {
    pub fn start(edge: String, topic: &'static str, partitions: i32, rate: usize) -> SteadyLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let produced = Arc::new(AtomicUsize::new(0));
        let (stop_flag, count) = (stop.clone(), produced.clone());
        let thread = std::thread::spawn(move || -> anyhow::Result<()> {
            let producer = kafka::producer(&edge)?;
            let batch = (rate / 10).max(1);
            let started = Instant::now();
            let mut n = 0usize;
            let mut turn = 0i32;
            while !stop_flag.load(Ordering::Relaxed) {
                let due = (started.elapsed().as_secs_f64() * rate as f64) as usize;
                if n >= due {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
                let size = batch.min(due - n).max(1);
                let records: Vec<Rec> = (n..n + size).map(telemetry).collect();
                kafka::produce(&producer, topic, turn % partitions, &records)?;
                turn += 1;
                n += size;
                count.store(n, Ordering::Relaxed);
            }
            Ok(())
        });
        SteadyLoad {
            stop,
            produced,
            thread,
        }
    }

    pub fn produced(&self) -> usize {
        self.produced.load(Ordering::Relaxed)
    }

    /// Stops producing; returns how many records were produced (all acknowledged by the edge).
    pub fn finish(self) -> anyhow::Result<usize> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("producer thread panicked"))??;
        Ok(self.produced.load(Ordering::Relaxed))
    }
}
