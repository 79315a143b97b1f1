"""course_lib.vit: patches, the model's pieces, and parity with transformers ViT, DeiT and
DINOv2-with-registers on random weights."""

import pytest
import torch
import transformers
import torch.nn.functional as F
from conftest import randomize_, report_diff

from course_lib.layers import attention, resample_pos_embed, use_explicit_attention
from course_lib.vit import ViT, ViTConfig, deit_hard_distillation_loss, patchify, unpatchify



@pytest.mark.parametrize("shape,p", [((2, 3, 32, 32), 4), ((1, 3, 24, 40), 8), ((2, 1, 6, 9), 3)])
def test_patchify_unpatchify_exact_inverse(shape, p):
    x = torch.randn(shape)
    patches = patchify(x, p)
    assert patches.shape == (shape[0], (shape[2] // p) * (shape[3] // p), p * p * shape[1])
    assert torch.equal(unpatchify(patches, p, shape[2:], shape[1]), x)
    # First patch is the top-left corner, values ordered (row, column, channel).
    assert torch.equal(patches[0, 0], x[0, :, :p, :p].permute(1, 2, 0).reshape(-1))


def test_conv_patch_embedding_equals_linear_on_patches():
    m = ViT(ViTConfig(dim=16, depth=1, num_heads=2))
    x = torch.randn(2, 3, 32, 32)
    w, b = m.patch_embed.as_linear()
    report_diff("conv vs linear patch embedding", m.patch_embed(x), patchify(x, 4) @ w.T + b)


def test_sdpa_and_explicit_attention_agree():
    q, k, v = torch.randn(3, 2, 4, 10, 8).unbind(0)
    mask = torch.rand(2, 4, 10, 10) > 0.3
    mask[..., 0] = True
    for m in (None, mask):
        a, _ = attention(q, k, v, m, use_sdpa=True)
        b, w = attention(q, k, v, m, use_sdpa=False)
        report_diff("sdpa vs explicit", a, b, 1e-6)
        assert torch.allclose(w.sum(-1), torch.ones(()))
    model = ViT(ViTConfig(dim=32, depth=2, num_heads=4))
    x = torch.randn(2, 3, 32, 32)
    fast = model.eval()(x)
    slow = use_explicit_attention(model)(x)
    report_diff("ViT sdpa vs explicit", fast, slow, 1e-5)


def test_registers_carry_no_position_and_are_dropped_by_the_head():
    m = ViT(ViTConfig(dim=16, depth=1, num_heads=2, num_registers=3, num_classes=4)).eval()
    x = torch.randn(2, 3, 32, 32)
    tokens = m.embed(x)
    assert tokens.shape == (2, 1 + 3 + 64, 16)
    assert torch.equal(tokens[0, 1:4], m.reg_tokens[0])  # registers exactly as learned: no position added
    assert torch.allclose(tokens[0, 0], (m.cls_token + m.pos_embed[:, :1])[0, 0])
    assert m(x).shape == (2, 4)


def test_resample_pos_embed_identity_and_shapes():
    pos = torch.randn(1, 1 + 16, 8)
    assert resample_pos_embed(pos, (4, 4)) is pos
    assert resample_pos_embed(pos, (2, 8)).shape == (1, 17, 8)  # same token count, other shape
    assert resample_pos_embed(pos, (3, 5)).shape == (1, 16, 8)
    assert torch.equal(resample_pos_embed(pos, (6, 6))[:, 0], pos[:, 0])  # CLS untouched
    const = torch.ones(1, 1 + 12, 4)  # a constant table stays constant, on a non-square source grid
    assert torch.allclose(resample_pos_embed(const, (5, 7), old_grid=(3, 4)), torch.ones(1, 36, 4))


def test_sincos_model_runs_at_any_resolution():
    m = ViT(ViTConfig(dim=32, depth=1, num_heads=4, pos_embed="sincos", num_classes=3)).eval()
    assert m(torch.randn(1, 3, 48, 24)).shape == (1, 3)


def test_mean_pool_and_weight_decay_exclusions():
    m = ViT(ViTConfig(dim=16, depth=1, num_heads=2, pool="mean", num_registers=2))
    from course_lib.layers import param_groups

    decay, no_decay = param_groups(m, 0.05)
    no_decay_ids = {id(p) for p in no_decay["params"]}
    for name in ("cls_token", "pos_embed", "reg_tokens"):
        assert id(getattr(m, name)) in no_decay_ids
    assert id(m.blocks[0].attn.qkv.weight) in {id(p) for p in decay["params"]}


@pytest.mark.parametrize(
    "bad,match",
    [
        (torch.randn(1, 3, 30, 32), "not divisible by the patch size 4"),
        (torch.randn(1, 1, 32, 32), r"expected images of shape \(B, 3, H, W\)"),
        (torch.randn(1, 32, 32, 3), "channels-last"),
    ],
)
def test_clear_errors_for_bad_images(bad, match):
    m = ViT(ViTConfig(dim=16, depth=1, num_heads=2))
    with pytest.raises(ValueError, match=match):
        m(bad)


def test_clear_error_for_weights_that_do_not_fit():
    m = ViT(ViTConfig(dim=16, depth=1, num_heads=2))
    sd = m.state_dict()
    sd.pop("cls_token")
    sd["extra.weight"] = torch.zeros(1)
    sd["pos_embed"] = torch.zeros(1, 5, 16)
    from course_lib.layers import load_state_dict_checked

    with pytest.raises(ValueError) as err:
        load_state_dict_checked(ViT(ViTConfig(dim=16, depth=1, num_heads=2)), sd)
    msg = str(err.value)
    assert "missing (1): cls_token" in msg and "unexpected (1): extra.weight" in msg and "pos_embed" in msg


# ----------------------------------------------------------------------------------------------
# Parity with transformers
# ----------------------------------------------------------------------------------------------
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=4)


@pytest.fixture
def hf_vit():
    cfg = transformers.ViTConfig(**SMALL, intermediate_size=64)
    return randomize_(transformers.ViTModel(cfg)).eval()


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(2, 3, 32, 32), (1, 3, 24, 40), (1, 3, 48, 48), (1, 3, 16, 64)])
def test_vit_parity_in_memory(hf_vit, shape):
    ours = ViT.from_hf(hf_vit).eval()
    x = torch.randn(shape)
    with torch.no_grad():
        ref = hf_vit(x, interpolate_pos_encoding=True).last_hidden_state
        report_diff(f"ViTModel {shape}", ours.forward_features(x), ref)
        report_diff(f"ViTModel {shape} explicit attention", use_explicit_attention(ours).forward_features(x), ref)


@pytest.mark.slow
def test_vit_parity_from_disk_names(hf_vit, tmp_path):
    hf_vit.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "model.safetensors")).keys()
    assert any(".attention.attention.query." in k for k in keys), "expected transformers' on-disk names"
    ours = ViT.from_hf(str(tmp_path)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        report_diff("ViTModel from disk", ours.forward_features(x), hf_vit(x).last_hidden_state)


@pytest.mark.slow
def test_vit_classifier_parity():
    hf = randomize_(transformers.ViTForImageClassification(transformers.ViTConfig(**SMALL, intermediate_size=64, num_labels=7))).eval()
    ours = ViT.from_hf(hf).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        report_diff("ViTForImageClassification logits", ours(x), hf(x).logits)


@pytest.mark.slow
def test_deit_parity_and_distillation():
    hf = randomize_(transformers.DeiTForImageClassificationWithTeacher(transformers.DeiTConfig(**SMALL, intermediate_size=64, num_labels=5))).eval()
    ours = ViT.from_hf(hf).eval()
    assert ours.config.distilled and ours.config.num_prefix_tokens == 2
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = hf(x)
        cls_logits, dist_logits = ours.forward_heads(x)
        report_diff("DeiT cls head", cls_logits, out.cls_logits)
        report_diff("DeiT distillation head", dist_logits, out.distillation_logits)
        report_diff("DeiT averaged logits", ours(x), out.logits)
    labels, teacher = torch.tensor([0, 3]), torch.randn(2, 5)
    expected = (F.cross_entropy(cls_logits, labels) + F.cross_entropy(dist_logits, teacher.argmax(-1))) / 2
    assert torch.allclose(deit_hard_distillation_loss(cls_logits, dist_logits, labels, teacher), expected)


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(2, 3, 32, 32), (1, 3, 24, 40)])
def test_dinov2_with_registers_backbone_parity(shape, tmp_path):
    cfg = transformers.Dinov2WithRegistersConfig(**SMALL, mlp_ratio=2, num_register_tokens=3)
    hf = randomize_(transformers.Dinov2WithRegistersModel(cfg)).eval()
    ours = ViT.from_hf(hf).eval()
    assert ours.config.num_registers == 3 and ours.config.layer_scale is not None
    x = torch.randn(shape)
    with torch.no_grad():
        report_diff(f"Dinov2WithRegisters {shape}", ours.forward_features(x), hf(x).last_hidden_state)
    hf.save_pretrained(tmp_path)
    with torch.no_grad():
        report_diff("Dinov2WithRegisters from disk", ViT.from_hf(str(tmp_path)).eval().forward_features(x), hf(x).last_hidden_state)


@pytest.mark.slow
def test_from_hf_offline_hub_id_gives_clear_error():
    with pytest.raises(OSError, match="Offline, pass a transformers model instance"):
        ViT.from_hf("google/vit-base-patch16-224")


@pytest.mark.parametrize("factory,params", [("vit_tiny", 5_717_416), ("vit_small", 22_050_664), ("vit_base", 86_567_656),
                                            ("vit_large", 304_326_632), ("vit_huge", 632_045_800)])
def test_paper_sizes_match_the_papers_tables(factory, params):
    """ViT-B/16 86.6M and ViT-L/16 304M parameters at 224 px with the 1,000-class head (ViT Table 1
    rounds to 86M and 307M; DeiT Table 1: Ti 5.7M, S 22M). Built on the meta device: no memory."""
    from course_lib import vit

    with torch.device("meta"):
        model = getattr(vit, factory)()
    c = model.config
    assert (c.image_size, c.num_classes) == (224, 1000) and c.patch_size == (14 if factory == "vit_huge" else 16)
    assert sum(p.numel() for p in model.parameters()) == params


def test_vit_scenes_is_the_shipped_model():
    from course_lib.utils import load_checkpoint
    from course_lib.vit import vit_scenes

    shipped, _ = load_checkpoint("vit_scenes.safetensors", ViT, ViTConfig)
    assert vit_scenes().config == shipped.config
