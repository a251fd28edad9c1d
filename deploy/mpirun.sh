#!/usr/bin/env bash
# A Sheaf job under Open MPI's mpirun: 8 ranks on two hosts, one `sheaf run` each.
# Each rank reads OMPI_COMM_WORLD_RANK, OMPI_COMM_WORLD_SIZE and
# OMPI_COMM_WORLD_LOCAL_RANK; mpirun gives no rendezvous address, so MASTER_ADDR
# (rank 0's host) and the secret are exported to every rank with -x.
# MPICH's mpiexec works the same way (PMI_RANK, PMI_SIZE; pass variables with -genv).
set -euo pipefail
export MASTER_ADDR=node01 MASTER_PORT=29500
export SHEAF_JOB_TOKEN="${SHEAF_JOB_TOKEN:-$(openssl rand -hex 32)}"
mpirun -np 8 --host node01:4,node02:4 -x MASTER_ADDR -x MASTER_PORT -x SHEAF_JOB_TOKEN \
    sheaf run examples/shakespeare-gpt.toml --run-dir runs/mpirun
