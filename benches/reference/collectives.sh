#!/usr/bin/env bash
# Sheaf's allreduce beside MPI's on the same machine, per transport: shared memory
# against Open MPI's shared memory (btl vader), ZeroMQ over loopback TCP against Open
# MPI over loopback TCP; and, for each transport, `auto` against every fixed
# algorithm. 2 ranks, 4 KiB to 16 MiB, ROUNDS interleaved rounds (default 3), medians.
# Prints the busbw ratios Sheaf / MPI (the table of issue 29) and, per size, how much
# slower `auto` is than the best fixed algorithm. Outside CI; needs Open MPI:
#
#   apt-get install openmpi-bin libopenmpi-dev
#   cargo build --release
#   benches/reference/collectives.sh [ROUNDS]
#
# Quote it from an otherwise idle machine only.
set -euo pipefail

rounds=${1:-3}
root=$(cd "$(dirname "$0")/../.." && pwd)
sheaf=$root/target/release/sheaf
[[ -x $sheaf ]] || { echo "build first: cargo build --release" >&2; exit 2; }
for tool in mpicc mpirun python3; do
    command -v $tool >/dev/null || { echo "$tool not found (see the header of $0)" >&2; exit 2; }
done
runs=$(mktemp -d)
trap 'rm -rf "$runs"' EXIT
mpicc -O2 -o "$runs/mpi_allreduce" "$root/benches/reference/mpi_allreduce.c"
mpi=(mpirun --allow-run-as-root --oversubscribe -np 2)
for r in $(seq "$rounds"); do
    for t in shm zmq-tcp; do
        for a in auto ring direct halving-doubling; do
            "$sheaf" bench collectives --transport $t --algorithm $a --min-bytes 1024 --max-bytes 16777216 \
                --json >"$runs/$t-$a-$r.json"
        done
    done
    "${mpi[@]}" --mca btl vader,self "$runs/mpi_allreduce" 1024 16777216 >"$runs/mpi-shm-$r.txt"
    "${mpi[@]}" --mca btl tcp,self --mca btl_tcp_if_include lo "$runs/mpi_allreduce" 1024 16777216 \
        >"$runs/mpi-zmq-tcp-$r.txt"
done

python3 - "$runs" "$rounds" <<'PY'
import json, statistics, sys
runs, rounds = sys.argv[1], int(sys.argv[2])
med = statistics.median
algs = ["auto", "ring", "direct", "halving-doubling"]
def sheaf(t, a):
    out = {}
    for r in range(1, rounds + 1):
        for row in json.load(open(f"{runs}/{t}-{a}-{r}.json")):
            out.setdefault(row["size_bytes"], []).append(row["time_us"])
    return {s: med(v) for s, v in out.items()}
def mpi(t):
    out = {}
    for r in range(1, rounds + 1):
        for line in open(f"{runs}/mpi-{t}-{r}.txt"):
            f = line.split()
            if f and f[0].isdigit():
                out.setdefault(int(f[0]), []).append(float(f[2]))
    return {s: med(v) for s, v in out.items()}
label = lambda s: f"{s >> 20} MiB" if s >= 1 << 20 else f"{s >> 10} KiB"
sizes = [s for s in sorted(sheaf("shm", "auto")) if s >= 4096]
print(f"allreduce, world 2, median of {rounds} interleaved rounds\n")
print("| Sheaf auto / MPI (busbw) | " + " | ".join(label(s) for s in sizes) + " |")
print("|---|" + "---|" * len(sizes))
for t, name in [("shm", "shm / MPI shm"), ("zmq-tcp", "zmq-tcp / MPI tcp")]:
    s, m = sheaf(t, "auto"), mpi(t)
    print(f"| {name} | " + " | ".join(f"{m[z] / s[z]:.2f}" for z in sizes) + " |")
for t in ["shm", "zmq-tcp"]:
    times = {a: sheaf(t, a) for a in algs}
    print(f"\n{t}: time (us) per algorithm; auto / best fixed")
    print("| size | " + " | ".join(algs) + " | auto / best |")
    print("|---|" + "---|" * (len(algs) + 1))
    for z in sizes:
        best = min(times[a][z] for a in algs[1:])
        row = " | ".join(f"{times[a][z]:.1f}" for a in algs)
        print(f"| {label(z)} | {row} | {times['auto'][z] / best:.2f} |")
print("\nTargets: shm at least 2x MPI's shm from 16 KiB, at least 1.0x at 4 KiB; zmq-tcp at least"
      " 0.8x MPI's tcp from 256 KiB; auto within 1.10 of the best fixed algorithm.")
PY
