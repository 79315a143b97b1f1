"""course_lib.qformer: the three masks, the stage-1 losses, the stage-2 connectors, and parity with
transformers' Blip2QFormerModel (random weights, with and without text)."""

import pytest
import torch
import transformers
from conftest import randomize_, report_diff
from torch import nn

from course_lib.layers import use_explicit_attention
from course_lib.connectors import LinearConnector, MlpConnector, QFormerConnector
from course_lib.qformer import (
    QFormer,
    QFormerConfig,
    itc_mask,
    itg_mask,
    itm_mask,
    max_query_similarity,
    prepend_soft_prompt,
    sample_hard_negatives,
    with_text_padding,
)



# ----------------------------------------------------------------------------------------------
# Masks
# ----------------------------------------------------------------------------------------------
def test_masks_on_two_queries_and_three_words():
    Q, T = True, False
    assert torch.equal(itc_mask(2, 3), torch.tensor([
        [Q, Q, T, T, T], [Q, Q, T, T, T],
        [T, T, Q, Q, Q], [T, T, Q, Q, Q], [T, T, Q, Q, Q]]))
    assert itm_mask(2, 3).all() and itm_mask(2, 3).shape == (5, 5)
    assert torch.equal(itg_mask(2, 3), torch.tensor([
        [Q, Q, T, T, T], [Q, Q, T, T, T],
        [Q, Q, Q, T, T], [Q, Q, Q, Q, T], [Q, Q, Q, Q, Q]]))
    # No text: all three masks are the queries' full square.
    for f in (itc_mask, itm_mask, itg_mask):
        assert f(3, 0).all()


def test_text_padding_hides_padded_keys_only():
    keep = torch.tensor([[True, True, False], [True, True, True]])
    m = with_text_padding(itm_mask(2, 3), keep)
    assert m.shape == (2, 1, 5, 5)
    assert not m[0, 0, :, 4].any() and m[0, 0, :, :4].all() and m[1].all()
    assert m.any(-1).all()  # no row is empty


# ----------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------
def test_max_query_similarity_takes_the_best_query():
    q = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [-1.0, 0.0]]])  # 2 images x 2 queries
    t = torch.tensor([[0.0, 2.0], [3.0, 0.0], [-1.0, -1.0]])  # 3 texts
    sim = max_query_similarity(q, t)
    s = 2**-0.5
    expected = torch.tensor([[1.0, 1.0, -s], [s, s, s]])  # image 2, text 3: the second query wins
    assert torch.allclose(sim, expected, atol=1e-6)


def test_hard_negatives_are_never_the_positive_and_follow_similarity():
    sim = torch.tensor([[0.0, 9.0, -9.0], [9.0, 0.0, -9.0], [-9.0, 9.0, 0.0]])
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        neg_text, neg_image = sample_hard_negatives(sim, g)
        assert (neg_text != torch.arange(3)).all() and (neg_image != torch.arange(3)).all()
        assert neg_text.tolist() == [1, 0, 1]  # the most confusing other text
    with pytest.raises(ValueError, match="at least 2"):
        sample_hard_negatives(torch.zeros(1, 1))


def test_hard_negatives_skip_excluded_pairs():
    logits = torch.tensor([[0.0, 9.0, 1.0], [9.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    same = torch.tensor([[False, True, False], [True, False, False], [False, False, False]])  # captions 0 and 1 identical
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        neg_text, neg_image = sample_hard_negatives(logits, g, exclude=same)
        assert neg_text[:2].tolist() == [2, 2] and neg_image[:2].tolist() == [2, 2]
    # Everything excluded: fall back to any other pair rather than fail.
    neg_text, _ = sample_hard_negatives(torch.zeros(2, 2), g, exclude=torch.ones(2, 2, dtype=torch.bool))
    assert neg_text.tolist() == [1, 0]


@pytest.mark.slow
def test_stage1_draws_hard_negatives_from_temperature_scaled_logits(monkeypatch):
    """Regression: the negatives were drawn from softmax(cosine similarity), nearly uniform over
    [-1, 1], so ITM trained on random negatives. BLIP-2 draws them from similarity / temperature."""
    import course_lib.qformer as qformer_module

    seen = {}

    def spy(logits, generator=None, exclude=None):
        seen["logits"], seen["exclude"] = logits, exclude
        return sample_hard_negatives(logits, generator, exclude)

    monkeypatch.setattr(qformer_module, "sample_hard_negatives", spy)
    torch.manual_seed(0)
    m = QFormer(QFormerConfig(dim=32, depth=2, num_heads=4, mlp_dim=64, num_queries=4, encoder_dim=24, vocab_size=20, max_text_len=8))
    ids = torch.randint(4, 20, (5, 6))
    ids[:, 0], ids[3] = 1, ids[1]  # texts 1 and 3 are the same caption
    out = m.stage1_losses(torch.randn(5, 9, 24), ids, torch.Generator().manual_seed(0))
    temperature = m.temperature().item()
    assert abs(temperature - 0.07) < 1e-6
    assert torch.allclose(seen["logits"], out["similarity"].detach() / temperature)
    assert seen["exclude"][1, 3] and seen["exclude"][3, 1] and not seen["exclude"][0, 1]


@pytest.mark.slow
def test_stage1_losses_and_the_masks_matter():
    torch.manual_seed(0)
    m = QFormer(QFormerConfig(dim=32, depth=2, num_heads=4, mlp_dim=64, num_queries=4, encoder_dim=24, vocab_size=20, max_text_len=8))
    feats, ids = torch.randn(4, 9, 24), torch.randint(4, 20, (4, 6))
    ids[:, 0], ids[0, 4:] = 1, 0
    out = m.stage1_losses(feats, ids, torch.Generator().manual_seed(0))
    assert set(out) >= {"itc", "itm", "itg", "loss"} and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert m.query_tokens.grad.abs().sum() > 0 and m.word_embed.weight.grad.abs().sum() > 0
    # Under the ITC mask the text does not depend on the image; under ITG it does, causally.
    with torch.no_grad():
        other = torch.randn(4, 9, 24)
        a, b = m(feats, ids, "itc")[:, 4:], m(other, ids, "itc")[:, 4:]
        assert torch.allclose(a, b)
        a, b = m(feats, ids, "itg")[:, 4:], m(other, ids, "itg")[:, 4:]
        assert not torch.allclose(a, b)
        ids2 = ids.clone()
        ids2[:, -1] = 5
        a, b = m(feats, ids, "itg")[:, 4:-1], m(feats, ids2, "itg")[:, 4:-1]
        assert torch.allclose(a, b)  # changing the last word changes nothing before it
        assert torch.allclose(m(feats, ids, "itg")[:, :4], m(feats)[:, :4], atol=1e-6)  # queries never see text


# ----------------------------------------------------------------------------------------------
# Stage 2
# ----------------------------------------------------------------------------------------------
def test_connectors_give_soft_prompts_of_the_lm_width():
    feats = torch.randn(2, 65, 24)
    qf = QFormer(QFormerConfig(dim=32, depth=2, num_heads=4, mlp_dim=64, num_queries=5, encoder_dim=24, vocab_size=0))
    assert LinearConnector(24, 48)(feats).shape == (2, 65, 48)
    assert MlpConnector(24, 48)(feats).shape == (2, 65, 48)
    assert QFormerConnector(qf, 48)(feats).shape == (2, 5, 48)
    proj = nn.Linear(32, 48)
    out = prepend_soft_prompt(torch.randn(2, 5, 32), proj, torch.randn(2, 7, 48))
    assert out.shape == (2, 12, 48)
    with pytest.raises(ValueError, match="nn.Linear"):
        prepend_soft_prompt(torch.randn(2, 5, 32), proj, torch.randn(2, 7, 40))


def test_errors_say_what_to_fix():
    qf = QFormer(QFormerConfig(dim=32, depth=1, num_heads=4, mlp_dim=64, encoder_dim=24, vocab_size=0))
    with pytest.raises(ValueError, match="encoder_dim"):
        qf(torch.randn(1, 9, 16))
    with pytest.raises(ValueError, match="image_feats"):
        qf.encode(torch.randn(1, 8, 32), 8, None)
    with pytest.raises(ValueError, match="cross_attention_freq"):
        QFormerConfig(cross_attention_freq=0)
    with pytest.raises(ValueError, match="mask_kind"):
        QFormer(QFormerConfig(dim=32, depth=1, num_heads=4, encoder_dim=24, vocab_size=10))(torch.randn(1, 9, 24), torch.ones(1, 3, dtype=torch.long), "causal")


# ----------------------------------------------------------------------------------------------
# Parity with transformers
# ----------------------------------------------------------------------------------------------
def _hf_qformer(depth=3, freq=2, text=True):
    from transformers import Blip2QFormerConfig, Blip2QFormerModel

    config = Blip2QFormerConfig(hidden_size=32, num_hidden_layers=depth, num_attention_heads=4, intermediate_size=48,
                                encoder_hidden_size=24, cross_attention_frequency=freq, use_qformer_text_input=text,
                                vocab_size=50, max_position_embeddings=40)
    return randomize_(Blip2QFormerModel(config)).eval()


@pytest.mark.slow
@pytest.mark.parametrize("depth,freq,B,Nq,N", [(3, 2, 2, 4, 9), (2, 1, 1, 8, 17), (4, 3, 3, 2, 5)])
def test_parity_queries_only(depth, freq, B, Nq, N):
    hf = _hf_qformer(depth, freq)
    ours = QFormer.from_hf(hf, num_queries=Nq).eval()
    assert sum(layer.cross_attn is not None for layer in ours.layers) == len(range(0, depth, freq))
    q, feats = torch.randn(B, Nq, 32), torch.randn(B, N, 24)
    with torch.no_grad():
        ref = hf(query_embeds=q, encoder_hidden_states=feats).last_hidden_state
        report_diff(f"Q-Former queries only (depth {depth}, every {freq}, {Nq} queries, {N} image tokens)", ours.encode(q, Nq, feats), ref)
        report_diff("  explicit attention path", use_explicit_attention(ours).encode(q, Nq, feats), ref)


@pytest.mark.slow
@pytest.mark.parametrize("B,Nq,T", [(2, 4, 6), (3, 3, 1)])
def test_parity_with_text_and_padding(B, Nq, T):
    hf = _hf_qformer()
    ours = QFormer.from_hf(hf, num_queries=Nq).eval()
    x, feats = torch.randn(B, Nq + T, 32), torch.randn(B, 9, 24)
    keep = torch.ones(B, T, dtype=torch.bool)
    keep[0, T // 2 + 1 :] = False  # padding at the end of the first text
    full = torch.cat([torch.ones(B, Nq, dtype=torch.long), keep.long()], dim=1)  # transformers' (B, L) mask
    with torch.no_grad():
        ref = hf(query_embeds=x, query_length=Nq, attention_mask=full, encoder_hidden_states=feats).last_hidden_state
        ours_out = ours.encode(x, Nq, feats, with_text_padding(itm_mask(Nq, T), keep))
    report_diff(f"Q-Former queries + {T} text tokens, padded (ITM mask)", ours_out, ref)


@pytest.mark.slow
def test_parity_with_a_4d_itg_mask():
    hf = _hf_qformer()
    ours = QFormer.from_hf(hf, num_queries=4).eval()
    x, feats = torch.randn(2, 4 + 5, 32), torch.randn(2, 9, 24)
    mask = itg_mask(4, 5)
    with torch.no_grad():
        ref = hf(query_embeds=x, query_length=4, attention_mask=mask[None, None].expand(2, 1, 9, 9), encoder_hidden_states=feats).last_hidden_state
        report_diff("Q-Former with the ITG mask", ours.encode(x, 4, feats, mask), ref)


@pytest.mark.slow
def test_from_hf_folder_and_blip2_model(tmp_path):
    hf = _hf_qformer()
    hf.save_pretrained(tmp_path)
    ours = QFormer.from_hf(str(tmp_path), num_queries=4).eval()
    q, feats = torch.randn(2, 4, 32), torch.randn(2, 9, 24)
    with torch.no_grad():
        report_diff("Q-Former from a save_pretrained folder", ours.encode(q, 4, feats), hf(query_embeds=q, encoder_hidden_states=feats).last_hidden_state)

    from transformers import Blip2Config, Blip2Model

    config = Blip2Config(
        vision_config=dict(hidden_size=24, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=8),
        qformer_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, encoder_hidden_size=24),
        text_config=dict(model_type="opt", hidden_size=16, num_hidden_layers=1, num_attention_heads=2, ffn_dim=32, vocab_size=60, word_embed_proj_dim=16),
        num_query_tokens=6,
    )
    blip2 = randomize_(Blip2Model(config)).eval()
    ours = QFormer.from_hf(blip2).eval()
    assert ours.config.num_queries == 6 and torch.equal(ours.query_tokens, blip2.query_tokens)
    feats = torch.randn(2, 5, 24)
    with torch.no_grad():
        ref = blip2.qformer(query_embeds=blip2.query_tokens.expand(2, -1, -1), encoder_hidden_states=feats).last_hidden_state
        report_diff("Q-Former from a Blip2Model (its query tokens)", ours(feats), ref)
    with pytest.raises(ValueError, match="lacks Q-Former weights"):
        from transformers import ViTConfig, ViTModel

        QFormer.from_hf(ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48,
                                           image_size=16, patch_size=8, encoder_hidden_size=24, hidden_act="gelu")))


def test_stage2_examples_predict_only_the_answer():
    from course_lib.recipes.qformer import caption_examples, connector_data, qa_examples, soft_prompt_loss
    from course_lib.recipes.text import scene_tokenizer
    from course_lib.tinylm import TinyLM, TinyLMConfig

    tok = scene_tokenizer()
    ds = {"questions": [["how many shapes are there?", "what color is the large object?"]], "answers": [["two", "red"]],
          "caption": ["a large red circle in the center on a plain background"]}
    index, ids, targets, kind = qa_examples(ds, tok)
    assert index.tolist() == [0, 0] and kind.tolist() == [0, 1]
    assert tok.decode(ids[0]) == "how many shapes are there? two"
    assert [t for t in targets[0].tolist() if t != -100] == [tok.ids["two"], tok.eos_id]
    _, cap_ids, cap_targets = caption_examples(ds, tok)
    assert tok.decode(cap_ids[0]) == ds["caption"][0] and (cap_targets[0] == cap_ids[0]).all()
    lm = TinyLM(TinyLMConfig(vocab_size=tok.vocab_size, dim=16, depth=1, num_heads=2))
    prompt = torch.randn(2, 3, 16, requires_grad=True)
    loss = soft_prompt_loss(lm, prompt, ids, targets)
    loss.backward()
    assert torch.isfinite(loss) and prompt.grad.abs().sum() > 0  # the loss reaches the soft prompt
    index, mixed_ids, mixed_targets = connector_data((index, ids, targets), (_, cap_ids, cap_targets))
    assert mixed_ids.shape == (3, max(ids.shape[1], cap_ids.shape[1])) and index.tolist() == [0, 0, 0]
    assert torch.equal(mixed_targets[2, : cap_ids.shape[1]], cap_targets[0])
    with pytest.raises(ValueError, match="at least one example set"):
        connector_data()


# ----------------------------------------------------------------------------------------------
# Connector checkpoints: the library's save/load, the training script, the shipped results
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_query_transformer_keeps_the_query_path(tmp_path):
    from course_lib.connectors import Connectors, ConnectorsConfig, make_connector
    from course_lib.qformer import query_transformer
    from course_lib.recipes.qformer import load_connectors
    from course_lib.utils import save_checkpoint

    config = QFormerConfig(dim=32, depth=2, num_heads=4, mlp_dim=64, num_queries=3, encoder_dim=24, vocab_size=20, max_text_len=8)
    full = QFormer(config).eval()
    bare = query_transformer(full)
    assert bare.config.vocab_size == 0 and not bare.config.text_ffn
    feats = torch.randn(2, 9, 24)
    assert torch.equal(bare(feats), full(feats))  # the queries never needed the text side
    connectors = Connectors(ConnectorsConfig({"lin": "linear", "qf": "qformer"}, 24, 16, config)).eval()
    connectors["qf"].qformer = bare
    save_checkpoint(connectors, tmp_path / "c.safetensors", note="x")
    loaded, meta = load_connectors(tmp_path / "c.safetensors")
    assert list(loaded) == ["lin", "qf"] and meta["note"] == "x"
    for name in connectors:
        assert torch.equal(loaded[name](feats), connectors[name](feats))
        assert not any(p.requires_grad for p in loaded[name].parameters())
    with pytest.raises(ValueError, match="unknown connector"):
        make_connector("perceiver", 24, 16)
    with pytest.raises(ValueError, match="unknown connector kinds"):
        ConnectorsConfig({"a": "perceiver"})
    with pytest.raises(ValueError, match="needs ConnectorsConfig\\(qformer="):
        ConnectorsConfig({"a": "qformer"})


@pytest.mark.slow
def test_training_script_smoke_run(tmp_path):
    """scripts/train_qformer.py, which makes the shipped connectors, still runs end to end."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from course_lib.recipes.qformer import load_connectors, load_stage1_qformer

    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, str(root / "scripts" / "train_qformer.py"), "--n", "16", "--test", "16", "--epochs", "1",
           "--stage1-batch", "8", "--stage2-batch", "8", "--out-dir", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(root)}, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    qformer, meta = load_stage1_qformer(tmp_path / "qformer_stage1_scenes.safetensors")
    assert meta["steps"] == "2" and set(json.loads(meta["metrics"])) >= {"recall@1 image->text", "itm_random"}
    connectors, meta = load_connectors(tmp_path / "connectors_scenes.safetensors")
    assert list(connectors) == ["linear", "mlp", "qformer_scratch", "qformer_stage1"]
    results = json.loads(meta["results"])
    assert results["qformer_stage1"]["prompt_tokens"] == qformer.config.num_queries
    assert results["linear"]["prompt_tokens"] == 17


@pytest.fixture(scope="module")
def scenes_eval():
    """The frozen parts and 200 held-out scenes with their encoder features."""
    from course_lib import data
    from course_lib.recipes.text import scene_tokenizer
    from course_lib.recipes.vlm import encode_images, load_frozen_image_encoder, load_frozen_lm

    torch.set_num_threads(1)
    tok, lm, encoder = scene_tokenizer(), load_frozen_lm(), load_frozen_image_encoder()
    test_ds = data.scenes(500, "test").select(range(200))
    return tok, lm, test_ds, encode_images(encoder, test_ds)


@pytest.mark.slow
def test_shipped_stage1_qformer_retrieves_and_matches(scenes_eval):
    from course_lib.recipes.qformer import caption_examples, load_stage1_qformer, stage1_metrics

    tok, _, test_ds, feats = scenes_eval
    qformer, _ = load_stage1_qformer()
    with torch.no_grad():
        m = stage1_metrics(qformer, feats, caption_examples(test_ds, tok)[1])
    print({k: round(v, 3) for k, v in m.items()})
    assert m["recall_chance"] < 0.01
    assert m["recall@1 image->text"] > 0.4 and m["recall@1 text->image"] > 0.4  # chance: 1 in 200
    assert m["itm_random"] > 0.8 and m["itm_hard"] > 0.6  # chance: 0.5


@pytest.mark.slow
def test_shipped_qformer_connector_answers_beyond_the_lm_prior(scenes_eval):
    """The answers come from the image: on held-out scenes the LM after the shipped Q-Former's
    soft prompt beats the LM alone on every question type about what the encoder sees."""
    from course_lib.recipes.qformer import load_connectors
    from course_lib.recipes.vlm import answer_accuracy, answer_questions

    tok, lm, test_ds, feats = scenes_eval
    connectors, _ = load_connectors()
    prior = answer_accuracy(answer_questions(lm, tok, test_ds, None, None), test_ds)
    acc = answer_accuracy(answer_questions(lm, tok, test_ds, feats, connectors["qformer_stage1"]), test_ds)
    print("prior", prior, "\nQ-Former", acc)
    for kind in ("shape", "color", "count", "position"):
        assert acc[kind] > prior[kind] + 0.3, f"{kind}: {acc[kind]:.2f} vs the LM alone {prior[kind]:.2f}"


@pytest.mark.slow
def test_shipped_connector_comparison_holds(scenes_eval):
    """Lecture 07's comparison at equal budget: the per-token connectors (linear, MLP) leave the
    colour of the large object near the prior, the Q-Former reads it; all of them count."""
    from course_lib.recipes.qformer import load_connectors
    from course_lib.recipes.vlm import answer_accuracy, answer_questions

    tok, lm, test_ds, feats = scenes_eval
    connectors, _ = load_connectors()
    acc = {name: answer_accuracy(answer_questions(lm, tok, test_ds, feats, c), test_ds) for name, c in connectors.items()}
    print({name: {k: round(v, 2) for k, v in a.items()} for name, a in acc.items()})
    for per_token in ("linear", "mlp"):
        for qformer in ("qformer_scratch", "qformer_stage1"):
            assert acc[qformer]["color"] > acc[per_token]["color"] + 0.3, (qformer, per_token, acc)
    assert all(a["count"] > 0.9 for a in acc.values()), acc


# ----------------------------------------------------------------------------------------------
# Bad input: a clear error that says what to fix
# ----------------------------------------------------------------------------------------------
def _bad_qformer_inputs():
    from course_lib import connectors
    from course_lib import qformer as q
    from course_lib.recipes import qformer as rq
    from course_lib.tinylm import tinylm

    tiny = lambda: q.qformer_tiny()  # noqa: E731
    return {
        "width not divisible by heads": (lambda: q.QFormerConfig(dim=30, num_heads=4), "not divisible by 4 heads"),
        "no layers": (lambda: q.QFormerConfig(depth=0), "must all be positive"),
        "image features without tokens": (lambda: tiny()(torch.randn(2, 64)), r"\(batch, tokens, encoder_dim\)"),
        "nothing to encode": (lambda: tiny()(None), "image features"),
        "mask without queries": (lambda: q.itc_mask(0, 3), "at least one query"),
        "mask of another length": (lambda: q.with_text_padding(q.itm_mask(2, 3), torch.ones(1, 5, dtype=torch.bool)), "does not cover"),
        "similarity widths differ": (lambda: q.max_query_similarity(torch.randn(2, 3, 8), torch.randn(2, 6)), "one width"),
        "non-square ITC": (lambda: q.itc_loss(torch.randn(2, 3), 0.1), "square"),
        "connector kind": (lambda: connectors.make_connector("perceiver", 4, 4), "unknown connector kind"),
        "example sets of unequal length": (lambda: rq.connector_data((torch.zeros(2), torch.zeros(3, 4), torch.zeros(3, 4))), "as many"),
        "stage 1 batch": (lambda: rq.Stage1Loss(torch.randn(4, 17, 64))(tiny(), (torch.arange(2),)), "image_index, caption_ids"),
        "stage 2 batch": (lambda: rq.ConnectorLoss(freeze_(tinylm(10)), torch.zeros(1))(None, (1, 2)), "connector_data"),
        "LM not frozen": (lambda: rq.ConnectorLoss(tinylm(10), torch.zeros(1)), "must be frozen"),
        "one image for stage-1 metrics": (lambda: rq.stage1_metrics(tiny(), torch.randn(1, 17, 64), torch.ones(1, 5, dtype=torch.long)), "N >= 2"),
        "missing checkpoint": (lambda: rq.load_connectors("/nonexistent/c.safetensors"), "shipped checkpoints"),
    }


def freeze_(model):
    from course_lib.utils import freeze

    return freeze(model)


@pytest.mark.parametrize("case", list(_bad_qformer_inputs()))
def test_bad_inputs_raise_clear_errors(case):
    fn, match = _bad_qformer_inputs()[case]
    with pytest.raises((ValueError, TypeError, FileNotFoundError), match=match):
        fn()
