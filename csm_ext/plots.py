"""PNG figures for training runs (matplotlib, Agg backend: no display needed)."""
import json
import math
import textwrap

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402


def save_image_grid(images, path, nrow=None, title=None):
    """Save images (N, C, H, W) with values in [0, 1] as one grid PNG (C = 1 or 3)."""
    x = images.detach().float().cpu().clamp(0, 1)
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"images must have shape (N, 1|3, H, W); got {tuple(x.shape)}")
    n, c, h, w = x.shape
    nrow = nrow or max(1, int(math.ceil(math.sqrt(n))))
    ncol_rows = int(math.ceil(n / nrow))
    pad = 1
    grid = torch.ones(c, ncol_rows * (h + pad) + pad, nrow * (w + pad) + pad) * 0.5
    for i in range(n):
        r, q = divmod(i, nrow)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = x[i]
    arr = grid.permute(1, 2, 0).numpy()
    scale = max(1.0, 200 / max(arr.shape[:2]))  # at least ~8 inches for tiny images
    fig = plt.figure(figsize=(arr.shape[1] / 40 * scale, arr.shape[0] / 40 * scale * (1.07 if title else 1)))
    ax = fig.add_axes([0, 0, 1, 1 if not title else 0.93])
    ax.imshow(arr[..., 0] if c == 1 else arr, cmap="gray" if c == 1 else None, vmin=0, vmax=1,
              interpolation="nearest")
    ax.axis("off")
    if title:
        fig.suptitle(textwrap.fill(title, 60), fontsize=8)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_scatter(samples, path, reference=None, lim=None, title=None):
    """Save a 2-D scatter of samples (N, 2) beside optional reference data (M, 2)."""
    s = samples.detach().float().cpu().numpy()
    panels = [("model samples", s)] + ([("data", reference.detach().float().cpu().numpy())]
                                       if reference is not None else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4), squeeze=False)
    for ax, (name, pts) in zip(axes[0], panels):
        ax.scatter(pts[:, 0], pts[:, 1], s=1, alpha=0.4)
        ax.set_title(name)
        ax.set_aspect("equal")
        if lim is not None:
            ax.set_xlim(*lim)
            ax.set_ylim(*lim)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def read_metrics(path):
    """Read a metrics JSONL file into a list of dicts."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def save_loss_curve(records, path, optimum=None, title=None):
    """Plot training loss (and test loss where present) against step from metrics records."""
    tr = [(r["step"], r["loss"]) for r in records if "loss" in r]
    te = [(r["step"], r["test_loss"]) for r in records if "test_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    if tr:
        ax.plot(*np.array(tr).T, label="train loss")
    if te:
        ax.plot(*np.array(te).T, "o-", label="test loss")
    if optimum is not None:
        ax.axhline(optimum, color="k", ls="--", lw=1, label="optimum")
    ax.set_xlabel("step")
    ax.set_ylabel("CSM loss per sample")
    ax.legend()
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(textwrap.fill(title, 80), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
