"""Training-step benchmark of PixelCNN++-CSM: fused vs autograd head backend, and where the time
goes (backbone vs head).

For each head backend ("fused": the csm_ext kernels; "autograd": double backward through the
plain energy) it reports, as medians with the interquartile range over the repeats:

* the full training step (backbone + channel mask + head + CSM loss + backward + Adam);
* its split: the context network (forward, and backward from a given context gradient) and the
  head (jets + loss forward, and backward to the contexts and the head's weights), timed
  separately on the same batch, so ``head share = head / (backbone + head)``;
* the peak extra memory of one training step (CUDA: the allocator's peak; CPU: the rise of the
  process's peak resident set, VmHWM, in a fresh process), and the bytes autograd saves for the
  backward pass, split backbone vs head (exact, independent of the machine's load);
* optionally (``--sampling``) the Langevin sampling time per image.

Presets: ``small`` (default on CPU: MNIST size 1×28×28, nr_resnet 1, nr_filters 32, batch 16)
and ``standard`` (default on CUDA: 3×32×32, nr_resnet 5, nr_filters 160, batch 16).

    python benchmarks/bench_train_pixelcnnpp.py
    python benchmarks/bench_train_pixelcnnpp.py --device cuda --preset standard --out out.json

On a shared machine pin the thread count (``--threads 1``): oversubscribed OpenMP threads make
small convolutions many times slower.
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
from csm_ext.bench.timing import median_iqr
from csm_ext.loss import csm_loss
from csm_ext.models.pixelcnnpp import PixelCNNppCSM

PRESETS = {
    "small": dict(shape=(1, 28, 28), nr_resnet=1, nr_filters=32, context_dim=16, head_hidden=64,
                  head_layers=2, batch=16),
    "standard": dict(shape=(3, 32, 32), nr_resnet=5, nr_filters=160, context_dim=32,
                     head_hidden=64, head_layers=2, batch=16),
    "smoke": dict(shape=(3, 6, 5), nr_resnet=1, nr_filters=4, context_dim=2, head_hidden=4,
                  head_layers=2, batch=2),
}


def make(cfg, backend, device):
    torch.manual_seed(0)
    C, H, W = cfg["shape"]
    m = PixelCNNppCSM(C, H, W, nr_resnet=cfg["nr_resnet"], nr_filters=cfg["nr_filters"],
                      context_dim=cfg["context_dim"], head_hidden=cfg["head_hidden"],
                      head_layers=cfg["head_layers"], backend=backend)
    return m.to(device)


def batch(cfg, device):
    g = torch.Generator().manual_seed(1)
    return (torch.rand(cfg["batch"], *cfg["shape"], generator=g) * 2 - 1).to(device)


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def step_fn(cfg, backend, device):
    m = make(cfg, backend, device)
    opt = torch.optim.Adam(m.parameters(), lr=1e-4)
    x = batch(cfg, device)

    def step():
        loss = m.loss(x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    return m, x, step


def timed(fn, device):
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t, out


def time_backends(cfg, backends, device, repeats, warmup):
    """Step times and the backbone/head split (seconds) per backend. The backends take turns
    inside every repeat, so load from other processes hits them alike."""
    runs = {b: step_fn(cfg, b, device) for b in backends}
    for m, x, step in runs.values():
        for _ in range(warmup):
            step()
    ts = {b: {k: [] for k in ("step", "backbone_fwd", "backbone_bwd", "head_fwd", "head_bwd")}
          for b in backends}
    for _ in range(repeats):
        for b, (m, x, step) in runs.items():
            t = ts[b]
            t["step"].append(timed(step, device)[0])
            # The split: the same computation cut at the contexts.
            m.zero_grad(set_to_none=True)
            dt, ctx = timed(lambda: m.context(x), device)
            t["backbone_fwd"].append(dt)
            leaf = ctx.detach().requires_grad_(True)
            dt, loss = timed(lambda: csm_loss(m.head, leaf, x), device)
            t["head_fwd"].append(dt)
            t["head_bwd"].append(timed(lambda: loss.backward(), device)[0])
            t["backbone_bwd"].append(timed(lambda: ctx.backward(leaf.grad), device)[0])
    out = {}
    for b in backends:
        r = {}
        for name, vals in ts[b].items():
            r[name + "_s"], r[name + "_iqr_s"] = median_iqr(vals)
        r["backbone_s"] = r["backbone_fwd_s"] + r["backbone_bwd_s"]
        r["head_s"] = r["head_fwd_s"] + r["head_bwd_s"]
        r["head_share"] = r["head_s"] / (r["head_s"] + r["backbone_s"])
        out[b] = r
    return out


def saved_bytes(cfg, backend, device):
    """Bytes autograd keeps for the backward pass (parameters excluded), for the context network
    and for the head + loss: exact and load-independent, unlike resident-memory peaks."""
    m = make(cfg, backend, device)
    x = batch(cfg, device)
    params = {p.untyped_storage().data_ptr() for p in m.parameters()}

    def measure(fn):
        seen = {}

        def pack(t):
            st = t.untyped_storage()
            if st.data_ptr() not in params:
                seen[st.data_ptr()] = st.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fn()
        return out, sum(seen.values())

    ctx, bb = measure(lambda: m.context(x))
    leaf = ctx.detach().requires_grad_(True)
    _, hd = measure(lambda: csm_loss(m.head, leaf, x))
    return bb, hd




def memory_child(cfg, backend):
    """In a fresh process: the rise of peak RSS during one training step after warm-up."""
    _, _, step = step_fn(cfg, backend, "cpu")
    return peak_extra_rss(step)  # the warm-up step allocates optimizer state and caches


def peak_memory(cfg, backend, device, argv):
    if str(device).startswith("cuda"):
        _, _, step = step_fn(cfg, backend, device)
        step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    if not os.path.exists("/proc/self/clear_refs"):
        return None
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", backend] + list(argv)
    r = subprocess.run(cmd, capture_output=True, text=True, env=probe_env())
    if r.returncode != 0:
        raise RuntimeError(f"memory probe for {backend} failed:\n{r.stderr[-2000:]}")
    return int(r.stdout.strip().splitlines()[-1])


def time_sampling(cfg, backend, device, n, steps):
    m = make(cfg, backend, device).eval()
    t, _ = timed(lambda: m.sample(n, steps=steps, step_size=1e-3, anneal=10, clip=(-1, 1),
                                  progress=False), device)
    return t / n


def main(argv=None):
    """Run the benchmark (``argv``: the command-line arguments); returns the results dict."""
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="default: standard on CUDA, small on CPU")
    p.add_argument("--batch", type=int, default=None, help="override the preset's batch")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--backends", nargs="*", default=["fused", "autograd"])
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--sampling", action="store_true", help="also time Langevin sampling")
    p.add_argument("--sample-n", type=int, default=8)
    p.add_argument("--sample-steps", type=int, default=10, help="Langevin steps per dimension")
    p.add_argument("--out", "--json", dest="out", default=None,
                   help="write the results here (JSON)")
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = args.preset or ("standard" if args.device.startswith("cuda") else "small")
    cfg = dict(PRESETS[preset])
    if args.batch:
        cfg["batch"] = args.batch
    if args.memory_child:
        print(memory_child(cfg, args.memory_child))
        return None

    n_params = sum(p.numel() for p in make(cfg, "fused", "cpu").parameters())
    res = dict(machine=dict(platform=platform.platform(), processor=platform.processor(),
                            cpu_count=os.cpu_count(), threads=torch.get_num_threads(),
                            torch=torch.__version__, device=args.device,
                            gpu=torch.cuda.get_device_name() if args.device.startswith("cuda")
                            else None),
               preset=preset, config=cfg, params=n_params, backends={})
    C, H, W = cfg["shape"]
    print(f"PixelCNN++-CSM training step, preset {preset}: B={cfg['batch']} {C}x{H}x{W} "
          f"nr_resnet={cfg['nr_resnet']} nr_filters={cfg['nr_filters']} K={cfg['context_dim']} "
          f"head {cfg['head_hidden']}x{cfg['head_layers']} ({n_params:,} params), "
          f"{args.device}, {torch.get_num_threads()} threads")
    timings = time_backends(cfg, args.backends, args.device, args.repeats, args.warmup)
    for b in args.backends:
        r = timings[b]
        r["peak_extra_bytes"] = (None if args.no_memory
                                 else peak_memory(cfg, b, args.device, argv))
        r["saved_backbone_bytes"], r["saved_head_bytes"] = saved_bytes(cfg, b, args.device)
        if args.sampling:
            r["sample_s_per_image"] = time_sampling(cfg, b, args.device, args.sample_n,
                                                    args.sample_steps)
        res["backends"][b] = r
        mem = r["peak_extra_bytes"]
        print(f"  {b:9s} step {r['step_s'] * 1e3:8.1f} ms (IQR {r['step_iqr_s'] * 1e3:.1f})"
              + (f"  peak +{mem / 2**20:7.1f} MiB" if mem is not None else "")
              + f"  saved for backward: backbone {r['saved_backbone_bytes'] / 2**20:.1f} MiB, "
              f"head {r['saved_head_bytes'] / 2**20:.1f} MiB"
              + f"  | backbone {r['backbone_s'] * 1e3:7.1f} ms (fwd {r['backbone_fwd_s'] * 1e3:.1f}"
              f" + bwd {r['backbone_bwd_s'] * 1e3:.1f})  head {r['head_s'] * 1e3:6.1f} ms (fwd "
              f"{r['head_fwd_s'] * 1e3:.1f} + bwd {r['head_bwd_s'] * 1e3:.1f})  head share "
              f"{100 * r['head_share']:.1f}%"
              + (f"  sampling {r['sample_s_per_image']:.2f} s/image ({args.sample_steps} "
                 f"steps/dim)" if "sample_s_per_image" in r else ""))
    if "fused" in res["backends"] and "autograd" in res["backends"]:
        f, a = res["backends"]["fused"], res["backends"]["autograd"]
        res["speedup_step"] = a["step_s"] / f["step_s"]
        res["speedup_head"] = a["head_s"] / f["head_s"]
        msg = (f"  fused vs autograd: step {res['speedup_step']:.2f}x faster, head "
               f"{res['speedup_head']:.2f}x faster")
        res["saved_head_ratio"] = a["saved_head_bytes"] / max(1, f["saved_head_bytes"])
        msg += f", head keeps {res['saved_head_ratio']:.1f}x less for backward"
        if f["peak_extra_bytes"] and a["peak_extra_bytes"]:
            res["memory_ratio"] = a["peak_extra_bytes"] / f["peak_extra_bytes"]
            msg += f", {res['memory_ratio']:.2f}x less peak memory"
        print(msg)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(res, fh, indent=1)
    return res


if __name__ == "__main__":
    main()
