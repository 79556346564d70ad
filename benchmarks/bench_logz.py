"""Benchmark of the quadrature op head_logz: the fused op against the pure-PyTorch reference.

Methods (same head, same inputs, one run, so the ratios hold on a noisy machine):
  fused      csm_ext.ops.head_logz (this package: (element, node) rows in chunks, nothing
             N×G×H stored, the backward recomputes the node energies)
  reference  csm_ext.reference.head_logz_ref (the head on an (N, G, H) tensor, then
             torch.logsumexp; autograd backward)

For each number of nodes G: forward time (log Z, no grad) and forward+backward time (the mean
log Z and its gradients for z and every head weight), medians with the interquartile range, the
peak extra memory of one forward+backward step, the row rate (N·G per second) and speedups of the
fused op. Both methods' loss and gradients are checked against the reference in float64 (on the
first 4,096 elements) before anything is timed; a method that runs out of memory or past its time budget is reported as such.

  python benchmarks/bench_logz.py --device cuda --out results.json   # N = 784·64, G 64,256,1024
  python benchmarks/bench_logz.py --n 2000 --nodes 17,65 --repeats 5  # a quick CPU run
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from csm_ext import ops, quadrature, reference
from csm_ext.bench.memory import peak_extra_rss, probe_env
from csm_ext.bench.timing import fmt_bytes, fmt_time, machine_info, sync, time_it

METHODS = ("fused", "reference")
SUPPORT = (-4.0, 4.0)
ALPHA = 0.1


def make_inputs(N, H, L, G, dtype, device, seed=0):
    """(z, u, W, b, w) and the Gauss-Legendre rule with G nodes on SUPPORT."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype=dtype, device=device)

    weights = [rnd(N, H), rnd(H), rnd(L - 1, H, H, scale=H ** -0.5), rnd(L - 1, H, scale=0.5),
               rnd(H, scale=H ** -0.5)]
    t, lw = quadrature.rule(SUPPORT, G, "gauss-legendre", dtype, device)
    return weights, t, lw


def logz_fn(method):
    return {"fused": ops.head_logz, "reference": reference.head_logz_ref}[method]


def step(method, weights, t, lw, act, backward):
    """Forward (no grad) or forward+backward of the mean log Z; returns (loss, grads)."""
    fn = logz_fn(method)
    if not backward:
        with torch.no_grad():
            return fn(*weights, ALPHA, act, t, lw).mean(), None
    params = [a.detach().requires_grad_(True) for a in weights]
    loss = fn(*params, ALPHA, act, t, lw).mean()
    grads = torch.autograd.grad(loss, params)
    return loss.detach(), grads


VERIFY_N = 4096  # elements checked against the float64 reference before timing


def float64_reference(weights, t, lw, act):
    """The reference in float64 on the first VERIFY_N elements: (loss, grads). Correctness is
    judged against this, not against the other float32 method: summed over millions of rows,
    float32 reductions (the reference's matrix-vector product for grad w, say) lose digits."""
    sub = [weights[0][:VERIFY_N].double()] + [w.double() for w in weights[1:]]
    return step("reference", sub, t.double(), lw.double(), act, backward=True)


def verify(method, weights, t, lw, act, ref64, dtype):
    """``method`` on the first VERIFY_N elements matches the float64 reference, to 1e-10 of each
    quantity's scale in float64 and 1e-2 in float32: the float32 reference's grad w is a
    matrix-vector product over N·G rows that loses about three digits (the fused op sums per
    chunk and keeps about six)."""
    sub = [weights[0][:VERIFY_N]] + list(weights[1:])
    loss, grads = step(method, sub, t, lw, act, backward=True)
    rtol = 1e-2 if dtype == torch.float32 else 1e-10
    ok = torch.allclose(loss.double(), ref64[0], rtol=rtol,
                        atol=rtol * max(1.0, ref64[0].abs().item()))
    for g, r in zip(grads, ref64[1]):
        scale = max(1.0, r.abs().max().item()) if r.numel() else 1.0
        ok &= torch.allclose(g.double(), r, rtol=rtol, atol=rtol * scale)
    return bool(ok)


# ----------------------------------------------------------------------------- memory
def peak_memory_cuda(method, weights, t, lw, act):
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step(method, weights, t, lw, act, backward=True)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def _memory_child(method, N, H, L, G, dtype, act):
    """Runs in a fresh process: peak resident memory of one step beyond the inputs."""
    weights, t, lw = make_inputs(N, H, L, G, getattr(torch, dtype), torch.device("cpu"))
    peak = peak_extra_rss(lambda: step(method, weights, t, lw, act, backward=True))
    print(json.dumps({"peak_extra_bytes": peak}))


def peak_memory_cpu(method, N, H, L, G, dtype, act):
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import bench_logz; "
            f"bench_logz._memory_child({method!r}, {N}, {H}, {L}, {G}, {dtype!r}, {act!r})")
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
    G: int
    method: str
    fwd_s: float | None = None
    fwd_iqr_s: float | None = None
    fwdbwd_s: float | None = None
    fwdbwd_iqr_s: float | None = None
    peak_bytes: int | None = None
    mrows_per_s_fwdbwd: float | None = None
    note: str = ""
    speedup: dict = field(default_factory=dict)


def run_config(N, H, L, G, methods, device, dtype, act, repeats, budget_s, memory):
    weights, t, lw = make_inputs(N, H, L, G, dtype, device)
    ref64 = float64_reference(weights, t, lw, act)
    rows = []
    for method in methods:
        row = Row(N, H, L, G, method)
        rows.append(row)
        try:
            if not verify(method, weights, t, lw, act, ref64, dtype):
                row.note = "MISMATCH vs the float64 reference"
                continue
            t_probe = time.perf_counter()
            step(method, weights, t, lw, act, backward=True)
            sync(device)
            t_probe = time.perf_counter() - t_probe
            reps = repeats
            if t_probe * (repeats + 1) * 2 > budget_s:
                if t_probe * 4 > budget_s:
                    row.note = f"over budget ({t_probe:.1f} s/step)"
                    continue
                reps = max(3, int(budget_s / (2 * t_probe)) - 1)
            row.fwd_s, row.fwd_iqr_s = time_it(
                lambda: step(method, weights, t, lw, act, False), device, reps, 1)
            row.fwdbwd_s, row.fwdbwd_iqr_s = time_it(
                lambda: step(method, weights, t, lw, act, True), device, reps, 1)
            row.mrows_per_s_fwdbwd = N * G / row.fwdbwd_s / 1e6
            if memory:
                if device.type == "cuda":
                    row.peak_bytes = peak_memory_cuda(method, weights, t, lw, act)
                else:
                    row.peak_bytes = peak_memory_cpu(method, N, H, L, G,
                                                     str(dtype).split(".")[1], act)
        except torch.cuda.OutOfMemoryError:
            row.note = "out of memory"
        except Exception as exc:  # report, do not hide: the row says what failed
            if "out of memory" in str(exc).lower():
                row.note = "out of memory"
            else:
                row.note = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
    fused = rows[0]
    for row in rows:
        for key in ("fwd_s", "fwdbwd_s", "peak_bytes"):
            a, b = getattr(row, key), getattr(fused, key)
            if a and b:
                row.speedup[key] = a / b
    return rows


def table(rows):
    lines = ["| N | H | L | G | method | fwd (± IQR) | fwd+bwd (± IQR) | vs fused | peak mem "
             "| mem vs fused | Mrows/s | note |", "|" + "---|" * 12]
    for r in rows:
        sp = r.speedup.get("fwdbwd_s")
        mem = r.speedup.get("peak_bytes")
        lines.append(
            f"| {r.N:,} | {r.H} | {r.L} | {r.G} | {r.method} | {fmt_time(r.fwd_s)} "
            f"(± {fmt_time(r.fwd_iqr_s)}) | {fmt_time(r.fwdbwd_s)} "
            f"(± {fmt_time(r.fwdbwd_iqr_s)}) | "
            f"{'-' if sp is None else f'{sp:.2f}×'} | {fmt_bytes(r.peak_bytes)} | "
            f"{'-' if mem is None else f'{mem:.2f}×'} | "
            f"{'-' if r.mrows_per_s_fwdbwd is None else f'{r.mrows_per_s_fwdbwd:.1f}'} | "
            f"{r.note} |")
    return "\n".join(lines)


def parse_ints(text):
    return [int(float(v)) for v in text.split(",") if v]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=lambda v: int(float(v)), default=784 * 64,
                   help="elements N (default 784·64: an MNIST batch of 64 images)")
    p.add_argument("--nodes", type=parse_ints, default=[64, 256, 1024], help="G values")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--activation", default="softplus", choices=list(ops.ACTIVATIONS))
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--budget", type=float, default=30.0,
                   help="seconds one method may spend timing one configuration")
    p.add_argument("--memory", choices=["none", "all"], default="all")
    p.add_argument("--out", type=Path, default=None, help="JSON output path")
    a = p.parse_args(argv)

    device = torch.device(a.device)
    dtype = getattr(torch, a.dtype)
    methods = [m for m in a.methods.split(",") if m]
    unknown = set(methods) - set(METHODS)
    if unknown:
        p.error(f"--methods: unknown {sorted(unknown)}; choose from {METHODS}")
    methods = ["fused"] + [m for m in methods if m != "fused"]
    if any(G < 2 for G in a.nodes):
        p.error("--nodes: every G must be >= 2")

    info = machine_info(device)
    print(f"# {info.get('gpu', info.get('cpu'))}, {info['threads']} threads, torch "
          f"{info['torch']}, {a.dtype}, {a.activation}")
    print(f"# {' '.join(sys.argv)}")
    rows = []
    for G in a.nodes:
        t0 = time.perf_counter()
        new = run_config(a.n, a.hidden, a.layers, G, methods, device, dtype, a.activation,
                         a.repeats, a.budget, a.memory != "none")
        rows += new
        print(table(new).split("\n", 2)[2] if rows != new else table(new), flush=True)
        print(f"#   ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    result = {"machine": info, "args": {k: str(v) for k, v in vars(a).items()},
              "dtype": a.dtype, "activation": a.activation, "rows": [asdict(r) for r in rows]}
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=1))
        print(f"# wrote {a.out}")
    return result


if __name__ == "__main__":
    main()
