#!/usr/bin/env bash
# The GPU check of the enforcement library (issue #19), for a machine with an NVIDIA GPU, its
# driver, Rust and a Python with PyTorch (CUDA build) already installed. It needs no network
# once the workspace's crates are in cargo's cache (run `cargo fetch` beforehand where the
# machine is offline). About 2 minutes of building on 16 cores (8 on 2), then about 3 minutes of
# checks; under 10 minutes in all on 16 cores:
#
#   hack/gpu-check.sh            # figures on stdout and in ${OUT:-/tmp}/gpu-check.txt
#
# 1. NVML discovery by the plugin: the devices the kubelet plugin would publish.
# 2. PyTorch under the library: torch.cuda.mem_get_info shows the slice, allocating past it
#    raises OutOfMemoryError, two processes share one cap.
# 3. Compute: a 30 % cap holds within ±5 points for eager kernels, CUDA graphs of a few ms and
#    a graph of ~80 ms (measured as throughput against an unthrottled run of the same loop,
#    which keeps the GPU busy).
# 4. Overhead on a real training step: ms per step without the library, with it and no limits,
#    with a memory limit (the plugin's setup), and with CUDA_DEVICE_SM_LIMIT=100.
# Exit status 0 only if every check passed. Record the figures in enforcement/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-/tmp}
REPORT=$OUT/gpu-check.txt
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
: >"$REPORT"
failures=0
say() { echo "$*" | tee -a "$REPORT"; }
check() { # check NAME CONDITION-EXIT-STATUS DETAIL
    if [ "$2" = 0 ]; then say "PASS $1: $3"; else say "FAIL $1: $3"; failures=$((failures + 1)); fi
}
PY=${PYTHON:-python3}
"$PY" -c 'import torch; assert torch.cuda.is_available()' ||
    { say "FAIL: $PY has no CUDA-enabled PyTorch"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$REPORT"

say "== build"
cargo build -q --release -p libvgpu
LIB=${CARGO_TARGET_DIR:-$ROOT/target}/release/libvgpu.so
# Discovery through the plugin's own code: a throwaway binary over its library.
mkdir -p "$WORK/discover/src"
cat >"$WORK/discover/Cargo.toml" <<TOML
[package]
name = "gpu-check-discover"
version = "0.0.0"
edition = "2024"
[dependencies]
kubelet-plugin = { path = "$ROOT/kubelet-plugin" }
[workspace]
TOML
cat >"$WORK/discover/src/main.rs" <<'RS'
fn main() {
    let source = kubelet_plugin::discovery::nvml::NvmlSource::init().expect("NVML loads");
    let snapshot = source.discover().expect("NVML discovery");
    for gpu in &snapshot.gpus {
        println!("gpu {gpu:?}");
    }
    let devices = snapshot.published_devices().expect("devices render");
    println!("published={}", devices.len());
    println!("unhealthy={}", snapshot.unhealthy.len());
}
RS
# The workspace's lock file: the same versions as the plugin's own build (and no registry
# look-up beyond what building the workspace needs).
cp "$ROOT/Cargo.lock" "$WORK/discover/"
CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target} cargo build -q --release --manifest-path "$WORK/discover/Cargo.toml"

say "== 1. NVML discovery by the plugin"
disc=$("${CARGO_TARGET_DIR:-$ROOT/target}/release/gpu-check-discover" 2>&1) || true
echo "$disc" | tee -a "$REPORT"
gpus=$(nvidia-smi -L | wc -l)
published=$(echo "$disc" | sed -n 's/^published=//p')
check discovery "$([ "${published:-0}" = "$gpus" ] && echo 0 || echo 1)" "published ${published:-none} of $gpus GPUs"

under() { # under ENV... -- COMMAND: with the library preloaded
    env LD_PRELOAD="$LIB" "$@"
}
cache=$WORK/claim.cache

say "== 2. PyTorch memory"
mem=$(under CUDA_DEVICE_MEMORY_LIMIT=4g CUDA_DEVICE_MEMORY_SHARED_CACHE="$cache.1" "$PY" - <<'PY'
import torch
free, total = torch.cuda.mem_get_info()
print(f"total_mib={total >> 20} free_mib={free >> 20}")
a = torch.empty(3 << 30, dtype=torch.uint8, device="cuda")
try:
    b = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    print("past_limit=allocated")
except torch.cuda.OutOfMemoryError:
    print("past_limit=oom")
PY
)
say "$mem"
check mem_get_info "$(echo "$mem" | grep -q 'total_mib=4096 ' && echo 0 || echo 1)" "total is the 4 GiB slice"
check oom "$(echo "$mem" | grep -q 'past_limit=oom' && echo 0 || echo 1)" "3 GiB + 2 GiB past a 4 GiB slice raises OutOfMemoryError"

under CUDA_DEVICE_MEMORY_LIMIT=4g CUDA_DEVICE_MEMORY_SHARED_CACHE="$cache" "$PY" - "$WORK/held" <<'PY' &
import sys, time, torch
a = torch.empty(3 << 30, dtype=torch.uint8, device="cuda")
torch.cuda.synchronize()
open(sys.argv[1], "w").close()
time.sleep(60)
PY
holder=$!
for _ in $(seq 120); do [ -e "$WORK/held" ] && break; sleep 0.5; done
second=$(under CUDA_DEVICE_MEMORY_LIMIT=4g CUDA_DEVICE_MEMORY_SHARED_CACHE="$cache" "$PY" - <<'PY'
import torch
free, total = torch.cuda.mem_get_info()
print(f"second_free_mib={free >> 20}")
try:
    torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    print("second_2g=allocated")
except torch.cuda.OutOfMemoryError:
    print("second_2g=oom")
torch.empty(512 << 20, dtype=torch.uint8, device="cuda")
print("second_512m=allocated")
PY
)
kill "$holder" 2>/dev/null || true
wait "$holder" 2>/dev/null || true
say "$second"
check shared_cap "$(echo "$second" | grep -q 'second_2g=oom' && echo "$second" | grep -q 'second_512m=allocated' && echo 0 || echo 1)" \
    "a second process gets only what the first (3 GiB) left of 4 GiB"

say "== 3. Compute at CUDA_DEVICE_SM_LIMIT=30 (share = throughput throttled / unthrottled)"
cat >"$WORK/compute.py" <<'PY'
import sys, time, torch
mode, seconds = sys.argv[1], float(sys.argv[2])
n = 4096
a = torch.randn(n, n, device="cuda", dtype=torch.float16)
b = torch.randn(n, n, device="cuda", dtype=torch.float16)
def step():
    torch.mm(a, b)
if mode == "eager":
    run = step
else:
    reps = {"graph": 8, "longgraph": 600}[mode]  # ~1-2 ms and ~80-150 ms per replay on an H100/H200
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        step()
        torch.cuda.synchronize()
        with torch.cuda.graph(g):
            for _ in range(reps):
                step()
    run = g.replay
for _ in range(3):
    run()
torch.cuda.synchronize()
warm = time.time() + 1.5
count, start = 0, None
end = time.time() + seconds
while time.time() < end:
    run()
    if start is None and time.time() > warm:
        torch.cuda.synchronize()
        start, count = time.time(), 0
    count += 1
torch.cuda.synchronize()
print(f"{count / (time.time() - start):.3f}")
PY
for mode in eager graph longgraph; do
    free_rate=$("$PY" "$WORK/compute.py" "$mode" 8)
    capped_rate=$(under CUDA_DEVICE_SM_LIMIT=30 "$PY" "$WORK/compute.py" "$mode" 12)
    share=$("$PY" -c "print(round(100 * $capped_rate / $free_rate, 1))")
    ok=$("$PY" -c "print(0 if abs($share - 30) <= 5 else 1)")
    check "compute_$mode" "$ok" "share ${share} % (unthrottled ${free_rate}/s, capped ${capped_rate}/s)"
done

say "== 4. Overhead on a training step (ms per step, no throttling)"
cat >"$WORK/train.py" <<'PY'
import time, torch
torch.manual_seed(0)
model = torch.nn.Sequential(
    torch.nn.Linear(2048, 4096), torch.nn.ReLU(), torch.nn.Linear(4096, 4096), torch.nn.ReLU(),
    torch.nn.Linear(4096, 1000)).cuda()
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
x = torch.randn(512, 2048, device="cuda")
y = torch.randint(0, 1000, (512,), device="cuda")
def step():
    opt.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
for _ in range(50):
    step()
torch.cuda.synchronize()
t = time.perf_counter()
for _ in range(500):
    step()
torch.cuda.synchronize()
print(f"{(time.perf_counter() - t) / 500 * 1e3:.3f}")
PY
base=$("$PY" "$WORK/train.py")
lib=$(under "$PY" "$WORK/train.py")
memlim=$(under CUDA_DEVICE_MEMORY_LIMIT=40g CUDA_DEVICE_MEMORY_SHARED_CACHE="$cache.2" "$PY" "$WORK/train.py")
sm100=$(under CUDA_DEVICE_MEMORY_LIMIT=40g CUDA_DEVICE_SM_LIMIT=100 CUDA_DEVICE_MEMORY_SHARED_CACHE="$cache.3" "$PY" "$WORK/train.py")
say "train_step_ms: none=$base library=$lib memory_limit=$memlim memory_limit+sm100=$sm100"
ok=$("$PY" -c "print(0 if $memlim <= $base * 1.02 + 0.05 else 1)")
check overhead "$ok" "a memory-limited training step within 2 % of the bare one"

say "== $failures failure(s); report in $REPORT"
[ "$failures" = 0 ]
