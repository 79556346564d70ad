"""What the normalised model costs and buys, on MADE-CSM at MNIST size (and PixelCNN++ small).

    python benchmarks/bench_normalised.py                 # all sections, JSON to benchmarks/results
    python benchmarks/bench_normalised.py --quick         # tiny sizes (a smoke run)
    python benchmarks/bench_normalised.py --ckpt runs/demo/last.pt   # + quadrature accuracy

Sections (each verifies before it times):

* ``sampling``: images per second, MADE-CSM 784-D, n images: the paper's per-dimension Langevin
  (steps per dimension as in the demo, full trunk per dimension as before this release) against
  the grid sampler (exact inverse CDF on the quadrature grid, incremental MADE context). The
  grid sampler is first checked against the model's own conditional on one dimension.
* ``objectives``: one training step (forward + backward + Adam) per objective: CSM, MLE by
  quadrature (G nodes per element), hybrid; MADE-CSM MNIST size and PixelCNN++ small.
* ``rings``: KL(truth‖model) on the rings toy for CSM, MLE and hybrid at the same steps.
* ``quadrature`` (with ``--ckpt``): the G vs 2G−1 disagreement of log Z on held-out data of a
  trained model, for several G, and the bits/dim it gives.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

from csm_ext.bench.timing import machine_info, time_it
from csm_ext.models import DEFAULT_NODES, MADECSM, PixelCNNppCSM

SUPPORT = (-3.0, 3.0)  # MNIST in [-1, 1] smoothed with sigma 0.5: the data range + 4 sigma


def made(args, **kw):
    torch.manual_seed(0)
    return MADECSM(args.dim, hidden_sizes=(args.hidden,), context_dim=16, head_hidden=64,
                   head_layers=2, support=SUPPORT, **kw)


def _langevin_full_trunk(model, n, steps, generator):
    """The sampler as it was before the incremental context: the MADE trunk recomputed from
    the whole x for every dimension (context_at), Langevin on the head."""
    from csm_ext import sampling

    x = sampling.initial_points(n, model.dim, "uniform", (-1.0, 1.0), generator, torch.float32,
                                "cpu")
    return sampling.ar_langevin(model.context_at, model.head, x, model.order.tolist(), steps,
                                0.0125, 30.0, False, generator, 1.0)


def bench_sampling(args):
    m = made(args).eval()
    # Verify: grid samples of dimension 0 (context = biases) follow its normalised conditional.
    with torch.no_grad():
        t, lw = m.quadrature_rule()
        ctx = m.context_at(torch.zeros(1, m.dim), 0)
        E = m.head.node_energies(ctx, t)[0]
        x0 = m.sample(4000, generator=torch.Generator().manual_seed(0), progress=False)[:, 0] \
            if args.dim <= 64 else None
    mean_model = float((torch.softmax(lw - E, 0) * t).sum())
    rows = []
    n = args.n
    g = torch.Generator().manual_seed(1)
    t_grid, iqr_grid = time_it(lambda: m.sample(n, generator=g, progress=False), "cpu",
                               args.repeats, 1)
    rows.append(dict(method=f"grid (G={DEFAULT_NODES}, incremental context)", n=n,
                     seconds=t_grid, iqr=iqr_grid, per_image=t_grid / n))
    t_lang, iqr_lang = time_it(
        lambda: m.sample(n, method="langevin", steps=args.steps, step_size=0.0125, anneal=30.0,
                         clip=(-1, 1), generator=g, progress=False), "cpu", max(1, args.repeats // 2), 0)
    rows.append(dict(method=f"langevin ({args.steps} steps/dim, incremental context)", n=n,
                     seconds=t_lang, iqr=iqr_lang, per_image=t_lang / n))
    t_old, iqr_old = time_it(lambda: _langevin_full_trunk(m, n, args.steps, g), "cpu", 1, 0)
    rows.append(dict(method=f"langevin ({args.steps} steps/dim, full trunk per dim: before)",
                     n=n, seconds=t_old, iqr=iqr_old, per_image=t_old / n))
    for r in rows:
        r["speedup_vs_before"] = t_old / r["seconds"]
    check = dict(dim0_model_mean=mean_model)
    if x0 is not None:
        check["dim0_sample_mean"] = float(x0.mean())
    return dict(rows=rows, check=check)


def bench_objectives(args):
    out = []
    B = args.batch
    g = torch.Generator().manual_seed(2)
    configs = [("MADE-CSM", lambda **kw: made(args, **kw),
                (torch.rand(B, args.dim, generator=g) * 2 - 1))]
    if not args.quick:
        configs.append(("PixelCNN++ small (1x28x28, nr_resnet 1, 32 filters)",
                        lambda **kw: PixelCNNppCSM(1, 28, 28, nr_resnet=1, nr_filters=32,
                                                   context_dim=16, support=SUPPORT, **kw),
                        torch.rand(args.pcnn_batch, 1, 28, 28, generator=g) * 2 - 1))
    for name, build, x in configs:
        for objective, nodes in (("csm", None), ("mle", DEFAULT_NODES), ("mle", 65),
                                 ("hybrid", DEFAULT_NODES)):
            torch.manual_seed(0)
            m = build(objective=objective)
            opt = torch.optim.Adam(m.parameters(), lr=1e-4)

            def step():
                loss = m.loss(x, nodes=nodes)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                return loss

            loss0 = float(step().detach())
            if not math.isfinite(loss0):
                raise RuntimeError(f"{name} {objective}: non-finite loss")
            t, iqr = time_it(step, "cpu", args.repeats, 1)
            out.append(dict(model=name, batch=int(x.shape[0]), objective=objective,
                            nodes=nodes, seconds=t, iqr=iqr))
            print(f"  {name:52s} {objective:7s} G={nodes!s:5s} {t * 1e3:9.1f} ms", file=sys.stderr)
    base = {r["model"]: r["seconds"] for r in out if r["objective"] == "csm"}
    for r in out:
        r["vs_csm"] = r["seconds"] / base[r["model"]]
    return out


def bench_rings(args):
    """KL(truth‖model) on the rings toy per objective, same model and steps, the best of two
    learning rates each (fresh truth samples; exact model log-density by quadrature)."""
    from csm_ext.data import ToySource

    src = ToySource("rings")
    toy = src.toy
    x_eval = toy.sample(args.n_eval_toy, generator=torch.Generator().manual_seed(2))
    rows = []
    for objective in ("csm", "mle", "hybrid"):
        for lr in (3e-3, 1e-2):
            torch.manual_seed(0)
            m = MADECSM(2, hidden_sizes=(64, 64), context_dim=8, head_hidden=32, head_layers=2,
                        support=src.support, objective=objective)
            opt = torch.optim.Adam(m.parameters(), lr=lr)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.toy_steps)
            g = torch.Generator().manual_seed(1)
            t0 = time.perf_counter()
            for _ in range(args.toy_steps):
                loss = m(toy.sample(256, generator=g))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
            dt = time.perf_counter() - t0
            with torch.no_grad():
                kl = float((toy.log_prob(x_eval.double()) - m.log_prob(x_eval).double()).mean())
            rows.append(dict(objective=objective, lr=lr, steps=args.toy_steps, kl=kl,
                             train_seconds=dt))
            print(f"  rings {objective:6s} lr {lr:g}: KL {kl:.4f} nats ({dt:.0f} s)",
                  file=sys.stderr)
    return rows


def bench_quadrature(args):
    from csm_ext.data.sources import make_source
    from csm_ext.train import load_checkpoint

    model, ck = load_checkpoint(args.ckpt)
    model.eval()
    source = make_source(ck["data_config"])
    if model.support is None:
        model.support = source.support
    x = source.test[: args.n_eval]
    rows = []
    for G in (33, 65, 129, 257, 513):
        with torch.no_grad():
            err = model.quadrature_error(x, nodes=G)
            t0 = time.perf_counter()
            bpd = float(model.bits_per_dim(x, nodes=G).mean())
            dt = time.perf_counter() - t0
        rows.append(dict(nodes=G, bits_per_dim=bpd, seconds=dt,
                         max_abs_per_dim=err["max_abs"], mean_abs_per_dim=err["mean_abs"],
                         max_per_sample=err["max_per_sample"]))
        print(f"  G={G:4d}: {bpd:.5f} bits/dim, |logZ_G - logZ_2G-1| max {err['max_abs']:.2e} "
              f"mean {err['mean_abs']:.2e} nats/dim ({dt:.1f} s)", file=sys.stderr)
    return dict(ckpt=args.ckpt, data=source.describe(), n=len(x), rows=rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sections", default="sampling,objectives,rings,quadrature")
    p.add_argument("--toy-steps", type=int, default=1500, help="training steps per rings run")
    p.add_argument("--n-eval-toy", type=int, default=10000, help="truth samples for the KL")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    p.add_argument("--ckpt", default=None, help="trained checkpoint for the quadrature section")
    p.add_argument("--n", type=int, default=64, help="images sampled")
    p.add_argument("--steps", type=int, default=200, help="Langevin steps per dimension")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--n-eval", type=int, default=500, help="held-out samples (quadrature)")
    p.add_argument("--out", default="benchmarks/results/normalised_cpu.json")
    args = p.parse_args(argv)
    args.dim, args.hidden, args.batch, args.pcnn_batch = 784, 512, 64, 16
    if args.quick:
        args.dim, args.hidden, args.batch, args.n, args.steps, args.repeats = 16, 32, 8, 4, 5, 1
        args.toy_steps, args.n_eval_toy = 5, 200
    sections = [s for s in args.sections.split(",") if s]
    res = dict(machine=machine_info("cpu"), args=vars(args))
    if "sampling" in sections:
        print("# sampling", file=sys.stderr)
        res["sampling"] = bench_sampling(args)
        for r in res["sampling"]["rows"]:
            print(f"  {r['method']:60s} {r['per_image']:.4f} s/image "
                  f"({r['speedup_vs_before']:.1f}x vs before)", file=sys.stderr)
    if "objectives" in sections:
        print("# objectives (one training step)", file=sys.stderr)
        res["objectives"] = bench_objectives(args)
    if "rings" in sections:
        print("# rings: KL(truth||model) per objective", file=sys.stderr)
        res["rings"] = bench_rings(args)
    if "quadrature" in sections and args.ckpt:
        print("# quadrature accuracy", file=sys.stderr)
        res["quadrature"] = bench_quadrature(args)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
        print(f"wrote {args.out}", file=sys.stderr)
    return res


if __name__ == "__main__":
    main()
