#!/usr/bin/env bash
# Memory per rank beside PyTorch (outside CI): bytes per parameter held, as the slope
# of each rank's peak resident memory (the kernel's, getrusage) between a GPT of
# n_layer 8 and one of 16 (n_head 8, n_embd 512, block 128, global batch 8, AdamW,
# 4 steps, world 4 on this host), so fixed costs drop out; Sheaf's plan beside its
# measured peak less its baseline; tokens/s.
#
#   cargo build --release
#   benches/reference/memory.sh /path/to/python-with-torch [sheaf|torch|both]
#   LAYOUTS="pipeline4 tensor4" benches/reference/memory.sh PYTHON sheaf   # some rows
#
# Sheaf (`sheaf launch -n 4`, zmq-tcp): data-parallel at ZeRO 0, 1, 2 and 3, ZeRO 0 and
# ZeRO 3 with every block recomputing its activations, a pipeline of 4 stages, 4 tensor-parallel
# slices, and both of those recomputing. PyTorch (pytorch_memory.py, gloo): DDP, FSDP2 (fully_shard per block, built
# on the meta device) and FSDP2 with activation checkpointing.
set -euo pipefail

python=${1:?usage: memory.sh PYTHON [sheaf|torch|both]}
which=${2:-both}
root=$(cd "$(dirname "$0")/../.." && pwd)
sheaf=$root/target/release/sheaf
[[ -x $sheaf ]] || { echo "build first: cargo build --release" >&2; exit 2; }
runs=$(mktemp -d)
trap 'rm -rf "$runs"' EXIT
# Each row as it is measured, kept after the run (ROWS=path to choose where).
rows=${ROWS:-$root/target/memory-rows.jsonl}
job=$runs/gpt.toml
cat >"$job" <<'EOF'
seed = 1337
[model]
kind = "gpt"
n_layer = 8
n_head = 8
n_embd = 512
block_size = 128
[data]
dataset = "shakespeare"
test_fraction = 0.01
[train]
epochs = 100
max_steps = 4
batch_size = 8
optimizer = "adamw"
lr = 1e-3
grad_clip = 1.0
[parallel]
strategy = "data-parallel"
[transport]
plugin = "zmq-tcp"
EOF

sheaf_layout() { # LABEL [--set ...]: one JSON line per n_layer
    local label=$1
    shift
    # LAYOUTS="pipeline4 tensor4" measures only those rows.
    [[ -z ${LAYOUTS:-} || " $LAYOUTS " == *" $label "* ]] || return 0
    for n in 8 16; do
        local dir=$runs/$label-$n
        "$sheaf" launch -n 4 "$job" --run-dir "$dir" --threads-per-worker 1 --set "model.n_layer=$n" "$@" \
            >"$runs/log" 2>&1 || { tail -5 "$runs/log" >&2; exit 1; }
        "$python" - "$dir/summary.json" "$label" "$n" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
print(json.dumps({"who": "sheaf", "layout": sys.argv[2], "n_layer": int(sys.argv[3]), "params": s["params"],
                  "params_per_rank": s["params_per_rank"], "peak": s["peak_rss_bytes_per_rank"],
                  "baseline": s["baseline_rss_bytes_per_rank"],
                  "planned": [p["total"] for p in s["planned_bytes_per_rank"]],
                  "tokens_per_sec": s["tokens_per_sec"]}))
PY
    done
}

torch_layout() { # MODE
    for n in 8 16; do
        (cd "$root/benches/reference" && "$python" pytorch_memory.py --mode "$1" --world 4 --n-layer "$n" 2>/dev/null) |
            "$python" -c '
import json, sys
# The ranks print at once, so their lines may interleave: every JSON object in the text.
text, dec, rows, i = sys.stdin.read(), json.JSONDecoder(), [], 0
while (i := text.find("{", i)) >= 0:
    try:
        row, end = dec.raw_decode(text, i)
        rows.append(row)
        i = end
    except ValueError:
        i += 1
rows = sorted((r for r in rows if "rank" in r), key=lambda r: r["rank"])
print(json.dumps({"who": "torch", "layout": rows[0]["mode"], "n_layer": rows[0]["n_layer"],
                  "peak": [r["peak_rss_bytes"] for r in rows], "baseline": [r["baseline_rss_bytes"] for r in rows],
                  "tokens_per_sec": rows[0]["tokens_per_sec"]}))'
    done
}

{
    if [[ $which != torch ]]; then
        sheaf_layout zero0
        sheaf_layout zero1 --set parallel.options.data-parallel.zero=1
        sheaf_layout zero2 --set parallel.options.data-parallel.zero=2
        sheaf_layout zero3 --set parallel.options.data-parallel.zero=3
        sheaf_layout zero3-recompute --set parallel.options.data-parallel.zero=3 \
            --set 'train.activation_checkpointing="blocks"'
        sheaf_layout zero0-recompute --set 'train.activation_checkpointing="blocks"'
        sheaf_layout pipeline4 --set 'parallel.strategy="pipeline"'
        sheaf_layout tensor4 --set 'parallel.strategy="tensor-parallel"'
        sheaf_layout pipeline4-recompute --set 'parallel.strategy="pipeline"' \
            --set 'train.activation_checkpointing="blocks"'
        sheaf_layout tensor4-recompute --set 'parallel.strategy="tensor-parallel"' \
            --set 'train.activation_checkpointing="blocks"'
        # 2 pipelines of 2 stages, each stage's replicas sharding it by rows (ZeRO 3) or not.
        sheaf_layout pipeline2x2 --set 'parallel.strategy="pipeline"' --set parallel.options.pipeline.data=2
        sheaf_layout pipeline2x2-zero3 --set 'parallel.strategy="pipeline"' \
            --set parallel.options.pipeline.data=2 --set parallel.options.pipeline.zero=3
    fi
    if [[ $which != sheaf ]]; then
        torch_layout ddp
        torch_layout fsdp
        torch_layout fsdp-ac
    fi
} | tee "$rows"

"$python" - "$rows" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
params = {r["n_layer"]: r["params"] for r in rows if r["who"] == "sheaf"}
if not params:  # the GPT's count, as Sheaf's model has it: 12 n_embd^2 + 13 n_embd per block
    c = 512
    params = {n: 65 * c + 128 * c + n * (12 * c * c + 13 * c) + 2 * c for n in (8, 16)}
mib = lambda b: b / 2**20
print(f"{'layout':<18} {'peak MiB, 8 / 16 layers (rank 0; max of the others)':<52} {'B/param':>8} {'plan/meas':>10} {'tok/s':>7}")
groups = {}
for r in rows:
    groups.setdefault((r["who"], r["layout"]), {})[r["n_layer"]] = r
for (who, layout), by in groups.items():
    a, b = by[8], by[16]
    # Bytes per parameter each rank holds: the slope of its peak over the parameters
    # it holds (pieces under model parallelism); a ZeRO 3 shard holds the whole
    # model's parameters between its gathers, so its slope is per parameter of the model.
    pieces = who == "sheaf" and layout.startswith(("pipeline", "tensor"))
    held = lambda r, k: r["params_per_rank"][k]
    slope = [(b["peak"][k] - a["peak"][k]) / (held(b, k) - held(a, k) if pieces else params[16] - params[8])
             for k in range(len(a["peak"]))]
    others = max(range(1, len(a["peak"])), key=lambda k: b["peak"][k])
    ratio = ""
    if "planned" in a:
        meas = [p - q for p, q in zip(b["peak"], b["baseline"])]
        ratio = f"{statistics.median(pl / m for pl, m in zip(b['planned'], meas)):.2f}"
    peaks = "%.0f / %.0f; %.0f / %.0f" % (mib(a["peak"][0]), mib(b["peak"][0]), mib(a["peak"][others]), mib(b["peak"][others]))
    name = who + " " + layout
    print(f"{name:<18} {peaks:<52} {slope[0]:>5.1f}/{max(slope[1:]):<4.1f} {ratio:>8} {a['tokens_per_sec']:>7.0f}")
PY
