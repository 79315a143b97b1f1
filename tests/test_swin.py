"""course_lib.swin: windows, shift, mask and relative positions on hand-checkable toys, and parity
with transformers SwinModel / Swinv2Model on random weights."""

import pytest
import torch
import transformers
from conftest import randomize_, report_diff

from course_lib.layers import param_groups, use_explicit_attention
from course_lib.recipes.swin import attention_flops, window_connectivity
from course_lib.swin import (
    Swin,
    SwinConfig,
    SwinV2,
    cyclic_shift,
    log_spaced_coords,
    merge_patches,
    pad_to_window,
    relative_position_bias,
    relative_position_index,
    reverse_cyclic_shift,
    shifted_window_mask,
    swin_micro,
    window_and_shift,
    window_partition,
    window_reverse,
)



def grid(H: int, W: int) -> torch.Tensor:
    """Tokens numbered 1..H*W row-major, as a (1, H, W, 1) map (the paper's 8x8 example)."""
    return torch.arange(1, H * W + 1).reshape(1, H, W, 1)


# ----------------------------------------------------------------------------------------------
# Pure functions
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("B,H,W,C,M", [(1, 8, 8, 1, 4), (2, 6, 9, 3, 3), (2, 4, 12, 5, 2)])
def test_window_partition_reverse_roundtrip(B, H, W, C, M):
    x = torch.randn(B, H, W, C)
    win = window_partition(x, M)
    assert win.shape == (B * (H // M) * (W // M), M, M, C)
    assert torch.equal(window_reverse(win, M, H, W), x)
    assert torch.equal(win[1], x[0, :M, M : 2 * M])  # window-major: second window = next to the right


def test_window_partition_paper_example():
    win = window_partition(grid(8, 8), 4)[..., 0]
    assert win[0].tolist() == [[1, 2, 3, 4], [9, 10, 11, 12], [17, 18, 19, 20], [25, 26, 27, 28]]
    assert win[3, 0].tolist() == [37, 38, 39, 40]


def test_cyclic_shift_paper_example_and_inverse():
    shifted = cyclic_shift(grid(8, 8), 2)[0, :, :, 0]
    assert shifted[0].tolist() == [19, 20, 21, 22, 23, 24, 17, 18]  # the paper's figure, first row
    assert shifted[-1].tolist() == [11, 12, 13, 14, 15, 16, 9, 10]
    x = torch.randn(2, 6, 10, 3)
    assert torch.equal(reverse_cyclic_shift(cyclic_shift(x, 3), 3), x)
    assert cyclic_shift(x, 0) is x


def test_shifted_window_mask_paper_example():
    mask = shifted_window_mask(8, 8, 4, 2)
    assert mask.shape == (4, 16, 16) and mask.dtype == torch.bool
    assert mask[0].all()  # the top-left shifted window holds no wrapped tokens
    # The bottom-right window holds four regions of 2x2 tokens: each attends only within its own.
    assert mask[3].sum(dim=1).tolist() == [4] * 16
    wins = window_partition(cyclic_shift(grid(8, 8), 2), 4).reshape(4, 16)
    assert wins[3].tolist()[:4] == [55, 56, 49, 50]
    assert set(wins[3][mask[3][0]].tolist()) == {55, 56, 63, 64}  # token 55 sees only its own 2x2 region
    assert set(wins[3][mask[3][2]].tolist()) == {49, 50, 57, 58}
    # Right column windows: two regions side by side (8 tokens each).
    assert mask[1].sum(dim=1).tolist() == [8] * 16
    assert shifted_window_mask(8, 8, 4, 0).all()


def test_shifted_window_mask_non_square_and_errors():
    mask = shifted_window_mask(4, 12, 4, 2)
    assert mask.shape == (3, 16, 16)
    assert mask[0].sum(1).tolist() == [8] * 16  # one row of windows: only the row wrap splits it
    with pytest.raises(ValueError, match="shift must be in"):
        shifted_window_mask(8, 8, 4, 4)
    with pytest.raises(ValueError, match="pad it first with pad_to_window"):
        window_partition(torch.zeros(1, 6, 8, 1), 4)


def test_window_connectivity_matches_paper_figure_2():
    regular = window_connectivity(8, 8, 4, 0)
    assert regular.sum(1).tolist() == [16] * 64 and torch.equal(regular, regular.T)
    shifted = window_connectivity(8, 8, 4, 2).sum(1).reshape(8, 8)
    # Shifting by 2 gives 9 windows: 2x2 corners, 2x4 / 4x2 edges, one 4x4 centre.
    assert shifted[0].tolist() == [4, 4, 8, 8, 8, 8, 4, 4] and shifted[3].tolist() == [8, 8, 16, 16, 16, 16, 8, 8]
    two_blocks = (regular.float() @ window_connectivity(8, 8, 4, 2).float()) > 0
    assert two_blocks[0].sum() > 16 and (regular.float() @ regular.float() > 0).sum(1).max() == 16


def test_relative_position_index_2x2():
    idx = relative_position_index(2)  # offsets (dy, dx) in {-1,0,1}^2, table of 3x3
    assert idx.tolist() == [[4, 3, 1, 0], [5, 4, 2, 1], [7, 6, 4, 3], [8, 7, 5, 4]]
    assert relative_position_index(7).shape == (49, 49) and relative_position_index(7).max() == 168


def test_relative_position_bias_and_central_slice():
    table = torch.randn(49, 3)  # a table for 4x4 windows
    bias = relative_position_bias(table, 4)
    assert bias.shape == (3, 16, 16)
    assert torch.equal(bias[:, 5, 5], table[24])  # zero offset: the table's centre
    small = relative_position_bias(table, 2, table_window=4)  # a 2x2 window reads the centre 3x3
    centre = table.reshape(7, 7, 3)[2:5, 2:5].reshape(9, 3)
    assert torch.equal(small, relative_position_bias(centre, 2))
    with pytest.raises(ValueError, match="cannot serve"):
        relative_position_bias(table, 5, table_window=4)


def test_log_spaced_coords():
    c = log_spaced_coords(3)  # offsets -2..2 scaled to -8..8, then sign*log2(1+|d|)/3
    assert c.shape == (25, 2)
    assert torch.allclose(c[12], torch.zeros(2))  # zero offset
    assert torch.allclose(c[-1], torch.log2(torch.tensor(9.0)) / 3)  # offset (2, 2) -> 8 -> log2(9)/3
    assert torch.allclose(c[0], -torch.log2(torch.tensor(9.0)) / 3)
    assert torch.allclose(log_spaced_coords(5, pretrained_window_size=3)[-1], torch.log2(torch.tensor(17.0)) / 3)


def test_window_and_shift_and_padding_and_merge():
    assert window_and_shift(8, 8, 4, 2) == (4, 2)
    assert window_and_shift(4, 6, 4, 2) == (4, 0)  # not larger than the window: no shift
    assert window_and_shift(2, 3, 4, 2) == (2, 0)
    assert pad_to_window(torch.ones(1, 5, 6, 2), 4).shape == (1, 8, 8, 2)
    x = grid(4, 4)
    merged = merge_patches(x)
    assert merged.shape == (1, 2, 2, 4)
    assert merged[0, 0, 0].tolist() == [1, 5, 2, 6]  # order (0,0), (1,0), (0,1), (1,1)
    assert merge_patches(grid(3, 5)).shape == (1, 2, 3, 4)


def test_attention_flops_eq_1_and_2():
    # Swin eq. 1-2 at stage 1 of Swin-T: 56x56 tokens, C=96, M=7.
    assert attention_flops(56, 56, 96) == 4 * 3136 * 96**2 + 2 * 3136**2 * 96
    assert attention_flops(56, 56, 96, 7) == 4 * 3136 * 96**2 + 2 * 49 * 3136 * 96
    assert attention_flops(56, 56, 96) > 10 * attention_flops(56, 56, 96, 7)


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_micro_model_shapes_sdpa_explicit_and_no_weight_decay():
    m = swin_micro(num_classes=4).eval()
    x = torch.randn(2, 3, 32, 32)
    feats, maps = m.forward_features(x, return_attention=True)
    assert feats.shape == (2, 16, 128) and m(x).shape == (2, 4)
    assert len(maps) == 6 and maps[0].shape == (2 * 16, 2, 16, 16)
    assert torch.allclose(maps[1].sum(-1), torch.ones(()))
    report_diff("Swin sdpa vs explicit", m(x), use_explicit_attention(m)(x), 1e-5)
    nwd = m.no_weight_decay()
    assert "stages.0.blocks.0.attn.relative_position_bias_table" in nwd
    decay, no_decay = param_groups(m, 0.05)
    assert id(m.stages[0].blocks[0].attn.relative_position_bias_table) in {id(p) for p in no_decay["params"]}
    v2 = SwinV2(SwinConfig(depths=(2,), num_heads=(2,), num_classes=0))
    assert v2.config.version == 2 and v2.stages[0].blocks[0].attn.qkv.bias is None
    assert {"stages.0.blocks.0.attn.logit_scale", "stages.0.blocks.0.attn.cpb_mlp.0.weight"} <= v2.no_weight_decay()
    assert (v2.stages[0].blocks[1].norm1.weight == 0).all()  # res-post-norm branches start at zero


def test_shift_changes_output_only_through_window_mixing():
    m = swin_micro(depths=(2,), num_heads=(2,), num_classes=0).eval()
    x = torch.randn(1, 3, 32, 32)
    y = m(x)
    m.stages[0].blocks[1].shift = 0
    assert not torch.allclose(y, m(x))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(depths=(2, 2), num_heads=(2,)), "one entry per stage"),
        (dict(window_size=1), "window_size must be at least 2"),
        (dict(embed_dim=30, num_heads=(4, 4, 8)), "not divisible by 4 heads"),
        (dict(image_size=33), "not divisible by the patch size"),
        (dict(version=3), "version must be 1"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SwinConfig(**kwargs)


def test_bad_image_gets_clear_error():
    with pytest.raises(ValueError, match="not divisible by the patch size 2"):
        swin_micro()(torch.randn(1, 3, 31, 32))


# ----------------------------------------------------------------------------------------------
# Parity with transformers
# ----------------------------------------------------------------------------------------------
SMALL = dict(patch_size=4, embed_dim=16, depths=[2, 2, 2], num_heads=[2, 2, 4], window_size=4)


# 64x64: stages 16, 8, 4 (the last equals the window: no shift); 72x88: stages 18x22, 9x11, 5x6
# (padding to the window, odd sizes in patch merging); 64x96: last stage 4x6, padded, unshifted.
@pytest.mark.slow
@pytest.mark.parametrize("shape", [(2, 3, 64, 64), (1, 3, 72, 88), (1, 3, 64, 96)])
def test_swin_parity_in_memory(shape):
    hf = randomize_(transformers.SwinModel(transformers.SwinConfig(image_size=64, **SMALL))).eval()
    ours = Swin.from_hf(hf).eval()
    x = torch.randn(shape)
    with torch.no_grad():
        ref = hf(x).last_hidden_state
        report_diff(f"SwinModel {shape}", ours.forward_features(x), ref)
        report_diff(f"SwinModel {shape} explicit", use_explicit_attention(ours).forward_features(x), ref)


@pytest.mark.slow
def test_swin_classifier_parity_from_disk(tmp_path):
    hf = randomize_(transformers.SwinForImageClassification(transformers.SwinConfig(image_size=64, num_labels=5, **SMALL))).eval()
    hf.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    assert any(".attention.self.query." in k for k in load_file(str(tmp_path / "model.safetensors")))
    ours = Swin.from_hf(str(tmp_path)).eval()
    assert type(ours) is Swin and ours.config.num_classes == 5
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        report_diff("SwinForImageClassification from disk", ours(x), hf(x).logits)


# transformers' Swinv2 fixes each block's window and shift from config.image_size, so each input
# size gets its own reference. 48: stages 12, 6 (padded to 8, shifted), 3 (smaller than the window:
# window 3); 32: stages 8, 4, 2.
@pytest.mark.slow
@pytest.mark.parametrize("size,pretrained", [(64, None), (48, None), (32, [0, 3, 2])])
def test_swinv2_parity(size, pretrained, tmp_path):
    extra = dict(pretrained_window_sizes=pretrained) if pretrained else {}
    hf = randomize_(transformers.Swinv2Model(transformers.Swinv2Config(image_size=size, **SMALL, **extra))).eval()
    ours = SwinV2.from_hf(hf).eval()
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        ref = hf(x).last_hidden_state
        report_diff(f"Swinv2Model {size}", ours.forward_features(x), ref)
        report_diff(f"Swinv2Model {size} explicit", use_explicit_attention(ours).forward_features(x), ref)
    if size == 64:
        hf.save_pretrained(tmp_path)
        with torch.no_grad():
            report_diff("Swinv2Model from disk", Swin.from_hf(str(tmp_path)).eval().forward_features(x), ref)


@pytest.mark.slow
def test_swinv2_loader_rejects_v1_checkpoint():
    hf = transformers.SwinModel(transformers.SwinConfig(image_size=32, **SMALL))
    with pytest.raises(ValueError, match="Swin V1 checkpoint"):
        SwinV2.from_hf(hf)


@pytest.mark.parametrize("factory,millions", [("swin_tiny", 28.3), ("swin_small", 49.6), ("swin_base", 87.8), ("swinv2_tiny", 28.3)])
def test_paper_sizes_match_the_papers_tables(factory, millions):
    """Swin Table 1: Swin-T 28M, Swin-S 50M, Swin-B 88M parameters (224 px, 1,000 classes);
    Swin V2-T 28M (256 px, window 8)."""
    from course_lib import swin

    with torch.device("meta"):
        model = getattr(swin, factory)()
    assert model.config.num_classes == 1000
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(millions, abs=0.05)
