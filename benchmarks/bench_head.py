"""Benchmark of the energy head + CSM loss: the fused op against the pure-PyTorch alternatives.

Methods (same head, same inputs, one run, so the ratios hold on a noisy machine):
  fused            csm_ext.ops.head_jets (this package)
  autograd         (a) autograd double-backward through the plain energy
  eager            (b) hand-written forward-mode jets (three matmuls per layer), autograd backward
  func             (c) torch.func nested forward-mode jvp
  compile-autograd (d) torch.compile of (a)
  compile-eager    (e) torch.compile of (b): the strongest plain-PyTorch competitor

Two paths (--path):
  z     the jets of the head from its projected context z (N, H), the op's own inputs;
  loss  the public path: csm_ext.csm_loss(head, ctx, x) with an EnergyHead whose backend is the
        method (compile-*: torch.compile of the whole csm_loss call), so the context projection
        z = A c + b0 (K -> H) and all glue are included; gradients for ctx and every parameter.

For each configuration and method: forward time (loss only, no grad) and forward+backward time,
medians with the interquartile range, the peak extra memory of one forward+backward step, the
FLOP rate, and speedups of the fused op. Every method's loss and gradients are checked against
the fused op before anything is timed. GFLOP/s count the matrix products every method needs (the
same count for all); the fused op also recomputes its forward in the backward, and the "op %
sgemm" column counts those FLOPs too.

  python benchmarks/bench_head.py                      # the target configuration (N 50k, H 64, L 2)
  python benchmarks/bench_head.py --path loss          # through csm_loss, projection included
  python benchmarks/bench_head.py --preset sweep       # N from 1e3 to 1e6, H and L varied
  python benchmarks/bench_head.py --device cuda --sizes 1e5,1e6,1e7 --hidden 64,128 --layers 2
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import csm_ext
from csm_ext import EnergyHead, csm_loss, ops, reference
from csm_ext.bench.memory import peak_extra_rss, probe_env, saved_bytes
from csm_ext.bench.timing import fmt_bytes, fmt_time, machine_info, sync, time_it

METHODS = ("fused", "autograd", "eager", "func", "compile-autograd", "compile-eager")
# Presets are lists of (N, H, L); --sizes/--hidden/--layers instead give their full product.
PRESETS = {
    "target": [(50_000, 64, 2)],
    # N from 1e3 to 1e6 at the target width, then H and L varied at the target N.
    "sweep": [(1_000, 64, 2), (10_000, 64, 2), (50_000, 64, 2), (200_000, 64, 2),
              (1_000_000, 64, 2), (50_000, 32, 2), (50_000, 128, 2), (50_000, 64, 3),
              (50_000, 128, 3)],
    "smoke": [(300, 16, 2)],
    # Small calls, around the one-thread threshold of the CPU op.
    "small": [(64, 64, 2), (256, 64, 2), (511, 64, 2), (512, 64, 2), (1_000, 64, 2),
              (4_000, 64, 2)],
}
PATHS = ("z", "loss")
_compiled: dict = {}


def jets_fn(method: str):
    base = {"fused": ops.head_jets, "autograd": reference.head_jets_ref,
            "eager": reference.head_jets_eager, "func": reference.head_jets_func}
    if method in base:
        return base[method]
    inner = base[method.split("-", 1)[1]]
    if method not in _compiled:
        # Dynamo traces autograd.grad (needed by the double-backward reference) only when told.
        torch._dynamo.config.trace_autograd_ops = True
        _compiled[method] = torch.compile(inner, dynamic=False)
    return _compiled[method]


def make_inputs(N, H, L, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype=dtype, device=device)

    return [rnd(N, H), rnd(N), rnd(H), rnd(L - 1, H, H, scale=H ** -0.5), rnd(L - 1, H, scale=0.5),
            rnd(H, scale=H ** -0.5)]


def loss_of(method, args, alpha, act):
    _, dE, d2E = jets_fn(method)(*args, alpha, act)
    return (0.5 * dE * dE - d2E).mean()


def step(method, args, alpha, act, backward):
    """One forward (no grad) or forward+backward of the mean CSM loss; returns (loss, grads)."""
    if not backward:
        with torch.no_grad():  # the autograd reference turns grad mode on for its x-derivatives
            return loss_of(method, args, alpha, act), None
    params = [a.detach().requires_grad_(i != 1) for i, a in enumerate(args)]  # x needs no grad
    loss = loss_of(method, params, alpha, act)
    grads = torch.autograd.grad(loss, [p for i, p in enumerate(params) if i != 1])
    return loss.detach(), grads


def head_flops(N, H, L, backward, K=0, performed=False):
    """Matrix-product FLOPs of the jets: three jet rows through each hidden matrix (forward),
    twice that again for the gradients of the activations and of the weights (backward); with
    K > 0 the context projection (N, K) -> (N, H) too. ``performed``: the fused op's own count,
    which recomputes the forward in the backward."""
    fwd = N * (3 * 2 * H * H * (L - 1) + 3 * 2 * H)
    proj = 2 * N * K * H
    if not backward:
        return fwd + proj
    return fwd * (4 if performed else 3) + 3 * proj


class Problem:
    """One configuration on one path: ``step(method, backward)`` runs the mean CSM loss (and its
    gradients) with the method, on inputs fixed at construction."""

    def __init__(self, path, N, H, L, K, dtype, device, act, seed=0):
        self.path, self.act = path, act
        if path == "z":
            self.args = make_inputs(N, H, L, dtype, device, seed)
            return
        torch.manual_seed(seed)
        self.head = EnergyHead(K, hidden=H, layers=L, activation=act, confine=0.1).to(
            device=device, dtype=dtype)
        g = torch.Generator().manual_seed(seed + 1)
        self.ctx = torch.randn(N, K, generator=g).to(device=device, dtype=dtype)
        self.x = torch.randn(N, generator=g).to(device=device, dtype=dtype)
        self._heads = {}

    def _loss_fn(self, method):
        if method not in self._heads:  # one head per method (same weights), so a compiled
            import copy                # function never sees its head's backend change

            head = copy.deepcopy(self.head)
            head.backend = method.split("-", 1)[1] if method.startswith("compile") else method

            def fn(ctx, x):
                return csm_loss(head, ctx, x)

            if method.startswith("compile"):
                torch._dynamo.config.trace_autograd_ops = True
                fn = torch.compile(fn, dynamic=False)
            self._heads[method] = (head, fn)
        return self._heads[method]

    def step(self, method, backward):
        if self.path == "z":
            return step(method, self.args, 0.1, self.act, backward)
        head, fn = self._loss_fn(method)
        if not backward:
            with torch.no_grad():
                return fn(self.ctx, self.x), None
        ctx = self.ctx.detach().requires_grad_(True)
        loss = fn(ctx, self.x)
        grads = torch.autograd.grad(loss, [ctx, *head.parameters()])
        return loss.detach(), grads


def matmul_rate(device, dtype):
    """Measured dense matmul rate (FLOP/s) of this device at a large square size."""
    n = 4096 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t, _ = time_it(lambda: a @ b, device, repeats=7, warmup=2)
    return 2 * n ** 3 / t


# ----------------------------------------------------------------------------- memory
def peak_memory_cuda(method, prob):
    prob.step(method, backward=True)  # warm-up, as on the CPU (csm_ext.bench.memory)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    prob.step(method, backward=True)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base




def _memory_child(path, method, N, H, L, K, dtype, act):
    """Runs in a fresh process: peak resident memory of one step beyond the inputs."""
    prob = Problem(path, N, H, L, K, getattr(torch, dtype), torch.device("cpu"), act)
    peak = peak_extra_rss(lambda: prob.step(method, backward=True))  # after a warm-up step
    print(json.dumps({"peak_extra_bytes": peak}))


def peak_memory_cpu(path, method, N, H, L, K, dtype, act):
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import bench_head; "
            f"bench_head._memory_child({path!r}, {method!r}, {N}, {H}, {L}, {K}, {dtype!r}, "
            f"{act!r})")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=1800, env=probe_env())
    if out.returncode != 0:
        raise RuntimeError(f"memory probe for {method} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_extra_bytes"]


# ----------------------------------------------------------------------------- main loop
@dataclass
class Row:
    N: int
    H: int
    L: int
    method: str
    path: str = "z"
    K: int = 0
    fwd_s: float | None = None
    fwd_iqr_s: float | None = None
    fwdbwd_s: float | None = None
    fwdbwd_iqr_s: float | None = None
    peak_bytes: int | None = None
    saved_bytes: int | None = None  # what autograd keeps for the backward (inputs included)
    gflops_fwdbwd: float | None = None
    frac_matmul_peak: float | None = None
    op_frac_matmul_peak: float | None = None  # fused only: with the FLOPs it performs
    note: str = ""
    speedup: dict = field(default_factory=dict)


def verify(method, prob, ref, dtype):
    loss, grads = prob.step(method, backward=True)
    rtol = 1e-3 if dtype == torch.float32 else 1e-8
    ok = torch.allclose(loss, ref[0], rtol=rtol, atol=rtol * max(1.0, ref[0].abs().item()))
    for g, r in zip(grads, ref[1]):
        scale = max(1.0, r.abs().max().item()) if r.numel() else 1.0
        ok &= torch.allclose(g, r, rtol=rtol, atol=rtol * scale)
    return ok


def run_config(N, H, L, methods, device, dtype, act, repeats, budget_s, memory, matmul,
               path="z", K=0):
    K = K if path == "loss" else 0
    # Fresh compilations per configuration: dynamo's cache would otherwise hit its recompile
    # limit over a sweep and silently run the later configurations uncompiled.
    torch._dynamo.reset()
    _compiled.clear()
    prob = Problem(path, N, H, L, K, dtype, device, act)
    ref = prob.step("fused", backward=True)
    rows = []
    for method in methods:
        row = Row(N, H, L, method, path, K)
        rows.append(row)
        try:
            if method != "fused" and not verify(method, prob, ref, dtype):
                row.note = "MISMATCH vs fused"
                continue
            t_probe = time.perf_counter()
            prob.step(method, backward=True)
            sync(device)
            t_probe = time.perf_counter() - t_probe
            if t_probe * (repeats + 1) * 2 > budget_s:
                reps = max(3, int(budget_s / (2 * t_probe)) - 1)
                if t_probe * 4 > budget_s:
                    row.note = f"over budget ({t_probe:.1f} s/step)"
                    continue
            else:
                reps = repeats
            row.fwd_s, row.fwd_iqr_s = time_it(lambda: prob.step(method, False), device, reps, 1)
            row.fwdbwd_s, row.fwdbwd_iqr_s = time_it(lambda: prob.step(method, True), device,
                                                     reps, 1)
            flops = head_flops(N, H, L, backward=True, K=K)
            row.gflops_fwdbwd = flops / row.fwdbwd_s / 1e9
            if L > 1:
                row.frac_matmul_peak = flops / row.fwdbwd_s / matmul
                if method == "fused":
                    row.op_frac_matmul_peak = (head_flops(N, H, L, True, K, performed=True)
                                               / row.fwdbwd_s / matmul)
            if memory:
                row.saved_bytes = saved_bytes(lambda: prob.step(method, backward=True))
                if device.type == "cuda":
                    row.peak_bytes = peak_memory_cuda(method, prob)
                elif memory == "all" or not method.startswith("compile"):
                    row.peak_bytes = peak_memory_cpu(path, method, N, H, L, K,
                                                     str(dtype).split(".")[1], act)
        except torch.cuda.OutOfMemoryError:
            row.note = "out of memory"
            torch.cuda.empty_cache()
        except Exception as exc:  # report, do not hide: the row says what failed
            row.note = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    fused = rows[0]
    for row in rows:
        for key in ("fwd_s", "fwdbwd_s", "peak_bytes", "saved_bytes"):
            a, b = getattr(row, key), getattr(fused, key)
            if a and b:
                row.speedup[key] = a / b
    return rows


def table(rows):
    lines = ["| path | N | H | L | method | fwd | fwd+bwd (± IQR) | vs fused | peak mem "
             "| mem vs fused | saved for bwd | saved vs fused | GFLOP/s | % sgemm | op % sgemm "
             "| note |", "|" + "---|" * 16]
    for r in rows:
        sp = r.speedup.get("fwdbwd_s")
        mem = r.speedup.get("peak_bytes")
        sv = r.speedup.get("saved_bytes")
        path = "z" if r.path == "z" else f"loss (K {r.K})"
        op_frac = "-" if r.op_frac_matmul_peak is None else f"{100 * r.op_frac_matmul_peak:.0f}%"
        lines.append(
            f"| {path} | {r.N:,} | {r.H} | {r.L} | {r.method} | {fmt_time(r.fwd_s)} | "
            f"{fmt_time(r.fwdbwd_s)} (± {fmt_time(r.fwdbwd_iqr_s)}) | "
            f"{'-' if sp is None else f'{sp:.2f}×'} | {fmt_bytes(r.peak_bytes)} | "
            f"{'-' if mem is None else f'{mem:.2f}×'} | {fmt_bytes(r.saved_bytes)} | "
            f"{'-' if sv is None else f'{sv:.2f}×'} | "
            f"{'-' if r.gflops_fwdbwd is None else f'{r.gflops_fwdbwd:.1f}'} | "
            f"{'-' if r.frac_matmul_peak is None else f'{100 * r.frac_matmul_peak:.0f}%'} | "
            f"{op_frac} | {r.note} |")
    return "\n".join(lines)


def parse_ints(text):
    return [int(float(v)) for v in text.split(",") if v]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="target")
    p.add_argument("--sizes", type=parse_ints, help="N values, e.g. 1e3,5e4,1e6")
    p.add_argument("--hidden", type=parse_ints, help="H values, e.g. 32,64,128")
    p.add_argument("--layers", type=parse_ints, help="L values, e.g. 2,3")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--path", default="z,loss",
                   help="z (the op on its inputs), loss (csm_loss through an EnergyHead, "
                        "projection included), or both: z,loss")
    p.add_argument("--context", type=int, default=None,
                   help="K, the context width of the loss path (default: H)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--activation", default="softplus", choices=list(ops.ACTIVATIONS))
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--budget", type=float, default=60.0,
                   help="seconds one method may spend timing one configuration")
    p.add_argument("--memory", choices=["none", "eager", "all"], default="eager",
                   help="peak memory: none, all but the compiled methods (CPU), or all")
    p.add_argument("--out", type=Path, default=None, help="JSON output path")
    a = p.parse_args(argv)

    device = torch.device(a.device)
    dtype = getattr(torch, a.dtype)
    if a.sizes or a.hidden or a.layers:
        configs = [(N, H, L) for L in (a.layers or [2]) for H in (a.hidden or [64])
                   for N in (a.sizes or [50_000])]
    else:
        configs = PRESETS[a.preset]
    methods = [m for m in a.methods.split(",") if m]
    unknown = set(methods) - set(METHODS)
    if unknown:
        p.error(f"--methods: unknown {sorted(unknown)}; choose from {METHODS}")
    if methods[0] != "fused":
        methods = ["fused"] + [m for m in methods if m != "fused"]
    memory = None if a.memory == "none" else a.memory
    paths = [q for q in a.path.split(",") if q]
    if not paths or set(paths) - set(PATHS):
        p.error(f"--path: choose from {PATHS} (comma-separated); got {a.path!r}")
    if a.context is not None and a.context < 1:
        p.error(f"--context must be >= 1; got {a.context}")

    info = machine_info(device)
    matmul = matmul_rate(device, dtype)
    info["matmul_gflops"] = matmul / 1e9
    print(f"# {info.get('gpu', info.get('cpu'))}, {info['threads']} threads, torch "
          f"{info['torch']}; measured {a.dtype} matmul {matmul / 1e9:.0f} GFLOP/s")
    print(f"# {' '.join(sys.argv)}")
    rows = []
    for path, (N, H, L) in [(q, c) for q in paths for c in configs]:
        t0 = time.perf_counter()
        new = run_config(N, H, L, methods, device, dtype, a.activation, a.repeats, a.budget,
                         memory, matmul, path, a.context or H)
        rows += new
        print(table(new).split("\n", 2)[2] if rows != new else table(new), flush=True)
        print(f"#   ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    result = {"machine": info, "args": {k: str(v) for k, v in vars(a).items()},
              "dtype": a.dtype, "activation": a.activation,
              "rows": [asdict(r) for r in rows]}
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=1))
        print(f"# wrote {a.out}")
    return result


if __name__ == "__main__":
    main()
