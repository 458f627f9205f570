#!/usr/bin/env bash
# Fuzz the inputs the project reads from outside (fuzz-targets/src/lib.rs) with cargo-fuzz/libFuzzer.
#
#   hack/fuzz.sh                      every target, 1,000,000 runs each, growing fuzz/corpus
#   hack/fuzz.sh --runs 50000 cel     one target, fewer runs
#   hack/fuzz.sh --seconds 10         every target for 10 s each
#   hack/fuzz.sh --ci                 what .ci/run does: as --seconds 10, new inputs kept apart
#                                     from the committed corpora, no sanitizer (CI's 2 cores)
#   hack/fuzz.sh --cmin               minimise every committed corpus
#
# cargo-fuzz needs unstable compiler flags; this machine has one stable toolchain, so the build
# runs with RUSTC_BOOTSTRAP=1. A crash leaves its input in fuzz/artifacts/<target>/ and fails
# the script; add the input to fuzz/corpus/<target>/ once fixed, and `cargo test --workspace`
# (fuzz-targets/tests/corpora.rs) replays it on every run from then on.
set -euo pipefail
self=$(realpath "$0")
cd "$(dirname "$0")/../fuzz"

runs=1000000
seconds=""
ci=false
cmin=false
targets=()
while [ $# -gt 0 ]; do
  case $1 in
    --runs) runs=$2; shift 2 ;;
    --seconds) seconds=$2; shift 2 ;;
    --ci) ci=true; seconds=${seconds:-10}; shift ;;
    --cmin) cmin=true; shift ;;
    -h|--help) sed -n "2,14p" "$self"; exit 0 ;;
    -*) echo "hack/fuzz.sh: unknown option $1" >&2; exit 2 ;;
    *) targets+=("$1"); shift ;;
  esac
done
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked --quiet
# Every [[bin]] of fuzz/Cargo.toml.
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <(cargo fuzz list)
export RUSTC_BOOTSTRAP=1

build=(--release --debug-assertions)
if $ci; then
  # CI has 2 cores: skip AddressSanitizer (the fuzzed code is safe Rust; the panics it looks
  # for need no sanitizer) and keep the optimised build that the corpus replay needs anyway.
  build+=(--sanitizer none --target-dir "${CARGO_TARGET_DIR:-target}/fuzz-ci")
fi

failed=()
for t in "${targets[@]}"; do
  corpus=corpus/$t
  mkdir -p "$corpus"
  if $cmin; then
    cargo fuzz cmin "${build[@]}" "$t" "$corpus"
    continue
  fi
  dirs=("$corpus")
  if $ci; then
    # New inputs go to a scratch directory; the committed corpus is only read.
    scratch=$(mktemp -d)
    dirs=("$scratch" "$corpus")
  fi
  limit=(-runs="$runs")
  [ -z "$seconds" ] || limit=(-max_total_time="$seconds")
  echo "=== fuzz $t ${limit[*]}"
  log=$(mktemp)
  if cargo fuzz run "${build[@]}" "$t" "${dirs[@]}" -- "${limit[@]}" -max_len=4096 \
      -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1; then
    grep -E '^(stat::number_of_executed_units|stat::average_exec_per_sec|stat::new_units_added|stat::peak_rss_mb|Done)' "$log" | tr '\n' ' '
    echo
  else
    tail -40 "$log"
    failed+=("$t")
  fi
  rm -f "$log"
  if $ci; then rm -rf "$scratch"; fi
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "hack/fuzz.sh: failed: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
  exit 1
fi
