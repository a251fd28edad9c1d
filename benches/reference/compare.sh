#!/usr/bin/env bash
# Sheaf beside PyTorch on the two reference workloads, interleaved in one run (each
# Sheaf configuration, then PyTorch's), medians of 3, with the ratios. Outside CI:
#
#   cargo build --release
#   benches/reference/compare.sh /path/to/python-with-torch [mlp|gpt|both]
#
# Sheaf: `sheaf bench train benches/reference/{mlp,gpt}.toml` at 1 x 1, 1 x 2 and
# 2 x 1 (shared memory, then zmq-tcp). PyTorch: pytorch_reference.py at 1 x 1, 1 x 2
# and DDP over gloo at 2 x 1, 100 steps a pass, two ways: `compute` (one batch made
# once, forward, backward and the optimizer only: PyTorch's best case) and `job` (the
# rest of what Sheaf's job does each step too: a new batch, the gradient norm, the
# loss read back). Quote medians from an otherwise idle machine only.
set -euo pipefail

python=${1:?usage: compare.sh PYTHON [mlp|gpt|both]}
which=${2:-both}
root=$(cd "$(dirname "$0")/../.." && pwd)
sheaf=$root/target/release/sheaf
[[ -x $sheaf ]] || { echo "build first: cargo build --release" >&2; exit 2; }
"$python" -c 'import torch' 2>/dev/null || { echo "$python has no torch" >&2; exit 2; }
runs=$(mktemp -d)
trap 'rm -rf "$runs"' EXIT

sheaf_median() { # WORKLOAD N THREADS [--set ...]
    local w=$1 n=$2 t=$3
    shift 3
    "$sheaf" bench train "$root/benches/reference/$w.toml" -n "$n" --threads-per-worker "$t" --runs 3 \
        --json --run-dir "$runs/$w-$n-$t-$RANDOM" "$@" >"$runs/out.json" 2>"$runs/log" ||
        { cat "$runs/log" >&2; exit 1; }
    "$python" -c 'import json, sys; print(json.load(open(sys.argv[1]))["median"])' "$runs/out.json"
}

torch_median() { # WORKLOAD THREADS WORLD LOOP
    "$python" "$root/benches/reference/pytorch_reference.py" --workload "$1" --threads "$2" --world "$3" \
        --loop "$4" --steps 100 |
        "$python" -c 'import json, sys; print(json.loads(sys.stdin.read().strip().splitlines()[-1])["median"])'
}

row() { # LABEL SHEAF TORCH_COMPUTE TORCH_JOB
    "$python" -c 'import sys; l, s, ts = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
cells = ["%9.0f | %5.2f" % (float(t), s / float(t)) for t in ts]
print("| %-16s | %9.0f | %s |" % (l, s, " | ".join(cells)))' "$@"
}

for w in mlp gpt; do
    [[ $which == both || $which == "$w" ]] || continue
    unit=$([[ $w == mlp ]] && echo samples/s || echo tokens/s)
    echo "$w ($unit)"
    echo "| config           |     Sheaf | PyTorch compute | ratio | PyTorch job | ratio |"
    echo "|------------------|-----------|-----------|-------|-----------|-------|"
    s11=$(sheaf_median "$w" 1 1); t11=$(torch_median "$w" 1 1 compute); j11=$(torch_median "$w" 1 1 job)
    row "1 x 1" "$s11" "$t11" "$j11"
    s12=$(sheaf_median "$w" 1 2); t12=$(torch_median "$w" 2 1 compute); j12=$(torch_median "$w" 2 1 job)
    row "1 x 2" "$s12" "$t12" "$j12"
    s21=$(sheaf_median "$w" 2 1); t21=$(torch_median "$w" 1 2 compute); j21=$(torch_median "$w" 1 2 job)
    row "2 x 1 shm / DDP" "$s21" "$t21" "$j21"
    s21z=$(sheaf_median "$w" 2 1 --set 'transport.plugin="zmq-tcp"')
    row "2 x 1 zmq-tcp" "$s21z" "$t21" "$j21"
    "$python" -c 'import sys; a, b, c, d = map(float, sys.argv[1:])
print("Sheaf against its own 1 x 1: 1 x 2 %.2fx, 2 x 1 shm %.2fx, 2 x 1 zmq-tcp %.2fx\n" % (b / a, c / a, d / a))' \
        "$s11" "$s12" "$s21" "$s21z"
done
