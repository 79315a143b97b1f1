"""course_lib.flamingo: the media mask, the gates, the resampler, the wrapper around a frozen LM,
and parity with transformers' IDEFICS perceiver resampler and gated cross-attention layer."""

import pytest
import torch
import transformers
from conftest import randomize_, report_diff

from course_lib.flamingo import (
    Flamingo,
    FlamingoConfig,
    GatedCrossAttentionBlock,
    GatedXAttnConfig,
    PerceiverConfig,
    PerceiverResampler,
    expand_media_mask,
    gated_residual,
    media_attention_mask,
    media_cross_attention_mask,
)
from course_lib.connectors import VisualPrefixLM
from course_lib.layers import Attention, use_explicit_attention
from course_lib.tinylm import TinyLM, TinyLMConfig
from course_lib.vit import ViT, ViTConfig

IMG = 3  # the <image> id of the toy LMs below


# ----------------------------------------------------------------------------------------------
# Pure functions
# ----------------------------------------------------------------------------------------------
def test_media_attention_mask_by_hand():
    loc = torch.tensor([[0, 1, 0, 0, 1, 0], [1, 0, 0, 0, 0, 0]]).bool()
    T, F_ = True, False
    immediate = media_attention_mask(loc)
    assert immediate.shape == (2, 6, 2)
    assert immediate[0].tolist() == [[F_, F_], [T, F_], [T, F_], [T, F_], [F_, T], [F_, T]]
    assert immediate[1].tolist() == [[T, F_]] * 6  # the second row has one image only
    every_earlier = media_attention_mask(loc, only_immediate=False)
    assert every_earlier[0].tolist() == [[F_, F_], [T, F_], [T, F_], [T, F_], [T, T], [T, T]]
    assert media_attention_mask(loc, num_media=3).shape == (2, 6, 3)
    expanded = expand_media_mask(immediate, 2)
    assert expanded.shape == (2, 6, 4) and expanded[0, 4].tolist() == [F_, F_, T, T]


def test_media_mask_errors():
    with pytest.raises(ValueError, match="one image per <image> token"):
        media_attention_mask(torch.tensor([[1, 1, 0]]).bool(), num_media=1)
    with pytest.raises(ValueError, match=r"\(batch, tokens\)"):
        media_attention_mask(torch.zeros(5).bool())


def test_gated_residual_is_identity_at_zero():
    x, b = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    assert torch.equal(gated_residual(x, b, torch.zeros(1)), x)
    assert torch.allclose(gated_residual(x, b, torch.tensor([100.0])), x + b)  # tanh saturates at 1
    report_diff("gated residual", gated_residual(x, b, torch.tensor([0.5])), x + 0.46211716 * b, 1e-6)


def test_config_errors():
    with pytest.raises(ValueError, match="norm must be one of"):
        GatedXAttnConfig(norm="batchnorm")
    with pytest.raises(ValueError, match="not divisible by 3 heads"):
        GatedXAttnConfig(dim=16, num_heads=3)
    with pytest.raises(ValueError, match="act must be one of"):
        PerceiverConfig(act="swiglu")
    r = PerceiverResampler(PerceiverConfig(dim=8, num_heads=2, head_dim=4, num_latents=3))
    with pytest.raises(ValueError, match="check PerceiverConfig.dim"):
        r(torch.randn(2, 5, 6))
    blk = GatedCrossAttentionBlock(GatedXAttnConfig(dim=8, media_dim=6, num_heads=2))
    with pytest.raises(ValueError, match="media_dim=6"):
        blk(torch.randn(1, 4, 8), torch.randn(1, 3, 5))
    with pytest.raises(ValueError, match="expand the per-image mask"):
        blk(torch.randn(1, 4, 8), torch.randn(1, 3, 6), torch.ones(1, 4, 1).bool())


# ----------------------------------------------------------------------------------------------
# The blocks
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("N", [1, 5, 17])
def test_resampler_gives_num_latents_for_any_length(N):
    r = randomize_(PerceiverResampler(PerceiverConfig(dim=8, num_heads=2, head_dim=3, num_latents=4)))
    out, maps = r(torch.randn(2, N, 8), return_attention=True)
    assert out.shape == (2, 4, 8)
    assert maps[0].shape == (2, 2, 4, N + 4) and torch.allclose(maps[0].sum(-1), torch.ones(()))
    x = torch.randn(2, N, 8)
    report_diff("resampler sdpa vs explicit", r(x), use_explicit_attention(r)(x), 1e-5)


def test_gated_block_identity_at_init_and_no_output_before_the_first_image():
    blk = GatedCrossAttentionBlock(GatedXAttnConfig(dim=8, media_dim=6, num_heads=2))
    x, media = torch.randn(2, 5, 8), torch.randn(2, 6, 6)
    mask = expand_media_mask(media_attention_mask(torch.tensor([[0, 0, 1, 0, 0], [0, 1, 0, 1, 0]]).bool(), 2), 3)
    assert torch.equal(blk(x, media, mask), x)  # both gates at 0: exactly the input
    with torch.no_grad():
        blk.alpha_xattn.fill_(1.0)  # open the cross-attention gate only
    out = blk(x, media, mask)
    assert torch.equal(out[0, :2], x[0, :2]) and torch.equal(out[1, :1], x[1, :1])  # before any image
    assert (out[0, 2:] - x[0, 2:]).abs().min() > 0  # after it, the image comes through
    assert not out.isnan().any()


def test_media_cross_attention_mask_opens_imageless_rows_and_reports_them():
    media_mask = expand_media_mask(media_attention_mask(torch.tensor([[0, 0, 1, 0]]).bool(), 1), 2)  # (1, 4, 2)
    mask, has_media = media_cross_attention_mask(media_mask)
    assert mask.shape == (1, 1, 4, 2) and has_media.tolist() == [[False, False, True, True]]
    assert mask[0, 0, :2].all()  # no image yet: every key visible (softmax stays finite), zeroed by the caller
    with pytest.raises(ValueError, match="boolean"):
        media_cross_attention_mask(media_mask.float())


def test_every_attention_is_the_course_attention():
    model = Flamingo(*_toy_parts(), FlamingoConfig(image_token_id=IMG, num_latents=3, resampler_heads=2, xattn_heads=2))
    # Whatever projects queries is layers.Attention (self or cross); Flamingo adds only its masking.
    others = [n for n, m in model.named_modules() if hasattr(m, "q") and not isinstance(m, Attention)]
    assert not others, others
    names = {n for n, m in model.named_modules() if isinstance(m, Attention) and m.is_cross}
    assert any("resampler" in n for n in names) and any("xattn_layers" in n for n in names)


def test_gated_block_sdpa_and_explicit_agree():
    blk = randomize_(GatedCrossAttentionBlock(GatedXAttnConfig(dim=8, media_dim=6, num_heads=2)))
    x, media = torch.randn(2, 7, 8), torch.randn(2, 8, 6)
    mask = expand_media_mask(media_attention_mask(torch.tensor([[0, 1, 0, 1, 0, 0, 0], [0, 0, 0, 1, 0, 0, 0]]).bool(), 2), 4)
    fast = blk(x, media, mask)
    slow, w = blk(x, media, mask, return_weights=True)
    report_diff("gated block sdpa vs explicit", fast, slow, 1e-5)
    assert torch.equal(w[0, :, 1, 4:], torch.zeros_like(w[0, :, 1, 4:]))  # image 1 only sees its own tokens


# ----------------------------------------------------------------------------------------------
# The wrapper around a frozen LM
# ----------------------------------------------------------------------------------------------
def _toy_parts(seed=0):
    torch.manual_seed(seed)
    lm = TinyLM(TinyLMConfig(vocab_size=12, max_len=16, dim=16, depth=3, num_heads=2))
    vision = ViT(ViTConfig(image_size=16, patch_size=8, dim=8, depth=1, num_heads=2, num_classes=0))
    return lm, vision


def _toy_batch():
    ids = torch.tensor([[5, 6, IMG, 7, 8, IMG, 9, 10], [IMG, 4, 5, 6, 7, 8, 9, 10]])
    return ids, torch.rand(2, 2, 3, 16, 16)


@pytest.mark.parametrize("every", [1, 2])
def test_flamingo_equals_the_frozen_lm_at_init(every):
    lm, vision = _toy_parts()
    model = Flamingo(lm, vision, FlamingoConfig(image_token_id=IMG, num_latents=3, resampler_heads=2, xattn_heads=2, cross_attn_every=every))
    assert len(model.xattn_layers) == (3 if every == 1 else 2)
    ids, images = _toy_batch()
    assert torch.equal(model(ids, images), lm(ids))
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"resampler", "xattn_layers"}  # the LM and the encoder stay frozen
    assert torch.equal(model.gates(), torch.zeros(len(model.xattn_layers)))


@pytest.mark.slow
def test_flamingo_text_before_the_first_image_ignores_the_images():
    lm, vision = _toy_parts()
    model = Flamingo(lm, vision, FlamingoConfig(image_token_id=IMG, num_latents=3, resampler_heads=2, xattn_heads=2))
    randomize_(model.resampler), randomize_(model.xattn_layers)  # open every gate
    ids, images = _toy_batch()
    a, b = model(ids, images), model(ids, torch.rand_like(images))
    assert torch.equal(a[0, :2], b[0, :2])  # tokens 0-1 come before the first <image>
    assert (a[0, 2:] - b[0, 2:]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="one image per <image> token"):
        model(ids, images[:, :1])


def test_visual_prefix_lm():
    lm, vision = _toy_parts()
    model = VisualPrefixLM(lm, vision, image_token_id=IMG, num_prefix=2)
    ids = torch.tensor([[5, IMG, IMG, 7, 8, 9]])
    out = model(ids, torch.rand(1, 1, 3, 16, 16))
    assert out.shape == (1, 6, 12)
    assert torch.equal(out[0, 0], lm(ids)[0, 0])  # causal: the token before the prefix is unchanged
    with pytest.raises(ValueError, match="2 per image"):
        model(torch.tensor([[5, IMG, 7]]), torch.rand(1, 1, 3, 16, 16))


# ----------------------------------------------------------------------------------------------
# Parity with transformers IDEFICS
# ----------------------------------------------------------------------------------------------
def _idefics_config(alpha_type="float"):
    from transformers import IdeficsConfig

    return IdeficsConfig(
        vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        cross_layer_interval=1, alpha_type=alpha_type, use_resampler=True,
        vision_config=dict(embed_dim=24, image_size=16, patch_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48),
        perceiver_config=dict(resampler_n_latents=5, resampler_depth=2, resampler_n_heads=3, resampler_head_dim=6),
    )


@pytest.mark.slow
@pytest.mark.parametrize("N", [1, 7, 20])
def test_perceiver_resampler_parity(N):
    from transformers.models.idefics.perceiver import IdeficsPerceiverResampler

    c = _idefics_config()
    p = c.perceiver_config
    ref = randomize_(IdeficsPerceiverResampler(c, 24, p.resampler_depth, p.resampler_n_heads, p.resampler_head_dim, p.resampler_n_latents)).eval()
    ours = PerceiverResampler.from_hf(ref)
    x = torch.randn(3, N, 24)
    with torch.no_grad():
        report_diff(f"perceiver resampler, {N} visual tokens", ours(x), ref(x))
        report_diff("perceiver resampler, explicit softmax", use_explicit_attention(ours)(x), ref(x))


def _idefics_inputs(T, M, L, hidden, media_dim, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 9, (2, T), generator=g)
    ids[0, 2] = IMG  # row 0: two text tokens before its first image
    if M == 2:
        ids[0, T - 3] = ids[1, T // 2] = IMG
    ids[1, 0] = IMG
    mask = expand_media_mask(media_attention_mask(ids == IMG, M), L)  # (B, T, M*L)
    x, media = torch.randn(2, T, hidden, generator=g), torch.randn(2, M * L, media_dim, generator=g)
    additive = torch.where(mask, 0.0, torch.finfo(torch.float32).min)[:, None]  # (B, 1, T, S) as IDEFICS builds it
    gate = mask.any(-1).float()  # IDEFICS's cross_attention_gate
    return x, media, mask, additive, gate


@pytest.mark.slow
@pytest.mark.parametrize("alpha_type,T,M", [("float", 6, 1), ("vector", 9, 2), ("float", 12, 2)])
def test_gated_cross_attention_parity(alpha_type, T, M):
    from transformers.models.idefics.modeling_idefics import IdeficsGatedCrossAttentionLayer

    c = _idefics_config(alpha_type)
    ref = randomize_(IdeficsGatedCrossAttentionLayer(c, layer_idx=0)).eval()
    ours = GatedCrossAttentionBlock.from_hf(ref)
    x, media, mask, additive, gate = _idefics_inputs(T, M, 5, 32, 24, seed=T)
    with torch.no_grad():
        expected = ref(x, image_hidden_states=media, image_attention_mask=additive, cross_attention_gate=gate)
        report_diff(f"gated cross-attention ({alpha_type} gates, T={T}, {M} images)", ours(x, media, mask), expected)
        report_diff("gated cross-attention, explicit softmax", use_explicit_attention(ours)(x, media, mask), expected)


@pytest.mark.slow
@pytest.mark.parametrize("spelling", ["instance", "folder"])
def test_from_full_idefics_model(spelling, tmp_path):
    from transformers import IdeficsModel

    ref = randomize_(IdeficsModel(_idefics_config())).eval()
    source = ref
    if spelling == "folder":
        ref.save_pretrained(tmp_path)
        source = str(tmp_path)
    resampler = PerceiverResampler.from_hf(source)
    block = GatedCrossAttentionBlock.from_hf(source, layer=1)
    x = torch.randn(2, 7, 24)
    h, media, mask, additive, gate = _idefics_inputs(8, 1, 5, 32, 24, seed=3)
    with torch.no_grad():
        report_diff(f"resampler from an IdeficsModel ({spelling})", resampler(x), ref.perceiver_resampler(x))
        expected = ref.gated_cross_attn_layers[1](h, image_hidden_states=media, image_attention_mask=additive, cross_attention_gate=gate)
        report_diff(f"gated layer 1 from an IdeficsModel ({spelling})", block(h, media, mask), expected)
    with pytest.raises(ValueError, match="no gated cross-attention layer 5"):
        GatedCrossAttentionBlock.from_hf(source, layer=5)


# ----------------------------------------------------------------------------------------------
# Bad input: a clear error that says what to fix
# ----------------------------------------------------------------------------------------------
BAD_INPUTS = {
    "no latents": (lambda: PerceiverConfig(num_latents=0), "must all be positive"),
    "unknown activation": (lambda: PerceiverConfig(act="tanh"), "act must be one of"),
    "cross-attention never": (lambda: FlamingoConfig(image_token_id=3, cross_attn_every=0), ">= 1"),
    "unknown gate shape": (lambda: FlamingoConfig(image_token_id=3, alpha_shape="matrix"), "alpha_shape"),
    "zero tokens per image": (lambda: expand_media_mask(torch.ones(1, 2, 1, dtype=torch.bool), 0), "tokens_per_media >= 1"),
    "branch of another shape": (lambda: gated_residual(torch.randn(2, 3, 4), torch.randn(2, 3, 5), torch.zeros(1)), "one shape"),
    "float media mask": (lambda: media_cross_attention_mask(torch.ones(1, 2, 3)), "boolean"),
    "resampler input width": (lambda: PerceiverResampler(PerceiverConfig(dim=8, head_dim=4))(torch.randn(1, 5, 6)), "PerceiverConfig.dim"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_raise_clear_errors(case):
    fn, match = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=match):
        fn()


# ----------------------------------------------------------------------------------------------
# Lecture 08's experiment (course_lib.recipes.flamingo) and its shipped results
# ----------------------------------------------------------------------------------------------
def test_vqa_episodes_put_each_scenes_answer_at_the_answer_positions():
    from course_lib.recipes.flamingo import QUESTIONS, vqa_episodes
    from course_lib.recipes.text import scene_tokenizer

    tok = scene_tokenizer()
    answers = torch.tensor([[tok.ids["circle"], tok.ids["red"], tok.ids["one"]],
                            [tok.ids["square"], tok.ids["blue"], tok.ids["two"]]])
    idx, ids, targets, kind = vqa_episodes(tok, answers, 12, range(2), seed=0, shots=2)
    assert idx.shape == (12, 3) and ids.shape == targets.shape and kind.shape == (12,)
    for r in range(12):
        at = targets[r] != -100
        assert targets[r][at].tolist() == answers[idx[r], kind[r]].tolist()  # one answer per image, in order
        assert (ids[r] == tok.image_id).sum() == 3
        assert list(QUESTIONS.values())[kind[r]] in tok.decode(ids[r])
    assert len(set(kind.tolist())) > 1
    with pytest.raises(ValueError, match="shots >= 0"):
        vqa_episodes(tok, answers, 4, range(2), seed=0, shots=-1)


def test_binding_episodes_pair_labels_with_shapes_only_within_a_prompt():
    from course_lib.recipes.flamingo import LABEL_WORDS, binding_episodes
    from course_lib.recipes.text import scene_tokenizer

    tok = scene_tokenizer()
    classes = torch.arange(40) % 5  # scene i has shape i % 5
    idx, ids, targets, query = binding_episodes(tok, classes, 50, list(range(40)), seed=0, shots=2)
    label_ids = {tok.ids[w] for w in LABEL_WORDS}
    mappings = set()
    for r in range(50):
        labels = [int(t) for t in ids[r] if int(t) in label_ids]  # the shots' labels, then the query's
        shapes = classes[idx[r]].tolist()
        assert len(set(shapes[:2])) == 2 and len(set(labels[:2])) == 2  # two shots: both shapes, two labels
        assert query[r] == shapes[2] and labels[2] == labels[shapes[:2].index(shapes[2])]  # the query repeats its shape's label
        assert targets[r][targets[r] != -100].tolist() == [labels[2]]  # only the query's label is a target
        mappings.add(tuple(sorted(zip(shapes[:2], labels[:2]))))
    assert len(mappings) > 10  # the pairing changes from prompt to prompt: only the examples tell it
    _, _, train_targets, _ = binding_episodes(tok, classes, 5, list(range(40)), seed=0, shots=4, train=True)
    assert ((train_targets != -100).sum(1) == 5).all()
    with pytest.raises(ValueError, match="ways"):
        binding_episodes(tok, classes, 5, list(range(40)), seed=0, shots=2, ways=9)


def test_branch_monitor_measures_the_gated_branch_against_the_residual():
    from course_lib.recipes.flamingo import BranchMonitor

    lm, vision = _toy_parts()
    model = Flamingo(lm, vision, FlamingoConfig(image_token_id=IMG, num_latents=3, resampler_heads=2, xattn_heads=2))
    randomize_(model.resampler), randomize_(model.xattn_layers)
    ids, images = _toy_batch()
    block = model.xattn_layers["0"]
    with BranchMonitor(model) as monitor:
        model(ids, images)
        monitor.step()
    assert len(monitor.gate) == len(monitor.ratio) == 1 and len(monitor.ratio[0]) == len(model.xattn_layers)
    # By hand for the first gated block: its input is the LM's embedded text.
    x = lm.add_positions(lm.embed(ids))
    media = model.resample(model.image_features(images))
    from course_lib.flamingo import expand_media_mask, media_attention_mask

    mask = expand_media_mask(media_attention_mask(ids == IMG, 2), 3)
    branch = torch.tanh(block.alpha_xattn) * block.xattn(block.norm1(x), media, mask)[0]
    seen = mask.any(-1)
    expected = branch[seen].norm(dim=-1).mean() / x[seen].norm(dim=-1).mean()
    assert monitor.ratio[0][0] == pytest.approx(float(expected), rel=1e-5)
    assert monitor.gate[0][0] == pytest.approx(float(torch.tanh(block.alpha_xattn).abs().mean()))
    model(ids, images)  # the hooks are gone after the with block: nothing more is recorded
    monitor.step()
    assert monitor.ratio[1] == monitor.ratio[0]


def test_vqa_loss_shuffled_control_gives_each_prompt_other_images():
    from course_lib.recipes.flamingo import VqaLoss

    seen = []

    class Recorder(torch.nn.Module):
        def forward(self, ids, features):
            seen.append(features[:, 0, 0, 0, 0].tolist())
            return torch.zeros(*ids.shape, 5)

    features = torch.arange(8.0)[:, None, None, None].expand(8, 2, 1, 1)  # image i has feature value i
    idx = torch.arange(8)[:, None]
    ids, targets = torch.zeros(8, 3, dtype=torch.long), torch.full((8, 3), -100)
    targets[:, 2] = 1
    VqaLoss(features)(Recorder(), (idx, ids, targets))
    VqaLoss(features, shuffle_images=True)(Recorder(), (idx, ids, targets))
    assert seen[0] == list(range(8))
    assert sorted(seen[1]) == list(range(8)) and seen[1] != list(range(8))


def _shipped_sweep() -> dict:
    import json

    from course_lib.utils import CHECKPOINTS

    return json.loads((CHECKPOINTS / "flamingo_sweep.json").read_text())


def test_shipped_sweep_supports_lecture_08():
    """What lecture 08 says about scripts/sweep_flamingo.py's runs (scalar gates, lr 2e-3)."""
    sweep = _shipped_sweep()
    short, full, control = sweep["scalar_live"]["test"], sweep["scalar"]["test"], sweep["scalar_shuffled"]["test"]
    chance = {"shape": 1 / 5, "color": 1 / 6, "count": 1 / 3}
    # After one epoch only the count is learned; the average hides it.
    assert short["count"] > 0.95 and all(short[k] < chance[k] + 0.05 for k in ("shape", "color"))
    # After ten, every question kind is learned on unseen scenes.
    assert all(full[k] > 0.85 for k in chance), full
    # The examples in these prompts add nothing: the answer after 2 examples is no better than after 0.
    assert full["after 2 examples"] <= full["after 0 examples"] + 0.01
    # Images that say nothing: every kind stays near chance.
    assert all(control[k] < chance[k] + 0.1 for k in chance), control
    # A small gate is not a closed branch: layer 0's gate ends below 0.05 and its branch adds > 20% of ||x||.
    assert sweep["scalar"]["gate"][-1][0] < 0.05 and sweep["scalar"]["ratio"][-1][0] > 0.2
    # ... and with images that say nothing the gates return to 0 and the branch adds nothing.
    shuffled = sweep["scalar_shuffled"]
    assert max(shuffled["gate"][-1]) < 0.005 and max(shuffled["ratio"][-1]) < 0.01
