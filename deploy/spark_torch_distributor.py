"""Sheaf under Spark's TorchDistributor: each process it starts runs `sheaf run` as its rank.

TorchDistributor runs torchrun underneath, whose elastic agent serves its store on
MASTER_PORT (TORCHELASTIC_USE_AGENT_STORE=True): `sheaf run` sees that and meets two
ports above it by itself. Every rank shares the job's secret.

    pip install pyspark   # and a Java runtime (17)
    python deploy/spark_torch_distributor.py [JOB.toml] [--processes 2] \
        [--sheaf target/release/sheaf] [--run-dir runs/spark] [--set train.max_steps=50 ...]

Local mode here (local_mode=True: the processes on the driver); on a cluster, give
--run-dir a path every executor shares and leave local mode.
"""
import argparse
import os
import secrets


def sheaf_rank(sheaf, job, run_dir, sets, token):
    import os
    import subprocess

    env = dict(os.environ, SHEAF_JOB_TOKEN=token)
    cmd = [sheaf, "run", *job, "--run-dir", run_dir]
    for s in sets:
        cmd += ["--set", s]
    subprocess.run(cmd, env=env, check=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("job", nargs="?")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--sheaf", default="sheaf")
    p.add_argument("--run-dir", default="runs/spark")
    p.add_argument("--set", dest="sets", action="append", default=[])
    a = p.parse_args()

    from pyspark.ml.torch.distributor import TorchDistributor
    from pyspark.sql import SparkSession

    spark = SparkSession.builder.master(f"local[{a.processes}]").appName("sheaf").getOrCreate()
    sheaf = os.path.abspath(a.sheaf) if os.path.sep in a.sheaf else a.sheaf
    job = [os.path.abspath(a.job)] if a.job else []
    run_dir = os.path.abspath(a.run_dir)
    TorchDistributor(num_processes=a.processes, local_mode=True, use_gpu=False).run(
        sheaf_rank, sheaf, job, run_dir, a.sets, secrets.token_hex(32)
    )
    spark.stop()
    print(f"outputs in {run_dir}")


if __name__ == "__main__":
    main()
