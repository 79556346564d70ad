"""Training loop for AR-CSM models: Adam, warmup + cosine learning rate, gradient clipping,
optional EMA of the weights, a tqdm bar with the loss, metrics as JSONL, checkpoints that carry
the model and data configs (save / load / resume), sample grids and loss curves as PNG.

Runs unchanged under ``torchrun``: when ``WORLD_SIZE > 1`` it joins the process group (gloo on
CPU, nccl on CUDA), wraps the model in DistributedDataParallel, draws different batches on each
rank, and lets rank 0 alone write files. At the end it checks that all replicas hold identical
weights (``replica_max_abs_diff`` in the summary and the metrics).
"""
import copy
import json
import math
import os
import pickle
import re
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .models import MADECSM, MADEMixture, PixelCNNppCSM, PixelCNNppMixture

# Energy models (CSM / MLE / hybrid) and the maximum-likelihood mixture baselines.
MODELS = {"made": MADECSM, "pixelcnnpp": PixelCNNppCSM, "made-mog": MADEMixture,
          "pixelcnnpp-logistic": PixelCNNppMixture}
CHECKPOINT_FORMAT = "csm_ext/1"


class NonFiniteLossError(RuntimeError):
    """Training diverged (the message says what to change); the CLI reports it as an error."""


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping settings (all saved in checkpoints)."""

    steps: int = 1000            # total optimizer steps (the schedule spans these)
    batch_size: int = 64         # per process
    lr: float = 1e-3
    lr_schedule: str = "cosine"  # "cosine" (to min_lr_ratio·lr) or "constant", after warmup
    warmup: int = 0              # linear warmup steps
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    grad_clip: float = 1.0       # max global grad norm; 0 disables
    ema: float = 0.0             # EMA decay of the weights (e.g. 0.999); 0 disables
    log_every: int = 50          # metrics line every this many steps
    eval_every: int = 0          # test loss every this many steps (0: only at the end)
    ckpt_every: int = 0          # checkpoint every this many steps (0: only at the end)
    sample_every: int = 0        # sample grid every this many steps (0: only at the end)
    n_samples: int = 64          # samples in the final figure
    sample_kwargs: dict = field(default_factory=dict)  # passed to model.sample
    time_limit: float = 0.0      # stop after this many seconds (0: no limit)
    seed: int = 0
    device: str = "cpu"
    out_dir: str = "runs/train"
    progress: bool = True

    def __post_init__(self):
        for name in ("steps", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0; got {self.lr}")
        if self.lr_schedule not in ("cosine", "constant"):
            raise ValueError(f"lr_schedule must be 'cosine' or 'constant'; got {self.lr_schedule!r}")
        if not 0 <= self.ema < 1:
            raise ValueError(f"ema must be in [0, 1); got {self.ema}")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0; got {self.grad_clip}")
        if int(self.n_samples) < 0:
            raise ValueError(f"n_samples must be >= 0; got {self.n_samples}")


def lr_factor(step, cfg):
    """Multiplier of cfg.lr at ``step``: linear warmup, then constant or cosine decay."""
    if cfg.warmup and step < cfg.warmup:
        return (step + 1) / cfg.warmup
    if cfg.lr_schedule == "constant":
        return 1.0
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


class EMA:
    """Exponential moving average of a model's floating-point parameters and buffers."""

    def __init__(self, model, decay):
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model):
        for e, p in zip(self.model.state_dict().values(), model.state_dict().values()):
            if e.dtype.is_floating_point:
                e.lerp_(p, 1 - self.decay)
            else:
                e.copy_(p)


# ---------------------------------------------------------------- checkpoints


def build_model(name, config):
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name].from_config(config)


def model_name(model):
    for k, cls in MODELS.items():
        if type(model) is cls:
            return k
    raise ValueError(f"model class {type(model).__name__} is not registered in csm_ext.train.MODELS")


def save_checkpoint(path, model, data_config=None, optimizer=None, ema=None, step=0,
                    train_config=None, generator=None, extra=None, rng_state=None):
    """Write a checkpoint that :func:`load_checkpoint` can rebuild without other information.

    It holds the model's config and ``state_dict`` (parameters and the small persistent
    buffers; the masks are rebuilt from the config), the EMA weights and the optimizer state when
    given, the step, the training config (with the sampling settings, ``sample_kwargs``), the
    data config, the batch generator's state and ``rng_state`` (the global torch RNG, which
    dropout draws from)."""
    ckpt = dict(format=CHECKPOINT_FORMAT, model_name=model_name(model), model_config=model.config,
                model=model.state_dict(), ema=None if ema is None else ema.model.state_dict(),
                optimizer=None if optimizer is None else optimizer.state_dict(), step=step,
                train_config=None if train_config is None else asdict(train_config),
                data_config=data_config,
                generator=None if generator is None else generator.get_state(),
                torch_rng=rng_state, extra=extra or {})
    tmp = path + ".tmp"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def _unreadable_reason(e):
    """Why torch.load failed, in a few words (never torch's advice to load unsafely)."""
    name = type(e).__name__
    msg = str(e)
    if isinstance(e, EOFError):
        return f"empty or truncated file: {name}"
    if isinstance(e, RuntimeError) and ("zip archive" in msg or "PytorchStreamReader" in msg):
        return f"truncated or not a torch file: {name}"
    if isinstance(e, pickle.UnpicklingError):
        m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", msg)
        if m:  # a torch file with pickled Python objects, which csm_ext checkpoints never hold
            return f"it holds a pickled Python object ({m.group(1)}), not only tensors and data"
        return f"not a torch file: {name}"
    return f"truncated or not a torch file: {name}"


def load_checkpoint(path, map_location="cpu", use_ema=True):
    """Rebuild the model of a checkpoint → ``(model, ckpt)``; the EMA weights when present and
    ``use_ema``. ``ckpt`` holds the rest (``data_config``, ``train_config``, ``step``, ...).

    Loads with ``weights_only=True``. A missing file raises FileNotFoundError; a file that is
    not a readable csm_ext checkpoint raises ValueError with a short reason (torch's exception
    is chained as ``__cause__``). Checkpoints of csm_ext 0.1.0, which also stored the masks,
    still load."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise ValueError(f"not a readable csm_ext checkpoint: {path} ({_unreadable_reason(e)})") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"not a csm_ext checkpoint (format {CHECKPOINT_FORMAT}): {path}")
    try:
        model = build_model(ckpt["model_name"], ckpt["model_config"])
        state = ckpt["ema"] if (use_ema and ckpt.get("ema") is not None) else ckpt["model"]
        model.load_state_dict(state)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        what = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
        if len(what) > 300:
            what = what[:297] + "..."
        raise ValueError(f"not a readable csm_ext checkpoint: {path} (its model does not load: "
                         f"{type(e).__name__}: {what})") from e
    return model, ckpt


# ---------------------------------------------------------------- distributed helpers


def _dist_setup(device):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, False
    if not dist.is_initialized():
        backend = "nccl" if str(device).startswith("cuda") else "gloo"
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size(), True


def _replica_max_abs_diff(model):
    """Max |w - w_rank0| over all parameters and ranks (0.0 when all replicas are identical)."""
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    ref = flat.clone()
    dist.broadcast(ref, 0)
    diff = (flat - ref).abs().max().reshape(1)
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return float(diff)


def _mean_across(x, distributed):
    t = torch.tensor([float(x)], dtype=torch.float64)
    if distributed:
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return float(t)


# ---------------------------------------------------------------- figures


def default_step_size(source):
    """Final Langevin step size: 0.05·σ² for data smoothed with noise σ, else 0.01."""
    return 0.05 * source.sigma ** 2 if source.sigma > 0 else 0.01


def save_samples(model, source, path, n=64, title=None, **sample_kwargs):
    """Sample n points from ``model`` and save a figure (image grid or 2-D scatter) → samples.
    Sampling defaults: clip to the data range, denoise with the data's σ, step size
    :func:`default_step_size`; ``sample_kwargs`` (None values ignored) override them (pass
    ``generator`` for reproducible samples)."""
    from . import plots

    kw = dict(clip=source.clip, denoise=source.sigma, step_size=default_step_size(source))
    kw.update({k: v for k, v in sample_kwargs.items() if v is not None})
    x = model.sample(n, **kw)
    if source.kind == "image":
        plots.save_image_grid(source.to_display(x), path, title=title)
    elif source.dim == 2:
        plots.save_scatter(x, path, reference=source.test[:n], lim=source.clip, title=title)
    return x


@torch.no_grad()
def evaluate(model, x, batch_size=500):
    """Mean per-sample training loss (the model's objective) over x (n, D)."""
    tot = 0.0
    for i in range(0, len(x), batch_size):
        tot += float(model.loss(x[i:i + batch_size], reduction="sum"))
    return tot / max(1, len(x))


@torch.no_grad()
def evaluate_likelihood(model, x, batch_size=100, nodes=None):
    """Held-out likelihood of a model with a support: ``nll_per_dim`` (nats), ``bits_per_dim``
    and the quadrature's accuracy on the same data (``quadrature_max_abs``: the worst
    |log Z_G − log Z_2G−1| of any element, nats; ``quadrature_max_per_sample``). x (n, D) in
    the model's space; the numbers are those of that space's density."""
    nll, worst, worst_sample = 0.0, 0.0, 0.0
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size]
        nll += float(-model.log_prob(xb, nodes).double().sum())
        err = model.quadrature_error(xb, nodes)
        worst, worst_sample = max(worst, err["max_abs"]), max(worst_sample, err["max_per_sample"])
    per_dim = nll / max(1, len(x)) / model.dim
    return dict(nll_per_dim=per_dim, bits_per_dim=per_dim / math.log(2.0),
                quadrature_nodes=err["nodes"] if len(x) else nodes,
                quadrature_max_abs=worst, quadrature_max_per_sample=worst_sample)


# ---------------------------------------------------------------- the loop


def _keep_metrics_until(path, step):
    """Drop the records of a metrics file that lie past ``step`` (resuming an earlier checkpoint)."""
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    keep = [line for line in lines if json.loads(line).get("step", 0) <= step]
    if len(keep) != len(lines):
        with open(path, "w") as f:
            f.writelines(keep)


def train(model, source, cfg, resume=None):
    """Train ``model`` on batches from ``source`` (see :mod:`csm_ext.data.sources`).

    Writes into ``cfg.out_dir``: ``metrics.jsonl``, ``last.pt`` (and ``step_N.pt`` with
    ``ckpt_every``), ``samples.png`` and ``loss.png``; existing files of those names are replaced
    (the ``csm-ext`` command line checks the folder first). ``resume``: a checkpoint path to
    continue from (model, EMA, optimizer, step, data RNG and global torch RNG); it must be at a
    step below ``cfg.steps``. Returns a summary dict.

    Reproducible: the batches come from a generator seeded with ``cfg.seed``, the global torch
    RNG (dropout) is seeded with it, and the sample figures use a generator seeded with it (so
    ``csm-ext sample`` of ``last.pt`` with the same seed and settings redraws ``samples.png``).
    The model's initial weights are the caller's: seed before building it.
    """
    rank, world, distributed = _dist_setup(cfg.device)
    device = torch.device(cfg.device)
    if device.type == "cuda" and distributed:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    main = rank == 0
    os.makedirs(cfg.out_dir, exist_ok=True)
    metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")

    torch.manual_seed(cfg.seed)  # the global RNG: dropout (the model was built by the caller)
    model.to(device)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank)  # different batches per rank
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start = 0
    if resume is not None:
        _, ck = load_checkpoint(resume, map_location=device, use_ema=False)
        start = int(ck["step"])
        if start >= cfg.steps:
            raise ValueError(f"the checkpoint {resume} is at step {start}, and steps is "
                             f"{cfg.steps}: nothing left to train; raise steps above {start} "
                             f"to continue")
        model.load_state_dict(ck["model"])
        if ck.get("optimizer") is not None:
            opt.load_state_dict(ck["optimizer"])
        if ck.get("generator") is not None and world == 1:
            gen.set_state(ck["generator"])
        else:
            gen.manual_seed(cfg.seed * 1000 + rank + 7919 * start)
        if ck.get("torch_rng") is not None and world == 1:
            torch.set_rng_state(ck["torch_rng"].cpu())
    ema = EMA(model, cfg.ema) if cfg.ema > 0 else None
    if ema is not None and resume is not None and ck.get("ema") is not None:
        ema.model.load_state_dict(ck["ema"])
    net = torch.nn.parallel.DistributedDataParallel(model) if distributed else model
    eval_model = ema.model if ema is not None else model
    data_config = source.config()

    def log(rec):
        if main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")

    def checkpoint(path, step):
        if main:
            save_checkpoint(path, model, data_config, opt, ema, step, cfg, gen,
                            rng_state=torch.get_rng_state())

    def sample_generator():  # every figure from the same seeded noise, apart from the model
        return torch.Generator(device=device).manual_seed(cfg.seed)

    if main and resume is None and os.path.exists(metrics_path):
        os.remove(metrics_path)
    elif main and os.path.exists(metrics_path):  # records past the checkpoint: a replaced segment
        _keep_metrics_until(metrics_path, start)
    t0 = time.time()
    window, step, last_loss = [], start, None
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="train",
               disable=not (main and cfg.progress), dynamic_ncols=True)
    for step in bar:
        model.train()
        for g in opt.param_groups:
            g["lr"] = cfg.lr * lr_factor(step, cfg)
        x = source.batch(cfg.batch_size, gen).to(device)
        loss = net(x)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"non-finite loss {float(loss.detach())} at step {step}: lower lr, raise grad "
                f"clipping or the smoothing noise sigma, or raise confine")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        opt.step()
        if ema is not None:
            ema.update(model)
        window.append(float(loss.detach()))
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            rec = dict(step=done, loss=_mean_across(sum(window) / len(window), distributed),
                       lr=opt.param_groups[0]["lr"], grad_norm=float(gn), time=time.time() - t0)
            window, last_loss = [], rec["loss"]
            if cfg.eval_every and done % cfg.eval_every == 0 and done != cfg.steps:
                rec["test_loss"] = evaluate(eval_model, source.test.to(device))
            log(rec)
            bar.set_postfix(loss=f"{rec['loss']:.4g}")
        elif cfg.eval_every and done % cfg.eval_every == 0:
            log(dict(step=done, test_loss=evaluate(eval_model, source.test.to(device))))
        if cfg.ckpt_every and done % cfg.ckpt_every == 0 and done != cfg.steps:
            checkpoint(os.path.join(cfg.out_dir, f"step_{done}.pt"), done)
        if cfg.sample_every and done % cfg.sample_every == 0 and done != cfg.steps and main:
            save_samples(eval_model, source, os.path.join(cfg.out_dir, f"samples_{done}.png"),
                         n=min(cfg.n_samples, 64), progress=False, generator=sample_generator(),
                         **cfg.sample_kwargs)
        stop = cfg.time_limit and time.time() - t0 > cfg.time_limit
        if distributed:  # all ranks stop together
            flag = torch.tensor([1.0 if stop else 0.0])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop = bool(flag.item())
        if stop:
            break
    bar.close()
    steps_done = step + 1 if cfg.steps > start else start
    train_time = time.time() - t0
    summary = dict(steps=steps_done, train_time=train_time, world_size=world,
                   final_train_loss=last_loss,
                   stopped_early=steps_done < cfg.steps)
    summary["test_loss"] = evaluate(eval_model, source.test.to(device))
    if getattr(eval_model, "support", None) is not None:
        summary["test_likelihood"] = evaluate_likelihood(eval_model, source.test.to(device))
    if distributed:
        summary["replica_max_abs_diff"] = _replica_max_abs_diff(model)
    checkpoint(os.path.join(cfg.out_dir, "last.pt"), steps_done)
    log(dict(step=steps_done, test_loss=summary["test_loss"], summary=summary))
    if main:
        from . import plots

        records = plots.read_metrics(metrics_path)
        opt_val = source.gauss.csm_optimum if source.kind == "gaussian" else None
        plots.save_loss_curve(records, os.path.join(cfg.out_dir, "loss.png"), optimum=opt_val,
                              title=source.describe())
        if cfg.n_samples and source.kind in ("image", "toy"):
            ts = time.time()
            save_samples(eval_model, source, os.path.join(cfg.out_dir, "samples.png"),
                         n=cfg.n_samples, progress=cfg.progress, generator=sample_generator(),
                         **cfg.sample_kwargs)
            summary["sample_time"] = time.time() - ts
    if distributed:
        dist.barrier()
    return summary
