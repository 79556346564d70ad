"""Single-step Tweedie denoising with MADE-CSM on MNIST 5k: PSNR of the joint and per-dimension
score against the noisy input and a tuned Gaussian blur.

    python benchmarks/bench_denoise.py            # train (or reuse) sigma 0.3 and 0.6, JSON + PNG
    python benchmarks/bench_denoise.py --quick    # a smoke run (tiny model, a few steps)

For each noise level σ a MADE-CSM (the demo architecture) is trained on MNIST 5k smoothed with
that σ, i.e. on ``y = x + σε`` — the density Tweedie's formula needs — and checkpointed under
``runs/bench_denoise/sigma<σ>/last.pt`` (reused when its settings match, unless ``--retrain``).
Held-out images get fresh noise of the same process (dequantised, affine to [-1, 1], noise
truncated at ±4σ, so inside the model's support), and are denoised by

* ``joint``:   x̂ = y + σ²∇_y log q(y), the exact joint score of the normalised model;
* ``per-dim``: x̂_d = y_d + σ² s_d(y), the per-dimension conditional scores;
* ``blur``:    a Gaussian blur (torch conv2d), its width tuned on the training split;

PSNR in dB on the [-1, 1] scale (peak-to-peak 2), mean over images. MLE baselines (MADE
Gaussian, PixelCNN++ trained by maximum likelihood) do not exist in this project yet: the JSON
says "not available". Timing (seconds per image of each denoiser) follows a verification that
the fused path agrees with the pure-PyTorch reference head.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

from csm_ext import applications as app
from csm_ext.bench.timing import machine_info, time_it
from csm_ext.data import ImageSource
from csm_ext.models import MADECSM
from csm_ext.train import TrainConfig, load_checkpoint, train

MLE_BASELINES = ("not available: the project has no maximum-likelihood baselines yet (MADE with "
                 "Gaussian/mixture conditionals, PixelCNN++ trained by MLE); nothing was run in "
                 "their place")
# The demo architecture (csm_ext.cli.DEMO); --quick shrinks it.
ARCH = dict(hidden_sizes=(512,), context_dim=16, head_hidden=64, head_layers=2)
ARCH_QUICK = dict(hidden_sizes=(32,), context_dim=4, head_hidden=8, head_layers=1)


class _HeldOutSubset:
    """The source as ``train`` sees it, with a smaller held-out set for its end-of-run
    evaluation (the exact likelihood of all 500 held-out images with its quadrature check costs
    about a minute per model on 2 cores; this benchmark's evaluation is its own)."""

    def __init__(self, source, n):
        self._source, self.test = source, source.test[:n]

    def __getattr__(self, name):
        return getattr(self._source, name)


def gaussian_blur(images, s):
    """Separable Gaussian blur of images (n, C, H, W), std ``s`` pixels (0: unchanged),
    radius ⌈3s⌉, reflected borders."""
    if s <= 0:
        return images.clone()
    r = max(1, math.ceil(3 * s))
    t = torch.arange(-r, r + 1, dtype=images.dtype)
    k = torch.exp(-0.5 * (t / s) ** 2)
    k = k / k.sum()
    C = images.shape[1]
    x = F.pad(images, (r, r, r, r), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(C, 1, 1, -1), groups=C)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(C, 1, -1, 1), groups=C)


def tune_blur(source, sigma, grid, n, seed):
    """The blur width with the best mean PSNR on ``n`` noisy *training* images → (best, table)."""
    g = torch.Generator().manual_seed(seed + 101)
    pix = source.train.images[torch.randperm(len(source.train), generator=g)[:n]]
    x, y = app.noisy_pairs(source, pix, sigma, g)
    shape = (-1, *source.shape)
    table = {}
    for s in grid:
        xb = gaussian_blur(y.view(shape), s).flatten(1)
        table[s] = float(app.psnr(xb, x).mean())
    best = max(table, key=table.get)
    return best, table


def train_or_load(sigma, args, log=print):
    """The MADE-CSM of MNIST 5k smoothed at ``sigma``: ``runs/.../sigma<σ>/last.pt`` when it
    exists with the requested settings (and not ``--retrain``), else trained now."""
    arch = ARCH_QUICK if args.quick else ARCH
    run = os.path.join(args.runs, f"sigma{sigma:g}")
    ckpt_path = os.path.join(run, "last.pt")
    source = ImageSource("mnist5k", sigma=sigma)
    want = dict(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
                ema=args.ema, seed=args.seed)
    if os.path.isfile(ckpt_path) and not args.retrain:
        model, ck = load_checkpoint(ckpt_path)
        tc = ck.get("train_config") or {}
        same = (all(tc.get(k) == v for k, v in want.items())
                and ck["data_config"].get("sigma") == sigma
                and all(model.config.get(k) == (list(v) if isinstance(v, tuple) else v)
                        for k, v in arch.items()))
        if same:
            info = dict((ck.get("extra") or {}).get("bench", {}), reused=True)
            log(f"  sigma {sigma:g}: reusing {ckpt_path} (step {ck['step']})")
            return model.eval(), source, ckpt_path, info
        log(f"  sigma {sigma:g}: {ckpt_path} has other settings; retraining")
    torch.manual_seed(args.seed)
    model = MADECSM(source.dim, support=source.support, seed=args.seed, **arch)
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
                      grad_clip=1.0, ema=args.ema, log_every=max(1, min(50, args.steps)),
                      n_samples=0, time_limit=args.time_limit, seed=args.seed, out_dir=run,
                      progress=False)
    t0 = time.perf_counter()
    summary = train(model, _HeldOutSubset(source, args.n_bpd), cfg)
    info = dict(reused=False, steps=summary["steps"], train_time=summary["train_time"],
                wall_time=time.perf_counter() - t0, stopped_early=summary["stopped_early"],
                final_train_loss=summary["final_train_loss"], test_loss=summary["test_loss"],
                heldout_bits_per_dim=summary.get("test_likelihood", {}).get("bits_per_dim"),
                heldout_bpd_images=args.n_bpd)
    # Keep the bookkeeping with the checkpoint, so a reused run reports it too.
    ck = torch.load(ckpt_path, weights_only=True)
    ck.setdefault("extra", {})["bench"] = info
    torch.save(ck, ckpt_path)
    log(f"  sigma {sigma:g}: trained {info['steps']} steps in {info['train_time']:.0f} s, "
        f"held-out {info['heldout_bits_per_dim']:.3f} bits/dim ({args.n_bpd} images) -> "
        f"{ckpt_path}")
    model, _ = load_checkpoint(ckpt_path)  # the EMA weights, as every later user sees them
    return model.eval(), source, ckpt_path, info


def verify_and_time(model, source, sigma, args):
    """The fused denoisers against the reference head on a few images, then seconds per image."""
    g = torch.Generator().manual_seed(args.seed + 7)
    pix = app.heldout_images(source).images[: args.n_time]
    _, y = app.noisy_pairs(source, pix, sigma, g)
    out = {}
    for m in app.DENOISERS:
        fused = app.denoise(model, y[:4], sigma, m)
        model.backend = "autograd"
        try:
            ref = app.denoise(model, y[:4], sigma, m)
        finally:
            model.backend = "fused"
        err = float((fused - ref).abs().max())
        if not (torch.isfinite(fused).all() and err < 1e-3):
            raise RuntimeError(f"denoise {m}: fused and reference disagree by {err:.3g}")
        t, iqr = time_it(lambda: app.denoise(model, y, sigma, m, args.batch_eval), "cpu",
                         args.repeats, 1)
        out[m] = dict(max_abs_vs_reference=err, batch=int(y.shape[0]), seconds=t, iqr=iqr,
                      per_image=t / y.shape[0])
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sigmas", default="0.3,0.6", help="noise levels (model scale), comma-separated")
    p.add_argument("--steps", type=int, default=500, help="training steps per model")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--ema", type=float, default=0.99)
    p.add_argument("--time-limit", type=float, default=0.0, help="stop training after this many s")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--retrain", action="store_true", help="train even when a matching run exists")
    p.add_argument("--n-eval", type=int, default=200, help="held-out images denoised")
    p.add_argument("--n-tune", type=int, default=300, help="training images for the blur width")
    p.add_argument("--blur-grid", default="0,0.5,0.75,1,1.25,1.5,2,2.5",
                   help="blur widths (pixels) tried on the training split")
    p.add_argument("--n-bpd", type=int, default=50, help="held-out images for the bits/dim")
    p.add_argument("--n-fig", type=int, default=8, help="digits in the figure")
    p.add_argument("--n-time", type=int, default=16, help="images per timed call")
    p.add_argument("--batch-eval", type=int, default=50, help="images per denoising chunk")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="tiny model and sizes: a smoke run")
    p.add_argument("--runs", default=None, help="checkpoint folder (default: runs/bench_denoise)")
    p.add_argument("--out", default=None,
                   help="JSON (default: benchmarks/results/denoise_cpu.json)")
    p.add_argument("--fig", default=None, help="figure (default: beside the JSON, denoise.png)")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.n_eval, args.n_tune, args.n_bpd = 3, 1, 6, 8, 2
        args.n_fig, args.n_time, args.repeats, args.batch_eval = 4, 2, 1, 4
        args.blur_grid = "0,1"
    base = "runs/bench_denoise_quick" if args.quick else "runs/bench_denoise"
    args.runs = args.runs or base
    args.out = args.out or (os.path.join(base, "denoise.json") if args.quick
                            else "benchmarks/results/denoise_cpu.json")
    args.fig = args.fig or os.path.join(os.path.dirname(args.out) or ".", "denoise.png")
    sigmas = [float(s) for s in args.sigmas.split(",") if s]
    grid = [float(s) for s in args.blur_grid.split(",") if s]
    t_start = time.perf_counter()
    res = dict(machine=machine_info("cpu"), args=vars(args),
               data="MNIST 5k (4,500 training / 500 held-out images), dequantised, affine to "
                    "[-1, 1], Gaussian noise sigma truncated at +-4 sigma",
               model=dict(ARCH_QUICK if args.quick else ARCH, name="MADE-CSM"),
               psnr_note="dB on the [-1, 1] model scale (peak-to-peak 2), mean over images; "
                         "'clipped': the output clipped to [-1, 1] first",
               mle_baselines=MLE_BASELINES, results=[])
    fig_rows, fig_pix = [], None
    for sigma in sigmas:
        print(f"# sigma {sigma:g}", file=sys.stderr)
        model, source, ckpt_path, info = train_or_load(sigma, args,
                                                       lambda s: print(s, file=sys.stderr))
        pix = app.heldout_images(source).images[: args.n_eval]
        ev = app.evaluate_denoising(model, source, sigma, n=args.n_eval, seed=args.seed,
                                    batch_size=args.batch_eval, pixels=pix)
        best, table = tune_blur(source, sigma, grid, args.n_tune, args.seed)
        xb = gaussian_blur(ev["noisy"].view(-1, *source.shape), best).flatten(1)
        ev["outputs"]["blur"] = xb
        ev["psnr"]["blur"] = float(app.psnr(xb, ev["clean"]).mean())
        ev["psnr_clipped"]["blur"] = float(app.psnr(xb.clamp(-1, 1), ev["clean"]).mean())
        ev["mse"]["blur"] = float((xb - ev["clean"]).double().pow(2).mean())
        timing = verify_and_time(model, source, sigma, args)
        order = ("noisy", "blur", "per-dim", "joint")
        row = dict(sigma=sigma, ckpt=ckpt_path, train=info, n_eval=ev["n"],
                   psnr={k: ev["psnr"][k] for k in order},
                   psnr_clipped={k: ev["psnr_clipped"][k] for k in order},
                   mse={k: ev["mse"][k] for k in order},
                   blur=dict(best_sigma_pixels=best, tuned_on=f"{args.n_tune} training images",
                             train_psnr={f"{k:g}": v for k, v in table.items()}),
                   eval_seconds=ev["seconds"], timing=timing)
        res["results"].append(row)
        print("  PSNR (dB): " + ", ".join(f"{k} {row['psnr'][k]:.2f}" for k in order)
              + f"  (blur width {best:g} px)", file=sys.stderr)
        k = args.n_fig
        if fig_pix is None:
            fig_pix = ev["clean"][:k]
            fig_rows.append(("clean", source.to_display(fig_pix)))
        for name in order:
            y = ev["noisy"] if name == "noisy" else ev["outputs"][name]
            fig_rows.append((f"σ={sigma:g} {name}\n{row['psnr'][name]:.1f} dB",
                             source.to_display(y[:k])))
    res["total_seconds"] = time.perf_counter() - t_start
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    os.makedirs(os.path.dirname(args.fig) or ".", exist_ok=True)
    app.save_rows_figure(fig_rows, args.fig,
                         title="MADE-CSM, MNIST 5k held-out: single-step denoising (PSNR: mean "
                               f"over {res['results'][0]['n_eval']} images)")
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {args.out} and {args.fig} ({res['total_seconds']:.0f} s)", file=sys.stderr)
    return res


if __name__ == "__main__":
    main()
