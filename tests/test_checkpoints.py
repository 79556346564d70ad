"""Checkpoints: what they hold (no masks: those are rebuilt from the config), their size,
exact round trips, exact resume with dropout, old-format (mask-carrying) checkpoints, and
clean errors for files that are not checkpoints."""
import os

import pytest
import torch

from csm_ext.cli import main
from csm_ext.data.sources import ToySource
from csm_ext.models import MADECSM, PixelCNNppCSM
from csm_ext.models.made import MaskedLinear
from csm_ext.train import EMA, TrainConfig, load_checkpoint, save_checkpoint, train


def _masks(model):
    return {n: b for n, b in model.named_buffers() if n.endswith("mask")}


def _with_adam_state(model):
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    return opt


@pytest.mark.parametrize("kw", [dict(), dict(order="random"), dict(order="random", seed=7),
                                dict(order="random", hidden_sizes=(24, 16), direct=True, seed=3),
                                dict(order=[4, 2, 0, 1, 3, 5, 8, 7, 6], hidden_sizes=())])
def test_made_masks_are_rebuilt_from_the_config(kw):
    m = MADECSM(9, **{"hidden_sizes": (32,), "context_dim": 3, "head_hidden": 8, **kw})
    m2 = MADECSM.from_config(m.config)
    masks, masks2 = _masks(m), _masks(m2)
    assert masks and masks.keys() == masks2.keys()
    for k in masks:
        assert torch.equal(masks[k], masks2[k]), k
    assert torch.equal(m.order, m2.order) and torch.equal(m.degrees, m2.degrees)
    assert not any(k.endswith("mask") for k in m.state_dict())


def test_pixelcnnpp_channel_mask_is_not_stored():
    m = PixelCNNppCSM(3, 4, 4, nr_resnet=1, nr_filters=8, context_dim=4, head_hidden=8)
    assert "chan_mask" not in m.state_dict()
    assert torch.equal(PixelCNNppCSM.from_config(m.config).chan_mask, m.chan_mask)


def test_checkpoint_size_is_params_ema_and_adam(tmp_path):
    torch.manual_seed(0)
    m = MADECSM(100, hidden_sizes=(256,), context_dim=8, head_hidden=16, head_layers=2)
    opt = _with_adam_state(m)
    path = str(tmp_path / "c.pt")
    save_checkpoint(path, m, dict(kind="toy"), opt, EMA(m, 0.9), 1, TrainConfig(),
                    torch.Generator(), rng_state=torch.get_rng_state())
    n = sum(p.numel() for p in m.parameters())
    n_masks = sum(b.numel() for b in _masks(m).values())
    bound = (n + n + 2 * n) * 4  # weights, EMA, Adam's two moments; float32
    size = os.path.getsize(path)
    assert n_masks > 0.9 * n  # storing the masks (model + EMA) would add ~2n floats: ≥ 1.45×
    assert size < 1.2 * bound, (size, bound)


def test_save_load_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    for m in (MADECSM(12, hidden_sizes=(32,), context_dim=4, head_hidden=8, order="random",
                      direct=True, seed=5),
              PixelCNNppCSM(3, 3, 3, nr_resnet=1, nr_filters=8, context_dim=4, head_hidden=8)):
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.1 * torch.randn_like(p))
        path = str(tmp_path / f"{type(m).__name__}.pt")
        save_checkpoint(path, m, dict(kind="toy"), _with_adam_state(m), EMA(m, 0.9), 3)
        x = torch.randn(5, m.dim)
        for use_ema in (False, True):
            m2, ck = load_checkpoint(path, use_ema=use_ema)
            ref = EMA(m, 0.9).model if use_ema else m
            for a, b in zip(m2.jets(x), ref.jets(x)):
                assert torch.equal(a, b)
            for k, v in _masks(m).items():
                assert torch.equal(_masks(m2)[k], v)
        assert ck["step"] == 3 and ck["optimizer"]["state"]


def _legacy_state(model, masks):
    """A csm_ext 0.1.0 state dict: the masks stored next to the weights."""
    sd = dict(model.state_dict())
    sd.update({k: v.clone() for k, v in masks.items()})
    return sd


def test_old_format_checkpoints_with_masks_still_load(tmp_path):
    torch.manual_seed(0)
    m = MADECSM(8, hidden_sizes=(16,), context_dim=3, head_hidden=8, order="random", seed=2)
    # 0.1.0 drew random-order hidden degrees differently: its stored masks are the ones to use
    old_masks = {k: (v * (torch.rand_like(v) > 0.3)) if k.startswith("hidden") else v
                 for k, v in _masks(m).items()}
    ckpt = dict(format="csm_ext/1", model_name="made", model_config=m.config,
                model=_legacy_state(m, old_masks), ema=_legacy_state(m, old_masks),
                optimizer=None, step=5, train_config=None, data_config=dict(kind="toy"),
                generator=None, extra={})
    path = str(tmp_path / "old.pt")
    torch.save(ckpt, path)
    m2, ck = load_checkpoint(path)
    for k, v in old_masks.items():
        assert torch.equal(_masks(m2)[k], v)
    x = torch.randn(4, 8)
    with torch.no_grad():
        for k, v in old_masks.items():
            dict(m.named_modules())[k.rsplit(".", 1)[0]].mask.copy_(v)
    assert torch.equal(m2.energy(x), m.energy(x))

    # a mask of the wrong shape is an error, not silently ignored
    bad = dict(ckpt, ema=None, model=dict(ckpt["model"], **{"out.mask": torch.ones(3, 3)}))
    torch.save(bad, path)
    with pytest.raises(ValueError, match="does not load.*out.mask"):
        load_checkpoint(path)

    p = PixelCNNppCSM(3, 2, 2, nr_resnet=1, nr_filters=8, context_dim=4, head_hidden=8)
    sd = dict(p.state_dict(), chan_mask=p.chan_mask.clone())
    p2 = PixelCNNppCSM.from_config(p.config)
    p2.load_state_dict(sd)  # strict: the old key is accepted
    sd["chan_mask"] = torch.ones_like(p.chan_mask)
    with pytest.raises(RuntimeError, match="chan_mask"):
        p2.load_state_dict(sd)
    assert isinstance(m.out, MaskedLinear)


def test_resume_is_exact_with_dropout(tmp_path):
    """The global RNG (dropout) is saved and restored: straight and resumed runs agree."""
    from csm_ext.data.sources import source_from_spec

    src = source_from_spec("digits", sigma=0.5, limit=32)

    def model():
        torch.manual_seed(0)
        return PixelCNNppCSM(1, 8, 8, nr_resnet=1, nr_filters=4, context_dim=2, head_hidden=4,
                             head_layers=1, dropout=0.5)

    def cfg(out, **kw):
        return TrainConfig(steps=4, batch_size=4, lr=1e-3, log_every=2, n_samples=0,
                           out_dir=str(out), progress=False, **kw)

    a, b = model(), model()
    train(a, src, cfg(tmp_path / "straight", ckpt_every=2))
    train(b, src, cfg(tmp_path / "resumed"), resume=str(tmp_path / "straight" / "step_2.pt"))
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), k


@pytest.mark.parametrize("kind", ["garbage", "truncated", "empty", "pickled_module", "text"])
def test_unreadable_checkpoints_give_clean_errors(tmp_path, capsys, kind):
    good = tmp_path / "good.pt"
    torch.save(dict(a=torch.zeros(100)), good)
    path = tmp_path / f"{kind}.pt"
    if kind == "garbage":
        path.write_bytes(b"garbage")
    elif kind == "truncated":
        path.write_bytes(good.read_bytes()[:200])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "pickled_module":
        torch.save(torch.nn.Linear(2, 2), path)
    else:
        path.write_text("hello\n" * 20)
    with pytest.raises(ValueError) as e:
        load_checkpoint(str(path))
    msg = str(e.value)
    assert msg.startswith(f"not a readable csm_ext checkpoint: {path} (")
    assert "weights_only" not in msg and "arbitrary code" not in msg
    capsys.readouterr()
    assert main(["sample", "--ckpt", str(path), "--no-progress"]) == 2
    cap = capsys.readouterr()
    assert cap.err.startswith("csm-ext: error: not a readable csm_ext checkpoint")
    assert "weights_only" not in cap.err and "Traceback" not in cap.err
    assert len(cap.err.strip().splitlines()) == 1


def test_api_resume_past_steps_is_an_error(tmp_path):
    src = ToySource("8gaussians", n_test=10)
    m = MADECSM(2, hidden_sizes=(8,), context_dim=2, head_hidden=4, head_layers=1)
    train(m, src, TrainConfig(steps=3, out_dir=str(tmp_path / "a"), progress=False, n_samples=0))
    with pytest.raises(ValueError, match="at step 3.*raise steps"):
        train(m, src, TrainConfig(steps=3, out_dir=str(tmp_path / "b"), progress=False,
                                  n_samples=0), resume=str(tmp_path / "a" / "last.pt"))
