"""VAEs with an implicit encoder on binarised MNIST: test NLL of (ELBO-Gaussian, SSM-implicit,
CSM-implicit) × latent dimensions, training time per method, reconstruction and sample figures.

    python benchmarks/bench_vae.py                 # the full run (6 models), JSON + PNG + table
    python benchmarks/bench_vae.py --quick         # a smoke run (tiny networks, a few steps)
    csm-ext vae --dims 8 --steps 500               # the same entry point, installed

Protocol (Song et al., UAI 2019, sliced score matching, scaled to a 2-core CPU; the defaults
below are what BENCHMARKS.md reports): MNIST 5k (4,500 train / 500 test, or the IDX files of
``--data mnist:DIR``), dynamically binarised for training, the test set binarised once (seeded);
encoder / decoder / score network MLPs with two hidden layers of 300 (softplus); Bernoulli
decoder; N(0, I) prior; Adam 1e-3, batch 100, ``--steps`` steps for every method; the score
estimators get ``fit_steps`` = 2 updates per VAE step on fresh encoder samples. The test NLL is
importance sampling with K = 1000 samples per image from a proposal fitted per test image to
M = 256 encoder samples (full-covariance Gaussian, covariance ×1.2², 5 % prior as a defensive
component), on ``--n-test`` test images (:func:`csm_ext.vae.vae_nll`). The anchor instead
trains far longer on the full 60k MNIST and evaluates with Hamiltonian AIS (1,000
temperatures, 16 chains); the JSON records the settings so the gap can be stated.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

from .. import vae
from .timing import fmt_time, machine_info

LABELS = {"elbo-gaussian": "ELBO-Gaussian", "ssm-implicit": "SSM-implicit",
          "csm-implicit": "CSM-implicit"}


def build_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """The benchmark's arguments (``add_help=False``: as a parent of the ``csm-ext vae``
    subcommand)."""
    p = argparse.ArgumentParser(prog="bench_vae", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                add_help=add_help)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: tiny networks, latent 2, a few steps, 4 test images")
    p.add_argument("--data", default="mnist5k", help="mnist5k or mnist:DIR (IDX files)")
    p.add_argument("--dims", default="8,32", help="latent dimensions, comma-separated")
    p.add_argument("--methods", default=",".join(vae.METHODS),
                   help=f"comma-separated subset of {','.join(vae.METHODS)}")
    p.add_argument("--steps", type=int, default=3000, help="training steps of every method")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--hidden", default="300,300", help="encoder/decoder/score-net MLP widths")
    p.add_argument("--fit-steps", type=int, default=2,
                   help="score-estimator updates per VAE step")
    p.add_argument("--nodes", type=int, default=vae.LATENT_NODES,
                   help="Simpson nodes of the AR-CSM's normalisers (odd)")
    p.add_argument("--n-test", type=int, default=500, help="test images for the NLL")
    p.add_argument("--K", type=int, default=1000, help="importance samples per test image")
    p.add_argument("--M", type=int, default=256,
                   help="encoder samples the per-image proposal is fitted to")
    p.add_argument("--time-limit", type=float, default=None,
                   help="stop a method's training after this many seconds (stated in the JSON)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: small MLP steps run fastest on one thread here)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None,
                   help="JSON (default benchmarks/results/vae_cpu.json, _quick with --quick)")
    p.add_argument("--fig-dir", default=None,
                   help="figures vae_z<D>.png (default docs/images; the JSON's folder with "
                        "--quick)")
    p.add_argument("--progress", action="store_true", help="progress bars")
    return p


def _figure(rows, path, title):
    """rows: list of (label, images (n, 784) in [0, 1]) → one grid PNG, a row per entry."""
    from ..plots import save_image_grid

    n = rows[0][1].shape[0]
    imgs = torch.cat([r[1][:n] for r in rows]).view(-1, 1, 28, 28)
    save_image_grid(imgs, path, nrow=n, title=title)


def _table(results, dims, methods):
    lines = ["| method | " + " | ".join(f"NLL z={d} (nats)" for d in dims) + " | "
             + " | ".join(f"train time z={d}" for d in dims) + " |",
             "|---|" + "---|" * (2 * len(dims))]
    for m in methods:
        cells, times = [], []
        for d in dims:
            r = results.get(f"{m}/z{d}")
            cells.append("-" if r is None else f"{r['nll_mean']:.2f} ± {r['nll_sem']:.2f}")
            times.append("-" if r is None else
                         f"{fmt_time(r['train_time'])} ({r['step_time'] * 1e3:.0f} ms/step)")
        lines.append(f"| {LABELS[m]} | " + " | ".join(cells) + " | " + " | ".join(times) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    """Parse ``argv`` and :func:`run`; returns the JSON document."""
    return run(build_parser().parse_args(argv), argv)


def run(a: argparse.Namespace, argv=None) -> dict:
    """Train and evaluate every (method, latent dimension); write JSON and figures."""
    dims = [int(d) for d in a.dims.split(",") if d.strip()]
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in vae.METHODS]
    if bad:
        raise SystemExit(f"--methods: unknown {bad}; choose from {vae.METHODS}")
    if not dims or any(d < 1 for d in dims):
        raise SystemExit(f"--dims must be positive ints; got {a.dims!r}")
    hidden = tuple(int(h) for h in a.hidden.split(","))
    made_hidden, head_hidden, context_dim = (256,), 32, 8
    steps, n_test, K, M, nodes = a.steps, a.n_test, a.K, a.M, a.nodes
    if a.quick:
        dims, hidden, made_hidden, head_hidden, context_dim = [2], (16,), (8,), 8, 4
        steps, n_test, K, M, nodes = min(steps, 3), min(n_test, 4), min(K, 20), min(M, 8), 33
    out = a.out or os.path.join("benchmarks", "results",
                                "vae_cpu_quick.json" if a.quick else "vae_cpu.json")
    fig_dir = a.fig_dir or (os.path.dirname(out) or "." if a.quick else
                            os.path.join("docs", "images"))
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    os.makedirs(fig_dir, exist_ok=True)
    torch.set_num_threads(a.threads)

    train_probs, test = vae.binarized_mnist(a.data, seed=a.seed)
    test = test[:n_test]
    print(f"data {a.data}: {train_probs.shape[0]} train, {test.shape[0]} test images "
          f"(NLL on {test.shape[0]}), threads {torch.get_num_threads()}", flush=True)
    results, settings = {}, None
    t_all = time.perf_counter()
    for d in dims:
        fig_rows = [("test", test[:10])]
        samples_rows = []
        for m in methods:
            cfg = vae.VAEConfig(method=m, z_dim=d, hidden=hidden, steps=steps,
                                batch_size=a.batch_size, fit_steps=a.fit_steps,
                                made_hidden=made_hidden, head_hidden=head_hidden,
                                context_dim=context_dim, nodes=nodes, seed=a.seed,
                                time_limit=a.time_limit, progress=a.progress)
            settings = cfg.as_dict()
            run = vae.train_vae(cfg, train_probs, log=print)
            enc, dec, est = run["encoder"], run["decoder"], run["estimator"]
            t0 = time.perf_counter()
            nll = vae.vae_nll(enc, dec, test, K=K, M=M, seed=a.seed, progress=a.progress)
            nll_time = time.perf_counter() - t0
            r = dict(method=m, z_dim=d, steps=run["steps"], stopped_early=run["steps"] < steps,
                     train_time=run["train_time"], step_time=run["step_time"],
                     nll_mean=float(nll.mean()), nll_sem=float(nll.std() / math.sqrt(len(nll))),
                     nll_time=nll_time, n_test=len(nll), history=run["history"])
            with torch.no_grad():
                torch.manual_seed(a.seed + 7)
                z = enc(test)
                r["test_max_abs_z"] = float(z.abs().max())
                if m == "elbo-gaussian":
                    elbo = (dec.log_likelihood(test, z) + vae.log_prior(z) + enc.entropy(test))
                    r["test_elbo"] = float(elbo.mean())
                if m == "csm-implicit":
                    inside = bool(z.abs().max() <= vae.LATENT_SUPPORT[1])
                    r["test_z_inside_support"] = inside
                    if inside:
                        lq = est.log_prob(z, nodes, cond=test)
                        elbo = dec.log_likelihood(test, z) + vae.log_prior(z) - lq
                        r["test_elbo_csm"] = float(elbo.mean())
                        r["quadrature_error"] = est.quadrature_error(z, nodes, cond=test)
                recon = torch.sigmoid(dec.logits(enc(test[:10])))
                samples = torch.sigmoid(dec.logits(torch.randn(10, d)))
            fig_rows.append((f"{LABELS[m]} recon", recon))
            samples_rows.append((f"{LABELS[m]} samples", samples))
            results[f"{m}/z{d}"] = r
            print(f"{LABELS[m]} z={d}: NLL {r['nll_mean']:.2f} ± {r['nll_sem']:.2f} nats "
                  f"({len(nll)} test images, K={K}), {run['steps']} steps in "
                  f"{fmt_time(run['train_time'])}, NLL in {fmt_time(nll_time)}"
                  + (f", quadrature error {r['quadrature_error']['max_per_sample']:.2e} nats "
                     "per sample" if "quadrature_error" in r else ""), flush=True)
        path = os.path.join(fig_dir, f"vae_z{d}.png")
        short = "/".join(LABELS[m].split("-")[0][:5] for m in methods)
        _figure(fig_rows + samples_rows, path,
                f"latent {d}, {a.data}. Rows: test; recon {short}; samples {short}")
        print(f"figure: {path}")
    table = _table(results, dims, methods)
    doc = dict(benchmark="vae", quick=a.quick, data=a.data, dims=dims, methods=methods,
               n_train=int(train_probs.shape[0]), n_test=int(test.shape[0]), K=K, M=M,
               proposal=dict(kind="full-covariance Gaussian fitted to M encoder samples",
                             inflate=1.2, defensive_prior=0.05),
               latent_support=list(vae.LATENT_SUPPORT), nodes=nodes, settings=settings,
               results=results, table=table, total_time=time.perf_counter() - t_all,
               machine=machine_info("cpu"),
               command=("python benchmarks/bench_vae.py " + " ".join(argv)) if argv is not None
               else " ".join(["csm-ext", *sys.argv[1:]]))
    with open(out, "w") as f:
        json.dump(doc, f, indent=1)
    print(table)
    print(f"wrote {out}")
    return doc
