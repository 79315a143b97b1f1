"""course_lib.convnext: LayerNorm over channels, GRN, blocks, FCMAE masking, the roadmap, and parity
with transformers ConvNextModel / ConvNextV2Model on random weights."""

import pytest
import torch
import transformers
import torch.nn.functional as F
from conftest import randomize_, report_diff

from course_lib.convnext import (
    FCMAE,
    GRN,
    ConvNeXt,
    ConvNeXtBlock,
    ConvNeXtConfig,
    LayerNorm2d,
    convnext_tiny,
    convnextv2_atto,
    fcmae_loss,
    fcmae_mask,
    grn,
    grn_aggregate,
    grn_normalize,
    layer_norm_2d,
    upsample_mask,
)
from course_lib.layers import param_groups
from course_lib.recipes.convnext import ROADMAP, RoadmapBlock, grn_disabled, mask_leakage
from course_lib.utils import count_macs


TINY = dict(depths=(1, 2, 1), dims=(8, 16, 24), num_classes=0)


# ----------------------------------------------------------------------------------------------
# Pure functions on hand-checkable tensors
# ----------------------------------------------------------------------------------------------
def test_layer_norm_2d_normalizes_each_pixel_over_channels():
    x = torch.tensor([1.0, 2.0, 3.0]).reshape(1, 3, 1, 1).repeat(2, 1, 2, 2)  # every pixel is (1, 2, 3)
    out = layer_norm_2d(x, torch.ones(3), torch.zeros(3), eps=0.0)
    expected = torch.tensor([-1.0, 0.0, 1.0]) * (3 / 2) ** 0.5  # (x - 2) / std, std = sqrt(2/3)
    assert torch.allclose(out[0, :, 1, 0], expected, atol=1e-6)
    y = torch.randn(2, 5, 4, 3)
    ref = F.layer_norm(y.permute(0, 2, 3, 1), (5,)).permute(0, 3, 1, 2)
    report_diff("layer_norm_2d vs F.layer_norm", LayerNorm2d(5)(y), ref, 1e-6)


def test_grn_steps_on_a_toy_map():
    x = torch.zeros(1, 2, 2, 2)  # (B, H, W, C): channel 0 has norm 2, channel 1 has norm 1
    x[..., 0] = 1.0
    x[0, 0, 0, 1] = 1.0
    gx = grn_aggregate(x)
    assert torch.allclose(gx.flatten(), torch.tensor([2.0, 1.0]))
    nx = grn_normalize(gx, eps=0.0)
    assert torch.allclose(nx.flatten(), torch.tensor([4 / 3, 2 / 3]))  # divided by the mean 1.5
    out = grn(x, torch.ones(2), torch.zeros(2), eps=0.0)  # gamma = 1: x * (1 + nx)
    assert torch.allclose(out[0, 0, 0], torch.tensor([1 + 4 / 3, 1 + 2 / 3]))


def test_grn_starts_as_identity_and_mean_equals_scaled_sum():
    x = torch.randn(2, 5, 6, 8)
    assert torch.equal(GRN(8)(x), x)  # gamma = beta = 0 at init
    gx = grn_aggregate(x)
    paper = gx / gx.sum(dim=-1, keepdim=True)  # eq. 2 writes a sum over channels
    assert torch.allclose(grn_normalize(gx, eps=0.0), paper * 8)


def test_v2_block_at_init_equals_the_block_without_grn():
    v2 = ConvNeXtBlock(8, layer_scale=None, grn=True)
    assert not v2.grn.gamma.any() and not v2.grn.beta.any() and v2.grn.gamma.shape == (32,)
    plain = ConvNeXtBlock(8, layer_scale=None, grn=False)
    plain.load_state_dict({k: v for k, v in v2.state_dict().items() if ".grn." not in k and not k.startswith("grn.")})
    x = torch.randn(2, 8, 5, 5)
    assert torch.equal(v2(x), plain(x))


def test_grn_disabled_restores_parameters():
    model = randomize_(ConvNeXt(ConvNeXtConfig(**TINY, layer_scale=None, grn=True)))
    x = torch.randn(1, 3, 32, 32)
    before = model.eval()(x)
    with grn_disabled(model):
        off = model(x)
        assert all(not m.gamma.any() for m in model.modules() if isinstance(m, GRN))
    assert not torch.allclose(off, before)
    assert torch.equal(model(x), before)


@pytest.mark.parametrize(
    "fn,bad,match",
    [
        (lambda x: GRN(8)(x), torch.randn(1, 8, 4, 4), r"\(B, H, W, C\) with C=8.*permute\(0, 2, 3, 1\)"),
        (lambda x: LayerNorm2d(8)(x), torch.randn(1, 4, 4, 8), r"\(B, C, H, W\) with C=8.*permute\(0, 3, 1, 2\)"),
        (lambda x: ConvNeXtBlock(8)(x), torch.randn(1, 5, 5, 8), "other layout"),
        (lambda x: GRN(8)(x), torch.randn(8, 4, 4), "4D tensor"),
        (lambda x: ConvNeXt(ConvNeXtConfig(**TINY))(x), torch.randn(1, 32, 32, 3), r"permute\(0, 3, 1, 2\)"),
        (lambda x: ConvNeXt(ConvNeXtConfig(**TINY))(x), torch.randn(1, 3, 8, 8), "smaller than the network's total stride 16"),
    ],
)
def test_clear_errors_for_wrong_layouts(fn, bad, match):
    with pytest.raises(ValueError, match=match):
        fn(bad)


def test_config_errors():
    with pytest.raises(ValueError, match="one entry per stage"):
        ConvNeXtConfig(depths=(1, 1), dims=(8,))
    with pytest.raises(ValueError, match="odd"):
        ConvNeXtConfig(kernel_size=4)


# ----------------------------------------------------------------------------------------------
# FCMAE
# ----------------------------------------------------------------------------------------------
def test_fcmae_mask_counts_and_upsampling():
    mask = fcmae_mask(3, (4, 5), 0.6, generator=torch.Generator().manual_seed(0))
    assert mask.shape == (3, 4, 5)
    assert torch.equal(mask.flatten(1).sum(1), torch.full((3,), 12.0))  # 20 - int(20 * 0.4) = 12 masked
    up = upsample_mask(mask, 4)
    assert up.shape == (3, 1, 16, 20)
    assert torch.equal(up[:, 0, ::4, ::4], mask) and torch.equal(up[:, 0, 3::4, 3::4], mask)
    with pytest.raises(ValueError, match=r"mask_ratio must lie in \[0, 1\)"):
        fcmae_mask(1, (2, 2), 1.0)
    with pytest.raises(ValueError, match=r"\(B, gh, gw\)"):
        upsample_mask(mask[None], 2)


def test_sparse_emulation_keeps_masked_cells_empty_and_dense_leaks():
    model = randomize_(ConvNeXt(ConvNeXtConfig(**TINY)), std=0.1).eval()
    x = torch.randn(2, 3, 64, 64)
    mask = fcmae_mask(2, (4, 4), 0.5, generator=torch.Generator().manual_seed(1))
    sparse = mask_leakage(model, x, mask, sparse=True)
    dense = mask_leakage(model, x, mask, sparse=False)
    print("leakage sparse", sparse, "dense", dense)
    assert sparse == [0.0, 0.0, 0.0]
    assert all(d > 0.1 for d in dense)
    # With re-masking, the visible cells cannot see what the masked pixels contained.
    y = x.clone()
    y[upsample_mask(mask, 16).expand_as(y) > 0] = 5.0
    with torch.no_grad():
        assert torch.equal(model.forward_features(x, mask=mask), model.forward_features(y, mask=mask))
    with pytest.raises(ValueError, match=r"mask of shape \(B, 4, 4\)"):
        model.forward_features(x, mask=mask[:, :2])


def test_fcmae_loss_only_on_masked_cells_and_model_runs():
    images = torch.rand(2, 3, 16, 16)
    mask = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 1.0]]])
    from course_lib.vit import patchify

    pred = patchify(images, 8).clone()
    pred[0, 1:] = 100.0  # wrong only on visible cells: no loss
    pred[1, :3] = -100.0
    assert fcmae_loss(images, pred, mask, 8, norm_pix=False).item() == 0.0
    pred[0, 0] += 1.0  # wrong by 1 on one of the 2 masked cells
    assert abs(fcmae_loss(images, pred, mask, 8, norm_pix=False).item() - 0.5) < 1e-6
    mae = FCMAE(ConvNeXt(ConvNeXtConfig(**TINY)), decoder_dim=16)
    loss, pred, m = mae(torch.rand(2, 3, 32, 32), generator=torch.Generator().manual_seed(0))
    assert pred.shape == (2, 4, 16 * 16 * 3) and m.shape == (2, 2, 2) and loss.ndim == 0
    loss.backward()
    assert mae.mask_token.grad is not None
    assert "mask_token" in mae.no_weight_decay()


# ----------------------------------------------------------------------------------------------
# Roadmap, sizes, weight decay
# ----------------------------------------------------------------------------------------------
def test_roadmap_ends_at_the_convnext_block():
    assert [n for n, _ in ROADMAP][0] == "ResNet bottleneck" and len(ROADMAP) == 9
    last = RoadmapBlock(96, ROADMAP[-1][1])
    block = ConvNeXtBlock(96, layer_scale=None)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(last) == n(block) == 79200
    assert count_macs(last, (1, 96, 14, 14)) == count_macs(block, (1, 96, 14, 14))
    for _, design in ROADMAP:
        assert RoadmapBlock(16, design)(torch.randn(1, 16, 6, 6)).shape == (1, 16, 6, 6)


def test_convnext_tiny_size_matches_the_paper():
    with torch.device("meta"):  # shapes only: no memory, no time
        model = convnext_tiny()
    params = sum(p.numel() for p in model.parameters())
    assert model.config.num_classes == 1000  # the paper's model, with its ImageNet head
    assert params / 1e6 == pytest.approx(28.6, abs=0.05)  # ConvNeXt-T: 28.6M (timm), "28M" in Table 1
    assert 4.4e9 < count_macs(model, (1, 3, 224, 224)) < 4.5e9  # 4.5G FLOPs (Liu et al., 2022, Table 1)


def test_convnextv2_tiny_size_matches_the_paper():
    from course_lib.convnext import convnextv2_tiny

    with torch.device("meta"):
        model = convnextv2_tiny()
    assert model.config.num_classes == 1000
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(28.6, abs=0.05)  # V2 Table 5: 28.6M


def test_weight_decay_skips_grn_and_layer_scale():
    model = convnextv2_atto()
    assert "stages.0.blocks.0.grn.gamma" in model.no_weight_decay()
    decay, no_decay = param_groups(model, 0.05)
    ids = {id(p) for p in no_decay["params"]}
    assert id(model.stages[0].blocks[0].grn.gamma) in ids and id(model.stages[0].blocks[0].pwconv1.weight) not in ids


# ----------------------------------------------------------------------------------------------
# Parity with transformers
# ----------------------------------------------------------------------------------------------
HF_SMALL = dict(hidden_sizes=[8, 16, 24], depths=[1, 2, 1], num_stages=3)


def _hf(v2: bool, head: bool = False):
    if v2:
        cfg = transformers.ConvNextV2Config(**HF_SMALL, num_labels=5)
        cls = transformers.ConvNextV2ForImageClassification if head else transformers.ConvNextV2Model
    else:
        cfg = transformers.ConvNextConfig(**HF_SMALL, num_labels=5)
        cls = transformers.ConvNextForImageClassification if head else transformers.ConvNextModel
    return randomize_(cls(cfg)).eval()


@pytest.mark.slow
@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("shape", [(2, 3, 32, 32), (1, 3, 24, 40), (1, 3, 64, 48)])
def test_parity_in_memory(v2, shape):
    hf = _hf(v2)
    ours = ConvNeXt.from_hf(hf).eval()
    assert ours.config.grn == v2 and (ours.config.layer_scale is None) == v2
    x = torch.randn(shape)
    with torch.no_grad():
        out = hf(x)
        name = "ConvNextV2Model" if v2 else "ConvNextModel"
        report_diff(f"{name} {shape} last_hidden_state", ours.forward_features(x), out.last_hidden_state)
        report_diff(f"{name} {shape} pooler_output", ours(x), out.pooler_output)


@pytest.mark.slow
@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_parity_classifier_from_disk(v2, tmp_path):
    hf = _hf(v2, head=True)
    hf.save_pretrained(tmp_path)
    ours = ConvNeXt.from_hf(str(tmp_path)).eval()
    assert ours.config.num_classes == 5
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        report_diff(f"{type(hf).__name__} from disk logits", ours(x), hf(x).logits)


@pytest.mark.slow
def test_from_hf_rejects_other_families():
    vit = transformers.ViTModel(transformers.ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32))
    with pytest.raises(ValueError, match="reads convnext, convnextv2 checkpoints"):
        ConvNeXt.from_hf(vit)
