"""DistributedDataParallel: the CLI's train command under torchrun with 2 CPU processes (gloo)
keeps the replicas identical and writes one checkpoint that loads."""
import json
import os
import subprocess
import sys

import torch

from csm_ext.train import load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_torchrun_two_cpu_processes_gloo(tmp_path):
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "csm_ext", "train", "--data", "toy:8gaussians", "--steps", "12", "--batch-size", "32",
           "--hidden", "16", "--context-dim", "4", "--head-hidden", "8", "--head-layers", "1",
           "--ema", "0.9", "--n-samples", "10", "--sample-steps", "2", "--log-every", "4",
           "--device", "cpu", "--out", str(out), "--no-progress"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 12
    assert summary["replica_max_abs_diff"] == 0.0
    model, ck = load_checkpoint(str(out / "last.pt"), use_ema=False)
    assert ck["step"] == 12 and all(torch.isfinite(p).all() for p in model.parameters())
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines if '"loss"' in line] == [4, 8, 12]
