"""Fidelity suite: the energy objectives (CSM, quadrature MLE, hybrid) against maximum-likelihood
baselines with normalised mixture conditionals, on the same context networks.

    csm-ext bench fidelity                               # toys + MNIST 5k, JSON, PNGs, markdown
    python benchmarks/bench_fidelity.py --quick          # the same script, tiny sizes (smoke run)
    csm-ext bench fidelity --sections toys               # one section
    csm-ext bench fidelity --data mnist:DIR              # any IDX folder (e.g. full MNIST)

Sections:

* ``toys``: every 2-D toy of :mod:`csm_ext.data.toys`; for each of MADE-CSM trained by CSM, by
  quadrature MLE and by the hybrid, MADE-Gaussian and MADE-MoG (the same MADE, same steps,
  batches and learning rate): KL(truth‖model) = E_truth[log p − log q] in nats on fresh truth
  samples (with its standard error), the training time, and one figure per toy with the
  truth's density and every model's side by side. Every model's density is a proper density
  on the same support box; truth samples outside it (the funnel's tails) are reported, and the
  KL is then that of the truth restricted to the box (the unrestricted KL is +inf for every
  model alike), and every model trains on truth samples restricted to the box.
* ``mnist``: held-out bits/dim of the smoothed data in model space ([−1, 1], Gaussian noise σ
  truncated at ±4σ, support widened by 4σ) for the same five MADE models and PixelCNN++ with
  CSM against PixelCNN++ with a logistic mixture, at each σ, the same split and the same
  wall-clock budget per model (warmup and cosine decay on the wall clock, so every schedule
  completes in the budget whatever the step cost; ``--steps N``: N steps each instead); steps/s; one figure of samples per σ (the
  exact grid sampler for the energy models, ancestral for the mixtures; all end with the same
  per-dimension Tweedie step and clip to the data range).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

from csm_ext.bench.timing import machine_info
from csm_ext.data import TOYS, ToySource, get_toy
from csm_ext.data.sources import source_from_spec
from csm_ext.models import MADECSM, MADEMixture, PixelCNNppCSM, PixelCNNppMixture
from csm_ext.train import lr_factor, TrainConfig

# The five rows on the MADE backbone: (name, builder kind, objective or mixture components).
MADE_ROWS = ("made-csm", "made-mle", "made-hybrid", "made-gaussian", "made-mog")
PCNN_ROWS = ("pixelcnnpp-csm", "pixelcnnpp-logistic")


# ---------------------------------------------------------------- KL


@torch.no_grad()
def kl_estimate(log_p, log_q, x, support=None, batch=5000):
    """Monte-Carlo KL(p‖q) = E_p[log p − log q] in nats from samples x (n, D) of p.

    ``log_p``, ``log_q``: callables (m, D) → (m,). With ``support=(lo, hi)`` samples outside
    the box are dropped and p is the truth restricted (renormalised) to it:
    log p_S = log p − log P(S), P(S) estimated by the fraction inside. Returns ``kl``,
    ``stderr`` (of the mean), ``n`` (samples used) and ``outside`` (fraction dropped)."""
    n0 = x.shape[0]
    if support is not None:
        lo, hi = support
        inside = ((x >= lo) & (x <= hi)).all(1)
        x = x[inside]
    outside = 1.0 - x.shape[0] / max(1, n0)
    diffs = []
    for i in range(0, x.shape[0], batch):
        xb = x[i:i + batch]
        diffs.append(log_p(xb).double() - log_q(xb).double())
    d = torch.cat(diffs) if diffs else torch.zeros(0, dtype=torch.float64)
    if outside > 0:
        d = d - math.log(1.0 - outside)
    n = d.numel()
    return dict(kl=float(d.mean()) if n else float("nan"),
                stderr=float(d.std() / math.sqrt(n)) if n > 1 else float("nan"),
                n=n, outside=outside)


# ---------------------------------------------------------------- models and training


def build_made(row, dim, support, a):
    """One of MADE_ROWS, every one on the MADE of the same hidden sizes and seed."""
    kind = row.split("-", 1)[1]
    if kind in ("csm", "mle", "hybrid"):
        return MADECSM(dim, hidden_sizes=a.hidden, context_dim=a.context_dim,
                       head_hidden=a.head_hidden, head_layers=2, support=support,
                       objective=kind, mle_weight=1.0)
    k = 1 if kind == "gaussian" else a.components
    return MADEMixture(dim, hidden_sizes=a.hidden, components=k, support=support)


def build_pcnn(row, shape, support, a):
    C, H, W = shape
    if row == "pixelcnnpp-csm":
        return PixelCNNppCSM(C, H, W, nr_resnet=a.nr_resnet, nr_filters=a.nr_filters,
                             context_dim=16, head_hidden=a.head_hidden, head_layers=2,
                             support=support, objective="csm")
    return PixelCNNppMixture(C, H, W, nr_resnet=a.nr_resnet, nr_filters=a.nr_filters,
                             components=a.pcnn_components, support=support)


def fit(model, batch, steps, lr, nodes, warmup=0, time_budget=None, seed=0):
    """Adam, grad-norm clip 1, on the model's own loss; ``batch(generator) -> x``.

    ``time_budget=None``: ``steps`` steps with linear warmup and cosine decay over them
    (csm_ext.train.lr_factor). ``time_budget=T`` seconds: the same schedule on the wall clock
    (warmup over the first 5 % of T, cosine to 0 at T), stopping at T, so every method gets the
    same time and a complete schedule whatever its step cost (``steps`` is then ignored).
    Returns steps done, seconds, steps/s and the last loss."""
    torch.manual_seed(seed)
    cfg = TrainConfig(steps=max(1, steps), lr=lr, warmup=warmup, progress=False)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed + 1)
    model.train()
    t0, done, last = time.perf_counter(), 0, float("nan")
    while True:
        if time_budget is None:
            if done >= steps:
                break
            factor = lr_factor(done, cfg)
        else:
            frac = (time.perf_counter() - t0) / time_budget
            if frac >= 1.0:
                break
            factor = (frac / 0.05 if frac < 0.05 else
                      0.5 * (1 + math.cos(math.pi * (frac - 0.05) / 0.95)))
            factor = max(factor, 1e-3)  # the first step is not a no-op
        for pg in opt.param_groups:
            pg["lr"] = lr * factor
        loss = model.loss(batch(g), nodes=nodes)
        if not torch.isfinite(loss):
            raise RuntimeError(f"{type(model).__name__}: non-finite loss at step {done}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        done, last = done + 1, float(loss.detach())
    dt = time.perf_counter() - t0
    model.eval()
    return dict(steps=done, seconds=dt, steps_per_s=done / dt if dt > 0 else float("nan"),
                final_loss=last)


# ---------------------------------------------------------------- toys


def _density_grid(lim, n):
    t = torch.linspace(lim[0], lim[1], n, dtype=torch.float64)
    X, Y = torch.meshgrid(t, t, indexing="xy")
    return torch.stack([X.reshape(-1), Y.reshape(-1)], 1)


@torch.no_grad()
def _log_density(fn, x, batch=5000):
    return torch.cat([fn(x[i:i + batch]).double() for i in range(0, x.shape[0], batch)])


def save_toy_figure(path, toy_name, panels, lim, res):
    """Densities (res × res each) side by side, one colour scale (the truth's)."""
    from csm_ext import plots  # noqa: F401  (sets the Agg backend)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 2.9), squeeze=False)
    vmax = float(panels[0][1].max())
    for ax, (name, dens) in zip(axes[0], panels):
        ax.imshow(dens.view(res, res).numpy(), origin="lower", extent=(*lim, *lim),
                  cmap="magma", vmin=0, vmax=vmax, interpolation="nearest")
        ax.set_title(name, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{toy_name}: density of the truth and of each model", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _batch_in_support(toy, n, support, generator):
    """n truth samples restricted to the support box (rejection; the funnel's tails leave it,
    and every model here, energy or mixture, is a density on the box)."""
    lo, hi = support
    parts, have = [], 0
    while have < n:
        x = toy.sample(n, generator=generator)
        x = x[((x >= lo) & (x <= hi)).all(1)]
        parts.append(x)
        have += x.shape[0]
    return torch.cat(parts)[:n]


def bench_toys(a):
    rows = []
    for name in a.toys:
        src = ToySource(name)
        toy = get_toy(name)
        x_eval = toy.sample(a.n_kl, generator=torch.Generator().manual_seed(7)).double()
        grid = _density_grid(src.clip, a.grid)
        g_in = ((grid >= src.support[0]) & (grid <= src.support[1])).all(1)
        panels = [("truth", _log_density(toy.log_prob, grid).exp())]
        for row in MADE_ROWS:
            torch.manual_seed(0)
            model = build_made(row, 2, src.support, a)
            fitted = fit(model, lambda g: _batch_in_support(toy, a.toy_batch, src.support, g),
                         a.toy_steps, a.toy_lr, a.train_nodes, warmup=a.toy_steps // 20)
            lq = lambda x, m=model: m.log_prob(x.float())  # noqa: E731
            kl = kl_estimate(toy.log_prob, lq, x_eval, support=src.support)
            dens = torch.zeros(grid.shape[0], dtype=torch.float64)
            dens[g_in] = _log_density(lq, grid[g_in]).exp()
            panels.append((f"{row}\nKL {kl['kl']:.3f}", dens))
            rec = dict(toy=name, model=row, kl=kl["kl"], kl_stderr=kl["stderr"], n_kl=kl["n"],
                       outside_support=kl["outside"], **fitted,
                       params=sum(p.numel() for p in model.parameters()))
            rows.append(rec)
            print(f"  {name:12s} {row:14s} KL {kl['kl']:.4f} ± {kl['stderr']:.4f} nats "
                  f"({fitted['steps']} steps, {fitted['seconds']:.0f} s)", file=sys.stderr)
        if a.figures:
            path = os.path.join(a.figures, f"fidelity_toy_{name}.png")
            save_toy_figure(path, name, panels, src.clip, a.grid)
            for r in rows[-len(MADE_ROWS):]:
                r["figure"] = path
    return rows


# ---------------------------------------------------------------- images


@torch.no_grad()
def held_out_likelihood(model, x, nodes, batch):
    """Mean nats/dim and bits/dim of x (n, D) under the model, with the quadrature's accuracy
    (energy models: G vs 2G−1 on the first batch; mixtures: exact)."""
    nll = 0.0
    for i in range(0, x.shape[0], batch):
        nll += float(-model.log_prob(x[i:i + batch], nodes).double().sum())
    err = model.quadrature_error(x[:batch], nodes)
    per_dim = nll / x.shape[0] / model.dim
    return dict(nll_per_dim=per_dim, bits_per_dim=per_dim / math.log(2.0),
                quadrature_max_per_sample=err["max_per_sample"], n_eval=x.shape[0])


def save_sample_figure(path, panels, title):
    """One figure: a grid of samples per model, side by side."""
    from csm_ext import plots  # noqa: F401
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(2.4 * len(panels), 2.7), squeeze=False)
    for ax, (name, imgs) in zip(axes[0], panels):
        n, c, h, w = imgs.shape
        k = int(math.ceil(math.sqrt(n)))
        canvas = torch.full((c, k * (h + 1) + 1, k * (w + 1) + 1), 0.5)
        for i in range(n):
            r, q = divmod(i, k)
            canvas[:, 1 + r * (h + 1):1 + r * (h + 1) + h, 1 + q * (w + 1):1 + q * (w + 1) + w] = imgs[i]
        arr = canvas.permute(1, 2, 0).numpy()
        ax.imshow(arr[..., 0] if c == 1 else arr, cmap="gray", vmin=0, vmax=1,
                  interpolation="nearest")
        ax.set_title(name, fontsize=7)
        ax.axis("off")
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def bench_images(a):
    rows = []
    for sigma in a.sigmas:
        src = source_from_spec(a.data, sigma=sigma, seed=0, limit=a.limit)
        x_test = src.test[:a.n_eval]
        wanted = list(MADE_ROWS) + (list(PCNN_ROWS) if sigma in a.pcnn_sigmas else [])
        panels = []
        for row in wanted:
            torch.manual_seed(0)
            is_pcnn = row.startswith("pixelcnnpp")
            model = (build_pcnn(row, src.shape, src.support, a) if is_pcnn
                     else build_made(row, src.dim, src.support, a))
            bs = a.pcnn_batch if is_pcnn else a.batch
            lr = a.pcnn_lr if is_pcnn else a.lr
            budget = a.pcnn_budget if is_pcnn else a.budget

            def batch(g, bs=bs):
                return src.batch(bs, g)

            steps = a.steps or 0
            fitted = fit(model, batch, steps, lr, a.train_nodes, warmup=min(50, steps // 10),
                         time_budget=budget if a.steps is None else None)
            t0 = time.perf_counter()
            lik = held_out_likelihood(model, x_test, None, a.eval_batch)
            eval_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            n_s = a.pcnn_samples if is_pcnn else a.n_samples
            xs = model.sample(n_s, clip=src.clip, denoise=src.sigma, progress=False,
                              generator=torch.Generator().manual_seed(0))
            sample_s = time.perf_counter() - t0
            sampler = "ancestral" if isinstance(model, (MADEMixture, PixelCNNppMixture)) else "grid"
            panels.append((f"{row}\n{lik['bits_per_dim']:.3f} bits/dim",
                           src.to_display(xs.reshape(n_s, -1))))
            rec = dict(data=a.data, sigma=sigma, model=row,
                       budget_s=budget if a.steps is None else None, batch=bs, lr=lr, **fitted, **lik,
                       eval_seconds=eval_s, sampler=sampler, sample_seconds=sample_s,
                       sample_seconds_per_image=sample_s / n_s,
                       params=sum(p.numel() for p in model.parameters()))
            rows.append(rec)
            print(f"  σ={sigma:<5g} {row:20s} {lik['bits_per_dim']:.4f} bits/dim  "
                  f"{fitted['steps']} steps in {fitted['seconds']:.0f} s "
                  f"({fitted['steps_per_s']:.2f}/s), eval {eval_s:.0f} s, "
                  f"sample {sample_s:.0f} s", file=sys.stderr)
        if a.figures:
            path = os.path.join(a.figures, f"fidelity_mnist_sigma{sigma:g}.png")
            save_sample_figure(path, panels, f"{a.data}, σ = {sigma:g}: samples (energy models: "
                               f"exact grid sampler; mixtures: ancestral), Tweedie step, clipped")
            for r in rows[-len(wanted):]:
                r["figure"] = path
    return rows


# ---------------------------------------------------------------- report


def markdown(res):
    """The tables of a result dict, as markdown (the section of BENCHMARKS.md)."""
    out = []
    toys = res.get("toys") or []
    if toys:
        out.append("| toy | " + " | ".join(MADE_ROWS) + " |")
        out.append("|---|" + "---|" * len(MADE_ROWS))
        for name in dict.fromkeys(r["toy"] for r in toys):
            cells = []
            by = {r["model"]: r for r in toys if r["toy"] == name}
            best = min(by.values(), key=lambda r: r["kl"])["model"]
            for m in MADE_ROWS:
                r = by.get(m)
                if r is None:
                    cells.append("-")
                    continue
                c = f"{r['kl']:.3f} ± {r['kl_stderr']:.3f} ({r['seconds']:.0f} s)"
                cells.append(f"**{c}**" if m == best else c)
            out.append(f"| {name} | " + " | ".join(cells) + " |")
        out.append("")
    imgs = res.get("images") or []
    if imgs:
        models = list(dict.fromkeys(r["model"] for r in imgs))
        out.append("| σ | " + " | ".join(models) + " |")
        out.append("|---|" + "---|" * len(models))
        for s in dict.fromkeys(r["sigma"] for r in imgs):
            by = {r["model"]: r for r in imgs if r["sigma"] == s}
            cells = []
            for m in models:
                r = by.get(m)
                cells.append("-" if r is None else
                             f"{r['bits_per_dim']:.3f} ({r['steps']} steps, "
                             f"{r['steps_per_s']:.2f}/s)")
            out.append(f"| {s:g} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sections", default="toys,mnist", help="toys, mnist (comma-separated)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    p.add_argument("--toys", default=",".join(TOYS), help="toys to run")
    p.add_argument("--toy-steps", type=int, default=2000, help="training steps, every model")
    p.add_argument("--toy-batch", type=int, default=256)
    p.add_argument("--toy-lr", type=float, default=3e-3)
    p.add_argument("--n-kl", type=int, default=10000, help="fresh truth samples for the KL")
    p.add_argument("--grid", type=int, default=120, help="density picture resolution")
    p.add_argument("--hidden", type=int, nargs="+", default=None,
                   help="MADE hidden sizes (default: 256 256 on toys, 512 on images)")
    p.add_argument("--context-dim", type=int, default=None,
                   help="energy models' K (default: 32 on toys, 16 on images)")
    p.add_argument("--head-hidden", type=int, default=None,
                   help="energy head width (default: 32 on toys, 64 on images)")
    p.add_argument("--components", type=int, default=None,
                   help="MADE-MoG components (default: 20 on toys, 5 on images: 15 outputs per "
                        "dimension, as many as the energy models' 16 contexts)")
    p.add_argument("--train-nodes", type=int, default=129,
                   help="quadrature nodes of the MLE / hybrid training loss (evaluation: 257)")
    p.add_argument("--data", default="mnist5k", help="image data spec (mnist5k, mnist:DIR, ...)")
    p.add_argument("--limit", type=int, default=None, help="training images (default: all)")
    p.add_argument("--sigmas", default="0.1,0.25,0.5", help="smoothing noise levels")
    p.add_argument("--pcnn-sigmas", default="0.1,0.25,0.5",
                   help="σ at which the PixelCNN++ pair runs (empty: none)")
    p.add_argument("--budget", type=float, default=60.0,
                   help="training wall-clock seconds per MADE model (schedule on the wall clock)")
    p.add_argument("--pcnn-budget", type=float, default=90.0, help="same, per PixelCNN++ model")
    p.add_argument("--steps", type=int, default=None,
                   help="a fixed number of steps for every image model instead of the budget")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--pcnn-batch", type=int, default=16)
    p.add_argument("--pcnn-lr", type=float, default=2e-3)
    p.add_argument("--nr-resnet", type=int, default=1)
    p.add_argument("--nr-filters", type=int, default=32)
    p.add_argument("--pcnn-components", type=int, default=5)
    p.add_argument("--n-eval", type=int, default=300, help="held-out images for bits/dim")
    p.add_argument("--eval-batch", type=int, default=50)
    p.add_argument("--n-samples", type=int, default=16, help="samples per MADE model")
    p.add_argument("--pcnn-samples", type=int, default=9, help="samples per PixelCNN++ model")
    p.add_argument("--figures", default="benchmarks/results", help="folder of the PNGs")
    p.add_argument("--out", default="benchmarks/results/fidelity_cpu.json")
    p.add_argument("--markdown", default=None, help="also write the tables to this .md file")
    a = p.parse_args(argv)
    a.toys = [t for t in a.toys.split(",") if t]
    bad = [t for t in a.toys if t not in TOYS]
    if bad:
        p.error(f"--toys: unknown {bad}; choose from {sorted(TOYS)}")
    a.sigmas = [float(s) for s in a.sigmas.split(",") if s]
    a.pcnn_sigmas = [float(s) for s in a.pcnn_sigmas.split(",") if s]
    sections = [s for s in a.sections.split(",") if s]
    if set(sections) - {"toys", "mnist"}:
        p.error(f"--sections takes toys, mnist; got {a.sections}")
    if a.quick:
        a.toy_steps, a.toy_batch, a.grid, a.n_kl = 3, 32, 12, 2000
        a.budget, a.pcnn_budget, a.steps, a.n_eval, a.eval_batch = 1.0, 1.0, 2, 4, 4
        a.limit, a.n_samples, a.pcnn_samples, a.train_nodes = 64, 2, 1, 17
        a.hidden = a.hidden or [16]
        a.context_dim, a.head_hidden, a.components = a.context_dim or 4, a.head_hidden or 8, 3
        a.nr_filters, a.pcnn_components, a.sigmas = 4, 2, a.sigmas[-1:]
        a.pcnn_sigmas = [s for s in a.pcnn_sigmas if s in a.sigmas]
    if a.figures:
        os.makedirs(a.figures, exist_ok=True)
    res = dict(machine=machine_info("cpu"), args={k: v for k, v in vars(a).items()},
               command="csm-ext bench fidelity " + " ".join(sys.argv[1:] if argv is None else argv))
    user = dict(hidden=a.hidden, context_dim=a.context_dim, head_hidden=a.head_hidden,
                components=a.components)
    if "toys" in sections:
        print("# toys: KL(truth||model), nats", file=sys.stderr)
        a.hidden, a.context_dim = user["hidden"] or [256, 256], user["context_dim"] or 32
        a.head_hidden, a.components = user["head_hidden"] or 32, user["components"] or 20
        res["toy_settings"] = dict(hidden=a.hidden, context_dim=a.context_dim,
                                   head_hidden=a.head_hidden, components=a.components)
        res["toys"] = bench_toys(a)
    if "mnist" in sections:
        print(f"# images ({a.data}): held-out bits/dim", file=sys.stderr)
        a.hidden, a.context_dim = user["hidden"] or [512], user["context_dim"] or 16
        a.head_hidden, a.components = user["head_hidden"] or 64, user["components"] or 5
        res["image_settings"] = dict(hidden=a.hidden, context_dim=a.context_dim,
                                     head_hidden=a.head_hidden, components=a.components)
        res["images"] = bench_images(a)
    res["markdown"] = markdown(res)
    print(res["markdown"], file=sys.stderr)
    if a.out:
        os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
        print(f"wrote {a.out}", file=sys.stderr)
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(res["markdown"] + "\n")
    return res


if __name__ == "__main__":
    main()
