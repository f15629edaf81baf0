//! The committed seed corpus is what `spoke_fuzz::seeds` generates, and every seed passes its
//! target's checks (a seed that fails would be a crash on the first fuzzing run).
//!
//! Regenerate after a wire format change: `SPOKE_WRITE_CORPUS=1 cargo test --manifest-path fuzz/Cargo.toml`.

use std::path::PathBuf;

use spoke_fuzz::seeds::seeds;

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("corpus")
}

#[test]
fn committed_corpus_matches_the_generator() {
    let write = std::env::var_os("SPOKE_WRITE_CORPUS").is_some();
    let mut stale = Vec::new();
    for seed in seeds() {
        let path = corpus_dir().join(seed.target).join(&seed.name);
        if write {
            std::fs::create_dir_all(path.parent().expect("dir")).expect("mkdir");
            std::fs::write(&path, &seed.bytes).expect("write seed");
        } else if std::fs::read(&path).ok().as_deref() != Some(&seed.bytes[..]) {
            stale.push(path.display().to_string());
        }
    }
    assert!(
        stale.is_empty(),
        "stale seeds (rerun with SPOKE_WRITE_CORPUS=1): {stale:?}"
    );
}

#[test]
fn corpus_stays_small() {
    let total: usize = seeds().iter().map(|s| s.bytes.len()).sum();
    assert!(total < 1 << 20, "seed corpus is {total} bytes");
}

#[test]
fn every_seed_passes_its_target() {
    for seed in seeds() {
        match seed.target {
            "frame_decode" => spoke_fuzz::check_stream(&seed.bytes),
            "frame_body" => {
                let (&kind, body) = seed.bytes.split_first().expect("type byte");
                spoke_fuzz::check_stream(&spoke_fuzz::frame_with_body(kind, body));
            }
            "batch_decode" => spoke_fuzz::check_batch_input(&seed.bytes),
            "roundtrip" => {
                let _ = spoke_fuzz::structured::check_roundtrip(&seed.bytes);
            }
            "connection" => {
                let _ = spoke_fuzz::connection::check_connection(&seed.bytes);
            }
            other => panic!("seed for unknown target {other}"),
        }
    }
}
