"""course_lib.train and course_lib.utils: the training loop learns, is reproducible, and records
its history; checkpoints round-trip with their config; bad input gets clear errors."""

import pytest
import torch
from torch import nn

from course_lib.train import cosine_schedule, evaluate, fit
from course_lib.utils import load_checkpoint, save_checkpoint, seed_everything
from course_lib.vit import ViT, ViTConfig


def _toy():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 3, 8, 8, generator=g)
    y = (x[:, 0].mean(dim=(1, 2)) > 0).long()  # learnable from the red channel's mean
    return x, y


def test_fit_learns_and_records_history():
    x, y = _toy()
    seed_everything(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(192, 2))
    before = evaluate(model, (x, y))
    hist = fit(model, (x, y), epochs=5, batch_size=32, lr=1e-2, eval_data=(x, y), progress=False, log_every=4)
    assert hist.eval_acc[-1] > max(0.9, before)
    assert len(hist.train_acc) == len(hist.eval_acc) == 5
    assert hist.step[-1] == 5 * 8 and hist.loss[-1] < hist.loss[0]
    # throughput is what was seen over the time it took: 5 epochs of 256 images
    assert hist.seconds > 0 and hist.images_per_s == pytest.approx(5 * 256 / hist.seconds)


def test_fit_is_reproducible():
    x, y = _toy()
    losses = []
    for _ in range(2):
        seed_everything(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(192, 2))
        losses.append(fit(model, (x, y), epochs=2, batch_size=32, progress=False).loss)
    assert losses[0] == losses[1]


def test_fit_rejects_bad_data():
    model = nn.Linear(2, 2)
    with pytest.raises(TypeError, match="tuple of tensors"):
        fit(model, [[1, 2]], progress=False)
    with pytest.raises(ValueError, match="different lengths"):
        fit(model, (torch.zeros(4, 2), torch.zeros(3).long()), progress=False)


def test_cosine_schedule_warms_up_then_decays_to_zero():
    f = cosine_schedule(100, 10)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.5, abs=0.01) and f(100) == pytest.approx(0.0)


def test_checkpoint_round_trip(tmp_path):
    model = ViT(ViTConfig(dim=16, depth=1, num_heads=2, num_classes=3)).eval()
    save_checkpoint(model, tmp_path / "m.safetensors", note="hello")
    loaded, meta = load_checkpoint(tmp_path / "m.safetensors", ViT, ViTConfig)
    assert meta == {"note": "hello"} and loaded.config == model.config
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded(x), model(x))
    with pytest.raises(FileNotFoundError, match="shipped checkpoints"):
        load_checkpoint(tmp_path / "missing.safetensors", ViT, ViTConfig)
