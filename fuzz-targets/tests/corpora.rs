//! Replays every committed corpus input through its target on a stable toolchain: what the
//! fuzzer once found (and every seed) keeps passing. `hack/fuzz.sh` runs the fuzzer itself.

use std::path::Path;

/// The inputs run on a thread with a release build's stack margin: this debug build's frames
/// are tens of times larger (the fuzzer itself runs optimised, on the main thread).
#[test]
fn every_corpus_input_passes_its_target() {
    std::thread::Builder::new()
        .stack_size(256 << 20)
        .spawn(replay)
        .unwrap()
        .join()
        .unwrap();
}

fn replay() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    for (name, target) in vgpu_fuzz_targets::TARGETS {
        let dir = root.join(name);
        let entries: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        assert!(entries.len() >= 3, "{}: no corpus committed", dir.display());
        for path in entries {
            let data = std::fs::read(&path).unwrap();
            let outcome = std::panic::catch_unwind(|| target(&data));
            assert!(outcome.is_ok(), "{name}: {} panics", path.display());
        }
    }
}
