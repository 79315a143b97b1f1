"""course_lib.mae: masking functions on toy tensors, losses, SimMIM, and parity with transformers
ViTMAEForPreTraining (same noise -> same mask, logits and loss) on random weights."""

import pytest
import torch
import transformers
from conftest import randomize_, report_diff

from course_lib.layers import use_explicit_attention
from course_lib.mae import (
    MAE,
    MAEConfig,
    SimMIM,
    mae_loss,
    normalized_pixel_target,
    paste_reconstruction,
    random_masking,
    simmim_loss,
    tube_masking,
    unshuffle,
)
from course_lib.recipes.mae import block_mask, encoder_tokens, grid_keep, linear_probe, masking_noise, probe_features
from course_lib.vit import ViT, ViTConfig, patchify



def report_scalar(name: str, ours: torch.Tensor, ref: torch.Tensor, tol: float = 1e-5) -> None:
    """report_diff for one number (a loss), which has no spread to check for degeneracy."""
    assert ref.ndim == 0 and ref.abs() > 1e-3, f"{name}: the reference loss {ref} is degenerate"
    diff = (ours - ref).abs().item()
    print(f"[parity] {name}: abs diff {diff:.2e} (tolerance {tol:.0e})")
    assert diff <= tol, f"{name}: abs diff {diff:.3e} > {tol:.0e}"


# ----------------------------------------------------------------------------------------------
# Masking on toy tensors
# ----------------------------------------------------------------------------------------------
def test_random_masking_by_hand():
    x = torch.arange(6.0).reshape(1, 6, 1) * 10  # token i carries the value 10*i
    noise = torch.tensor([[0.9, 0.1, 0.5, 0.3, 0.8, 0.0]])  # keep the 3 smallest: tokens 5, 1, 3
    kept, mask, ids_restore = random_masking(x, 0.5, noise)
    assert kept.flatten().tolist() == [50.0, 10.0, 30.0]  # in order of increasing noise
    assert mask.tolist() == [[1.0, 0.0, 1.0, 0.0, 1.0, 0.0]]  # 0 = keep, 1 = remove
    assert ids_restore.tolist() == [[5, 1, 3, 2, 4, 0]]
    # Restoring with "mask tokens" of value -1 puts every kept token back in its place.
    full = unshuffle(kept, torch.full((1, 1, 1), -1.0), ids_restore)
    assert full.flatten().tolist() == [-1.0, 10.0, -1.0, 30.0, -1.0, 50.0]


@pytest.mark.parametrize("B,L,D,r", [(2, 16, 4, 0.75), (3, 10, 2, 0.6), (1, 49, 8, 0.9), (2, 8, 3, 0.0)])
def test_random_masking_shapes_counts_and_restore(B, L, D, r):
    x = torch.randn(B, L, D)
    kept, mask, ids_restore = random_masking(x, r)
    K = int(L * (1 - r))
    assert kept.shape == (B, K, D) and mask.shape == (B, L)
    assert (mask.sum(1) == L - K).all()
    full = unshuffle(kept, torch.zeros(1, 1, D), ids_restore)
    visible = (mask == 0)[..., None]
    assert torch.equal(torch.where(visible, full, 0), torch.where(visible, x, 0))
    assert torch.equal(full[~visible.expand_as(full)], torch.zeros(B * (L - K) * D))


def test_masking_is_random_per_sample_and_fixed_by_noise():
    x = torch.randn(4, 64, 2)
    _, mask, _ = random_masking(x, 0.75)
    assert len({tuple(m.tolist()) for m in mask}) == 4  # four different masks
    noise = torch.rand(4, 64)
    assert torch.equal(random_masking(x, 0.75, noise)[1], random_masking(x, 0.75, noise)[1])


def test_block_and_grid_masks():
    keep = grid_keep((4, 4), 0.75)
    assert keep.int().tolist() == [[1, 0, 1, 0], [0, 0, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    noise = masking_noise("grid", 2, (4, 4), 0.75)
    _, mask, _ = random_masking(torch.randn(2, 16, 3), 0.75, noise)
    assert torch.equal(mask, (~keep).flatten().float().expand(2, 16))
    g = torch.Generator().manual_seed(0)
    blocks = block_mask((8, 8), 32, generator=g)
    assert 16 <= blocks.sum() <= 32
    noise = masking_noise("block", 3, (8, 8), 0.5, generator=g)
    _, mask, _ = random_masking(torch.randn(3, 64, 3), 0.5, noise)
    assert (mask.sum(1) == 32).all()
    # Block masks are contiguous: hidden patches have far more hidden neighbours than random ones.
    m = mask.reshape(3, 8, 8)
    same = (m[:, 1:] == m[:, :-1]).float().mean()
    assert same > 0.6


def test_tube_masking_hides_the_same_patches_in_every_frame():
    B, T, N, D = 2, 3, 16, 4
    x = torch.randn(B, T * N, D)
    kept, mask, ids_restore = tube_masking(x, 0.75, T)
    assert kept.shape == (B, T * 4, D)
    frames = mask.reshape(B, T, N)
    assert torch.equal(frames[:, 0], frames[:, 1]) and torch.equal(frames[:, 0], frames[:, 2])
    assert (mask.sum(1) == T * 12).all()
    full = unshuffle(kept, torch.zeros(1, 1, D), ids_restore)
    visible = (mask == 0)[..., None]
    assert torch.equal(torch.where(visible, full, 0), torch.where(visible, x, 0))


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: random_masking(torch.randn(1, 16, 2), 1.0), r"mask_ratio must lie in \[0, 1\)"),
        (lambda: random_masking(torch.randn(1, 16, 2), -0.1), r"mask_ratio must lie in \[0, 1\)"),
        (lambda: random_masking(torch.randn(1, 4, 2), 0.9), "keeps no patch out of 4"),
        (lambda: random_masking(torch.randn(2, 16, 2), 0.5, torch.rand(2, 15)), r"noise must have shape"),
        (lambda: grid_keep((4, 4), 0.5), "1 - 1/s"),
        (lambda: grid_keep((5, 5), 0.75), "divisible by 2"),
        (lambda: masking_noise("checkerboard", 1, (4, 4), 0.5), "unknown masking strategy"),
        (lambda: tube_masking(torch.randn(1, 10, 2), 0.5, 3), "do not split into 3 frames"),
        (lambda: MAEConfig(image_size=30, patch_size=4), "not divisible by the patch size 4"),
        (lambda: MAEConfig(mask_ratio=1.0), r"\[0, 1\)"),
        (lambda: MAEConfig(image_size=8, patch_size=4, mask_ratio=0.8), "keeps no patch"),
    ],
)
def test_clear_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ----------------------------------------------------------------------------------------------
# Targets and losses
# ----------------------------------------------------------------------------------------------
def test_normalized_target_and_masked_losses_by_hand():
    t = torch.tensor([[[1.0, 3.0], [2.0, 2.0]]])  # two patches of two pixels
    norm = normalized_pixel_target(t)
    assert torch.allclose(norm[0, 0], torch.tensor([-1.0, 1.0]) / (2 + 1e-6) ** 0.5)  # unbiased var = 2
    assert torch.equal(norm[0, 1], torch.zeros(2))
    pred = torch.zeros(1, 2, 2)
    mask = torch.tensor([[1.0, 0.0]])  # only patch 0 is hidden: patch 1's error must not count
    assert mae_loss(pred, t, mask).item() == pytest.approx((1 + 9) / 2)
    assert simmim_loss(pred, t, mask).item() == pytest.approx((1 + 3) / 2)
    assert mae_loss(pred, t, torch.tensor([[1.0, 1.0]])).item() == pytest.approx((5 + 4) / 2)
    assert mae_loss(pred, t, torch.zeros(1, 2)).item() == 0.0  # nothing hidden: 0, not 0/0


def test_paste_reconstruction_keeps_visible_pixels():
    images = torch.rand(2, 3, 8, 8)
    pred = torch.zeros(2, 4, 48)
    mask = torch.tensor([[1.0, 0, 0, 1], [0, 0, 0, 0]])
    out = paste_reconstruction(images, pred, mask, 4)
    assert torch.equal(out[1], images[1]) and torch.equal(out[0, :, :4, 4:], images[0, :, :4, 4:])
    assert out[0, :, :4, :4].abs().sum() == 0
    # With normalized pixels, a prediction of the exact normalized target gives the image back.
    target = patchify(images, 4)
    full = paste_reconstruction(images, normalized_pixel_target(target), torch.ones(2, 4), 4, norm_pix=True)
    report_diff("norm-pix reconstruction", full, images, 1e-5)


# ----------------------------------------------------------------------------------------------
# The models
# ----------------------------------------------------------------------------------------------
SMALL = dict(dim=32, depth=2, num_heads=4, decoder_dim=16, decoder_depth=1, decoder_num_heads=2)


def test_mae_encoder_sees_only_visible_tokens_and_learns_nothing_from_positions():
    m = MAE(MAEConfig(**SMALL))
    x = torch.randn(2, 3, 32, 32)
    latent, mask, _ = m.forward_encoder(x)
    assert latent.shape == (2, 1 + 16, 32) and mask.shape == (2, 64)
    loss, pred, _ = m(x)
    assert pred.shape == (2, 64, 48)
    loss.backward()
    assert m.encoder.pos_embed.grad is None and m.decoder_pos_embed.grad is None
    assert m.mask_token.grad is not None and m.encoder.cls_token.grad is not None
    from course_lib.layers import param_groups

    no_decay = {id(p) for p in param_groups(m, 0.05)[1]["params"]}
    assert id(m.mask_token) in no_decay and id(m.encoder.cls_token) in no_decay


def test_mae_sdpa_and_explicit_attention_agree_and_encoder_is_a_vit():
    m = MAE(MAEConfig(**SMALL)).eval()
    x, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 64)
    with torch.no_grad():
        fast = m(x, noise)[1]
        slow = use_explicit_attention(m)(x, noise)[1]
        report_diff("MAE sdpa vs explicit", fast, slow, 1e-5)
        # The pretrained encoder is a ViT backbone: on the full image it gives CLS + 64 tokens.
        assert isinstance(m.encoder, ViT) and m.encoder.forward_features(x).shape == (2, 65, 32)


def test_simmim_keeps_every_token_and_uses_l1_on_hidden_patches():
    s = SimMIM(ViTConfig(dim=32, depth=1, num_heads=4), mask_ratio=0.6)
    x, noise = torch.rand(2, 3, 32, 32), torch.rand(2, 64)
    loss, pred, mask = s(x, noise)
    assert pred.shape == (2, 64, 48) and (mask.sum(1) == 64 - 25).all()
    assert torch.allclose(loss, simmim_loss(pred, patchify(x, 4), mask))
    assert torch.equal(mask, random_masking(torch.zeros(2, 64, 1), 0.6, noise)[1])  # MAE's masking
    loss.backward()
    assert s.mask_token.grad.abs().sum() > 0
    assert encoder_tokens(64, 0.75, "mae") == 17 and encoder_tokens(64, 0.75, "simmim") == 65
    with pytest.raises(ValueError, match="no registers"):
        SimMIM(ViTConfig(num_registers=2))


# ----------------------------------------------------------------------------------------------
# Parity with transformers ViTMAEForPreTraining
# ----------------------------------------------------------------------------------------------
def hf_mae(image_size=32, patch_size=4, channels=3, norm_pix=False, mask_ratio=0.75):
    cfg = transformers.ViTMAEConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        image_size=image_size, patch_size=patch_size, num_channels=channels,
        decoder_hidden_size=24, decoder_num_hidden_layers=2, decoder_num_attention_heads=3,
        decoder_intermediate_size=40, norm_pix_loss=norm_pix, mask_ratio=mask_ratio,
    )
    model = transformers.ViTMAEForPreTraining(cfg).eval()
    return randomize_(model)


@pytest.mark.parametrize(
    "B,image_size,patch_size,channels,norm_pix,mask_ratio",
    [(2, 32, 4, 3, False, 0.75), (3, 32, 4, 3, True, 0.75), (1, 24, 8, 3, True, 0.5), (2, 16, 2, 1, False, 0.9), (2, 32, 8, 3, True, 0.25)],
)
@pytest.mark.slow
def test_mae_parity_in_memory(B, image_size, patch_size, channels, norm_pix, mask_ratio):
    hf = hf_mae(image_size, patch_size, channels, norm_pix, mask_ratio)
    ours = MAE.from_hf(hf).eval()
    assert ours.config.norm_pix_loss == norm_pix and ours.config.mask_ratio == mask_ratio
    L = (image_size // patch_size) ** 2
    x, noise = torch.randn(B, channels, image_size, image_size), torch.rand(B, L)
    name = f"ViTMAE B={B} {image_size}px/{patch_size} C={channels} norm_pix={norm_pix} r={mask_ratio}"
    with torch.no_grad():
        ref = hf(x, noise=noise)
        loss, pred, mask = ours(x, noise)
        assert torch.equal(mask, ref.mask)
        report_diff(f"{name} logits", pred, ref.logits)
        report_scalar(f"{name} loss", loss, ref.loss)
        latent, _, ids_restore = ours.forward_encoder(x, noise=noise)
        assert torch.equal(ids_restore, ref.ids_restore)
        report_diff(f"{name} encoder", latent, hf.vit(x, noise=noise).last_hidden_state)
        report_diff(f"{name} explicit attention", use_explicit_attention(ours)(x, noise)[1], ref.logits)


@pytest.mark.slow
def test_mae_parity_from_disk_names(tmp_path):
    hf = hf_mae(norm_pix=True)
    hf.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "model.safetensors")).keys()
    assert any(k.startswith("decoder.decoder_encoder.layer.0.attention.attention.query") for k in keys)
    ours = MAE.from_hf(str(tmp_path)).eval()
    x, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 64)
    with torch.no_grad():
        ref = hf(x, noise=noise)
        loss, pred, mask = ours(x, noise)
    report_diff("ViTMAE from disk logits", pred, ref.logits)
    report_scalar("ViTMAE from disk loss", loss, ref.loss)


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(1, 3, 48, 48), (2, 3, 24, 40)])
def test_mae_encoder_parity_at_other_resolutions(shape):
    hf = hf_mae()
    ours = MAE.from_hf(hf).eval()
    L = (shape[2] // 4) * (shape[3] // 4)
    x, noise = torch.randn(shape), torch.rand(shape[0], L)
    with torch.no_grad():
        ref = hf.vit(x, noise=noise, interpolate_pos_encoding=True)
        latent, mask, _ = ours.forward_encoder(x, noise=noise)
    assert torch.equal(mask, ref.mask)
    report_diff(f"ViTMAE encoder {shape}", latent, ref.last_hidden_state)


@pytest.mark.slow
def test_sincos_tables_match_transformers_builder():
    from transformers.models.vit_mae.modeling_vit_mae import build_2d_sinusoidal_position_embedding

    ours = MAE(MAEConfig(**{**SMALL, "decoder_dim": 24}))
    for name, table, dim in (("encoder", ours.encoder.pos_embed, 32), ("decoder", ours.decoder_pos_embed, 24)):
        ref = build_2d_sinusoidal_position_embedding(8, 8, dim, cls_token=True)
        ref = torch.cat([ref[:, dim // 2 :], ref[:, : dim // 2]], dim=1)  # transformers' rotation to MAE's layout
        report_diff(f"{name} sin-cos table", table[0], ref, 1e-6)


@pytest.mark.slow
def test_mae_encoder_loads_into_vit_for_probing():
    """A ViTMAEModel (encoder only) loads as a course_lib ViT; with mask ratio 0 and sorted noise
    transformers keeps every patch in order, so both see the full image."""
    hf = hf_mae(mask_ratio=0.0).vit
    with pytest.raises(ValueError, match="no MAE decoder"):
        MAE.from_hf(hf)
    ours = ViT.from_hf(hf).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = hf(x, noise=torch.arange(64.0).expand(2, 64)).last_hidden_state
        report_diff("ViTMAEModel as ViT", ours.forward_features(x), ref)


@pytest.mark.slow
def test_mae_checkpoint_script_runs(tmp_path):
    """The shipped checkpoint is made by scripts/train_mae_scenes.py: a one-step run must work and
    write a checkpoint with the shipped model's config."""
    import subprocess
    import sys
    from pathlib import Path

    from course_lib.utils import load_checkpoint

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "mae.safetensors"
    cmd = [sys.executable, str(root / "scripts" / "train_mae_scenes.py"), "--epochs", "1", "--n", "64", "--batch-size", "64",
           "--threads", "1", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    model, meta = load_checkpoint(out, MAE, MAEConfig)
    shipped, shipped_meta = load_checkpoint("mae_scenes.safetensors", MAE, MAEConfig)
    assert model.config == shipped.config, "the script's config and the shipped checkpoint's differ: rerun the script"
    assert meta["epochs"] == "1" and float(shipped_meta["final_loss"]) < 0.02


def test_linear_probe_and_probe_features():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(200) % 4
    f = torch.randn(200, 8, generator=g) * 0.1 + torch.nn.functional.one_hot(y, 8).float()  # separable
    assert linear_probe((f[:100], y[:100]), (f[100:], y[100:])) == 1.0
    noise_only = torch.randn(200, 8, generator=g)
    assert linear_probe((noise_only[:100], y[:100]), (noise_only[100:], y[100:])) < 0.6
    enc = MAE(MAEConfig(**SMALL)).encoder.train()
    feats = probe_features(enc, torch.rand(3, 3, 32, 32), batch_size=2)
    assert feats.shape == (3, 64) and enc.training  # [CLS, mean] of width 32; mode restored


def test_mae_scenes_is_the_shipped_model():
    from course_lib.mae import mae_scenes
    from course_lib.utils import load_checkpoint

    shipped, meta = load_checkpoint("mae_scenes.safetensors", MAE, MAEConfig)
    assert mae_scenes().config == shipped.config
    assert int(meta["epochs"]) > 1 and int(meta["train_images"]) >= 1000


def test_reconstruction_loss_is_the_models_loss_for_fit():
    from course_lib.recipes.mae import reconstruction_loss
    from course_lib.train import fit

    model, x = MAE(MAEConfig(**SMALL)), torch.rand(16, 3, 32, 32)
    torch.manual_seed(1)
    loss, count = reconstruction_loss(model, (x,))
    torch.manual_seed(1)
    assert count is None and torch.equal(loss, model(x)[0])  # the same random mask, the same loss
    hist = fit(model, (x,), epochs=3, batch_size=8, lr=3e-3, loss_fn=reconstruction_loss, progress=False, log_every=1)
    assert hist.train_acc == [] and len(hist.loss) == 6
    with pytest.raises(TypeError, match="masked autoencoder"):
        reconstruction_loss(ViT(ViTConfig(dim=16, depth=1, num_heads=2)), (x,))


@pytest.mark.parametrize("factory,encoder", [("mae_vit_base", "vit_base"), ("mae_vit_large", "vit_large"), ("mae_vit_huge", "vit_huge")])
def test_mae_paper_sizes_have_the_papers_encoders(factory, encoder):
    """MAE's ViT-B/L/H encoders are the ViT paper's (Table 1 of He et al.), with the default decoder:
    8 blocks of width 512 (Table 1a-b)."""
    from course_lib import mae, vit

    with torch.device("meta"):
        model, reference = getattr(mae, factory)(), getattr(vit, encoder)(num_classes=0)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(model.encoder) == count(reference)
    assert (model.config.decoder_dim, model.config.decoder_depth) == (512, 8)
