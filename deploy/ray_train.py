"""Sheaf under Ray Train: every worker of a `TorchTrainer` runs `sheaf run` as its rank.

Ray's Torch backend gives each worker torchrun's variables (RANK, WORLD_SIZE,
LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and has already started its own
process group, whose store listens on MASTER_PORT. So each worker tells Sheaf to meet
two ports above it (SHEAF_MASTER_PORT), and every rank shares the job's secret.

    pip install "ray[train]"
    python deploy/ray_train.py [JOB.toml] [--workers 2] [--sheaf target/release/sheaf] \
        [--run-dir runs/ray] [--set train.max_steps=50 ...]

Local mode here; on a Ray cluster, give --run-dir a path every node shares.
"""
import argparse
import os
import secrets
import subprocess

import ray
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer


def sheaf_rank(config):
    env = dict(os.environ)
    env["SHEAF_JOB_TOKEN"] = config["token"]
    env["SHEAF_MASTER_PORT"] = str(int(env["MASTER_PORT"]) + 2)
    cmd = [config["sheaf"], "run", *config["job"], "--run-dir", config["run_dir"]]
    for s in config["sets"]:
        cmd += ["--set", s]
    subprocess.run(cmd, env=env, check=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("job", nargs="?")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--sheaf", default="sheaf")
    p.add_argument("--run-dir", default="runs/ray")
    p.add_argument("--set", dest="sets", action="append", default=[])
    a = p.parse_args()
    ray.init(num_cpus=a.workers)
    config = {
        "token": secrets.token_hex(32),
        "sheaf": os.path.abspath(a.sheaf) if os.path.sep in a.sheaf else a.sheaf,
        "job": [os.path.abspath(a.job)] if a.job else [],
        "run_dir": os.path.abspath(a.run_dir),
        "sets": a.sets,
    }
    trainer = TorchTrainer(
        sheaf_rank,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=a.workers, use_gpu=False),
        run_config=RunConfig(storage_path=os.path.abspath(a.run_dir + "-ray")),
    )
    trainer.fit()
    print(f"outputs in {config['run_dir']}")


if __name__ == "__main__":
    main()
