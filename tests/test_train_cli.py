"""Training loop (outputs, checkpoints, exact resume, EMA) and the csm-ext CLI end to end."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from csm_ext.cli import main
from csm_ext.data.sources import ImageSource, ToySource, make_source, source_from_spec
from csm_ext.models import MADECSM
from csm_ext.train import TrainConfig, load_checkpoint, lr_factor, train


def _tiny_model(dim=2):
    return MADECSM(dim, hidden_sizes=(16,), context_dim=4, head_hidden=8, head_layers=1)


def test_train_writes_outputs_and_checkpoint_round_trips(tmp_path):
    src = ToySource("8gaussians", n_test=200)
    model = _tiny_model()
    cfg = TrainConfig(steps=12, batch_size=32, lr=3e-3, log_every=4, eval_every=6, ema=0.9,
                      n_samples=50, sample_kwargs=dict(steps=3), out_dir=str(tmp_path), progress=False)
    summary = train(model, src, cfg)
    assert summary["steps"] == 12 and np.isfinite(summary["test_loss"]) and not summary["stopped_early"]
    for f in ("metrics.jsonl", "last.pt", "loss.png", "samples.png"):
        assert (tmp_path / f).stat().st_size > 0, f
    recs = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in recs if "loss" in r] == [4, 8, 12]
    assert any("test_loss" in r for r in recs) and "summary" in recs[-1]
    m2, ck = load_checkpoint(str(tmp_path / "last.pt"), use_ema=False)
    for a, b in zip(m2.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
    m3, _ = load_checkpoint(str(tmp_path / "last.pt"))  # EMA weights differ from the raw ones
    assert not torch.equal(m3.head.w, model.head.w)
    assert ck["step"] == 12 and ck["train_config"]["ema"] == 0.9
    assert make_source(ck["data_config"]).config() == src.config()


def test_resume_is_exact(tmp_path):
    src = ToySource("rings", n_test=100)

    def cfg(out, **kw):
        return TrainConfig(steps=20, batch_size=16, lr=3e-3, warmup=3, log_every=5, n_samples=0,
                           out_dir=str(out), progress=False, **kw)

    torch.manual_seed(0)
    a = _tiny_model()
    b = MADECSM.from_config(a.config)
    b.load_state_dict(a.state_dict())
    train(a, src, cfg(tmp_path / "straight", ckpt_every=10, ema=0.5))
    assert (tmp_path / "straight" / "step_10.pt").exists()
    train(b, src, cfg(tmp_path / "resumed", ema=0.5), resume=str(tmp_path / "straight" / "step_10.pt"))
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.allclose(x, y, rtol=0, atol=1e-6)
    ea, _ = load_checkpoint(str(tmp_path / "straight" / "last.pt"))
    eb, _ = load_checkpoint(str(tmp_path / "resumed" / "last.pt"))
    assert torch.allclose(ea.head.w, eb.head.w, atol=1e-6)
    steps = [json.loads(line)["step"] for line in open(tmp_path / "resumed" / "metrics.jsonl")]
    assert steps[0] == 15  # the resumed run continues the count


def test_lr_schedule_and_config_validation():
    c = TrainConfig(steps=100, lr=1.0, warmup=10, min_lr_ratio=0.1)
    assert lr_factor(0, c) == pytest.approx(0.1) and lr_factor(9, c) == pytest.approx(1.0)
    assert lr_factor(10, c) == pytest.approx(1.0) and lr_factor(100, c) == pytest.approx(0.1)
    assert lr_factor(55, c) == pytest.approx(0.55)
    assert lr_factor(50, TrainConfig(lr_schedule="constant")) == 1.0
    for kw, arg in [(dict(steps=0), "steps"), (dict(lr=0), "lr"), (dict(ema=1.0), "ema"),
                    (dict(lr_schedule="step"), "lr_schedule"), (dict(grad_clip=-1), "grad_clip")]:
        with pytest.raises(ValueError, match=arg):
            TrainConfig(**kw)


def test_nonfinite_loss_is_reported(tmp_path):
    src = ToySource("8gaussians", n_test=10)
    model = _tiny_model()
    with torch.no_grad():
        model.head.u.fill_(float("nan"))
    with pytest.raises(RuntimeError, match="non-finite loss"):
        train(model, src, TrainConfig(steps=2, out_dir=str(tmp_path), progress=False, n_samples=0))


def test_sources():
    s = source_from_spec("digits", sigma=0.05, limit=100)
    assert isinstance(s, ImageSource) and s.dim == 64 and len(s.train) == 100
    x = s.batch(8, torch.Generator().manual_seed(0))
    assert x.shape == (8, 64) and s.test.shape == (180, 64)
    assert s.to_display(x).shape == (8, 1, 8, 8) and s.clip == (-1.0, 1.0) and s.sigma == 0.05
    assert make_source(s.config()).config() == s.config()
    assert source_from_spec("toy:funnel").dim == 2 and source_from_spec("rings").dim == 2
    assert source_from_spec("gaussian:4").dim == 4
    with pytest.raises(ValueError, match="unknown data spec"):
        source_from_spec("imagenet")


def test_cli_train_sample_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "toy"
    rc = main(["train", "--data", "toy:8gaussians", "--steps", "10", "--batch-size", "32",
               "--hidden", "16", "--context-dim", "4", "--head-hidden", "8", "--head-layers", "1",
               "--n-samples", "20", "--sample-steps", "3", "--out", str(out), "--no-progress",
               "--backend", "autograd", "--log-every", "5"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 10 and (out / "samples.png").exists()
    rc = main(["sample", "--ckpt", str(out / "last.pt"), "--n", "7", "--sample-steps", "2",
               "--out", str(tmp_path / "s.npz"), "--no-progress"])
    assert rc == 0
    z = np.load(tmp_path / "s.npz")
    assert z["samples"].shape == (7, 2) and np.isfinite(z["samples"]).all()
    assert "7 samples" in capsys.readouterr().out

    demo = tmp_path / "demo"
    rc = main(["demo", "--data", "digits", "--limit", "64", "--steps", "6", "--batch-size", "16",
               "--hidden", "32", "--context-dim", "4", "--head-hidden", "8", "--n-samples", "4",
               "--sample-steps", "2", "--out", str(demo), "--no-progress"])
    assert rc == 0
    for f in ("samples.png", "loss.png", "report.md", "last.pt", "metrics.jsonl"):
        assert (demo / f).exists(), f
    report = (demo / "report.md").read_text()
    assert "σ=0.5" in report and "samples.png" in report and "temperature 0.7" in report
    rc = main(["sample", "--ckpt", str(demo / "last.pt"), "--n", "4", "--sample-steps", "2",
               "--out", str(tmp_path / "d.png"), "--no-progress"])
    assert rc == 0 and (tmp_path / "d.png").stat().st_size > 0


def test_cli_errors(tmp_path, capsys):
    assert main(["sample", "--ckpt", str(tmp_path / "nope.pt")]) == 2
    assert "nope.pt" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    assert main(["sample", "--ckpt", str(bad)]) == 2
    assert "bad.pt" in capsys.readouterr().err
    assert main(["train", "--data", "cifar10:" + str(tmp_path / "nodir"), "--steps", "1"]) == 2
    assert "nodir" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["frobnicate"])


def test_python_m_entry_point():
    r = subprocess.run([sys.executable, "-m", "csm_ext", "--help"], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=120)
    assert r.returncode == 0 and "demo" in r.stdout and "sample" in r.stdout
