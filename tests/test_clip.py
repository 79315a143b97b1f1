"""course_lib.clip and course_lib.recipes.clip: the losses and retrieval metric on hand-checkable
tensors, the captions tokenizer, the towers' pieces, the size factories' parameter counts, and
parity with transformers CLIPModel and SiglipModel on random weights."""

import math

import pytest
import torch
import torch.nn.functional as F
import transformers
from conftest import randomize_, report_diff

from course_lib import clip, layers
from course_lib.clip import CLIP, CLIPConfig
from course_lib.recipes import clip as recipe
from course_lib.recipes.text import CAPTION_SPECIALS, WordTokenizer, caption_tokenizer


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
    tok = caption_tokenizer(captions)
    assert tok.vocab[:4] == ["<pad>", "<unk>", "<sot>", "<eot>"] and (tok.bos_id, tok.eos_id) == (2, 3)
    assert tok.vocab[4] == "a"  # the most frequent word first
    ids = tok.encode_batch(captions, context_length=20)
    assert ids.shape == (2, 20) and ids[0, 0] == tok.bos_id
    assert tok.decode(ids[0]) == captions[0]
    assert (ids[1] == tok.eos_id).nonzero().item() == 1 + len(WordTokenizer.split(captions[1]))
    assert tok.encode_batch("a purple circle", 40)[0, 2] == tok.unk_id
    short = tok.encode_batch(captions[0], context_length=5)
    assert short[0].tolist() == [tok.bos_id, tok.ids["a"], tok.ids["large"], tok.ids["red"], tok.eos_id]
    assert caption_tokenizer(reversed(captions)).vocab == tok.vocab  # deterministic
    with pytest.raises(ValueError, match="too short"):
        tok.encode_batch(captions, 2)
    with pytest.raises(ValueError, match="no words"):
        caption_tokenizer([])
    with pytest.raises(ValueError, match="twice"):
        WordTokenizer(["<pad>", "<bos>", "<eos>", "a", "a"])
    with pytest.raises(ValueError, match="the eos token '<eot>' is not in the vocabulary"):
        WordTokenizer(["<pad>", "<sot>", "a"], bos="<sot>", eos="<eot>")


@pytest.mark.slow
def test_shipped_tokenizer_has_the_ids_of_the_training_captions():
    """The shipped clip_scenes vocabulary is the one caption_tokenizer builds from the script's
    8,000 training captions: the model's token ids mean the same words as when it was trained."""
    from course_lib import data

    _, tok, meta = recipe.load_scenes_clip()
    assert tok.vocab == caption_tokenizer(data.scenes(int(meta["train_pairs"]), "train")["caption"]).vocab
    assert tok.vocab[:4] == list(CAPTION_SPECIALS)


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
    tok = caption_tokenizer(["a large red circle"])
    model = clip.clip_tiny(vocab_size=tok.vocab_size, context_length=10).eval()
    ids = tok.encode_batch("a large red circle", 10)
    noisy = ids.clone()
    noisy[0, 6:] = 5  # garbage after <eot>
    report_diff("padding after <eot>", model.encode_text(noisy), model.encode_text(ids), 1e-6)


@pytest.mark.slow
def test_explicit_attention_path_agrees():
    from course_lib.layers import use_explicit_attention

    for factory in (clip.clip_tiny, clip.siglip_tiny):
        kw = dict(vision_pool="map", image_proj=False) if factory is clip.siglip_tiny else {}
        model = factory(**kw).eval()
        x, ids = torch.randn(2, 3, 32, 32), torch.randint(4, 60, (3, 12))
        ids[:, -1] = 3
        fast = model(x, ids)
        report_diff(f"{factory.__name__} sdpa vs explicit", use_explicit_attention(model)(x, ids), fast, 1e-5)


@pytest.mark.slow
def test_temperature_init_clamp_and_weight_decay():
    from course_lib.layers import param_groups

    model = clip.clip_tiny()
    assert model.temperature == pytest.approx(0.07)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    model.clamp_logit_scale_()
    assert model.logit_scale.exp().item() == pytest.approx(100.0)
    # fit's after_step clamps in place after every optimizer step: a scale set above the cap
    # (as a large learning rate can push it) is back at log 100 after one step, and stays above
    # it in the same run without the clamp.
    from course_lib.train import fit

    tok = caption_tokenizer(["a large red circle", "a small blue square"])
    data = (torch.rand(4, 3, 32, 32), tok.encode_batch(["a large red circle", "a small blue square"] * 2, 8))
    for clamp in (True, False):
        model = clip.clip_tiny(vocab_size=tok.vocab_size, context_length=8)
        scale = model.logit_scale
        with torch.no_grad():
            scale.fill_(10.0)
        fit(model, data, epochs=1, batch_size=4, lr=1e-6, loss_fn=recipe.batch_loss,
            after_step=recipe.clamp_logit_scale(model) if clamp else None, progress=False)
        assert model.logit_scale is scale
        assert (scale.item() == pytest.approx(math.log(100))) if clamp else scale.item() > 9.9
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
        recipe.zero_shot_classifier(model, ["circle"], ["a circle"], caption_tokenizer(["circle"]))
    with pytest.raises(ValueError, match="list of at least one prompt"):
        recipe.class_embeddings(model, ["a circle"], caption_tokenizer(["circle"]))
    with pytest.raises(ValueError, match="zero_shot_classifier"):
        recipe.zero_shot_logits(model, torch.rand(1, 3, 32, 32), torch.randn(2, 8))
    with pytest.raises(ValueError, match="vision_pool"):
        CLIPConfig(vision_pool="max")
    with pytest.raises(ValueError, match="quick_gelu"):
        CLIPConfig(act="relu")
    with pytest.raises(ValueError, match="text width 30 is not divisible by 4 heads"):
        CLIPConfig(text_dim=30, text_heads=4)
    with pytest.raises(ValueError, match="must all be positive"):
        CLIPConfig(embed_dim=0)
    with pytest.raises(ValueError, match=r"shape \(B, 3, H, W\)"):
        model.encode_image(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="image_proj"):
        CLIPConfig(image_proj=False, vision_dim=48, vision_heads=4, embed_dim=64)


def test_zero_shot_classifier_ensembles_normalised_prompts():
    tok = caption_tokenizer(["a large red circle", "a large blue square"])
    model = clip.clip_tiny(vocab_size=tok.vocab_size, context_length=8).eval()
    templates = ["a large {}", "a large red {}"]
    weights = recipe.zero_shot_classifier(model, ["circle", "square"], templates, tok)
    assert weights.shape == (2, 64)
    assert torch.allclose(weights.norm(dim=-1), torch.ones(2), atol=1e-6)
    prompts = tok.encode_batch(["a large circle", "a large red circle"], 8)
    by_hand = F.normalize(model.encode_text(prompts, normalize=True).mean(0), dim=-1)
    report_diff("prompt ensemble", weights[0], by_hand.detach(), 1e-6)
    images = torch.rand(3, 3, 32, 32)
    logits = recipe.zero_shot_logits(model, images, weights, batch_size=2)
    by_hand = model.encode_image(images, normalize=True) @ weights.T * model.logit_scale.exp()
    report_diff("zero-shot logits in batches", logits, by_hand.detach(), 1e-6)


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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_from_hf_rejects_other_models():
    vit = transformers.ViTModel(transformers.ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32))
    with pytest.raises(ValueError, match="CLIPModel and SiglipModel"):
        CLIP.from_hf(vit)


@pytest.mark.slow
def test_train_script_smoke_run(tmp_path, monkeypatch):
    import runpy
    from pathlib import Path

    out = tmp_path / "clip.safetensors"
    script = Path(__file__).resolve().parents[1] / "scripts" / "train_clip.py"
    argv = ["train_clip.py", "--epochs", "1", "--n", "48", "--n-test", "16", "--batch-size", "16", "--threads", "1", "--out", str(out)]
    monkeypatch.setattr("sys.argv", argv)
    runpy.run_path(str(script), run_name="__main__")
    model, tok, meta = recipe.load_scenes_clip(str(out))
    assert meta["train_pairs"] == "48" and meta["epochs"] == "1" and set(meta) >= {"shape_acc", "color_acc", "recall1"}
    assert model.config.vocab_size == tok.vocab_size and tok.vocab[:4] == list(CAPTION_SPECIALS)
    # The scores in the metadata are what evaluate() measures on the same test pairs.
    from course_lib import data

    test_ds = data.scenes(16, "test")
    images = clip.preprocess(data.to_tensors(test_ds)[0])
    weights = recipe.zero_shot_classifier(model, data.SHAPES, [f"a large {c} {{}}" for c in data.COLORS], tok)
    shape_acc = (recipe.zero_shot_logits(model, images, weights).argmax(1) == torch.tensor(test_ds["label"])).float().mean().item()
    assert float(meta["shape_acc"]) == pytest.approx(shape_acc, abs=1e-4)


@pytest.mark.slow
def test_shipped_clip_scores_what_its_metadata_says():
    """The shipped clip_scenes, scored as scripts/train_clip.py scored it (its first 1,000 test
    pairs): zero-shot shape and colour accuracy and recall@1 equal the numbers in its metadata,
    each well above chance (1 in 5 shapes, 1 in 6 colours, 1 in 500 captions)."""
    import importlib.util
    from pathlib import Path

    from course_lib import data

    torch.set_num_threads(1)
    spec = importlib.util.spec_from_file_location("train_clip", Path(__file__).resolve().parents[1] / "scripts" / "train_clip.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    model, tok, meta = recipe.load_scenes_clip()
    test_ds = data.scenes(int(meta.get("test_pairs", 1000)), "test")
    scores = script.evaluate(model, tok, clip.preprocess(data.to_tensors(test_ds)[0]), test_ds)
    print("shipped CLIP:", {k: round(v, 4) for k, v in scores.items()}, "metadata:", {k: meta[k] for k in scores})
    for name, chance in (("shape_acc", 1 / 5), ("color_acc", 1 / 6), ("recall1", 1 / 500)):
        assert float(meta[name]) == pytest.approx(scores[name], abs=1e-3) and scores[name] > chance + 0.15, name


# ----------------------------------------------------------------------------------------------
# Size factories: the papers' models
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("factory,reference", [("clip_vit_b32", "CLIP"), ("siglip_base", "Siglip")])
def test_paper_sizes_have_the_papers_parameter_counts(factory, reference):
    """clip_vit_b32() is OpenAI's CLIP ViT-B/32 (151.3 M parameters), siglip_base() SigLIP B/16 at
    224 (203.2 M): the same counts as transformers' default configs, which are those checkpoints."""
    ours = getattr(clip, factory)()  # built on the CPU (a few seconds): ViT's init copies data
    with torch.device("meta"):
        ref = getattr(transformers, f"{reference}Model")(getattr(transformers, f"{reference}Config")())
    n_ours, n_ref = (sum(p.numel() for p in m.parameters()) for m in (ours, ref))
    print(f"{factory}: {n_ours / 1e6:.1f} M parameters, transformers {reference}Model {n_ref / 1e6:.1f} M")
    assert n_ours == n_ref
    assert round(n_ours / 1e6) == {"clip_vit_b32": 151, "siglip_base": 203}[factory]
