"""The ``csm-ext`` command line: ``train``, ``sample`` and ``demo``.

    csm-ext demo                                   # MNIST 5k, a few minutes on 2 CPU cores
    csm-ext train --data toy:8gaussians --steps 3000 --out runs/8g
    csm-ext sample --ckpt runs/8g/last.pt --n 1000 --out runs/8g/more.png
    torchrun --nproc_per_node 2 -m csm_ext train --data mnist5k ...   # DistributedDataParallel
"""
import argparse
import json
import os
import platform
import sys
import time

import torch

# The demo's settings: MADE-CSM on the embedded MNIST 5k, sized for ~3-5 minutes on 2 CPU cores.
DEMO = dict(
    data="mnist5k", sigma=0.5, logit=None, range=(-1.0, 1.0),
    hidden=(512,), context_dim=16, head_hidden=64, head_layers=2, activation="softplus",
    confine=0.01, direct=False,
    steps=1000, batch_size=64, lr=3e-3, warmup=50, grad_clip=1.0, ema=0.99,
    n_samples=36, sample_steps=200, step_size=None, anneal=30.0, temperature=0.7,
)


def _add_model_args(p, d):
    g = p.add_argument_group("model")
    g.add_argument("--model", default="made", choices=["made", "pixelcnnpp"],
                   help="context network: MADE (any data) or PixelCNN++ (images)")
    g.add_argument("--hidden", type=int, nargs="*", default=list(d["hidden"]),
                   help="MADE hidden layer widths (default: %(default)s)")
    g.add_argument("--context-dim", type=int, default=d["context_dim"], help="K context features per dimension")
    g.add_argument("--head-hidden", type=int, default=d["head_hidden"], help="energy head width H")
    g.add_argument("--head-layers", type=int, default=d["head_layers"], help="energy head hidden layers L")
    g.add_argument("--activation", default=d["activation"], choices=["softplus", "tanh", "silu"])
    g.add_argument("--confine", type=float, default=d["confine"], help="confinement alpha (E += alpha x^2/2)")
    g.add_argument("--order", default="natural", help="'natural', 'random' (autoregressive order)")
    g.add_argument("--direct", action="store_true", default=d["direct"],
                   help="direct masked input->context connections")
    g.add_argument("--backend", default="fused", choices=["fused", "autograd"], help="energy head jets")
    g.add_argument("--nr-resnet", type=int, default=1,
                   help="pixelcnnpp: gated resnet blocks per resolution (paper: 5)")
    g.add_argument("--nr-filters", type=int, default=32,
                   help="pixelcnnpp: feature channels of both streams (paper: 160)")
    g.add_argument("--dropout", type=float, default=0.0, help="pixelcnnpp: dropout in the resnet blocks")


def _add_data_args(p, d):
    g = p.add_argument_group("data")
    g.add_argument("--data", default=d["data"],
                   help="mnist5k | digits | mnist:DIR | fashion-mnist:DIR | cifar10:DIR | toy:NAME | gaussian[:D]")
    g.add_argument("--sigma", type=float, default=d["sigma"], help="Gaussian smoothing noise (images, model space)")
    g.add_argument("--logit", type=float, default=d["logit"], help="logit transform with this lambda (images)")
    g.add_argument("--range", type=float, nargs=2, default=list(d["range"]), metavar=("LO", "HI"),
                   help="affine range of image intensities (without --logit)")
    g.add_argument("--limit", type=int, default=None, help="use only this many training images")
    g.add_argument("--test-fraction", type=float, default=0.1)


def _add_sample_args(p, d, n_default):
    g = p.add_argument_group("sampling (per-dimension Langevin)")
    g.add_argument("--n-samples", "--n", dest="n_samples", type=int, default=n_default)
    g.add_argument("--sample-steps", type=int, default=d["sample_steps"], help="Langevin steps per dimension")
    g.add_argument("--step-size", type=float, default=d["step_size"],
                   help="final Langevin step size (default: 0.05·sigma² for smoothed images, else 0.01)")
    g.add_argument("--anneal", type=float, default=d["anneal"], help="first/last step size ratio")
    g.add_argument("--temperature", type=float, default=d["temperature"],
                   help="sample each conditional at q^(1/T) (1: the model itself)")
    g.add_argument("--init", default=None, choices=["uniform", "normal", "zeros"], help="chain start")
    g.add_argument("--no-denoise", action="store_true", help="skip the final Tweedie step")


def _add_train_args(p, d):
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, default=d["steps"])
    g.add_argument("--batch-size", type=int, default=d["batch_size"], help="per process")
    g.add_argument("--lr", type=float, default=d["lr"])
    g.add_argument("--schedule", default="cosine", choices=["cosine", "constant"])
    g.add_argument("--warmup", type=int, default=d["warmup"])
    g.add_argument("--grad-clip", type=float, default=d["grad_clip"])
    g.add_argument("--ema", type=float, default=d["ema"], help="EMA decay (0: off)")
    g.add_argument("--log-every", type=int, default=25)
    g.add_argument("--eval-every", type=int, default=0)
    g.add_argument("--ckpt-every", type=int, default=0)
    g.add_argument("--sample-every", type=int, default=0)
    g.add_argument("--time-limit", type=float, default=0.0, help="stop after this many seconds")
    g.add_argument("--resume", default=None, help="checkpoint to continue from")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--out", default=None, help="output directory (default runs/<data>)")
    g.add_argument("--no-progress", action="store_true")


def _sample_kwargs(a):
    kw = dict(steps=a.sample_steps, step_size=a.step_size, anneal=a.anneal, init=a.init,
              temperature=a.temperature)
    if a.no_denoise:
        kw["denoise"] = 0.0
    return kw


def _build_model(a, source):
    """The model named by ``--model``, sized for ``source``."""
    from .models import MADECSM, PixelCNNppCSM

    if a.model == "pixelcnnpp":
        if source.kind != "image":
            raise ValueError(f"--model pixelcnnpp needs image data; got --data {a.data}")
        C, H, W = source.shape
        return PixelCNNppCSM(C, H, W, nr_resnet=a.nr_resnet, nr_filters=a.nr_filters,
                             context_dim=a.context_dim, head_hidden=a.head_hidden,
                             head_layers=a.head_layers, activation=a.activation,
                             dropout=a.dropout, confine=a.confine, backend=a.backend)
    order = None if a.order == "natural" else a.order
    return MADECSM(source.dim, hidden_sizes=a.hidden, context_dim=a.context_dim,
                   head_hidden=a.head_hidden, head_layers=a.head_layers, activation=a.activation,
                   order=order, confine=a.confine, backend=a.backend, direct=a.direct, seed=a.seed)


def _run_training(a, title="train"):
    from .data.sources import make_source, source_from_spec
    from .train import TrainConfig, load_checkpoint, train

    if a.resume:  # model and data come from the checkpoint
        model, ck = load_checkpoint(a.resume, use_ema=False)
        source = make_source(ck["data_config"])
    else:
        source = source_from_spec(a.data, sigma=a.sigma, logit=a.logit, range=tuple(a.range),
                                  test_fraction=a.test_fraction, seed=a.seed, limit=a.limit)
        model = _build_model(a, source)
    model.backend = a.backend
    out = a.out or os.path.join("runs", a.data.replace(":", "_").replace("/", "_"))
    cfg = TrainConfig(steps=a.steps, batch_size=a.batch_size, lr=a.lr, lr_schedule=a.schedule,
                      warmup=a.warmup, grad_clip=a.grad_clip, ema=a.ema, log_every=a.log_every,
                      eval_every=a.eval_every, ckpt_every=a.ckpt_every, sample_every=a.sample_every,
                      n_samples=a.n_samples, sample_kwargs=_sample_kwargs(a), time_limit=a.time_limit,
                      seed=a.seed, device=a.device, out_dir=out, progress=not a.no_progress)
    summary = train(model, source, cfg, resume=a.resume)
    summary.update(out_dir=out, data=source.describe(),
                   params=sum(p.numel() for p in model.parameters()))
    if int(os.environ.get("RANK", "0")) == 0:
        with open(os.path.join(out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
    return model, source, cfg, summary


def cmd_train(a):
    _, _, _, summary = _run_training(a)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary, indent=1))


def cmd_sample(a):
    import numpy as np

    from . import plots
    from .data.sources import make_source
    from .train import default_step_size, load_checkpoint

    model, ckpt = load_checkpoint(a.ckpt, map_location=a.device, use_ema=not a.no_ema)
    model.to(a.device).eval()
    model.backend = a.backend
    source = make_source(ckpt["data_config"])
    kw = dict(clip=source.clip, denoise=source.sigma, progress=not a.no_progress,
              step_size=default_step_size(source),
              generator=torch.Generator(device=a.device).manual_seed(a.seed))
    kw.update({k: v for k, v in _sample_kwargs(a).items() if v is not None})
    t = time.time()
    x = model.sample(a.n_samples, **kw)
    dt = time.time() - t
    out = a.out or os.path.join(os.path.dirname(a.ckpt) or ".", "samples.png")
    if out.endswith(".npz"):
        np.savez(out, samples=x.cpu().numpy(), display=source.to_display(x).numpy())
    elif source.kind == "image":
        plots.save_image_grid(source.to_display(x), out)
    elif source.dim == 2:
        plots.save_scatter(x, out, reference=source.test[: a.n_samples], lim=source.clip)
    else:
        raise ValueError(f"--out must end in .npz for {source.kind} data; got {out!r}")
    print(f"wrote {out}: {a.n_samples} samples in {dt:.1f}s ({dt / max(1, a.n_samples):.3f}s each)")


def _write_demo_report(path, a, summary, cfg, source):
    from .train import default_step_size

    step = a.step_size or default_step_size(source)
    lines = [
        "# csm-ext demo: MADE-CSM on MNIST 5k",
        "",
        f"- data: {summary['data']}; {a.test_fraction:.0%} held out",
        f"- model: MADE hidden {a.hidden}, context K={a.context_dim}, energy head H={a.head_hidden} "
        f"x L={a.head_layers} ({a.activation}), confine {a.confine}, backend {a.backend}; "
        f"{summary['params']:,} parameters",
        f"- training: {summary['steps']} steps of batch {a.batch_size}, Adam lr {a.lr} "
        f"(warmup {a.warmup}, cosine), grad clip {a.grad_clip}, EMA {a.ema}; "
        f"{summary['train_time']:.0f} s on {torch.get_num_threads()} CPU thread(s), "
        f"{platform.processor() or platform.machine()}"
        + (" (stopped early by the time limit)" if summary.get("stopped_early") else ""),
        f"- final train loss {summary['final_train_loss']:.2f}, test loss {summary['test_loss']:.2f} "
        "(CSM loss per image, model space; lower is better, unbounded below)",
        f"- sampling: per-dimension Langevin, {a.sample_steps} steps per pixel, step size "
        f"{step:g} annealed from {step * a.anneal:g}, then the Tweedie denoising step "
        f"x + σ²·s(x); conditionals sampled at temperature {a.temperature}; "
        f"{a.n_samples} images in {summary.get('sample_time', float('nan')):.0f} s",
        "",
        "![samples](samples.png)",
        "",
        "![loss](loss.png)",
        "",
    ]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def cmd_demo(a):
    t0 = time.time()
    model, source, cfg, summary = _run_training(a, "demo")
    summary["total_time"] = time.time() - t0
    if int(os.environ.get("RANK", "0")) == 0:
        _write_demo_report(os.path.join(cfg.out_dir, "report.md"), a, summary, cfg, source)
        print(f"demo done in {summary['total_time']:.0f} s: {cfg.out_dir}/samples.png, "
              f"{cfg.out_dir}/loss.png, {cfg.out_dir}/report.md")


def build_parser():
    p = argparse.ArgumentParser(prog="csm-ext", description="Autoregressive score matching (AR-CSM)")
    sub = p.add_subparsers(dest="command", required=True)

    plain = dict(DEMO, temperature=1.0)  # train/sample: the model's own conditionals by default
    t = sub.add_parser("train", help="train MADE-CSM or PixelCNN++-CSM (--model) on a data set")
    _add_data_args(t, plain)
    _add_model_args(t, plain)
    _add_train_args(t, plain)
    _add_sample_args(t, plain, 64)
    t.set_defaults(fn=cmd_train)

    s = sub.add_parser("sample", help="sample from a checkpoint to PNG or .npz")
    s.add_argument("--ckpt", required=True)
    s.add_argument("--out", default=None, help="output .png or .npz (default: beside the checkpoint)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default="cpu")
    s.add_argument("--backend", default="fused", choices=["fused", "autograd"])
    s.add_argument("--no-ema", action="store_true", help="use the raw weights, not the EMA")
    s.add_argument("--no-progress", action="store_true")
    _add_sample_args(s, plain, 64)
    s.set_defaults(fn=cmd_sample)

    d = sub.add_parser("demo", help="train MADE-CSM on the embedded MNIST 5k (a few minutes) "
                                    "and write samples, a loss curve and a report under runs/demo")
    _add_data_args(d, DEMO)
    _add_model_args(d, DEMO)
    _add_train_args(d, DEMO)
    _add_sample_args(d, DEMO, DEMO["n_samples"])
    d.set_defaults(fn=cmd_demo, out="runs/demo", eval_every=250)

    b = sub.add_parser("bench", help="run a packaged benchmark (scaling: score-matching "
                                     "methods as D grows)")
    b.add_argument("name", choices=["scaling"], help="which benchmark")
    b.add_argument("bench_args", nargs=argparse.REMAINDER,
                   help="arguments of the benchmark (see `csm-ext bench scaling --help`)")
    b.set_defaults(fn=cmd_bench)
    return p


def cmd_bench(a):
    from .bench import scaling

    {"scaling": scaling.main}[a.name](a.bench_args)


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"csm-ext: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
