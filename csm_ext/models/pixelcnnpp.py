"""PixelCNN++-CSM: a PixelCNN++ context network followed by the shared energy head (docs/ARCHITECTURE.md, "The model split").

Images x have shape (B, C, H, W). The autoregressive order is raster order over pixels (row by
row, left to right) and, inside a pixel, channel order 0..C−1. The model gives every element
(c, i, j) a context vector of K features that depends only on the elements before it in that
order, and the :class:`~csm_ext.EnergyHead` turns (context, x[c, i, j]) into the energy
E = −log q(x_cij | x_<cij) + const and its first two derivatives in x_cij.

The backbone follows the PixelCNN++ paper (Salimans et al., 2017), written here in plain PyTorch:

* two streams: ``u`` (down-shifted convolutions: sees only rows strictly above the pixel) and
  ``ul`` (down-shifted plus down-right-shifted convolutions: also sees the pixels to the left in
  the current row). The first layer shifts its output by one row / one column so the current
  pixel itself is never seen;
* gated resnet blocks with concat_elu: ``x + a·σ(b)`` with ``[a, b] = conv(concat_elu(conv(
  concat_elu(x)) + nin(concat_elu(aux))))``;
* three resolutions: an up pass of ``nr_resnet`` blocks per resolution with stride-2 down-shifted
  convolutions between them, and a down pass (``nr_resnet``, then ``nr_resnet + 1`` blocks per
  resolution) with stride-2 transposed convolutions, every block fed the matching up-pass output
  from the skip lists;
* weight normalisation on every convolution.

The K context channels per pixel then go through the within-pixel channel mask: the context of
channel c is ``nin(elu(ul)) + M_c·x[:c]`` at the same pixel, a 1×1 convolution over
``[features, x]`` whose x-part is strictly lower-triangular across channels (channel c sees the
values of channels before c, never its own).

Every convolution is causal in rows (nothing below a row reaches it), so the contexts of rows
0..i are the same for any input cropped below row i; the sampler uses that to run the backbone
on the top i+1 rows only when it generates row i.

Receptive field (measured by gradients, see the tests), standard network (nr_resnet 5,
nr_filters 160) on 32×32: a pixel in an even row sees all its predecessors (pixel (16, 5): 517 of
517). In an odd row the lower resolutions bring only rows above, so the pixel's own row is seen
by the full-resolution ul stream alone, 4·nr_resnet + 2 = 22 pixels to the left, and a few far
pixels of the row above can be missed: the last pixel sees 1014 of its 1023 predecessors, pixel
(15, 5) 481 of 485. This is a property of the PixelCNN++ architecture.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm
from tqdm.auto import tqdm

from ..head import EnergyHead
from .base import ARCSM

__all__ = ["PixelCNNppCSM", "PixelCNNppBackbone", "GatedResnet", "DownShiftedConv2d",
           "DownRightShiftedConv2d", "DownShiftedDeconv2d", "DownRightShiftedDeconv2d", "Nin",
           "concat_elu", "down_shift", "right_shift"]


def concat_elu(x: Tensor) -> Tensor:
    """``elu([x, −x])`` along channels (B, 2F, H, W): an ELU that keeps both signs' information."""
    return F.elu(torch.cat([x, -x], dim=1))


def down_shift(x: Tensor) -> Tensor:
    """Move every row down by one (zeros enter at the top, the last row drops out)."""
    return F.pad(x, (0, 0, 1, 0))[:, :, :-1, :]


def right_shift(x: Tensor) -> Tensor:
    """Move every column right by one (zeros enter on the left, the last column drops out)."""
    return F.pad(x, (1, 0, 0, 0))[:, :, :, :-1]


class DownShiftedConv2d(nn.Module):
    """Convolution whose output (r, c) sees input rows r−kh+1..r and columns c−p..c+p
    (p = (kw−1)/2) — never a row below r. With ``stride=2`` output (i, j) sees rows
    2i−kh+1..2i. (B, cin, H, W) → (B, cout, ⌈H/s⌉, ⌈W/s⌉)."""

    def __init__(self, cin: int, cout: int, kernel=(2, 3), stride: int = 1):
        super().__init__()
        kh, kw = kernel
        if kw % 2 != 1:
            raise ValueError(f"kernel width must be odd for a down-shifted conv; got {kernel}")
        self.pad = ((kw - 1) // 2, (kw - 1) // 2, kh - 1, 0)  # left, right, top, bottom
        self.conv = weight_norm(nn.Conv2d(cin, cout, kernel, stride=stride))

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, self.pad))


class DownRightShiftedConv2d(nn.Module):
    """Convolution whose output (r, c) sees input rows r−kh+1..r and columns c−kw+1..c
    (above and to the left, including (r, c) itself). (B, cin, H, W) → (B, cout, ⌈H/s⌉, ⌈W/s⌉)."""

    def __init__(self, cin: int, cout: int, kernel=(2, 2), stride: int = 1):
        super().__init__()
        kh, kw = kernel
        self.pad = (kw - 1, 0, kh - 1, 0)
        self.conv = weight_norm(nn.Conv2d(cin, cout, kernel, stride=stride))

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, self.pad))


class DownShiftedDeconv2d(nn.Module):
    """Stride-2 transposed convolution, the up-sampling twin of :class:`DownShiftedConv2d`:
    input (i, j) reaches output rows 2i, 2i+1 and columns 2j−1..2j+1; cropped to ``size`` (H, W)
    (the skip tensor's size, so odd sizes work). (B, cin, h, w) → (B, cout, H, W)."""

    def __init__(self, cin: int, cout: int, kernel=(2, 3), stride: int = 2):
        super().__init__()
        kh, kw = kernel
        self.offset = (kw - 1) // 2
        # ConvTranspose2d weights are (in, out, kh, kw): normalise per output channel (dim 1).
        self.conv = weight_norm(nn.ConvTranspose2d(cin, cout, kernel, stride=stride), dim=1)

    def forward(self, x: Tensor, size) -> Tensor:
        y = self.conv(x)
        H, W = size
        return y[:, :, :H, self.offset:self.offset + W]


class DownRightShiftedDeconv2d(nn.Module):
    """Stride-2 transposed convolution, the up-sampling twin of :class:`DownRightShiftedConv2d`:
    input (i, j) reaches outputs (2i..2i+1, 2j..2j+1); cropped to ``size`` (H, W)."""

    def __init__(self, cin: int, cout: int, kernel=(2, 2), stride: int = 2):
        super().__init__()
        self.conv = weight_norm(nn.ConvTranspose2d(cin, cout, kernel, stride=stride), dim=1)

    def forward(self, x: Tensor, size) -> Tensor:
        H, W = size
        return self.conv(x)[:, :, :H, :W]


class Nin(nn.Module):
    """Weight-normalised 1×1 convolution ("network in network"):
    (B, cin, H, W) → (B, cout, H, W)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = weight_norm(nn.Conv2d(cin, cout, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class GatedResnet(nn.Module):
    """PixelCNN++ gated residual block: ``x + a·σ(b)``, where
    ``[a, b] = conv2(dropout(concat_elu(conv1(concat_elu(x)) + nin(concat_elu(aux)))))``.

    ``conv`` is :class:`DownShiftedConv2d` (u stream) or :class:`DownRightShiftedConv2d`
    (ul stream); ``aux_channels`` > 0 adds the auxiliary input (a skip or the other stream).
    Shapes: x (B, F, H, W), aux (B, aux_channels, H, W) → (B, F, H, W).
    """

    def __init__(self, filters: int, conv: type, aux_channels: int = 0, dropout: float = 0.0):
        super().__init__()
        self.conv1 = conv(2 * filters, filters)
        self.aux = Nin(2 * aux_channels, filters) if aux_channels else None
        self.dropout = nn.Dropout(dropout)
        self.conv2 = conv(2 * filters, 2 * filters)

    def forward(self, x: Tensor, aux: Tensor | None = None) -> Tensor:
        h = self.conv1(concat_elu(x))
        if self.aux is not None:
            if aux is None:
                raise ValueError("aux must be given to a GatedResnet built with aux_channels > 0")
            h = h + self.aux(concat_elu(aux))
        a, b = self.conv2(self.dropout(concat_elu(h))).chunk(2, dim=1)
        return x + a * torch.sigmoid(b)


class PixelCNNppBackbone(nn.Module):
    """The PixelCNN++ network minus its output layer: (B, C, H, W) → ul features (B, F, H, W)
    where the features at (i, j) depend only on pixels before (i, j) in raster order.

    Any H, W ≥ 1 work (the up-sampling crops to the skip tensors' sizes).
    """

    STAGES = 3  # resolutions H, H/2, H/4 as in the paper

    def __init__(self, in_channels: int, nr_resnet: int = 5, nr_filters: int = 160,
                 dropout: float = 0.0):
        super().__init__()
        Fn, S = nr_filters, self.STAGES
        cin = in_channels + 1  # + a channel of ones, so zero padding differs from a zero pixel
        self.u_init = DownShiftedConv2d(cin, Fn, (2, 3))
        self.ul_init_up = DownShiftedConv2d(cin, Fn, (1, 3))
        self.ul_init_left = DownRightShiftedConv2d(cin, Fn, (2, 1))

        def blocks(n, conv, aux):
            return nn.ModuleList(GatedResnet(Fn, conv, aux, dropout) for _ in range(n))

        self.up_u = nn.ModuleList(blocks(nr_resnet, DownShiftedConv2d, 0) for _ in range(S))
        self.up_ul = nn.ModuleList(blocks(nr_resnet, DownRightShiftedConv2d, Fn) for _ in range(S))
        self.downsize_u = nn.ModuleList(DownShiftedConv2d(Fn, Fn, (2, 3), 2) for _ in range(S - 1))
        self.downsize_ul = nn.ModuleList(DownRightShiftedConv2d(Fn, Fn, (2, 2), 2)
                                         for _ in range(S - 1))
        n_down = [nr_resnet] + [nr_resnet + 1] * (S - 1)
        self.down_u = nn.ModuleList(blocks(n, DownShiftedConv2d, Fn) for n in n_down)
        self.down_ul = nn.ModuleList(blocks(n, DownRightShiftedConv2d, 2 * Fn) for n in n_down)
        self.upsize_u = nn.ModuleList(DownShiftedDeconv2d(Fn, Fn) for _ in range(S - 1))
        self.upsize_ul = nn.ModuleList(DownRightShiftedDeconv2d(Fn, Fn) for _ in range(S - 1))

    def forward(self, x: Tensor) -> Tensor:
        ones = x.new_ones(x.shape[0], 1, x.shape[2], x.shape[3])
        x = torch.cat([x, ones], dim=1)
        # The shifts make the first layer strictly causal: u sees rows above, ul also the left.
        u_list = [down_shift(self.u_init(x))]
        ul_list = [down_shift(self.ul_init_up(x)) + right_shift(self.ul_init_left(x))]
        for s in range(self.STAGES):
            for bu, bul in zip(self.up_u[s], self.up_ul[s]):
                u_list.append(bu(u_list[-1]))
                ul_list.append(bul(ul_list[-1], u_list[-1]))
            if s < self.STAGES - 1:
                u_list.append(self.downsize_u[s](u_list[-1]))
                ul_list.append(self.downsize_ul[s](ul_list[-1]))
        u, ul = u_list.pop(), ul_list.pop()
        for s in range(self.STAGES):
            for bu, bul in zip(self.down_u[s], self.down_ul[s]):
                u = bu(u, u_list.pop())
                ul = bul(ul, torch.cat([u, ul_list.pop()], dim=1))
            if s < self.STAGES - 1:
                size = u_list[-1].shape[-2:]  # the next (finer) resolution
                u = self.upsize_u[s](u, size)
                ul = self.upsize_ul[s](ul, size)
        assert not u_list and not ul_list
        return ul


class PixelCNNppCSM(ARCSM):
    """Autoregressive score-matching model of images with a PixelCNN++ context network.

    Args:
        channels, height, width: the image shape (C, H, W).
        nr_resnet: gated resnet blocks per resolution (the paper's standard: 5).
        nr_filters: F, feature channels of both streams (standard: 160).
        context_dim: K, context features per (pixel, channel).
        head_hidden, head_layers, activation, confine, backend: the :class:`EnergyHead`.
        dropout: dropout rate inside the gated resnet blocks (the paper uses 0.5 on CIFAR-10).
        support, objective, mle_weight: see :class:`~csm_ext.models.ARCSM` (likelihood, grid
            sampling, training objective).

    Inputs are images ``(B, C, H, W)``; flat ``(B, C·H·W)`` inputs (PyTorch's C-major flattening)
    are accepted too and the outputs are then flat as well, so the model plugs into code written
    for flat data. ``order`` lists the flat indices in generation order (raster over pixels,
    channel order inside a pixel).

    Smoothing noise: score matching sees only local slopes, so it cannot weigh two modes of a
    conditional that no data connect (a pixel that is either off or on). Train with noise wide
    enough for them to overlap: on MNIST in [-1, 1], σ = 0.5 gives digits, while σ = 0.1 gives
    mode weights set by the sampler's start rather than by the data.
    """

    def __init__(self, channels: int, height: int, width: int, nr_resnet: int = 5,
                 nr_filters: int = 160, context_dim: int = 32, head_hidden: int = 64,
                 head_layers: int = 2, activation: str = "softplus", dropout: float = 0.0,
                 confine: float = 0.01, backend: str = "fused", support=None,
                 objective: str = "csm", mle_weight: float = 1.0):
        super().__init__()
        for name, v in (("channels", channels), ("height", height), ("width", width),
                        ("nr_resnet", nr_resnet), ("nr_filters", nr_filters),
                        ("context_dim", context_dim)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int; got {v!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1); got {dropout!r}")
        C, H, W, K = channels, height, width, context_dim
        self.channels, self.height, self.width, self.context_dim = C, H, W, K
        self.dim = C * H * W
        self.backbone = PixelCNNppBackbone(C, nr_resnet, nr_filters, dropout)
        self.out = Nin(nr_filters, C * K)
        # Within-pixel channel mask: context unit (c, k) sees x channel c' only when c' < c.
        if C > 1:
            self.chan_weight = nn.Parameter(torch.empty(C * K, C))
            nn.init.uniform_(self.chan_weight, -1.0 / math.sqrt(C), 1.0 / math.sqrt(C))
            mask = torch.arange(C)[None, :] < torch.arange(C)[:, None]  # [c, c'] = c' < c
            # Rebuilt here from the config, so not saved in the state_dict (see _load_from_state_dict).
            self.register_buffer("chan_mask", mask.repeat_interleave(K, 0).float(),
                                 persistent=False)
        else:
            self.chan_weight = None
        self.head = EnergyHead(K, hidden=head_hidden, layers=head_layers, activation=activation,
                               confine=confine, backend=backend)
        idx = torch.arange(self.dim).view(C, H, W)
        self.register_buffer("order", idx.permute(1, 2, 0).reshape(-1))  # raster, then channel
        self.config = dict(channels=C, height=H, width=W, nr_resnet=nr_resnet,
                           nr_filters=nr_filters, context_dim=K, head_hidden=head_hidden,
                           head_layers=head_layers, activation=activation, dropout=float(dropout),
                           confine=float(confine), backend=backend)
        self._init_common(support, objective, mle_weight)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # State dicts from csm_ext 0.1.0 carry the channel mask; it is a function of (C, K) alone,
        # so the stored copy is checked and dropped (load_state_dict passes a copy: pop is local).
        key = prefix + "chan_mask"
        if key in state_dict:
            old = state_dict.pop(key)
            mask = getattr(self, "chan_mask", None)
            if mask is None or tuple(old.shape) != tuple(mask.shape) or not torch.equal(
                    old.to(mask), mask):
                error_msgs.append(f"{key} of the state dict does not match the channel mask of "
                                  f"this model (shape {tuple(old.shape)})")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    @property
    def shape(self) -> tuple[int, int, int]:
        """The image shape (C, H, W)."""
        return (self.channels, self.height, self.width)

    # ---------------------------------------------------------------- shapes

    def _as_image(self, x) -> tuple[Tensor, bool]:
        """x (B, C, H, W) or flat (B, C·H·W) → (image view, was_flat)."""
        if torch.is_tensor(x) and x.dim() == 2 and x.shape[1] == self.dim:
            return x.reshape(x.shape[0], *self.shape), True
        if not torch.is_tensor(x) or x.dim() != 4 or tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"x must have shape (B, {self.channels}, {self.height}, "
                             f"{self.width}) or (B, {self.dim}); got "
                             f"{tuple(getattr(x, 'shape', ()))}")
        return x, False

    def _flatten(self, x: Tensor) -> Tensor:
        img, _ = self._as_image(x)
        return img.reshape(img.shape[0], self.dim)

    def _unflatten(self, x: Tensor, like: str = "image") -> Tensor:
        return x if like == "flat" else x.view(x.shape[0], *self.shape)

    # ---------------------------------------------------------------- contexts

    def features(self, x: Tensor) -> Tensor:
        """Backbone context part (B, C·K, h, w) for images x (B, C, h, w) of any height h ≤ H:
        unit (c, k) at (i, j) depends on pixels before (i, j) only (not yet on channels < c)."""
        return self.out(F.elu(self.backbone(x)))

    def _channel_part(self, x: Tensor) -> Tensor:
        """Masked 1×1 conv over x (B, C, ...) → (B, C·K, ...): unit (c, k) sees x[:, :c]."""
        w = self.chan_weight * self.chan_mask
        return torch.einsum("ok,bk...->bo...", w, x)

    def context(self, x: Tensor) -> Tensor:
        """Contexts (B, C, H, W, K) for images (flat x (B, D) → (B, D, K)); the context of
        element (c, i, j) depends only on elements before it in the order."""
        img, flat = self._as_image(x)
        ctx = self.features(img)
        if self.chan_weight is not None:
            ctx = ctx + self._channel_part(img)
        B, C, K = img.shape[0], self.channels, self.context_dim
        ctx = ctx.view(B, C, K, self.height, self.width).permute(0, 1, 3, 4, 2)
        return ctx.reshape(B, self.dim, K) if flat else ctx

    def _pixel_features(self, x: Tensor, i: int, j: int) -> Tensor:
        """Backbone part (B, C, K) at pixel (i, j); runs the backbone on rows 0..i only (the
        contexts of a row never depend on rows below it)."""
        f = self.features(x[:, :, :i + 1])[:, :, i, j]
        return f.view(x.shape[0], self.channels, self.context_dim)

    def _pixel_channel_context(self, feats: Tensor, xpix: Tensor, c: int) -> Tensor:
        """Context (B, K) of channel c from the pixel's features (B, C, K) and values (B, C)."""
        ctx = feats[:, c]
        if c > 0:
            K = self.context_dim
            w = self.chan_weight[c * K:(c + 1) * K, :c]  # exactly the unmasked entries
            ctx = ctx + xpix[:, :c] @ w.T
        return ctx

    def context_at(self, x: Tensor, d: int) -> Tensor:
        """The context (B, K) of flat dimension ``d`` (C-major index c·H·W + i·W + j) of flat x
        (B, D): the hook of :func:`csm_ext.sampling.ar_langevin`."""
        img, _ = self._as_image(x)
        c, rem = divmod(int(d), self.height * self.width)
        i, j = divmod(rem, self.width)
        return self._pixel_channel_context(self._pixel_features(img, i, j), img[:, :, i, j], c)

    def _sweep(self, x: Tensor, progress: bool = False):
        """Pixels in raster order; for each, the backbone runs once for the whole batch (on the
        rows so far), then every channel's context is completed with the channels before it."""
        img = x.view(x.shape[0], *self.shape)  # shares x's memory: writes to x show here
        HW = self.height * self.width
        pixels = [(i, j) for i in range(self.height) for j in range(self.width)]
        for i, j in tqdm(pixels, desc="sampling", unit="px", disable=not progress, leave=False):
            feats = self._pixel_features(img, i, j)
            for c in range(self.channels):
                yield c * HW + i * self.width + j, self._pixel_channel_context(
                    feats, img[:, :, i, j], c)

    # ---------------------------------------------------------------- sampling

    @torch.no_grad()
    def sample(self, n: int, method: str | None = None, flat: bool = False, **kwargs) -> Tensor:
        """Samples (n, C, H, W) (``flat=True``: (n, C·H·W)); every argument of
        :meth:`ARCSM.sample` (``method``, ``nodes``, ``steps``, ``temperature``, ``denoise``,
        ``clip``, ``init`` (n, C, H, W) or (n, D), ...). Runs in eval mode (no dropout) and
        restores the module's mode afterwards."""
        was_training = self.training
        self.eval()
        try:
            x = super().sample(n, method, **kwargs)
        finally:
            self.train(was_training)
        return x.reshape(n, self.dim) if flat else x
