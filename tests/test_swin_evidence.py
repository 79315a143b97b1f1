"""Lecture 02's evidence code: the switches of course_lib.recipes.swin and a smoke run of
scripts/sweep_swin.py. (Checks of a shipped results file against the lecture's claims belong here
once the sweep ships one.)"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers  # noqa: F401  (the suite imports it everywhere; the parity tests live in test_swin.py)

from course_lib.recipes import swin as recipe
from course_lib.swin import SwinConfig
from course_lib.train import fit
from course_lib.utils import seed_everything

ROOT = Path(__file__).resolve().parents[1]
SMALL = SwinConfig(image_size=16, patch_size=2, num_classes=3, embed_dim=8, depths=(2,), num_heads=(2,), window_size=4)


# ----------------------------------------------------------------------------------------------
# The switches
# ----------------------------------------------------------------------------------------------
def test_build_swin_without_shift_uses_regular_windows_everywhere():
    shifted, regular = recipe.build_swin(True, True, SMALL), recipe.build_swin(False, True, SMALL)
    assert [b.shift for b in shifted.stages[0].blocks] == [0, 2]
    assert [b.shift for b in regular.stages[0].blocks] == [0, 0]
    # Same weights, different windows: the second block's output must change.
    regular.load_state_dict(shifted.state_dict())
    x = torch.randn(2, 3, 16, 16)
    assert not torch.allclose(shifted(x), regular(x))


def test_build_swin_without_bias_keeps_the_tables_at_zero_through_training():
    seed_everything(0)
    model = recipe.build_swin(True, False, SMALL)
    tables = [b.attn.relative_position_bias_table for b in model.stages[0].blocks]
    assert all(not t.requires_grad and t.abs().max() == 0 for t in tables)
    x, y = torch.rand(16, 3, 16, 16), torch.randint(0, 3, (16,))
    fit(model, (x, y), epochs=1, batch_size=8, progress=False)
    assert all(t.abs().max() == 0 for t in tables)


def test_build_swin_refuses_a_v2_config():
    with pytest.raises(ValueError, match="version=1"):
        recipe.build_swin(config=SwinConfig(version=2))


def test_build_model_names_the_choices():
    with pytest.raises(ValueError, match="ViT"):
        recipe.build_model("ResNet")


def test_deep_stack_differs_only_in_the_norm_and_post_norm_starts_as_the_identity():
    config = SwinConfig(image_size=16, patch_size=4, num_classes=3, embed_dim=8, depths=(4,), num_heads=(2,), window_size=2)
    pre, post = recipe.build_deep_stack(False, config), recipe.build_deep_stack(True, config)
    assert sorted(pre.state_dict()) == sorted(post.state_dict())
    assert all(b.post_norm for b in post.stages[0].blocks) and not any(b.post_norm for b in pre.stages[0].blocks)
    x = torch.randn(1, 4, 4, 8)
    with torch.no_grad():
        assert torch.equal(post.stages[0](x), x)
    amp = recipe.activation_amplitude(post, torch.rand(2, 3, 16, 16))
    assert len(amp) == 4 and max(amp) - min(amp) < 1e-6  # identity blocks: one amplitude throughout


def test_per_class_accuracy_counts_each_class():
    class Fixed(torch.nn.Module):  # always predicts class 0
        def forward(self, x):
            return torch.tensor([1.0, 0.0])[None].expand(x.shape[0], 2)

    labels = torch.tensor([0, 0, 1, 1, 1])
    assert recipe.per_class_accuracy(Fixed(), torch.zeros(5, 1), labels, 2) == [1.0, 0.0]


# ----------------------------------------------------------------------------------------------
# The script
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sweep_script_smoke_run_and_merge(tmp_path):
    out = tmp_path / "sweep.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "sweep_swin.py"), "--smoke", "--out", str(out)]
    subprocess.run(cmd + ["--names", "ViT", "--no-deep"], check=True, cwd=tmp_path, timeout=600)
    part = tmp_path / "part.json"
    subprocess.run(cmd[:-1] + [str(part), "--names", "no pos."], check=True, cwd=tmp_path, timeout=600)
    merged = tmp_path / "merged.json"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "sweep_swin.py"), "--merge", str(out), str(part),
                    "--out", str(merged)], check=True, cwd=tmp_path, timeout=600)
    results = json.loads(merged.read_text())
    assert set(results["classifiers"]) == {"ViT", "no pos."}
    assert set(results["deep_stacks"]) == {"pre-norm", "res-post-norm"}
    row = results["classifiers"]["ViT"][0]
    assert len(row["per_class"]) == len(results["classes"]) and len(row["test_acc_per_epoch"]) == 1
