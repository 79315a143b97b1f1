"""course_lib.clip: the losses and retrieval metric on hand-checkable tensors, the tokenizer, the
towers' pieces, and parity with transformers CLIPModel and SiglipModel on random weights."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_, report_diff

from course_lib import clip, layers
from course_lib.clip import CLIP, CLIPConfig, SceneTokenizer

transformers = pytest.importorskip("transformers")


# ----------------------------------------------------------------------------------------------
# Losses and metrics
# ----------------------------------------------------------------------------------------------
def test_contrastive_logits_are_scaled_cosines():
    image = torch.tensor([[3.0, 0.0], [0.0, 2.0]])
    text = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, -5.0]])
    logits = clip.contrastive_logits(image, text, math.log(10.0))
    c = 1 / math.sqrt(2)
    expected = 10 * torch.tensor([[1.0, c, 0.0], [0.0, c, -1.0]])
    assert torch.allclose(logits, expected, atol=1e-6)
    assert torch.allclose(clip.contrastive_logits(image, text, 0.0, -2.0), expected / 10 - 2, atol=1e-6)


def test_clip_loss_by_hand():
    # Orthogonal unit embeddings, scale 1: each row of logits is one 1 and one 0.
    emb = torch.eye(2)
    expected = -math.log(math.e / (math.e + 1))
    assert clip.clip_loss(emb, emb, 0.0).item() == pytest.approx(expected, abs=1e-6)
    # Perfect pairs at the maximum scale: the loss is almost zero; swapped pairs: large.
    assert clip.clip_loss(emb, emb, clip.CLIP_MAX_LOGIT_SCALE).item() < 1e-6
    assert clip.clip_loss(emb, emb.flip(0), clip.CLIP_MAX_LOGIT_SCALE).item() > 50


def test_clip_loss_is_the_mean_of_both_directions_and_convirt_weights_them():
    g = torch.Generator().manual_seed(1)
    image, text = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    logits = F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T / 0.07
    labels = torch.arange(5)
    i2t, t2i = F.cross_entropy(logits, labels), F.cross_entropy(logits.T, labels)
    assert torch.allclose(clip.clip_loss(image, text, math.log(1 / 0.07)), (i2t + t2i) / 2, atol=1e-5)
    assert not torch.allclose(i2t, t2i)  # the two directions differ, so the weighting matters
    conv = clip.convirt_loss(image, text, tau=0.07, lam=0.75)
    assert torch.allclose(conv, 0.75 * i2t + 0.25 * t2i, atol=1e-5)
    # Scaling an embedding does not change anything: the loss normalises.
    assert torch.allclose(clip.clip_loss(3 * image, text, 2.0), clip.clip_loss(image, text, 2.0), atol=1e-6)


def test_siglip_loss_by_hand():
    # Two orthogonal pairs, scale 1, bias 0: diagonal logits 1 (label +1), off-diagonal 0 (label -1).
    emb = torch.eye(2)
    expected = (2 * -F.logsigmoid(torch.tensor(1.0)) + 2 * -F.logsigmoid(torch.tensor(0.0))) / 2
    assert clip.siglip_loss(emb, emb, 0.0, 0.0).item() == pytest.approx(expected.item(), abs=1e-6)
    # The same, with scale 10 and bias -10 (SigLIP's init): logits 0 on the diagonal, -10 off it.
    expected = (2 * -F.logsigmoid(torch.tensor(0.0)) + 2 * -F.logsigmoid(torch.tensor(10.0))) / 2
    assert clip.siglip_loss(emb, emb, math.log(10), -10.0).item() == pytest.approx(expected.item(), abs=1e-6)


def test_siglip_loss_matches_transformers():
    g = torch.Generator().manual_seed(2)
    image, text = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    s, b = torch.tensor(1.3), torch.tensor(-2.0)
    # transformers' formula (SiglipModel.forward with return_loss=True), on logits_per_text.
    logits_per_text = F.normalize(text, dim=-1) @ F.normalize(image, dim=-1).T * s.exp() + b
    m1_diag1 = -torch.ones_like(logits_per_text) + 2 * torch.eye(6)
    ref = -F.logsigmoid(m1_diag1 * logits_per_text).sum(dim=-1).mean()
    diff = (clip.siglip_loss(image, text, s, b) - ref).abs().item()
    print(f"[parity] siglip loss vs transformers' formula: max abs diff {diff:.2e}")
    assert diff < 1e-5 and ref.item() > 1.0


def test_loss_errors_say_what_is_wrong():
    with pytest.raises(ValueError, match="one caption per image, got 4 images and 3 texts"):
        clip.clip_loss(torch.randn(4, 8), torch.randn(3, 8), 1.0)
    with pytest.raises(ValueError, match="width 8 but text embeddings 6"):
        clip.siglip_loss(torch.randn(4, 8), torch.randn(4, 6), 1.0, 0.0)
    with pytest.raises(ValueError, match=r"shape \(batch, width\)"):
        clip.contrastive_logits(torch.randn(4), torch.randn(4, 4), 1.0)


def test_recall_at_k_by_hand():
    sim = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.5, 0.1], [0.3, 0.2, 0.1]])
    # ranks of the matches: row 0 -> 0, row 1 -> 1, row 2 -> 2
    assert clip.recall_at_k(sim, 1) == pytest.approx(1 / 3)
    assert clip.recall_at_k(sim, 2) == pytest.approx(2 / 3)
    assert clip.recall_at_k(sim, 3) == 1.0
    # text -> image: columns as queries; the tie in the last column counts against the query
    assert clip.recall_at_k(sim.T, 1) == pytest.approx(2 / 3)
    assert clip.recall_at_k(torch.ones(4, 4), 3) == 0.0  # a collapsed model finds nothing
    with pytest.raises(ValueError, match="square"):
        clip.recall_at_k(torch.zeros(2, 3), 1)


# ----------------------------------------------------------------------------------------------
# Tokenizer, masks, pooling
# ----------------------------------------------------------------------------------------------
def test_tokenizer_round_trip_and_truncation():
    captions = ["a large red circle at the top, a small blue square", "a large green cross on a plain background"]
    tok = SceneTokenizer.from_texts(captions)
    assert tok.vocab[:4] == ["<pad>", "<unk>", "<sot>", "<eot>"]
    assert tok.vocab[4] == "a"  # the most frequent word first
    ids = tok.encode(captions, context_length=20)
    assert ids.shape == (2, 20) and ids[0, 0] == tok.sot_id
    assert tok.decode(ids[0]) == captions[0]
    assert (ids[1] == tok.eot_id).nonzero().item() == 1 + len(SceneTokenizer.split(captions[1]))
    assert tok.encode("a purple circle")[0, 2] == tok.unk_id
    short = tok.encode(captions[0], context_length=5)
    assert short[0].tolist() == [tok.sot_id, tok.ids["a"], tok.ids["large"], tok.ids["red"], tok.eot_id]
    assert SceneTokenizer.from_texts(reversed(captions)).vocab == tok.vocab  # deterministic


def test_causal_mask_and_text_pooling():
    assert causal_rows() == [[True, False, False], [True, True, False], [True, True, True]]
    tokens = torch.arange(2 * 4 * 1, dtype=torch.float).reshape(2, 4, 1)
    ids = torch.tensor([[2, 5, 3, 0], [2, 3, 3, 0]])
    assert clip.pool_text(tokens, ids, "eos", 3).flatten().tolist() == [2.0, 5.0]  # first <eot>
    assert clip.pool_text(tokens, ids, "argmax", 3).flatten().tolist() == [1.0, 5.0]
    assert clip.pool_text(tokens, ids, "last", 3).flatten().tolist() == [3.0, 7.0]
    with pytest.raises(ValueError, match=r"texts \[0\] have no end-of-text token \(id 9\)"):
        clip.pool_text(tokens, torch.tensor([[1, 2, 2, 2], [9, 9, 9, 9]]), "eos", 9)


def causal_rows():
    return layers.causal_mask(3).tolist()


def test_causal_text_tower_ignores_tokens_after_eos():
    tok = SceneTokenizer.from_texts(["a large red circle"])
    model = clip.clip_tiny(vocab_size=tok.vocab_size, context_length=10).eval()
    ids = tok.encode("a large red circle", 10)
    noisy = ids.clone()
    noisy[0, 6:] = 5  # garbage after <eot>
    report_diff("padding after <eot>", model.encode_text(noisy), model.encode_text(ids), 1e-6)


def test_explicit_attention_path_agrees():
    from course_lib.layers import use_explicit_attention

    for factory in (clip.clip_tiny, clip.siglip_tiny):
        kw = dict(vision_pool="map", image_proj=False) if factory is clip.siglip_tiny else {}
        model = factory(**kw).eval()
        x, ids = torch.randn(2, 3, 32, 32), torch.randint(4, 60, (3, 12))
        ids[:, -1] = 3
        fast = model(x, ids)
        report_diff(f"{factory.__name__} sdpa vs explicit", use_explicit_attention(model)(x, ids), fast, 1e-5)


def test_temperature_init_clamp_and_weight_decay():
    from course_lib.layers import param_groups

    model = clip.clip_tiny()
    assert model.temperature == pytest.approx(0.07)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    model.clamp_logit_scale_()
    assert model.logit_scale.exp().item() == pytest.approx(100.0)
    # The hook clamps after every optimizer step taken inside the block, and only there.
    opt = torch.optim.SGD([model.logit_scale], lr=1.0)
    model.logit_scale.grad = torch.tensor(-5.0)
    with clip.clamp_logit_scale_after_each_step(model):
        opt.step()
    assert model.logit_scale.item() == pytest.approx(math.log(100))
    opt.step()
    assert model.logit_scale.item() == pytest.approx(math.log(100) + 5)
    sig = clip.siglip_tiny()
    assert sig.logit_scale.exp().item() == pytest.approx(10.0) and sig.logit_bias.item() == -10.0
    no_decay = {id(p) for p in param_groups(sig, 0.1)[1]["params"]}
    for name in ("visual.cls_token", "visual.pos_embed", "text.pos_embed", "logit_scale", "logit_bias"):
        assert id(sig.get_parameter(name)) in no_decay


def test_config_and_input_errors():
    with pytest.raises(ValueError, match="logit_bias_init"):
        CLIPConfig(loss="siglip")
    with pytest.raises(ValueError, match="embed_dim=64"):
        CLIPConfig(image_proj=False, embed_dim=32)
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        CLIPConfig(image_size=30)
    model = clip.clip_tiny(vocab_size=10, context_length=8)
    with pytest.raises(ValueError, match="longer than the context length 8"):
        model.encode_text(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="vocab_size=tokenizer.vocab_size"):
        model.encode_text(torch.full((1, 4), 12))
    with pytest.raises(ValueError, match="'\\{\\}'"):
        clip.zero_shot_classifier(model, ["circle"], ["a circle"], SceneTokenizer(["circle"]))


def test_zero_shot_classifier_ensembles_normalised_prompts():
    tok = SceneTokenizer.from_texts(["a large red circle", "a large blue square"])
    model = clip.clip_tiny(vocab_size=tok.vocab_size, context_length=8).eval()
    templates = ["a large {}", "a large red {}"]
    weights = clip.zero_shot_classifier(model, ["circle", "square"], templates, tok)
    assert weights.shape == (2, 64)
    assert torch.allclose(weights.norm(dim=-1), torch.ones(2), atol=1e-6)
    prompts = tok.encode(["a large circle", "a large red circle"], 8)
    by_hand = F.normalize(model.encode_text(prompts, normalize=True).mean(0), dim=-1)
    report_diff("prompt ensemble", weights[0], by_hand.detach(), 1e-6)
    logits = clip.zero_shot_logits(model, torch.rand(3, 3, 32, 32), weights)
    assert logits.shape == (3, 2)


# ----------------------------------------------------------------------------------------------
# Parity with transformers
# ----------------------------------------------------------------------------------------------
TEXT = dict(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=16, bos_token_id=48, eos_token_id=49, pad_token_id=0)
VISION = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)


def _reference(kind: str):
    if kind == "clip":
        config = transformers.CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=24)
        return randomize_(transformers.CLIPModel(config)).eval()
    config = transformers.SiglipConfig(text_config={**TEXT, "projection_size": 48}, vision_config=VISION)
    return randomize_(transformers.SiglipModel(config)).eval()


def _text(batch: int, length: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 48, (batch, length), generator=g)
    eos_at = torch.randint(1, length, (batch,), generator=g)
    ids[torch.arange(batch), eos_at] = 49  # one <eot> per text, at different places
    return ids


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("from_disk", [False, True])
def test_parity_with_transformers(kind, from_disk, tmp_path):
    ref = _reference(kind)
    if from_disk:
        ref.save_pretrained(tmp_path)
        ours = CLIP.from_hf(str(tmp_path)).eval()
    else:
        ours = CLIP.from_hf(ref).eval()
    assert ours.config.loss == kind
    for i, (n_img, n_txt, length) in enumerate([(2, 3, 16), (5, 1, 7)]):
        x, ids = torch.randn(n_img, 3, 32, 32), _text(n_txt, length, i)
        with torch.no_grad():
            out = ref(pixel_values=x, input_ids=ids)
            tag = f"{kind}{' (disk)' if from_disk else ''} {n_img} images, {n_txt} texts of {length}"
            report_diff(f"{tag}: image features", ours.encode_image(x), ref.get_image_features(pixel_values=x).pooler_output)
            report_diff(f"{tag}: text features", ours.encode_text(ids), ref.get_text_features(input_ids=ids).pooler_output)
            report_diff(f"{tag}: logits", ours(x, ids), out.logits_per_image)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_parity_at_another_resolution_and_with_a_padding_mask(kind):
    ref = _reference(kind)
    ours = CLIP.from_hf(ref).eval()
    x = torch.randn(2, 3, 48, 40)  # a 6x5 patch grid: position tables are resampled
    with torch.no_grad():
        expected = ref.get_image_features(pixel_values=x, interpolate_pos_encoding=True).pooler_output
        report_diff(f"{kind} at 48x40: image features", ours.encode_image(x), expected)
        ids = _text(3, 10, 7)
        mask = torch.ones_like(ids)
        mask[0, 6:], mask[2, 8:] = 0, 0
        expected = ref.get_text_features(input_ids=ids, attention_mask=mask).pooler_output
        report_diff(f"{kind} with padding mask: text features", ours.encode_text(ids, mask), expected)


def test_from_hf_rejects_other_models():
    vit = transformers.ViTModel(transformers.ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32))
    with pytest.raises(ValueError, match="CLIPModel and SiglipModel"):
        CLIP.from_hf(vit)


def test_train_script_smoke_run(tmp_path, monkeypatch):
    import runpy
    from pathlib import Path

    out = tmp_path / "clip.safetensors"
    script = Path(__file__).resolve().parents[1] / "scripts" / "train_clip.py"
    argv = ["train_clip.py", "--epochs", "1", "--n", "48", "--n-test", "16", "--batch-size", "16", "--threads", "1", "--out", str(out)]
    monkeypatch.setattr("sys.argv", argv)
    runpy.run_path(str(script), run_name="__main__")
    model, tok, meta = clip.load_scenes_clip(str(out))
    assert meta["train_pairs"] == "48" and 0.0 <= float(meta["shape_acc"]) <= 1.0
    assert model.config.vocab_size == tok.vocab_size and tok.vocab[:4] == list(SceneTokenizer.specials)
