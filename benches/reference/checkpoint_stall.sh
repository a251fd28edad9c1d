#!/usr/bin/env bash
# What a checkpoint costs the training loop, saved synchronously and on a thread
# (`train.checkpoint_async`), beside no checkpoints at all: a 25.2M-parameter MLP with
# AdamW (a checkpoint of about 290 MB), one rank, a save every EVERY steps (default 4)
# of STEPS (default 24), RUNS runs a mode, interleaved. A save every 2 steps here comes
# before the last one is written, and then waits for it. Prints, per mode, the median wall time of a run and the
# median of summary.json's per-save stall and write times; then the stall a save adds
# to the wall time, and the asynchronous stall as a share of the synchronous one.
# THREADS sets the rank's compute threads (default: the launcher's), so that a core
# can be left to the writer (THREADS=1 on two cores). Outside CI; quote medians from an otherwise idle machine:
#
#   cargo build --release
#   benches/reference/checkpoint_stall.sh [RUNS] [DIR]
set -euo pipefail

runs=${1:-5}
dir=${2:-$(mktemp -d)}
mkdir -p "$dir"
root=$(cd "$(dirname "$0")/../.." && pwd)
sheaf=$root/target/release/sheaf
[[ -x $sheaf ]] || { echo "build first: cargo build --release" >&2; exit 2; }
job=(--set 'data.dataset="synthetic"' --set data.samples=512 --set 'model.layers=[1024, 4096, 4096, 1024, 10]'
    --set train.batch_size=64 --set train.max_steps=${STEPS:-24} --set train.keep_checkpoints=2 --set 'train.optimizer="adamw"')
for i in $(seq "$runs"); do
    for mode in async sync none; do
        case $mode in
            async) extra=(--set train.checkpoint_every=${EVERY:-4} --set train.checkpoint_async=true) ;;
            sync) extra=(--set train.checkpoint_every=${EVERY:-4}) ;;
            none) extra=() ;;
        esac
        rm -rf "$dir/$mode-$i"
        "$sheaf" launch -n 1 ${THREADS:+--threads-per-worker "$THREADS"} "${job[@]}" "${extra[@]}" --run-dir "$dir/$mode-$i" >"$dir/$mode-$i.log" 2>&1
        # Only summary.json is read: each run's checkpoints (about 600 MB) go at once.
        rm -rf "$dir/$mode-$i/checkpoints" "$dir/$mode-$i/checkpoint.safetensors"
    done
done
python3 - "$dir" "$runs" <<'PY'
import json, statistics as st, sys
d, runs = sys.argv[1], int(sys.argv[2])
wall, stall, write = {}, {}, {}
for mode in ["async", "sync", "none"]:
    wall[mode], stall[mode], write[mode] = [], [], []
    for i in range(1, runs + 1):
        s = json.load(open(f"{d}/{mode}-{i}/summary.json"))
        wall[mode].append(s["wall_seconds"])
        for save in s.get("checkpoint_saves", []):
            stall[mode].append(save["stall_s"])
            write[mode].append(save["write_s"])
    line = f"{mode:5}: run {st.median(wall[mode]):.2f} s (median of {runs})"
    if stall[mode]:
        line += f", per save: stall {st.median(stall[mode]):.3f} s, write {st.median(write[mode]):.3f} s"
    print(line)
saves = len(stall["sync"]) // runs
added = {m: (st.median(wall[m]) - st.median(wall["none"])) / saves for m in ["async", "sync"]}
print(f"wall time a save adds: async {added['async']:.3f} s, sync {added['sync']:.3f} s")
print(f"async stall / sync stall: {st.median(stall['async']) / st.median(stall['sync']):.3f} (summary), "
      f"{added['async'] / added['sync']:.3f} (wall)")
PY
