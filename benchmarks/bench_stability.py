"""Training stability: CSM against denoising and sliced score matching on the same model.

Every method trains the same MADE-CSM (same initialisation, same batches) and is scored by the
exact CSM loss on held-out data, so all curves share one axis (lower is better; it equals the
Fisher divergence between the model's and the data's conditionals up to a data constant):

  csm        the CSM loss through the fused op
  dsm-<σ>    conditional denoising score matching at noise level σ (fits the σ-smoothed
             conditionals, so it is biased by σ; small σ means a high-variance target)
  ssm        sliced CSM: the trace term by a random projection through the whole network
             (unbiased but noisy; needs the double-backward head)

  python benchmarks/bench_stability.py                       # 2-D toy and MNIST 5k
  python benchmarks/bench_stability.py --data toy:8gaussians --steps 200   # quick
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from csm_ext import baselines, csm_loss
from csm_ext.data.sources import source_from_spec
from csm_ext.models import MADECSM


def make_model(dim, args):
    torch.manual_seed(args.seed)
    return MADECSM(dim, hidden_sizes=(args.hidden,), context_dim=args.context_dim,
                   head_hidden=args.head_hidden, head_layers=2, activation="softplus",
                   confine=0.01, backend="fused", seed=args.seed)


def objective(method, model, x, generator):
    if method == "csm":
        return model.loss(x)
    if method.startswith("dsm-"):
        return baselines.conditional_dsm_loss(model.head, model.context(x), x,
                                              float(method[4:]), generator=generator)
    if method == "ssm":
        return baselines.sliced_csm_loss(model.context, model.head, x, generator=generator)
    raise ValueError(f"unknown method {method!r}")


@torch.no_grad()
def heldout_csm(model, test):
    backend = model.backend
    model.backend = "fused"
    try:
        return csm_loss(model.head, model.context(test), test).item()
    finally:
        model.backend = backend


def train_curve(method, source, args):
    model = make_model(source.dim, args)
    if method == "ssm":
        model.backend = "autograd"  # its trace estimate differentiates the scores again
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    data_gen = torch.Generator().manual_seed(args.seed)   # same batches for every method
    noise_gen = torch.Generator().manual_seed(args.seed + 1)
    test = source.test[: args.n_eval]
    curve, t0 = [], time.perf_counter()
    for step in range(args.steps + 1):
        if step % args.eval_every == 0:
            curve.append({"step": step, "heldout_csm": heldout_csm(model, test),
                          "seconds": time.perf_counter() - t0})
        if step == args.steps:
            break
        x = source.batch(args.batch, generator=data_gen)
        opt.zero_grad(set_to_none=True)
        loss = objective(method, model, x, noise_gen)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
    return curve


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.2), squeeze=False)
    for ax, (data, curves) in zip(axes[0], results.items()):
        finals = [c[-1]["heldout_csm"] for c in curves.values() if math.isfinite(c[-1]["heldout_csm"])]
        for method, curve in curves.items():
            ax.plot([p["step"] for p in curve], [p["heldout_csm"] for p in curve],
                    lw=2.2 if method == "csm" else 1.3, label=method)
        if finals:  # keep the interesting range in view: diverging curves leave the plot
            lo, hi = min(finals), max(finals)
            ax.set_ylim(lo - 0.2 * (hi - lo + 1), hi + 1.5 * (hi - lo + 1))
        ax.set(title=data, xlabel="training step", ylabel="held-out CSM loss (lower is better)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default="toy:8gaussians,mnist5k")
    p.add_argument("--sigmas", default="0.01,0.05,0.1,0.3", help="DSM noise levels")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--clip", type=float, default=100.0, help="gradient-norm clip")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--context-dim", type=int, default=16)
    p.add_argument("--head-hidden", type=int, default=32)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--n-eval", type=int, default=500)
    p.add_argument("--image-sigma", type=float, default=0.1,
                   help="Gaussian smoothing noise of the image data (model space [-1, 1])")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/stability.json"))
    args = p.parse_args(argv)
    methods = ["csm"] + [f"dsm-{s}" for s in args.sigmas.split(",") if s] + ["ssm"]

    results = {}
    for spec in [s for s in args.data.split(",") if s]:
        kwargs = {} if spec.startswith("toy") else {"sigma": args.image_sigma}
        source = source_from_spec(spec, **kwargs)
        results[spec] = {}
        for method in methods:
            t0 = time.perf_counter()
            curve = train_curve(method, source, args)
            results[spec][method] = curve
            print(f"{spec:>16} {method:>9}: held-out CSM {curve[0]['heldout_csm']:10.2f} → "
                  f"{curve[-1]['heldout_csm']:10.2f}  ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                    "curves": results}, indent=1))
    png = args.out.with_suffix(".png")
    plot(results, png)
    print(f"# wrote {args.out} and {png}")
    return results


if __name__ == "__main__":
    main()
