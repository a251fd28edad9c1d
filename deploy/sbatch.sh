#!/usr/bin/env bash
# A Sheaf job on 2 nodes x 4 tasks under SLURM: one `sheaf run` per task, placed by
# srun. Each task reads SLURM_PROCID, SLURM_NTASKS and SLURM_LOCALID; rank 0 is the
# first host of SLURM_JOB_NODELIST, on port 20000 + SLURM_JOB_ID % 20000.
#SBATCH --job-name=sheaf
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --time=01:00:00
set -euo pipefail
# Every task must hold the same secret; srun passes the environment on.
export SHEAF_JOB_TOKEN="${SHEAF_JOB_TOKEN:-$(openssl rand -hex 32)}"
export RAYON_NUM_THREADS="$SLURM_CPUS_PER_TASK" CANDLE_NUM_THREADS="$SLURM_CPUS_PER_TASK"
# SIGTERM (scancel, preemption) reaches every task; resume with --resume runs/$SLURM_JOB_ID.
srun --kill-on-bad-exit=1 sheaf run examples/shakespeare-gpt.toml \
    --set train.checkpoint_every=200 --run-dir "runs/$SLURM_JOB_ID"
