"""Same seed, same machine, same thread count → the same run, bit for bit: losses, weights and
samples (the initial weights are seeded before the model is built; the sample figures draw
from a generator seeded with the run's seed, not from the global RNG)."""
import json

import numpy as np
import torch

from csm_ext.cli import main
from csm_ext.train import load_checkpoint

TINY = ["--data", "toy:8gaussians", "--steps", "8", "--batch-size", "32", "--hidden", "16",
        "--context-dim", "4", "--head-hidden", "8", "--head-layers", "1", "--ema", "0.9",
        "--n-samples", "16", "--sample-steps", "3", "--log-every", "2", "--no-progress"]


def _train(out, *extra):
    assert main(["train", *TINY, "--out", str(out), *extra]) == 0
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if "loss" in r]


def _state(path, use_ema):
    model, _ = load_checkpoint(str(path), use_ema=use_ema)
    return model.state_dict()


def _sample_npz(ckpt, out):
    assert main(["sample", "--ckpt", str(ckpt), "--out", str(out), "--no-progress"]) == 0
    return np.load(out)["samples"]


def test_same_seed_same_run_bitwise(tmp_path):
    torch.manual_seed(1)  # the global RNG's state must not matter...
    losses_a = _train(tmp_path / "a", "--seed", "3")
    torch.rand(12345)  # ...however much of it was drawn in between
    losses_b = _train(tmp_path / "b", "--seed", "3")
    assert losses_a == losses_b and len(losses_a) == 4  # exact float equality
    for use_ema in (False, True):
        sa, sb = _state(tmp_path / "a" / "last.pt", use_ema), _state(tmp_path / "b" / "last.pt", use_ema)
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k
    # the final figures are the same picture, and so are fresh draws from the checkpoints
    assert (tmp_path / "a" / "samples.png").read_bytes() == (tmp_path / "b" / "samples.png").read_bytes()
    xa = _sample_npz(tmp_path / "a" / "last.pt", tmp_path / "a.npz")
    xb = _sample_npz(tmp_path / "b" / "last.pt", tmp_path / "b.npz")
    assert xa.shape == (16, 2) and np.array_equal(xa, xb)

    # not vacuous: another seed gives another run
    assert _train(tmp_path / "c", "--seed", "4") != losses_a


def test_sample_redraws_the_runs_figure(tmp_path):
    """`csm-ext sample --ckpt last.pt` with no sampling flags uses the run's settings and seed,
    so it draws exactly the run's samples.png (the run must not sample from the global RNG)."""
    _train(tmp_path / "run", "--seed", "5", "--temperature", "0.8")
    redraw = tmp_path / "redraw.png"
    assert main(["sample", "--ckpt", str(tmp_path / "run" / "last.pt"), "--out", str(redraw),
                 "--no-progress"]) == 0
    assert redraw.read_bytes() == (tmp_path / "run" / "samples.png").read_bytes()
    other = tmp_path / "other.png"  # an explicit seed changes the draw
    assert main(["sample", "--ckpt", str(tmp_path / "run" / "last.pt"), "--out", str(other),
                 "--seed", "6", "--no-progress"]) == 0
    assert other.read_bytes() != redraw.read_bytes()


def test_run_figure_does_not_depend_on_the_global_rng(tmp_path):
    """Training that draws from the global RNG (as dropout does) must not change the figure's
    noise: the figure equals a redraw from the checkpoint with the run's seed. (A run of the
    Python API with partial sample_kwargs: the redraw fills the rest with model.sample's
    defaults, as the run did.)"""
    from csm_ext.data.sources import ToySource
    from csm_ext.models import MADECSM
    from csm_ext.train import TrainConfig, train

    src = ToySource("8gaussians", n_test=100)
    batch = src.batch
    src.batch = lambda n, generator=None: (torch.rand(7), batch(n, generator))[1]
    torch.manual_seed(0)
    model = MADECSM(2, hidden_sizes=(16,), context_dim=4, head_hidden=8, head_layers=1)
    out = tmp_path / "api"
    train(model, src, TrainConfig(steps=6, batch_size=16, ema=0.5, n_samples=12, seed=9,
                                  sample_kwargs=dict(steps=3), out_dir=str(out), progress=False))
    redraw = tmp_path / "redraw.png"
    assert main(["sample", "--ckpt", str(out / "last.pt"), "--out", str(redraw),
                 "--no-progress"]) == 0
    assert redraw.read_bytes() == (out / "samples.png").read_bytes()
