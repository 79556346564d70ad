"""Anomaly (out-of-distribution) detection with MADE-CSM on MNIST 5k: AUROC of three scores.

    python benchmarks/bench_anomaly.py             # the bench_denoise checkpoints, JSON
    python benchmarks/bench_anomaly.py --quick     # a smoke run (tiny model, a few images)
    python benchmarks/bench_anomaly.py --ckpt runs/demo/last.pt --ood ~/data/fashion-mnist

In-distribution: held-out MNIST 5k images in the model's space, smoothed with the model's own
σ (as it was trained). Out-of-distribution sets, made offline and passed through the same
preprocessing (dequantisation, affine map to [-1, 1], smoothing noise σ truncated at ±4σ, so
every image lies in the model's support): uniform noise, Gaussian noise, pixel-permuted MNIST,
inverted MNIST, constant images, scikit-learn's 8×8 digits resized to 28×28, and any
MNIST-format IDX or CIFAR-10 folder given with ``--ood DIR``.

Scores (higher = more anomalous): ``nll`` = −log q(x) (exact, by quadrature), ``csm`` = the
per-sample CSM loss, ``score_norm`` = ‖s(x)‖₂ of the per-dimension scores. AUROC per score and
per OOD set (scikit-learn), per model. MLE baselines do not exist in this project yet ("not
available" in the JSON). The timing (seconds per image of each score) follows a check that the
scores equal the model's own ``log_prob``, ``loss`` and ``score`` on a few images.

Models: ``--ckpt`` (repeatable); by default the checkpoints ``bench_denoise.py`` writes
(``runs/bench_denoise/sigma0.3/last.pt`` and ``sigma0.6``), trained here with its recipe when
missing.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from csm_ext import applications as app
from csm_ext.bench.timing import machine_info, time_it
from csm_ext.data.sources import make_source
from csm_ext.train import load_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_denoise  # noqa: E402  (the training recipe and the checkpoints it writes)

FAILURE_NOTE = ("likelihood (nll) ranks these sets as more likely than the model's own held-out "
                "data (AUROC < 0.5): the known failure mode of likelihood scores on simple or "
                "smooth images")


def verify_and_time(model, source, args):
    """anomaly_scores against the model's own methods on a few images, then seconds per image."""
    x = source.test[: args.n_time]
    s = app.anomaly_scores(model, x)
    with torch.no_grad():
        ref = {"nll": -model.log_prob(x).double(),
               "csm": model.loss(x, reduction="none", objective="csm").double(),
               "score_norm": model.score(x).double().norm(dim=1)}
    out = {}
    for k, v in s.items():
        err = float((v - ref[k]).abs().max() / (1 + ref[k].abs().max()))
        if err > 1e-5:
            raise RuntimeError(f"anomaly score {k}: differs from the model's own by {err:.3g}")
        t, iqr = time_it(lambda: app.anomaly_scores(model, x, scores=[k]), "cpu", args.repeats, 1)
        out[k] = dict(rel_err_vs_model=err, batch=int(x.shape[0]), seconds=t, iqr=iqr,
                      per_image=t / x.shape[0])
    return out


def constant_breakdown(raw, pixels, levels, bins=4):
    """AUROC of each score for the constant images split by their grey level (``bins`` equal
    ranges, dark first) against the held-out data: where a likelihood failure hides."""
    level = pixels.reshape(pixels.shape[0], -1)[:, 0].long()
    edges = [round(levels * i / bins) for i in range(bins + 1)]
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (level >= lo) & (level < hi)
        if not sel.any():
            continue
        row = dict(grey_levels=f"{lo}-{hi - 1}", n=int(sel.sum()))
        for k, v in raw["constant"].items():
            row[k] = app.auroc(raw["in-distribution"][k], v[sel])
            row[f"{k}_mean"] = float(v[sel].mean())
        out.append(row)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", action="append", default=None,
                   help="checkpoint of an MNIST model (repeatable; default: bench_denoise's)")
    p.add_argument("--sigmas", default="0.3,0.6",
                   help="without --ckpt: the bench_denoise noise levels to use (trained if missing)")
    p.add_argument("--steps", type=int, default=500,
                   help="training steps of a missing bench_denoise checkpoint")
    p.add_argument("--n", type=int, default=500, help="images per set (held-out: at most 500)")
    p.add_argument("--sets", default=",".join(app.OOD_SETS), help="built-in OOD sets")
    p.add_argument("--ood", action="append", default=[], metavar="DIR",
                   help="extra OOD folder (MNIST-format IDX or CIFAR-10 batches), repeatable")
    p.add_argument("--nodes", type=int, default=None, help="quadrature nodes of the nll")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--n-time", type=int, default=16, help="images per timed call")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny model and sizes: a smoke run")
    p.add_argument("--runs", default=None, help="bench_denoise's checkpoint folder")
    p.add_argument("--out", default=None, help="JSON (default: benchmarks/results/anomaly_cpu.json)")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.n_time, args.repeats, args.steps = 8, 2, 1, 3
    args.runs = args.runs or ("runs/bench_denoise_quick" if args.quick else "runs/bench_denoise")
    args.out = args.out or (os.path.join(args.runs, "anomaly.json") if args.quick
                            else "benchmarks/results/anomaly_cpu.json")
    sets = [s for s in args.sets.split(",") if s]
    t_start = time.perf_counter()
    res = dict(machine=machine_info("cpu"), args=vars(args),
               scores_note="higher = more anomalous; AUROC of held-out MNIST (negatives) against "
                           "each OOD set (positives): 1 perfect, 0.5 chance, < 0.5 inverted",
               mle_baselines=bench_denoise.MLE_BASELINES, models=[])
    targets = []
    if args.ckpt:
        for path in args.ckpt:
            model, ck = load_checkpoint(path)
            targets.append((model.eval(), make_source(ck["data_config"]), path, None))
    else:
        dn = argparse.Namespace(steps=args.steps, batch_size=64, lr=3e-3, warmup=50, ema=0.99,
                                time_limit=0.0, seed=args.seed, retrain=False, quick=args.quick,
                                runs=args.runs, n_bpd=2 if args.quick else 50)
        if args.quick:
            dn.warmup = 1
        for sigma in (float(s) for s in args.sigmas.split(",") if s):
            model, source, path, info = bench_denoise.train_or_load(
                sigma, dn, lambda s: print(s, file=sys.stderr))
            targets.append((model, source, path, info))
    for model, source, path, info in targets:
        if model.support is None:
            model.support = source.support
        print(f"# {path} (sigma {source.sigma:g})", file=sys.stderr)
        timing = verify_and_time(model, source, args)
        ev = app.evaluate_anomaly(model, source, n=args.n, seed=args.seed, dirs=args.ood,
                                  sets=sets, batch_size=args.batch_size, nodes=args.nodes,
                                  keep_scores=True)
        raw, pix = ev.pop("raw"), ev.pop("pixels")
        if "constant" in raw:
            ev["constant_by_grey_level"] = constant_breakdown(raw, pix["constant"],
                                                              source.pre.levels)
        row = dict(model="MADE-CSM", ckpt=path, sigma=source.sigma, train=info, timing=timing,
                   **ev)
        if ev["likelihood_failures"]:
            row["likelihood_failure_note"] = FAILURE_NOTE
        res["models"].append(row)
        scores = ev["scores"]
        print(f"  {'set':14s}" + "".join(f"{s:>12s}" for s in scores), file=sys.stderr)
        for name, r in list(ev["table"].items()) + [("mean", ev["mean"])]:
            print(f"  {name:14s}" + "".join(f"{r[s]:12.3f}" for s in scores), file=sys.stderr)
        if ev["likelihood_failures"]:
            print(f"  {', '.join(ev['likelihood_failures'])}: {FAILURE_NOTE}", file=sys.stderr)
        for r in ev.get("constant_by_grey_level", []):
            print(f"  constant, grey levels {r['grey_levels']:>7s} ({r['n']:3d} images)"
                  + "".join(f"{r[s]:12.3f}" for s in scores), file=sys.stderr)
        dark = [r for r in ev.get("constant_by_grey_level", [])[:1] if r.get("nll", 1) < 0.5]
        if dark:
            row["likelihood_failure_note"] = (
                f"dark constant images (grey levels {dark[0]['grey_levels']}): nll AUROC "
                f"{dark[0]['nll']:.3f} < 0.5, the model finds them more likely than its own "
                f"held-out digits: the known failure mode of likelihood scores on simple images")
            print(f"  {row['likelihood_failure_note']}", file=sys.stderr)
    res["total_seconds"] = time.perf_counter() - t_start
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {args.out} ({res['total_seconds']:.0f} s)", file=sys.stderr)
    return res


if __name__ == "__main__":
    main()
