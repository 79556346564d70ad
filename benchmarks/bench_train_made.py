"""Training-step and sampling benchmark of MADE-CSM at MNIST size (B = 64, D = 784).

For each head backend ("fused": the csm_ext kernels; "autograd": double backward through the
plain energy) it times full training steps (context net + head + CSM loss + backward + Adam),
reports the median and interquartile range, and the peak extra memory of one step (CUDA: the
allocator's peak; CPU: the rise of the process's peak resident set, VmHWM, measured in a fresh
process). It then times per-dimension Langevin sampling and reports seconds per image.

    python benchmarks/bench_train_made.py
    python benchmarks/bench_train_made.py --device cuda --batch 256 --json out.json
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time

import torch

from csm_ext.bench.memory import peak_extra_rss, probe_env
from csm_ext.bench.timing import sync, time_it
from csm_ext.models import MADECSM


def make(args, backend):
    torch.manual_seed(0)
    m = MADECSM(args.dim, hidden_sizes=args.hidden, context_dim=args.context_dim,
                head_hidden=args.head_hidden, head_layers=args.head_layers, backend=backend)
    return m.to(args.device)


def step_fn(args, backend):
    m = make(args, backend)
    opt = torch.optim.Adam(m.parameters(), lr=1e-4)
    x = torch.rand(args.batch, args.dim, generator=torch.Generator().manual_seed(1)).to(args.device) * 2 - 1

    def step():
        loss = m.loss(x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    return m, step


def time_steps(args, backend):
    _, step = step_fn(args, backend)
    return time_it(step, args.device, args.repeats, args.warmup)




def memory_child(args, backend):
    """In a fresh process: the rise of peak RSS during one training step after warm-up."""
    _, step = step_fn(args, backend)
    return peak_extra_rss(step)  # the warm-up step allocates optimizer state and caches


def peak_memory(args, backend):
    if str(args.device).startswith("cuda"):
        _, step = step_fn(args, backend)
        step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    if not os.path.exists("/proc/self/clear_refs"):
        return None
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", backend] + sys.argv[1:]
    r = subprocess.run(cmd, capture_output=True, text=True, env=probe_env())
    if r.returncode != 0:
        raise RuntimeError(f"memory probe for {backend} failed:\n{r.stderr[-2000:]}")
    return int(r.stdout.strip().splitlines()[-1])


def time_sampling(args, backend):
    m = make(args, backend).eval()
    m.sample(2, steps=2, progress=False)  # warm up
    sync(args.device)
    t = time.perf_counter()
    m.sample(args.sample_n, steps=args.sample_steps, step_size=1e-3, anneal=10, clip=(-1, 1),
             progress=False)
    sync(args.device)
    return (time.perf_counter() - t) / args.sample_n


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=784)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--hidden", type=int, nargs="*", default=[512])
    p.add_argument("--context-dim", type=int, default=16)
    p.add_argument("--head-hidden", type=int, default=64)
    p.add_argument("--head-layers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--sample-n", type=int, default=16)
    p.add_argument("--sample-steps", type=int, default=20, help="Langevin steps per dimension")
    p.add_argument("--backends", nargs="*", default=["fused", "autograd"])
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--no-sampling", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_child:
        print(memory_child(args, args.memory_child))
        return

    res = dict(machine=dict(platform=platform.platform(), processor=platform.processor(),
                            threads=torch.get_num_threads(), torch=torch.__version__,
                            device=args.device,
                            gpu=torch.cuda.get_device_name() if args.device.startswith("cuda") else None),
               config={k: v for k, v in vars(args).items() if k not in ("json", "memory_child")},
               backends={})
    print(f"MADE-CSM training step: B={args.batch} D={args.dim} hidden={args.hidden} "
          f"K={args.context_dim} head {args.head_hidden}x{args.head_layers}, {args.device}, "
          f"{torch.get_num_threads()} threads")
    for b in args.backends:
        med, iqr = time_steps(args, b)
        mem = None if args.no_memory else peak_memory(args, b)
        r = dict(step_s=med, step_iqr_s=iqr, peak_extra_bytes=mem)
        if not args.no_sampling:
            r["sample_s_per_image"] = time_sampling(args, b)
        res["backends"][b] = r
        print(f"  {b:9s} step {med * 1e3:8.1f} ms (IQR {iqr * 1e3:.1f})"
              + (f"  peak +{mem / 2**20:7.1f} MiB" if mem is not None else "")
              + (f"  sampling {r['sample_s_per_image']:.2f} s/image ({args.sample_steps} steps/dim)"
                 if "sample_s_per_image" in r else ""))
    if "fused" in res["backends"] and "autograd" in res["backends"]:
        f, a = res["backends"]["fused"], res["backends"]["autograd"]
        res["speedup_step"] = a["step_s"] / f["step_s"]
        msg = f"  fused vs autograd: step {res['speedup_step']:.2f}x faster"
        if f["peak_extra_bytes"] and a["peak_extra_bytes"]:
            res["memory_ratio"] = a["peak_extra_bytes"] / f["peak_extra_bytes"]
            msg += f", {res['memory_ratio']:.2f}x less peak memory"
        print(msg)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
