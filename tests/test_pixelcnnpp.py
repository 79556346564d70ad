"""PixelCNN++-CSM: the causal structure of every block type, the autoregressive property of the
whole model (grey and RGB, channel order inside a pixel), fused vs autograd backends, the
sampler's building blocks and sampler, and the standard configuration (parameter count,
receptive field, a forward on 3×32×32)."""
import time

import pytest
import torch

from conftest import changed
from csm_ext.models.pixelcnnpp import (DownRightShiftedConv2d, DownRightShiftedDeconv2d,
                                       DownShiftedConv2d, DownShiftedDeconv2d, GatedResnet,
                                       PixelCNNppCSM, down_shift, right_shift)

# nr_filters 8, nr_resnet 1: every block type of the network at a small size.
SMALL = dict(nr_resnet=1, nr_filters=8, context_dim=3, head_hidden=8, head_layers=2)


@pytest.fixture(autouse=True)
def _one_thread():
    """These are small convolutions: on a shared 2-core machine a second OpenMP thread costs far
    more in synchronisation than it gains, so this module runs single-threaded."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _generic(module, scale=0.1, seed=0):
    """Jitter every parameter so no weight or bias is accidentally zero or symmetric."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def _dependency(fn, in_shape, out_pos):
    """Boolean (H, W) map of the input pixels (any channel) that output pixel ``out_pos`` of
    ``fn`` depends on, from the gradient of that pixel's outputs (float64, generic input)."""
    x = torch.randn(1, *in_shape, dtype=torch.float64, requires_grad=True)
    y = fn(x)
    r, c = out_pos
    (g,) = torch.autograd.grad(y[0, :, r, c].pow(2).sum() + y[0, :, r, c].sum(), x)
    g = g[0].abs().sum(0)
    return g > 1e-9 * g.max()  # far above rounding (a transform-based conv), far below a real path


def _box(H, W, rows, cols):
    m = torch.zeros(H, W, dtype=torch.bool)
    for r in rows:
        for c in cols:
            if 0 <= r < H and 0 <= c < W:
                m[r, c] = True
    return m


@pytest.mark.parametrize("H,W", [(6, 7), (5, 5)])
def test_block_types_causal_structure(H, W):
    """Each layer type reaches exactly the input window the PixelCNN++ design gives it."""
    torch.manual_seed(0)
    cin = 3
    ds = _generic(DownShiftedConv2d(cin, 4, (2, 3)).double())
    ds2 = _generic(DownShiftedConv2d(cin, 4, (2, 3), stride=2).double())
    drs = _generic(DownRightShiftedConv2d(cin, 4, (2, 2)).double())
    drs2 = _generic(DownRightShiftedConv2d(cin, 4, (2, 2), stride=2).double())
    h, w = (H + 1) // 2, (W + 1) // 2  # the stride-2 output size
    dsd = _generic(DownShiftedDeconv2d(cin, 4).double())
    drsd = _generic(DownRightShiftedDeconv2d(cin, 4).double())
    for r in range(H):
        for c in range(W):
            assert torch.equal(_dependency(ds, (cin, H, W), (r, c)),
                               _box(H, W, [r - 1, r], [c - 1, c, c + 1]))
            assert torch.equal(_dependency(drs, (cin, H, W), (r, c)),
                               _box(H, W, [r - 1, r], [c - 1, c]))
            assert torch.equal(_dependency(lambda x: down_shift(right_shift(x)), (cin, H, W),
                                           (r, c)), _box(H, W, [r - 1], [c - 1]))
            # transposed convs: output (r, c) comes from input (r // 2, ...) only
            assert torch.equal(_dependency(lambda x: dsd(x, (H, W)), (cin, h, w), (r, c)),
                               _box(h, w, [r // 2], [q for q in range(w) if abs(2 * q - c) <= 1]))
            assert torch.equal(_dependency(lambda x: drsd(x, (H, W)), (cin, h, w), (r, c)),
                               _box(h, w, [r // 2], [c // 2]))
    for i in range(h):
        for j in range(w):
            assert torch.equal(_dependency(ds2, (cin, H, W), (i, j)),
                               _box(H, W, [2 * i - 1, 2 * i], [2 * j - 1, 2 * j, 2 * j + 1]))
            assert torch.equal(_dependency(drs2, (cin, H, W), (i, j)),
                               _box(H, W, [2 * i - 1, 2 * i], [2 * j - 1, 2 * j]))


@pytest.mark.parametrize("conv", [DownShiftedConv2d, DownRightShiftedConv2d])
def test_gated_resnet_causal_structure(conv):
    """A gated resnet block reaches two stacked windows of its conv type, in x and in aux."""
    torch.manual_seed(0)
    Fn, H, W = 4, 6, 6
    block = _generic(GatedResnet(Fn, conv, aux_channels=2, dropout=0.0).double())
    aux = torch.randn(1, 2, H, W, dtype=torch.float64)
    left, right = 2, (2 if conv is DownShiftedConv2d else 0)  # two stacked windows
    for r in range(H):
        for c in range(W):
            dep = _dependency(lambda x: block(x, aux), (Fn, H, W), (r, c))
            want = _box(H, W, range(r - 2, r + 1), range(c - left, c + right + 1))
            assert torch.equal(dep, want), (r, c)
            dep_aux = _dependency(lambda a: block(torch.zeros(1, Fn, H, W, dtype=a.dtype), a),
                                  (2, H, W), (r, c))
            assert not (dep_aux & ~want).any() and dep_aux[r, c]
    with pytest.raises(ValueError, match="aux"):
        block(torch.zeros(1, Fn, H, W, dtype=torch.float64))


def _positions(C, H, W):
    """pos[c, i, j] = the element's place in the order (raster over pixels, channels inside)."""
    return (torch.arange(H * W).view(1, H, W) * C + torch.arange(C).view(C, 1, 1))


@pytest.mark.parametrize("C,H,W,dropout", [(1, 6, 5, 0.0), (3, 5, 4, 0.5), (2, 4, 4, 0.0)])
def test_autoregressive_property(C, H, W, dropout):
    """Perturbing element e changes no context of an element at or before e in the order and no
    energy of an element before e; the next element's context does change. All perturbations
    run as one batch and are compared with an unperturbed batch of the same size, with a
    threshold far above rounding and far below a real leak (float64)."""
    torch.manual_seed(0)
    m = _generic(PixelCNNppCSM(C, H, W, dropout=dropout, **SMALL).double()).eval()
    pos = _positions(C, H, W)
    D = C * H * W
    x = torch.randn(1, C, H, W, dtype=torch.float64)
    xp = x.repeat(D, 1, 1, 1)
    flat = xp.view(D, D)
    flat[torch.arange(D), torch.arange(D)] += 1.0 + torch.rand(D, dtype=torch.float64)
    with torch.no_grad():
        base = x.repeat(D, 1, 1, 1)
        c0, E0 = m.context(base), m.energy(base)
        c1, E1 = m.context(xp), m.energy(xp)
    ctx_changed = changed(c1, c0).any(-1)  # (D, C, H, W): perturbation e → element d changed
    E_changed = changed(E1, E0)
    pos_e = pos.reshape(-1)[torch.arange(D)]  # perturbed element b is flat index b (C-major)
    for b in range(D):
        before_or_at = pos <= pos_e[b]
        assert not ctx_changed[b][before_or_at].any(), b
        assert not E_changed[b][pos < pos_e[b]].any(), b
        assert E_changed[b].view(-1)[b], b  # its own energy sees it
        if pos_e[b] < D - 1:  # not vacuous: the next element in the order sees it
            nxt = (pos == pos_e[b] + 1)
            assert ctx_changed[b][nxt].all(), b
    # the first element's context is the same for every input (biases and padding only)
    with torch.no_grad():
        other = m.context(torch.randn(2, C, H, W, dtype=torch.float64))
    assert torch.allclose(other[:, 0, 0, 0], c0[:1, 0, 0, 0].expand(2, -1))


def test_context_rows_are_causal_and_pixel_context_matches():
    """Cropping below row i leaves the contexts of rows ≤ i unchanged (the sampler's shortcut),
    and the per-pixel and per-dimension contexts equal the full ones."""
    torch.manual_seed(0)
    C, H, W = 3, 7, 5
    m = _generic(PixelCNNppCSM(C, H, W, **SMALL).double()).eval()
    x = torch.randn(3, C, H, W, dtype=torch.float64)
    with torch.no_grad():
        full_f = m.features(x)
        ctx = m.context(x)
        for h in range(1, H + 1):
            torch.testing.assert_close(m.features(x[:, :, :h]), full_f[:, :, :h])
        for i, j in [(0, 0), (3, 2), (6, 4), (2, 0)]:
            feats = m._pixel_features(x, i, j)
            for c in range(C):
                torch.testing.assert_close(m._pixel_channel_context(feats, x[:, :, i, j], c),
                                           ctx[:, c, i, j])
                d = c * H * W + i * W + j
                torch.testing.assert_close(m.context_at(x.flatten(1), d), ctx[:, c, i, j])
    assert torch.equal(m.order, torch.arange(C * H * W).view(C, H, W).permute(1, 2, 0).reshape(-1))


def test_backends_agree_config_round_trip_and_flat_inputs():
    torch.manual_seed(0)
    C, H, W = 3, 6, 6
    m = _generic(PixelCNNppCSM(C, H, W, **SMALL).double())
    x = torch.randn(4, C, H, W, dtype=torch.float64)
    assert m.backend == "fused"
    params = list(m.parameters())
    l_f = m.loss(x)
    g_f = torch.autograd.grad(l_f, params)
    m.backend = "autograd"
    assert m.head.backend == "autograd" and m.config["backend"] == "autograd"
    l_a = m.loss(x)
    g_a = torch.autograd.grad(l_a, params)
    torch.testing.assert_close(l_f, l_a)
    for a, b in zip(g_f, g_a):
        torch.testing.assert_close(a, b)
    m2 = PixelCNNppCSM.from_config(m.config).double()
    m2.load_state_dict(m.state_dict())
    assert m2.config == m.config
    torch.testing.assert_close(m2.loss(x), l_a)
    # flat (B, D) inputs, as the training loop's data sources give them
    xf = x.flatten(1)
    torch.testing.assert_close(m.loss(xf, "none"), m.loss(x, "none"))
    assert m.loss(x, "none").shape == (4,)
    torch.testing.assert_close(m(x, "sum"), m.loss(x, "sum"))
    E, dE, d2E = m.jets(x)
    assert E.shape == dE.shape == d2E.shape == x.shape and torch.equal(m.score(x), -dE)
    assert m.jets(xf)[0].shape == xf.shape
    assert m.context(xf).shape == (4, C * H * W, SMALL["context_dim"])
    torch.testing.assert_close(m.context(xf).view(4, C, H, W, -1).flatten(1, 3),
                               m.context(x).flatten(1, 3))


def test_errors_name_the_argument():
    for name, kw in [("channels", dict(channels=0)), ("height", dict(height=-1)),
                     ("width", dict(width=2.5)), ("nr_resnet", dict(nr_resnet=0)),
                     ("nr_filters", dict(nr_filters=0)), ("context_dim", dict(context_dim=0)),
                     ("dropout", dict(dropout=1.0)), ("backend", dict(backend="magic")),
                     ("activation", dict(activation="relu"))]:
        args = dict(channels=1, height=4, width=4, **SMALL)
        args.update(kw)
        with pytest.raises(ValueError, match=name):
            PixelCNNppCSM(**args)
    m = PixelCNNppCSM(1, 4, 4, **SMALL)
    with pytest.raises(ValueError, match="x must"):
        m.loss(torch.zeros(2, 1, 4, 5))
    with pytest.raises(ValueError, match="x must"):
        m.loss(torch.zeros(2, 15))
    with pytest.raises(ValueError, match="init"):
        m.sample(2, init=torch.zeros(3, 1, 4, 4), progress=False)
    with pytest.raises(ValueError, match="init"):
        m.sample(2, init="sideways", progress=False)
    with pytest.raises(ValueError, match="clip"):
        m.sample(2, clip=(1, 0), progress=False)
    with pytest.raises(ValueError, match="steps"):
        m.sample(2, steps=0, progress=False)
    with pytest.raises(ValueError, match="temperature"):
        m.sample(2, temperature=0.0, progress=False)


def test_sample_shapes_clip_init_determinism():
    torch.manual_seed(0)
    m = PixelCNNppCSM(3, 4, 3, **SMALL)
    kw = dict(steps=3, clip=(-1.0, 1.0), progress=False)
    x = m.sample(5, generator=torch.Generator().manual_seed(0), **kw)
    y = m.sample(5, generator=torch.Generator().manual_seed(0), **kw)
    assert x.shape == (5, 3, 4, 3) and torch.equal(x, y) and x.abs().max() <= 1
    z = m.sample(2, steps=2, init=torch.full((2, 3, 4, 3), 0.5), denoise=0.1, progress=False,
                 flat=True)
    assert z.shape == (2, 36) and torch.isfinite(z).all()
    assert m.sample(2, steps=2, init=torch.zeros(2, 36), progress=False).shape == (2, 3, 4, 3)
    assert m.sample(0, steps=2, progress=False).shape == (0, 3, 4, 3)
    # sampling runs without dropout and leaves the module's mode as it was
    md = PixelCNNppCSM(1, 3, 3, dropout=0.5, **SMALL).train()
    a = md.sample(3, generator=torch.Generator().manual_seed(1), **kw)
    b = md.sample(3, generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(a, b) and md.training


def test_langevin_samples_a_known_head_distribution():
    """With the head's energy reduced to the confinement, every conditional is N(0, 1/alpha)."""
    torch.manual_seed(0)
    m = PixelCNNppCSM(2, 1, 3, confine=4.0, **SMALL)
    with torch.no_grad():
        m.head.w.zero_()
    x = m.sample(3000, steps=150, step_size=0.01, anneal=10, progress=False,
                 generator=torch.Generator().manual_seed(0)).flatten(1)
    assert (x.mean(0).abs() < 0.06).all() and ((x.std(0) - 0.5).abs() < 0.04).all()
    x = m.sample(3000, steps=150, step_size=0.01, anneal=10, temperature=0.25, progress=False,
                 generator=torch.Generator().manual_seed(0)).flatten(1)  # N(0, T/alpha)
    assert ((x.std(0) - 0.25).abs() < 0.02).all()


def _receptive_fields(model, targets, dtype=torch.float64):
    """For each target pixel (i, j): the boolean (H, W) map of input pixels its backbone
    features depend on, from one backward pass (one batch image per target)."""
    for p in model.parameters():  # only input gradients are needed
        p.requires_grad_(False)
    x = torch.randn(len(targets), *model.shape, dtype=dtype, requires_grad=True)
    f = model.features(x)
    assert f.shape == (len(targets), model.channels * model.context_dim, model.height,
                       model.width) and torch.isfinite(f).all()
    (g,) = torch.autograd.grad(sum(f[b, :, i, j].sum() for b, (i, j) in enumerate(targets)), x)
    return [g[b].abs().amax(0) > 0 for b in range(len(targets))]


RF_TARGETS = [(31, 31), (16, 5), (15, 5), (0, 31), (0, 0)]


def _check_standard_receptive_fields(rfs):
    """The receptive fields of the standard network (nr_resnet 5) on 32×32.

    Every map lies inside the pixels before the target (causality, no current pixel). Pixel
    (31, 31) sees all 31 rows above and, in its own row, the 22 = 4·nr_resnet + 2 pixels to its
    left (an odd row's left context comes from the full-resolution ul stream only): 992 + 22 =
    1014 of its 1023 predecessors. Pixel (16, 5) (an even row) sees all 517 predecessors."""
    counts = {}
    for (i, j), rf in zip(RF_TARGETS, rfs):
        prev = torch.zeros(32 * 32, dtype=torch.bool)
        prev[:i * 32 + j] = True
        assert not (rf & ~prev.view(32, 32)).any(), (i, j)
        counts[(i, j)] = int(rf.sum())
    assert counts == {(31, 31): 1014, (16, 5): 517, (15, 5): 481, (0, 31): 31, (0, 0): 0}
    last = rfs[0]
    assert last[:31].all() and last[31, 9:31].all() and not last[31, :9].any()
    return counts


def test_standard_configuration_receptive_field_structure():
    """The dependency structure does not depend on the width: a 4-filter twin of the standard
    network (nr_resnet 5) has its receptive fields (checked against the full width below)."""
    torch.manual_seed(0)
    twin = PixelCNNppCSM(3, 32, 32, nr_resnet=5, nr_filters=4, context_dim=2).double()
    _check_standard_receptive_fields(_receptive_fields(twin, RF_TARGETS))


def test_standard_configuration_params_receptive_field_and_forward():
    """nr_resnet 5, nr_filters 160, 3×32×32: the parameter count (53.6M, the PixelCNN++ paper's
    network without its mixture-of-logistics output layer), a forward and backward on a batch of
    3×32×32 images, and the receptive fields from the gradient of the backbone features."""
    t0 = time.time()
    torch.manual_seed(0)
    m = PixelCNNppCSM(3, 32, 32, nr_resnet=5, nr_filters=160, context_dim=32, head_hidden=64)
    n_backbone = sum(p.numel() for p in m.backbone.parameters())
    n_total = sum(p.numel() for p in m.parameters())
    assert n_backbone == 53_642_880
    assert n_total == 53_665_120
    counts = _check_standard_receptive_fields(_receptive_fields(m, RF_TARGETS, torch.float32))
    print(f"standard config: backbone {n_backbone:,} params, model {n_total:,}; receptive "
          f"fields {counts}; {time.time() - t0:.1f}s")


def test_train_and_cli_end_to_end(tmp_path):
    """``csm-ext train --model pixelcnnpp`` on tiny digits, then ``csm-ext sample`` from its
    checkpoint (skipped until the model is registered in csm_ext.train.MODELS)."""
    from csm_ext import train as train_mod

    if "pixelcnnpp" not in train_mod.MODELS:
        pytest.skip("PixelCNNppCSM is not registered in csm_ext.train.MODELS yet")
    from csm_ext.cli import main

    out = tmp_path / "run"
    rc = main(["train", "--model", "pixelcnnpp", "--data", "digits", "--limit", "64",
               "--steps", "3", "--batch-size", "8", "--nr-resnet", "1", "--nr-filters", "8",
               "--context-dim", "4", "--head-hidden", "8", "--n-samples", "2",
               "--sample-steps", "2", "--log-every", "1", "--ema", "0.5", "--out", str(out),
               "--no-progress"])
    assert rc == 0
    for f in ("metrics.jsonl", "last.pt", "loss.png", "samples.png"):
        assert (out / f).stat().st_size > 0, f
    model, ckpt = train_mod.load_checkpoint(str(out / "last.pt"))
    assert isinstance(model, PixelCNNppCSM) and model.shape == (1, 8, 8)
    assert ckpt["model_config"]["nr_filters"] == 8
    rc = main(["sample", "--ckpt", str(out / "last.pt"), "--n", "2", "--sample-steps", "2",
               "--out", str(tmp_path / "s.npz"), "--no-progress"])
    assert rc == 0
    import numpy as np

    assert np.load(tmp_path / "s.npz")["samples"].shape[0] == 2


def test_bench_train_pixelcnnpp_smoke(tmp_path):
    """A tiny run of benchmarks/bench_train_pixelcnnpp.py, so it cannot rot."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_train_pixelcnnpp as bench

    out = tmp_path / "bench.json"
    res = bench.main(["--preset", "smoke", "--device", "cpu", "--repeats", "2", "--warmup", "0",
                      "--no-memory", "--sampling", "--sample-n", "2", "--sample-steps", "2",
                      "--out", str(out)])
    assert json.loads(out.read_text())["preset"] == "smoke"
    for b in ("fused", "autograd"):
        r = res["backends"][b]
        assert r["step_s"] > 0 and r["backbone_s"] > 0 and r["head_s"] > 0
        assert 0 < r["head_share"] < 1 and r["sample_s_per_image"] > 0
    assert res["speedup_step"] > 0
