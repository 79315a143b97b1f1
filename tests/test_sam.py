"""course_lib.sam: the pure functions on hand-checkable cases, parity with transformers SamModel
(random weights) for point, box and mask prompts, the training recipe's pieces, and the shipped
checkpoint's results."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from conftest import randomize_, report_diff

from course_lib.layers import use_explicit_attention
from course_lib.recipes.sam import (
    box_of,
    colour_baseline,
    dice_loss,
    error_regions,
    focal_loss,
    interactive_loss,
    interior_point,
    mask_iou,
    mask_loss,
    min_over_masks,
    noisy_box,
    object_rows,
    sample_error_points,
)
from course_lib.sam import (
    Sam,
    SamConfig,
    decomposed_rel_pos,
    fourier_encode,
    grid_coordinates,
    pad_points,
    relative_offsets,
    sam_scenes,
)
from course_lib.sam_decoder import hypernetwork_masks

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------
# Pure functions of the model
# ----------------------------------------------------------------------------------------------
def test_relative_offsets():
    assert relative_offsets(3).tolist() == [[2, 1, 0], [3, 2, 1], [4, 3, 2]]


def test_decomposed_rel_pos_is_a_sum_of_two_axis_terms():
    H, W, d = 2, 3, 4
    q = torch.randn(1, 1, H * W, d)
    rh, rw = torch.randn(2 * H - 1, d), torch.randn(2 * W - 1, d)
    bias = decomposed_rel_pos(q, rh, rw, (H, W))[0, 0]
    # query (y1, x1) = (1, 2) = token 5, key (y2, x2) = (0, 0) = token 0: offsets dy = 1, dx = 2
    expected = q[0, 0, 5] @ rh[1 + H - 1] + q[0, 0, 5] @ rw[2 + W - 1]
    assert torch.allclose(bias[5, 0], expected)
    with pytest.raises(ValueError, match="do not fit"):
        decomposed_rel_pos(q, rh[:2], rw, (H, W))


def test_fourier_encode_shapes_and_values():
    G = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    out = fourier_encode(torch.tensor([[0.5, 0.75]]), G)
    # v = (2 * (0.5, 0.75) - 1) @ G = (0, 1) -> angles 2 pi (0, 1)
    assert torch.allclose(out, torch.tensor([[0.0, 0.0, 1.0, 1.0]]), atol=1e-6)
    assert fourier_encode(torch.rand(2, 5, 2), torch.randn(2, 8)).shape == (2, 5, 16)
    with pytest.raises(ValueError, match=r"\(x, y\)"):
        fourier_encode(torch.rand(3, 3), G)


def test_grid_coordinates_are_cell_centres():
    g = grid_coordinates(2, 4)
    assert g.shape == (2, 4, 2)
    assert g[0, 0].tolist() == [0.125, 0.25] and g[1, 3].tolist() == [0.875, 0.75]


def test_pad_points_appends_not_a_point():
    p, lab = pad_points(torch.ones(2, 1, 2), torch.ones(2, 1, dtype=torch.long))
    assert p.shape == (2, 2, 2) and lab.tolist() == [[1, -1], [1, -1]]


def test_hypernetwork_masks_is_a_dot_product_per_pixel():
    w, up = torch.randn(2, 3, 5), torch.randn(2, 5, 4, 4)
    masks = hypernetwork_masks(w, up)
    assert masks.shape == (2, 3, 4, 4)
    assert torch.allclose(masks[1, 2, 3, 1], w[1, 2] @ up[1, :, 3, 1])


@pytest.mark.slow
def test_multimask_output_count_and_shapes():
    model = sam_scenes().eval()
    images = torch.rand(2, 3, 32, 32)
    one = torch.tensor([[5.0, 6.0]]).expand(2, 1, 2)
    masks, iou = model(images, one, torch.ones(2, 1, dtype=torch.long))
    assert masks.shape == (2, 3, 32, 32) and iou.shape == (2, 3)  # one click: ambiguous
    masks, iou = model(images, one.repeat(1, 2, 1), torch.ones(2, 2, dtype=torch.long))
    assert masks.shape == (2, 1, 32, 32)
    masks, _ = model(images, boxes=torch.tensor([[1.0, 2.0, 20.0, 25.0]] * 2))
    assert masks.shape == (2, 1, 32, 32)


@pytest.mark.slow
def test_bad_inputs_raise_clear_errors():
    model = sam_scenes().eval()
    with pytest.raises(ValueError, match="resize"):
        model.encode_image(torch.rand(1, 3, 30, 30))
    emb = model.encode_image(torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match="labels"):
        model.decode(emb, points=torch.rand(1, 2, 2))
    with pytest.raises(ValueError, match="at least one prompt"):
        model.decode(emb)
    with pytest.raises(ValueError, match="mask_logits must be"):
        model.decode(emb, mask_logits=torch.rand(1, 1, 16, 16))
    with pytest.raises(ValueError, match="one prompt per"):
        model.decode(emb, boxes=torch.rand(2, 4))


# ----------------------------------------------------------------------------------------------
# Parity with transformers
# ----------------------------------------------------------------------------------------------
def hf_sam(window_size: int = 3) -> "transformers.SamModel":
    """A small SamModel (FACTS.md: output_channels = prompt width = 2 x num_pos_feats), 64 px,
    patch 8, windows of 3 on the 8 x 8 grid (so the windows are padded) and one global block."""
    config = transformers.SamConfig(
        vision_config=dict(hidden_size=32, output_channels=16, num_hidden_layers=3, num_attention_heads=2,
                           image_size=64, patch_size=8, window_size=window_size, global_attn_indexes=[1],
                           num_pos_feats=8, mlp_dim=48),
        prompt_encoder_config=dict(hidden_size=16, image_size=64, patch_size=8, mask_input_channels=8),
        mask_decoder_config=dict(hidden_size=16, mlp_dim=32, num_attention_heads=2, iou_head_hidden_dim=16),
    )
    return randomize_(transformers.SamModel(config).eval(), std=0.3)


PROMPTS = {  # name: (our keyword arguments, transformers' keyword arguments)
    "one point": ({"points": [[[10.0, 20.0]], [[40.0, 5.0]]], "labels": [[1], [1]]}, None),
    "two points (+, -)": ({"points": [[[10.0, 20.0], [30.0, 31.0]], [[40.0, 5.0], [2.0, 60.0]]], "labels": [[1, 0], [1, 1]]}, None),
    "box": ({"boxes": [[5.0, 6.0, 40.0, 50.0], [1.0, 2.0, 60.0, 30.0]]}, None),
    "point + box": ({"points": [[[10.0, 20.0]], [[40.0, 5.0]]], "labels": [[1], [0]], "boxes": [[5.0, 6.0, 40.0, 50.0], [1.0, 2.0, 60.0, 30.0]]}, None),
    "point + mask": ({"points": [[[10.0, 20.0]], [[40.0, 5.0]]], "labels": [[1], [1]], "mask_logits": "random"}, None),
}


def _prompt_tensors(spec: dict) -> tuple[dict, dict]:
    ours = {k: (torch.randn(2, 1, 32, 32) if v == "random" else torch.tensor(v)) for k, v in spec.items()}
    theirs = {}
    if "points" in ours:  # transformers has a "point batch" axis: one prompt per image here
        theirs["input_points"], theirs["input_labels"] = ours["points"][:, None], ours["labels"][:, None]
    if "boxes" in ours:
        theirs["input_boxes"] = ours["boxes"][:, None]
    if "mask_logits" in ours:
        theirs["input_masks"] = ours["mask_logits"]
    return ours, theirs


def _check_parity(ours: Sam, hf, tag: str) -> None:
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        emb_ref = hf.get_image_embeddings(images)
        emb = ours.encode_image(images)
        report_diff(f"SAM image embeddings ({tag})", emb, emb_ref)
        for name, (spec, _) in PROMPTS.items():
            kw, kw_hf = _prompt_tensors(spec)
            ious, ref_ious = [], []
            for multimask in (True, False):
                ref = hf(image_embeddings=emb_ref, multimask_output=multimask, **kw_hf)
                masks, iou = ours.decode(emb, multimask=multimask, **kw)
                report_diff(f"SAM masks, {name}, multimask={multimask} ({tag})", masks, ref.pred_masks[:, 0])
                ious.append(iou)
                ref_ious.append(ref.iou_scores[:, 0])
            # the IoU scores of all four mask tokens together (one token alone can be near-constant)
            report_diff(f"SAM IoU scores, {name} ({tag})", torch.cat(ious, 1), torch.cat(ref_ious, 1))


def test_vit_base_factory_matches_the_transformers_default_config():
    from course_lib.sam import config_from_hf, sam_vit_base_config

    assert sam_vit_base_config() == config_from_hf(transformers.SamConfig())  # transformers' default: ViT-B
    with pytest.raises(ValueError, match="inconsistent"):  # FACTS.md: the decoder width must be 2 x num_pos_feats
        config_from_hf(transformers.SamConfig(vision_config=dict(output_channels=16)))


@pytest.mark.slow
def test_parity_with_transformers_in_memory():
    hf = hf_sam()
    ours = Sam.from_hf(hf)
    _check_parity(ours, hf, "instance, SDPA")
    _check_parity(use_explicit_attention(ours), hf, "instance, explicit softmax")


@pytest.mark.slow
def test_parity_with_transformers_from_saved_folder(tmp_path):
    hf = hf_sam(window_size=4)
    hf.save_pretrained(tmp_path)
    _check_parity(Sam.from_hf(str(tmp_path)), hf, "save_pretrained folder")


# ----------------------------------------------------------------------------------------------
# The recipe's pieces
# ----------------------------------------------------------------------------------------------
def test_focal_loss_matches_its_formula_and_downweights_easy_pixels():
    logits, target = torch.tensor([[[[3.0, -1.0]]]]), torch.tensor([[[1, 1]]])
    p = torch.sigmoid(logits[0, 0, 0])
    expected = (0.25 * (1 - p) ** 2 * -torch.log(p)).mean()
    assert torch.allclose(focal_loss(logits, target)[0, 0], expected)
    easy = focal_loss(torch.tensor([[[[4.0]]]]), torch.tensor([[[1]]]))
    ce = torch.nn.functional.binary_cross_entropy_with_logits(torch.tensor(4.0), torch.tensor(1.0))
    assert easy.item() < 0.01 * ce.item()


def test_dice_loss_perfect_and_disjoint():
    target = torch.zeros(1, 4, 4)
    target[0, :2] = 1
    perfect = (target * 2 - 1)[:, None] * 50
    assert dice_loss(perfect, target).item() < 1e-3
    assert dice_loss(-perfect, target).item() > 0.9


def test_mask_loss_weights_focal_and_dice_20_to_1():
    logits, target = torch.randn(2, 3, 5, 5), (torch.rand(2, 5, 5) > 0.5).long()
    assert torch.allclose(mask_loss(logits, target), 20 * focal_loss(logits, target) + dice_loss(logits, target))


def test_min_over_masks_backpropagates_only_the_best_mask():
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    target = (torch.rand(2, 4, 4) > 0.5).long()
    losses = mask_loss(logits, target)
    best, index = min_over_masks(losses)
    assert torch.equal(best, losses.min(1).values)
    best.sum().backward()
    for b in range(2):
        for k in range(3):
            assert (logits.grad[b, k].abs().sum() > 0) == (k == index[b])


def test_mask_iou():
    target = torch.zeros(1, 4, 4, dtype=torch.bool)
    target[0, :2] = True  # 8 pixels
    pred = torch.full((1, 1, 4, 4), -1.0)
    pred[0, 0, :1] = 1.0  # 4 of them
    assert mask_iou(pred, target).item() == 0.5


def test_error_regions_and_sampled_points_lie_in_them():
    target = torch.zeros(64, 8, 8, dtype=torch.bool)
    target[:, 2:6, 2:6] = True
    pred = torch.zeros_like(target)
    pred[:, 4:8, 4:8] = True
    fn, fp = error_regions(pred, target)
    assert fn.sum(dim=(1, 2))[0] == 12 and fp.sum(dim=(1, 2))[0] == 12
    points, labels = sample_error_points(pred, target, torch.Generator().manual_seed(0))
    xs, ys = points[:, 0].long(), points[:, 1].long()
    rows = torch.arange(64)
    assert torch.equal(labels.bool(), fn[rows, ys, xs])  # positive exactly where a pixel was missed
    assert torch.all(fn[rows, ys, xs] | fp[rows, ys, xs])
    assert 0 < labels.sum() < 64  # both kinds of click occur
    # no error left: a positive click inside the object
    points, labels = sample_error_points(target, target)
    assert labels.all() and target[rows, points[:, 1].long(), points[:, 0].long()].all()


def test_interior_point_and_box():
    region = torch.zeros(1, 9, 9, dtype=torch.bool)
    region[0, 1:6, 2:7] = True  # rows 1-5, cols 2-6: centre (x, y) = (4, 3)
    assert interior_point(region).tolist() == [[4.0, 3.0]]
    assert box_of(region).tolist() == [[2.0, 1.0, 6.0, 5.0]]
    assert (noisy_box(region, max_pixels=1.0) - box_of(region)).abs().max() <= 1.0


def test_objects_and_colour_baseline():
    label_maps = torch.tensor([[[0, 1], [2, 2]], [[1, 0], [0, 0]]], dtype=torch.uint8)
    counts = torch.tensor([2, 1])
    scene, masks = object_rows(label_maps, counts)
    assert scene.tolist() == [0, 0, 1] and masks[1].tolist() == [[False, False], [True, True]]
    image = torch.zeros(1, 3, 2, 2)
    image[0, 0, 0] = 1.0  # the top row is red
    assert colour_baseline(image, torch.tensor([[1.0, 0.0]])).tolist() == [[[True, True], [False, False]]]


@pytest.mark.slow
def test_interactive_loss_trains_through_every_part():
    model = sam_scenes()
    images = torch.rand(4, 3, 32, 32)
    label_maps = torch.zeros(4, 32, 32, dtype=torch.uint8)
    label_maps[:, 4:12, 4:12], label_maps[:, 20:28, 18:30] = 1, 2
    for box_prob in (0.0, 1.0):
        model.zero_grad()
        loss, _ = interactive_loss(model, (images, label_maps, torch.tensor([2, 2, 1, 2])), rounds=2, box_prob=box_prob)
        loss.backward()
        assert math.isfinite(loss.item())
        assert model.image_encoder.patch_embed.proj.weight.grad.abs().sum() > 0
        assert model.prompt_encoder.mask_downscaling[0].weight.grad.abs().sum() > 0  # round 2 feeds the mask back
        assert model.mask_decoder.iou_prediction_head.proj_out.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------
# The script and the shipped checkpoint
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_train_script_smoke(tmp_path):
    out = tmp_path / "sam.safetensors"
    subprocess.run(
        [sys.executable, str(ROOT / "scripts/train_sam.py"), "--n-train", "64", "--epochs", "1",
         "--n-test", "16", "--batch-size", "32", "--out", str(out)],
        check=True, capture_output=True, text=True, timeout=600,
    )
    from course_lib.utils import load_checkpoint

    model, meta = load_checkpoint(out, Sam, SamConfig)
    results = json.loads(meta["results"])
    assert {"miou_click1", "miou_click3", "miou_box", "miou_colour", "pred_true_iou_corr"} <= set(results)
    assert model.encode_image(torch.rand(1, 3, 32, 32)).shape == (1, 32, 8, 8)


@pytest.mark.slow
def test_shipped_checkpoint_clicks_beat_one_click_and_the_baseline():
    """The shipped model (scripts/train_sam.py): its recorded held-out results, and a fresh
    evaluation on 100 held-out scenes that must agree with them."""
    from course_lib.recipes.sam import evaluate_clicks, scene_tensors
    from course_lib.utils import load_checkpoint

    model, meta = load_checkpoint("sam_scenes.safetensors", Sam, SamConfig)
    assert model.config == sam_scenes().config, "the script's config and the shipped checkpoint's differ: rerun the script"
    recorded = json.loads(meta["results"])
    assert recorded["miou_click3"] > recorded["miou_click1"]
    assert recorded["miou_click3"] > recorded["miou_colour"]
    assert recorded["pred_true_iou_corr"] > 0.3
    fresh = evaluate_clicks(model, *scene_tensors(100, "test", resolution=32))
    print({k: round(float(v.mean()), 3) for k, v in fresh.items()})
    assert fresh["iou_click3"].mean() > fresh["iou_colour"].mean()
    for key in ("click1", "click3", "box", "colour"):  # 100 of the 500 scenes: close to the record
        assert abs(fresh[f"iou_{key}"].mean() - recorded[f"miou_{key}"]) < 0.06, key
