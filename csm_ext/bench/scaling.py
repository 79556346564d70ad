"""Scaling of score-matching training steps with the data dimension D.

Methods, one training step each (forward + backward + Adam step) on the same data:
  exact-sm       exact score matching of a full-joint EnergyMLP (Hessian trace: D backward passes)
  sliced-sm      sliced score matching, one projection (EnergyMLP)
  sliced-sm-vr   its variance-reduced form (EnergyMLP)
  dsm            denoising score matching, sigma 0.1 (EnergyMLP)
  csm-autograd   CSM of MADE-CSM, head derivatives by autograd double-backward
  csm-func       CSM of MADE-CSM, head derivatives by torch.func forward mode
  csm-fused      CSM of MADE-CSM through the fused csm_ext op

Every (method, D, batch) runs in its own process, so peak memory is measured cleanly and a
method that runs past the time or memory budget is stopped and reported as such (not silently
skipped). All methods of a configuration run back to back in one invocation, so the ratios hold
on a noisy machine. Writes JSON, prints a markdown table, and plots time and memory against D.

  csm-ext bench scaling                                # D = 16 ... 3072, batch 16 and 64
  csm-ext bench scaling --dims 16,64 --batch 8 --steps 2 --hidden 32   # smoke
  (python benchmarks/bench_scaling.py takes the same arguments)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from .memory import peak_extra_rss, probe_env, status_bytes
from .timing import median_iqr

METHODS = ("exact-sm", "sliced-sm", "sliced-sm-vr", "dsm", "csm-autograd", "csm-func",
           "csm-fused")
BACKWARD_PASSES = {  # per training step, including the one for the parameter gradients
    "exact-sm": "D+2", "sliced-sm": "3", "sliced-sm-vr": "3", "dsm": "2", "csm-autograd": "3",
    "csm-func": "1 (+2 jvp)", "csm-fused": "1",
}


# ----------------------------------------------------------------------------- child process


def build(method, D, hidden, context_dim, head_hidden):
    """The model and a function computing its training loss on a batch."""
    import torch

    from csm_ext import baselines
    from csm_ext.models import MADECSM

    if method.startswith("csm"):
        model = MADECSM(D, hidden_sizes=(hidden,), context_dim=context_dim,
                        head_hidden=head_hidden, head_layers=2, backend=method.split("-")[1])
        return model, model.loss
    net = baselines.EnergyMLP(D, hidden=hidden, layers=2)
    loss_fns = {
        "exact-sm": lambda x: baselines.exact_score_matching_loss(net, x),
        "sliced-sm": lambda x: baselines.sliced_score_matching_loss(net, x),
        "sliced-sm-vr": lambda x: baselines.sliced_score_matching_loss(net, x,
                                                                       variance_reduced=True),
        "dsm": lambda x: baselines.denoising_score_matching_loss(net, x, sigma=0.1),
    }
    return net, loss_fns[method]


def child(method, D, B, hidden, context_dim, head_hidden, steps, emit=print):
    """Runs one configuration and emits JSON lines with its timings and peak memory."""
    import torch

    torch.manual_seed(0)
    model, loss_fn = build(method, D, hidden, context_dim, head_hidden)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.randn(B, D)

    def train_step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(x)
        loss.backward()
        opt.step()
        return loss.item()

    t0 = time.perf_counter()
    train_step()  # warm-up, also tells the parent the method runs at all
    emit(json.dumps({"warmup_s": time.perf_counter() - t0}))
    peak = peak_extra_rss(train_step, warmup=0)  # one steady-state step, as every benchmark
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        train_step()
        times.append(time.perf_counter() - t0)
    median, iqr = median_iqr(times)
    emit(json.dumps({
        "median_s": median, "iqr_s": iqr, "steps": len(times),
        "peak_extra_bytes": peak,
        "params": sum(p.numel() for p in model.parameters()),
    }))


# ----------------------------------------------------------------------------- parent
def run_in_process(method, D, B, args):
    """Run a configuration here (quick looks and smoke tests): no budgets, and the peak memory
    includes whatever this process held before."""
    lines = []
    child(method, D, B, args.hidden, args.context_dim, args.head_hidden, args.steps,
          emit=lambda line: lines.append(json.loads(line)))
    row = {"method": method, "D": D, "batch": B, "backward_passes": BACKWARD_PASSES[method],
           "status": "ok"}
    for line in lines:
        row.update(line)
    return row


def run_one(method, D, B, args):
    """Run a configuration in a child process under the time and memory budgets."""
    if args.in_process:
        return run_in_process(method, D, B, args)
    code = (f"from csm_ext.bench import scaling as b; b.child({method!r}, {D}, {B}, "
            f"{args.hidden}, {args.context_dim}, {args.head_hidden}, {args.steps})")
    env = dict(probe_env(), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    start, peak_rss, status = time.perf_counter(), 0, None
    while proc.poll() is None:
        time.sleep(0.05)
        rss = status_bytes("VmRSS", proc.pid)
        peak_rss = max(peak_rss, rss)
        if rss > args.memory_budget_gb * 2 ** 30:
            status = f"stopped: over the memory budget ({args.memory_budget_gb:g} GiB)"
        elif time.perf_counter() - start > args.time_budget:
            status = f"stopped: over the time budget ({args.time_budget:g} s)"
        if status:
            proc.kill()
            break
    out, err = proc.communicate()
    lines = [json.loads(l) for l in out.splitlines() if l.startswith("{")]
    row = {"method": method, "D": D, "batch": B, "backward_passes": BACKWARD_PASSES[method]}
    for line in lines:
        row.update(line)
    if status:
        row["status"] = status
    elif proc.returncode != 0:
        row["status"] = f"failed: {err.strip().splitlines()[-1][:200] if err.strip() else proc.returncode}"
    else:
        row["status"] = "ok"
    return row


def fmt_row(r):
    t = f"{r['median_s'] * 1e3:.1f} ms ± {r['iqr_s'] * 1e3:.1f}" if "median_s" in r else "-"
    m = f"{r['peak_extra_bytes'] / 2 ** 20:.0f} MiB" if "peak_extra_bytes" in r else "-"
    sp = f"{r['vs_fused']:.1f}×" if "vs_fused" in r else "-"
    return (f"| {r['D']} | {r['batch']} | {r['method']} | {t} | {sp} | {m} | "
            f"{r['backward_passes']} | {'' if r['status'] == 'ok' else r['status']} |")


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(len(batches), 2, figsize=(11, 4 * len(batches)), squeeze=False)
    for i, B in enumerate(batches):
        for method in METHODS:
            pts = [r for r in rows if r["batch"] == B and r["method"] == method
                   and "median_s" in r]
            if not pts:
                continue
            Ds = [r["D"] for r in pts]
            style = "-o" if method.startswith("csm") else "--s"
            axes[i, 0].loglog(Ds, [r["median_s"] for r in pts], style, label=method)
            axes[i, 1].loglog(Ds, [max(r["peak_extra_bytes"], 1) / 2 ** 20 for r in pts], style,
                              label=method)
        axes[i, 0].set(xlabel="D", ylabel="seconds per training step", title=f"time, batch {B}")
        axes[i, 1].set(xlabel="D", ylabel="peak extra memory (MiB)", title=f"memory, batch {B}")
        for ax in axes[i]:
            ax.grid(True, which="both", alpha=0.3)
        axes[i, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    p = argparse.ArgumentParser(prog="csm-ext bench scaling", description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dims", default="16,64,256,784,1024,3072")
    p.add_argument("--batch", default="16,64")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--hidden", type=int, default=256, help="width of EnergyMLP and of the MADE")
    p.add_argument("--context-dim", type=int, default=16)
    p.add_argument("--head-hidden", type=int, default=32)
    p.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up")
    p.add_argument("--time-budget", type=float, default=120.0,
                   help="seconds a configuration may run (warm-up + timed steps)")
    p.add_argument("--memory-budget-gb", type=float, default=12.0)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/scaling_cpu.json"))
    p.add_argument("--plot", type=Path, default=None, help="PNG path (default: next to --out)")
    p.add_argument("--in-process", action="store_true",
                   help="run every configuration in this process (no budgets; smoke tests)")
    args = p.parse_args(argv)
    dims = [int(v) for v in args.dims.split(",")]
    batches = [int(v) for v in args.batch.split(",")]
    methods = [m for m in args.methods.split(",") if m]
    bad = set(methods) - set(METHODS)
    if bad:
        p.error(f"--methods: unknown {sorted(bad)}; choose from {METHODS}")

    import torch

    print(f"# {os.cpu_count()} cores, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"# {' '.join(sys.argv)}")
    print("| D | batch | method | time per step | vs csm-fused | peak memory | backward passes "
          "| note |\n|---|---|---|---|---|---|---|---|")
    rows, stopped = [], set()
    for B in batches:
        for D in dims:
            group = []
            for method in methods:
                if (method, B) in stopped:  # it only gets worse as D grows
                    row = {"method": method, "D": D, "batch": B,
                           "backward_passes": BACKWARD_PASSES[method],
                           "status": "stopped: over budget at a smaller D"}
                else:
                    row = run_one(method, D, B, args)
                    if row["status"].startswith("stopped"):
                        stopped.add((method, B))
                group.append(row)
            fused = next((r for r in group if r["method"] == "csm-fused" and "median_s" in r), None)
            for r in group:
                if fused and "median_s" in r:
                    r["vs_fused"] = r["median_s"] / fused["median_s"]
                print(fmt_row(r), flush=True)
            rows += group
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                    "torch": torch.__version__, "threads": torch.get_num_threads(),
                                    "rows": rows}, indent=1))
    plot_path = args.plot or args.out.with_suffix(".png")
    plot(rows, plot_path)
    print(f"# wrote {args.out} and {plot_path}")
    return rows


if __name__ == "__main__":
    main()
