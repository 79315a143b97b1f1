"""course_lib.llava: the splice at <image>, the answer-only loss mask, the connector, AnyRes
(grid choice, tiling, unpadding, newline), and parity with transformers' LLaVA and LLaVA-NeXT
(logits and loss; LLaVA-NeXT on non-square images)."""

import pytest
import torch
import transformers
from conftest import randomize_, report_diff
from transformers.image_processing_utils import select_best_resolution as hf_select_best_resolution

from course_lib.llama import LlamaConfig
from course_lib.llava import (
    IGNORE_INDEX,
    Connector,
    Llava,
    LlavaConfig,
    answer_labels,
    answer_mask,
    anyres_views,
    select_best_resolution,
    splice_image_features,
    unpad_features,
    vision_features,
)
from course_lib.vit import ViTConfig

PINPOINTS = [[32, 64], [64, 32], [64, 64], [32, 96], [96, 32], [32, 128], [128, 32]]  # 1x2, 2x1, 2x2, 1x3, ...


def report_loss(name: str, ours: torch.Tensor, ref: torch.Tensor) -> None:
    """report_diff for a scalar (whose spread cannot show whether the reference is degenerate)."""
    assert ref.item() > 0.1, f"{name}: the reference loss {ref.item()} is degenerate"
    diff = abs(ours.item() - ref.item())
    print(f"[parity] {name}: {ours.item():.6f} vs {ref.item():.6f}, max abs diff {diff:.2e} (tolerance 1e-05)")
    assert diff <= 1e-5


def test_answer_mask_covers_answers_and_their_end_only():
    # ids: 7 = assistant marker, 2 = end of answer, 0 = padding
    ids = torch.tensor([[5, 9, 7, 11, 12, 2, 9, 7, 13, 2, 0, 0]])
    mask = answer_mask(ids, start_id=7, end_id=2)
    assert mask[0].tolist() == [False, False, False, True, True, True, False, False, True, True, False, False]
    labels = answer_labels(ids, 7, 2)
    assert labels[0, 3:6].tolist() == [11, 12, 2] and (labels[0, :3] == IGNORE_INDEX).all()


def test_splice_replaces_placeholders_in_order_and_checks_the_count():
    ids = torch.tensor([[1, 3, 3, 5], [3, 3, 6, 0]])
    embeds = torch.zeros(2, 4, 2)
    feats = torch.arange(8.0).reshape(4, 2)
    out = splice_image_features(embeds, ids, feats, image_token_id=3)
    assert out[0, 1:3].tolist() == [[0, 1], [2, 3]] and out[1, :2].tolist() == [[4, 5], [6, 7]]
    assert out[0, 0].tolist() == [0, 0] and out[1, 2].tolist() == [0, 0]
    with pytest.raises(ValueError, match="4 <image> placeholders but there are 3"):
        splice_image_features(embeds, ids, feats[:3], 3)


def test_connector_kinds_and_feature_layer():
    assert sum(p.numel() for p in Connector(8, 16, "linear").parameters()) == 8 * 16 + 16
    assert sum(p.numel() for p in Connector(8, 16, "mlp").parameters()) == 8 * 16 + 16 + 16 * 16 + 16
    model = Llava(LlavaConfig(vision=ViTConfig(image_size=32, patch_size=8, num_classes=0, dim=16, depth=3, num_heads=2)))
    x = torch.rand(2, 3, 32, 32)
    assert vision_features(model.vision_tower, x, -2).shape == (2, 16, 16)  # 4x4 patches, CLS dropped
    assert torch.allclose(vision_features(model.vision_tower, x, 3), vision_features(model.vision_tower, x, -1))
    with pytest.raises(ValueError, match="feature_layer 5"):
        LlavaConfig(vision=ViTConfig(num_classes=0, depth=3), feature_layer=5)


def test_best_resolution_matches_transformers():
    sizes = [(32, 32), (20, 90), (90, 20), (45, 100), (100, 45), (33, 64), (64, 33), (17, 130), (70, 70), (31, 95)]
    for size in sizes:
        assert select_best_resolution(size, PINPOINTS) == hf_select_best_resolution(size, PINPOINTS), size
    assert select_best_resolution((32, 96), PINPOINTS) == (32, 96)  # a 1:3 panorama gets three full tiles
    assert select_best_resolution((96, 32), PINPOINTS) == (96, 32)


def test_anyres_views_tile_a_wide_image_without_loss():
    image = torch.rand(3, 32, 96)
    views = anyres_views(image, PINPOINTS, 32)
    assert views.shape == (4, 3, 32, 32)  # the squashed base view, then 3 tiles
    assert torch.allclose(views[1:], image.reshape(3, 32, 3, 32).permute(2, 0, 1, 3), atol=1e-6)
    padded = anyres_views(torch.rand(3, 40, 70), PINPOINTS, 32)  # fitted into 64x64 with padding
    assert padded.shape == (5, 3, 32, 32) and (padded[1][:, :4] == 0).all()
    feats = torch.ones(1, 8, 8)
    assert unpad_features(feats, (40, 70)).shape == (1, 4, 8)


def test_num_image_tokens_equals_packed_length():
    config = LlavaConfig(
        vision=ViTConfig(image_size=32, patch_size=8, num_classes=0, dim=16, depth=2, num_heads=2),
        text=LlamaConfig(vocab_size=20, dim=16, depth=1, num_heads=2, mlp_dim=24), grid_pinpoints=PINPOINTS,
    )
    model = Llava(config).eval()
    images = [torch.rand(3, 32, 96), torch.rand(3, 50, 30), torch.rand(3, 40, 70)]
    tokens = model.image_tokens(images)
    assert [t.shape[0] for t in tokens] == [model.num_image_tokens(im.shape[1:]) for im in images]
    assert tokens[0].shape[0] == 16 + 4 * (12 + 1)  # base view + 4 rows of 12 tile features and a newline


def _hf_configs(next_: bool):
    vision = transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32, patch_size=8,
    )
    text = transformers.LlamaConfig(
        vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=256,
    )
    if next_:
        return transformers.LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=49, image_grid_pinpoints=PINPOINTS)
    return transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=49, image_seq_length=16)


def _prompts(counts: list[int], text_len: int = 6) -> torch.Tensor:
    """One row per image: text, the image's placeholders, text (padded with 0 to one length)."""
    g = torch.Generator().manual_seed(1)
    rows = [torch.cat([torch.randint(4, 49, (3,), generator=g), torch.full((n,), 49), torch.randint(4, 49, (text_len,), generator=g)]) for n in counts]
    out = torch.zeros(len(rows), max(len(r) for r in rows), dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


@pytest.mark.slow
def test_llava_parity_logits_and_loss(tmp_path):
    ref = randomize_(transformers.LlavaForConditionalGeneration(_hf_configs(False))).eval()
    images = torch.randn(2, 3, 32, 32)
    ids = _prompts([16, 16])
    labels = answer_labels(ids, start_id=10, end_id=11)
    labels[:, -4:] = ids[:, -4:]  # some answer tokens, so the loss is not empty
    with torch.no_grad():
        out = ref(input_ids=ids, pixel_values=images, labels=labels)
    ref.save_pretrained(tmp_path)
    for tag, source in (("in memory", ref), ("from folder", str(tmp_path))):
        ours = Llava.from_hf(source).eval()
        assert ours.config.feature_layer == -2 and ours.config.connector == "mlp"
        with torch.no_grad():
            report_diff(f"LLaVA {tag}: logits", ours(ids, images), out.logits)
            report_loss(f"LLaVA {tag}: loss", ours.loss(ids, images, labels), out.loss)


@pytest.mark.slow
def test_llava_next_parity_on_non_square_images(tmp_path):
    ref = randomize_(transformers.LlavaNextForConditionalGeneration(_hf_configs(True))).eval()
    images = [torch.randn(3, 32, 96), torch.randn(3, 50, 30), torch.randn(3, 40, 70)]  # 1x3, 2x1 padded, 2x2 padded
    ours = Llava.from_hf(ref).eval()
    counts = [ours.num_image_tokens(im.shape[1:]) for im in images]
    views = [anyres_views(im, PINPOINTS, 32) for im in images]
    pixel_values = torch.zeros(3, max(len(v) for v in views), 3, 32, 32)
    for i, v in enumerate(views):
        pixel_values[i, : len(v)] = v
    image_sizes = torch.tensor([im.shape[1:] for im in images])
    ids = _prompts(counts)
    labels = ids.clone()
    with torch.no_grad():
        out = ref(input_ids=ids, pixel_values=pixel_values, image_sizes=image_sizes, labels=labels)
    print("image tokens per image:", counts, "views:", [len(v) for v in views])
    ref.save_pretrained(tmp_path)
    for tag, model in (("in memory", ours), ("from folder", Llava.from_hf(str(tmp_path)).eval())):
        with torch.no_grad():
            report_diff(f"LLaVA-NeXT {tag}: logits", model(ids, images), out.logits)
            report_loss(f"LLaVA-NeXT {tag}: loss", model.loss(ids, images, labels), out.loss)


# ----------------------------------------------------------------------------------------------
# Instructions from the scenes, the chat template, and the training script
# ----------------------------------------------------------------------------------------------
def test_instructions_are_deterministic_and_true_to_the_scene():
    from course_lib import data
    from course_lib.recipes import instructions as I

    tok = I.instruction_tokenizer()
    answers = {"yes": 0, "no": 0}
    for i in range(80):
        scene = data.render_scene(i)
        samples = I.instructions(scene, i)
        assert samples == I.instructions(scene, i) and [s["kind"] for s in samples] == list(I.KINDS)
        for s in samples + [I.caption_sample(scene)]:
            for q, a in s["turns"]:
                assert tok.decode(tok.encode(f"{q} {a}")).replace(" .", ".").replace(" ?", "?") == f"{q} {a}".replace(" .", ".").replace(" ?", "?")
        (q, a), = samples[3]["turns"]
        colour, shape = q.split()[3:5]
        assert (a == "yes") == any((o["color"], o["shape"]) == (colour, shape) for o in scene["objects"])
        answers[a] += 1
        (q, a), = samples[2]["turns"]
        if a != "nothing":
            relation = " ".join(q.split()[2:-4])
            cell = lambda o: divmod(data.POSITIONS.index(o["position"]), 3)  # noqa: E731
            refs = [o for o in scene["objects"] if f"the {o['color']} {o['shape']} ?" in q]
            others = [o for o in scene["objects"] if a == f"the {o['size']} {o['color']} {o['shape']}"]
            assert any(I.RELATIONS[relation](cell(o)[0] - cell(r)[0], cell(o)[1] - cell(r)[1]) for r in refs for o in others)
        assert samples[1]["turns"][0][1].startswith("there is one shape" if scene["count"] == 1 else "there are")
    assert min(answers.values()) > 25  # both answers common


def test_chat_template_supervises_answers_only():
    from course_lib.recipes import instructions as I
    from course_lib.recipes.llava_training import encode_samples

    tok = I.instruction_tokenizer()
    sample = {"kind": "conversation", "turns": [("what color is it ?", "red"), ("how many shapes are there ?", "two")]}
    ids, labels, last = encode_samples([sample, {"kind": "yes/no", "turns": [("is there a red circle ?", "no")]}], tok, 4)
    assert tok.decode(ids[0], skip_special=False).startswith("<bos> <image> <image> <image> <image> <user> what color")
    supervised = [tok.vocab[i] for i in labels[0].tolist() if i != IGNORE_INDEX]
    assert supervised == ["red", "<eos>", "two", "<eos>"]
    assert [tok.vocab[i] for i in ids[0][last[0]].tolist()] == ["two", "<eos>"]
    assert (ids[1][labels[1] == IGNORE_INDEX] != tok.ids["no"]).all()


def test_panorama_panels_are_the_scenes():
    from course_lib.recipes import instructions as I

    for i in range(6):
        image, sample = I.panorama(i)
        H, W = image.shape[1:]
        assert sorted((H, W)) in ([32, 64], [32, 96]) and image.min() >= 0 and image.max() <= 1
        assert sample["kind"] in ("shape", "color") and sample == I.panorama(i)[1]


@pytest.mark.slow
def test_training_script_smoke(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from course_lib.utils import load_checkpoint

    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, str(root / "scripts" / "train_llava.py"), "--n", "16", "--steps", "1", "--batch", "8", "--out-dir", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "COURSE_CACHE": str(tmp_path / "cache")}, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    for name in ("llava_scenes", "llava_next_scenes"):
        model, meta = load_checkpoint(tmp_path / f"{name}.safetensors", Llava, LlavaConfig)
        assert set(json_loads(meta["results"])) >= {"lm_alone", "lm_with_true_caption", "stage1", "stage2_full", "stage2_lora", "anyres"}
    assert model.config.grid_pinpoints is not None and model.image_newline is not None


def json_loads(text: str):
    import json

    return json.loads(text)


@pytest.mark.slow
def test_shipped_checkpoints_load_and_answer():
    import json

    from course_lib import data
    from course_lib.recipes import instructions as I
    from course_lib.recipes.llava_training import accuracy_by_kind, instruction_data
    from course_lib.utils import load_checkpoint

    tok = I.instruction_tokenizer()
    model, meta = load_checkpoint("llava_scenes.safetensors", Llava, LlavaConfig)
    results = json.loads(meta["results"])
    assert json.loads(meta["vocab"]) == tok.vocab and model.config.grid_pinpoints is None
    # the recorded comparison the lecture teaches: stage 2 (full) beats stage 1 and the frozen-LM connector
    assert results["stage2_full"]["all"] > results["stage2_frozen_lm"]["all"] > results["stage1"]["all"]
    assert results["anyres"]["anyres"]["all"] > results["anyres"]["one_view"]["all"]
    ds = data.scenes(60, "test")  # the first 60 of the script's held-out scenes
    test, kinds = instruction_data(model, I.scene_records(ds), data.to_tensors(ds)[0], tok)
    live = accuracy_by_kind(model, test, kinds)
    print("shipped stage-2 model on 60 held-out scenes:", live)
    assert live["conversation"] > results["lm_alone"]["conversation"] + 0.2
    next_model, _ = load_checkpoint("llava_next_scenes.safetensors", Llava, LlavaConfig)
    assert next_model.config.grid_pinpoints is not None and next_model.image_newline is not None


def test_answer_is_correct_only_when_every_token_and_eos_would_be_generated():
    from course_lib.recipes.llava_training import answers_correct, trim_padding

    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 5, 2, IGNORE_INDEX]] * 3)
    last = labels != IGNORE_INDEX
    logits = torch.zeros(3, 5, 8)
    logits[:, 1, 5] = logits[:, 2, 2] = 1.0  # position t predicts token t + 1
    logits[1, 2, 2], logits[1, 2, 7] = 0.0, 1.0  # row 1: the answer is right but <eos> is not
    logits[2, 1, 5], logits[2, 1, 4] = 0.0, 1.0  # row 2: the answer word is wrong
    assert answers_correct(logits, labels, last).tolist() == [True, False, False]
    ids = torch.tensor([[1, 4, 0, 0], [1, 0, 0, 0]])
    assert trim_padding(ids, ids)[1].tolist() == [[1, 4], [1, 0]]
