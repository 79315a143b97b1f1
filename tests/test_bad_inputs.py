"""Bad input gets a clear, typed error that says what was wrong (and, where it can, how to fix it),
never a raw torch error or a silent wrong answer.

One table, one row per (public function or config, bad input). Every family may add its rows:
    (id, call, exception type, a regex the message must match)
`call` is a zero-argument function, so that building the bad input is part of the row.
"""

import pytest
import torch
import transformers

from course_lib import convnext, data, distributed, layers, mae, plot, swin, train, utils, vit
from course_lib.recipes import mae as mae_recipes


def _vit(**kw):
    return vit.ViT(vit.ViTConfig(**{**dict(dim=16, depth=1, num_heads=2), **kw}))


def _mae():
    return mae.MAE(mae.MAEConfig(dim=16, depth=1, num_heads=2, decoder_dim=16, decoder_num_heads=2))


def _hf_swin():
    return transformers.SwinModel(transformers.SwinConfig(image_size=32, embed_dim=16, depths=[1], num_heads=[2], window_size=4))


def _hf_vit():
    return transformers.ViTModel(transformers.ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32))


def _frozen():
    return utils.freeze(torch.nn.Linear(2, 2))


IMAGES = torch.zeros(1, 3, 32, 32)
UINT8 = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
XY = (torch.zeros(8, 2), torch.zeros(8, dtype=torch.long))

CASES = [
    # ---- layers ----------------------------------------------------------------------------
    ("attention: q and k of different widths", lambda: layers.attention(torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 4, 6), torch.zeros(1, 2, 4, 8)), ValueError, r"q \(\.\.\., Lq, d\)"),
    ("split_heads: width not divisible", lambda: layers.split_heads(torch.zeros(1, 3, 10), 3), ValueError, "not divisible by 3 heads"),
    ("Attention: width not divisible by heads", lambda: layers.Attention(10, 3), ValueError, "not divisible by 3 heads"),
    ("Attention: 2D tokens", lambda: layers.Attention(8, 2)(torch.zeros(3, 8)), ValueError, r"\(batch, length, width\)"),
    ("Attention: self-attention given a context", lambda: layers.Attention(8, 2)(torch.zeros(1, 3, 8), context=torch.zeros(1, 2, 8)), ValueError, "context_dim"),
    ("Attention: cross-attention without a context", lambda: layers.Attention(8, 2, context_dim=4)(torch.zeros(1, 3, 8)), ValueError, "pass the context"),
    ("Attention: context of the wrong width", lambda: layers.Attention(8, 2, context_dim=4)(torch.zeros(1, 3, 8), torch.zeros(1, 2, 6)), ValueError, "context has width 6"),
    ("causal_mask: length 0", lambda: layers.causal_mask(0), ValueError, "at least 1"),
    ("DropPath: rate above 1", lambda: layers.DropPath(1.5), ValueError, r"probability in \[0, 1\)"),
    ("sincos_1d: odd width", lambda: layers.sincos_1d(torch.arange(4), 7), ValueError, "even width"),
    ("sincos_2d_pos_embed: width not divisible by 4", lambda: layers.sincos_2d_pos_embed((4, 4), 6), ValueError, "divisible by 4"),
    ("resample_pos_embed: 2D table", lambda: layers.resample_pos_embed(torch.zeros(17, 4), (3, 3)), ValueError, r"\(1, tokens, dim\)"),
    ("resample_pos_embed: not a square grid", lambda: layers.resample_pos_embed(torch.zeros(1, 13, 4), (3, 3)), ValueError, "old_grid"),
    ("param_groups: negative weight decay", lambda: layers.param_groups(torch.nn.Linear(2, 2), -1.0), ValueError, "weight_decay must be >= 0"),
    ("load_state_dict_checked: weights of another model", lambda: layers.load_state_dict_checked(torch.nn.Linear(2, 2), {"w": torch.zeros(1)}), ValueError, "do not fit this model"),
    # ---- training --------------------------------------------------------------------------
    ("fit: empty dataset", lambda: train.fit(torch.nn.Linear(2, 2), (torch.zeros(0, 2), torch.zeros(0, dtype=torch.long)), progress=False), ValueError, "empty"),
    ("fit: data not a tuple of tensors", lambda: train.fit(torch.nn.Linear(2, 2), [[1, 2]], progress=False), TypeError, "tuple of tensors"),
    ("fit: a bare tensor as data", lambda: train.fit(torch.nn.Linear(2, 2), torch.zeros(8, 2), progress=False), TypeError, "tuple of tensors"),
    ("fit: tensors of different lengths", lambda: train.fit(torch.nn.Linear(2, 2), (torch.zeros(4, 2), torch.zeros(3, dtype=torch.long)), progress=False), ValueError, "different lengths"),
    ("fit: batch size 0", lambda: train.fit(torch.nn.Linear(2, 2), XY, batch_size=0, progress=False), ValueError, "batch_size must be a positive integer"),
    ("fit: zero epochs", lambda: train.fit(torch.nn.Linear(2, 2), XY, epochs=0, progress=False), ValueError, "epochs must be a positive integer"),
    ("fit: negative learning rate", lambda: train.fit(torch.nn.Linear(2, 2), XY, lr=-1e-3, progress=False), ValueError, "lr must be positive"),
    ("fit: warmup of 100%", lambda: train.fit(torch.nn.Linear(2, 2), XY, warmup=1.0, progress=False), ValueError, "warmup"),
    ("fit: a frozen model", lambda: train.fit(_frozen(), XY, progress=False), ValueError, "no trainable parameters"),
    ("fit: not a module", lambda: train.fit(lambda x: x, XY, progress=False), TypeError, "nn.Module"),
    ("fit: empty eval data", lambda: train.fit(torch.nn.Linear(2, 2), XY, eval_data=(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long)), progress=False), ValueError, "eval_data is empty"),
    ("evaluate: empty dataset", lambda: train.evaluate(torch.nn.Linear(2, 2), (torch.zeros(0, 2), torch.zeros(0, dtype=torch.long))), ValueError, "empty"),
    ("extract_features: no inputs", lambda: train.extract_features(lambda x: x, torch.zeros(0, 3)), ValueError, "no inputs"),
    ("extract_features: batch size 0", lambda: train.extract_features(lambda x: x, torch.zeros(4, 3), batch_size=0), ValueError, "batch_size"),
    ("cosine_schedule: no steps", lambda: train.cosine_schedule(0, 0), ValueError, "total_steps >= 1"),
    ("cosine_schedule: warmup longer than training", lambda: train.cosine_schedule(10, 20), ValueError, "warmup_steps <= total_steps"),
    ("batches: batch size 0", lambda: list(train.batches((torch.zeros(4),), 0, False)), ValueError, "batch_size must be at least 1"),
    ("wrap_distributed: unknown strategy", lambda: distributed.wrap_distributed(torch.nn.Linear(2, 2), "zero3", torch.device("cpu")), ValueError, "'ddp' or 'fsdp'"),
    # ---- utils -----------------------------------------------------------------------------
    ("get_device: unknown device", lambda: utils.get_device("tpu"), ValueError, "unknown device 'tpu'"),
    ("seed_everything: not an integer", lambda: utils.seed_everything("a"), TypeError, "non-negative integer"),
    ("save_checkpoint: a model without a config", lambda: utils.save_checkpoint(torch.nn.Linear(2, 2), "unused.safetensors"), TypeError, "model.config"),
    ("load_checkpoint: no such file", lambda: utils.load_checkpoint("no_such.safetensors", vit.ViT, vit.ViTConfig), FileNotFoundError, "shipped checkpoints"),
    # ---- ViT -------------------------------------------------------------------------------
    ("ViTConfig: width not divisible by heads", lambda: vit.ViTConfig(dim=100, num_heads=3), ValueError, "width 100 is not divisible by 3 heads"),
    ("ViTConfig: image not divisible by patch", lambda: vit.ViTConfig(image_size=30, patch_size=4), ValueError, "resize or pad the images to 32"),
    ("ViTConfig: depth 0", lambda: vit.ViTConfig(depth=0), ValueError, "depth must be a positive integer"),
    ("ViTConfig: patch size 0", lambda: vit.ViTConfig(patch_size=0), ValueError, "patch_size must be a positive integer"),
    ("ViTConfig: negative classes", lambda: vit.ViTConfig(num_classes=-1), ValueError, "num_classes"),
    ("ViTConfig: mlp_ratio 0", lambda: vit.ViTConfig(mlp_ratio=0), ValueError, "mlp_ratio must be positive"),
    ("ViTConfig: drop_path 1", lambda: vit.ViTConfig(drop_path=1.0), ValueError, "drop_path"),
    ("ViTConfig: unknown pooling", lambda: vit.ViTConfig(pool="max"), ValueError, "pool must be"),
    ("ViTConfig: CLS pooling without a CLS token", lambda: vit.ViTConfig(class_token=False), ValueError, "class_token"),
    ("ViT: uint8 images", lambda: _vit()(UINT8), TypeError, r"images\.float\(\) / 255"),
    ("ViT: channels-last images", lambda: _vit()(torch.zeros(1, 32, 32, 3)), ValueError, "channels-last"),
    ("ViT: one image without its batch axis", lambda: _vit()(torch.zeros(3, 32, 32)), ValueError, r"\(B, 3, H, W\)"),
    ("ViT: image not divisible by the patch", lambda: _vit()(torch.zeros(1, 3, 30, 32)), ValueError, "not divisible by the patch size 4"),
    ("ViT.forward_heads: not distilled", lambda: _vit().forward_heads(IMAGES), ValueError, "distilled"),
    ("ViT.from_hf: a Swin checkpoint", lambda: vit.ViT.from_hf(_hf_swin()), ValueError, "model_type 'swin'"),
    ("ViT.from_hf: not a model, folder or id", lambda: vit.ViT.from_hf(42), TypeError, "transformers model, a folder or a hub id"),
    ("patchify: 3D input", lambda: vit.patchify(torch.zeros(3, 32, 32), 4), ValueError, r"\(B, C, H, W\)"),
    ("unpatchify: wrong patch count", lambda: vit.unpatchify(torch.zeros(1, 10, 48), 4, 32), ValueError, "do not fit"),
    # ---- Swin ------------------------------------------------------------------------------
    ("SwinConfig: width not divisible by heads", lambda: swin.SwinConfig(embed_dim=30, num_heads=(4, 8, 16)), ValueError, "not divisible by 4 heads"),
    ("SwinConfig: depths and heads of different lengths", lambda: swin.SwinConfig(depths=(2, 2), num_heads=(2, 4, 8)), ValueError, "one entry per stage"),
    ("SwinConfig: window of 1", lambda: swin.SwinConfig(window_size=1), ValueError, "window_size must be at least 2"),
    ("SwinConfig: patch size 0", lambda: swin.SwinConfig(patch_size=0), ValueError, "patch_size must be a positive integer"),
    ("SwinConfig: version 3", lambda: swin.SwinConfig(version=3), ValueError, "version must be 1"),
    ("Swin: uint8 images", lambda: swin.swin_micro()(UINT8), TypeError, r"images\.float\(\) / 255"),
    ("Swin: image not divisible by the patch", lambda: swin.swin_micro()(torch.zeros(1, 3, 31, 32)), ValueError, "not divisible by the patch size 2"),
    ("Swin.from_hf: a ViT checkpoint", lambda: swin.Swin.from_hf(_hf_vit()), ValueError, "reads swin, swinv2 checkpoints, got model_type .vit."),
    ("window_partition: map not divisible", lambda: swin.window_partition(torch.zeros(1, 6, 8, 1), 4), ValueError, "pad_to_window"),
    ("window_partition: channels-first map", lambda: swin.window_partition(torch.zeros(4, 8, 8), 4), ValueError, r"\(B, H, W, C\)"),
    ("window_reverse: size not divisible", lambda: swin.window_reverse(torch.zeros(4, 4, 4, 1), 4, 6, 8), ValueError, "multiples of the window size"),
    ("cyclic_shift: 2D input", lambda: swin.cyclic_shift(torch.zeros(4, 4), 1), ValueError, r"\(B, H, W, C\)"),
    ("merge_patches: 3D input", lambda: swin.merge_patches(torch.zeros(4, 4, 4)), ValueError, r"\(B, H, W, C\)"),
    ("shifted_window_mask: shift as large as the window", lambda: swin.shifted_window_mask(8, 8, 4, 4), ValueError, "shift must be in"),
    ("relative_position_index: window 0", lambda: swin.relative_position_index(0), ValueError, "at least 1"),
    ("relative_position_bias: window larger than the table", lambda: swin.relative_position_bias(torch.zeros(9, 2), 3, 2), ValueError, "cannot serve"),
    # ---- ConvNeXt --------------------------------------------------------------------------
    ("ConvNeXtConfig: depths and dims of different lengths", lambda: convnext.ConvNeXtConfig(depths=(1, 1), dims=(8,)), ValueError, "one entry per stage"),
    ("ConvNeXtConfig: a width of 0", lambda: convnext.ConvNeXtConfig(depths=(1, 1), dims=(0, 8)), ValueError, "dims must be positive"),
    ("ConvNeXtConfig: even kernel", lambda: convnext.ConvNeXtConfig(kernel_size=4), ValueError, "kernel_size must be odd"),
    ("ConvNeXt: uint8 images", lambda: convnext.convnextv2_atto()(UINT8), TypeError, r"images\.float\(\) / 255"),
    ("ConvNeXt: channels-last images", lambda: convnext.convnextv2_atto()(torch.zeros(1, 32, 32, 3)), ValueError, "other layout"),
    ("ConvNeXt: image smaller than the total stride", lambda: convnext.convnextv2_atto()(torch.zeros(1, 3, 16, 16)), ValueError, "total stride 32"),
    ("layer_norm_2d: channels-last input", lambda: convnext.layer_norm_2d(torch.zeros(1, 4, 4, 3), torch.ones(3), torch.zeros(3)), ValueError, "other layout"),
    ("grn: wrong width", lambda: convnext.grn(torch.zeros(1, 4, 4, 3), torch.zeros(5), torch.zeros(5)), ValueError, "C=5"),
    ("fcmae_mask: mask ratio 1", lambda: convnext.fcmae_mask(2, (4, 4), 1.0), ValueError, "mask_ratio must lie in"),
    ("upsample_mask: 2D mask", lambda: convnext.upsample_mask(torch.zeros(4, 4), 2), ValueError, r"\(B, gh, gw\)"),
    ("FCMAE: mask ratio 1", lambda: convnext.FCMAE(convnext.convnextv2_atto(num_classes=0), mask_ratio=1.0), ValueError, "mask_ratio must lie in"),
    ("FCMAE: not a ConvNeXt encoder", lambda: convnext.FCMAE(_vit()), TypeError, "ConvNeXt"),
    # ---- MAE -------------------------------------------------------------------------------
    ("MAEConfig: mask ratio 1", lambda: mae.MAEConfig(mask_ratio=1.0), ValueError, "mask_ratio must lie in"),
    ("MAEConfig: a ratio that keeps no patch", lambda: mae.MAEConfig(image_size=8, patch_size=4, mask_ratio=0.8), ValueError, "keeps no patch"),
    ("MAEConfig: encoder width not divisible by heads", lambda: mae.MAEConfig(dim=100, num_heads=3), ValueError, "not divisible by 3 heads"),
    ("MAEConfig: decoder width not divisible by heads", lambda: mae.MAEConfig(decoder_dim=30, decoder_num_heads=4), ValueError, "decoder width 30"),
    ("MAE: image not divisible by the patch", lambda: _mae()(torch.zeros(1, 3, 30, 32)), ValueError, "not divisible by the patch size"),
    ("MAE: uint8 images", lambda: _mae()(UINT8), TypeError, r"images\.float\(\) / 255"),
    ("MAE.from_hf: a checkpoint without a decoder", lambda: mae.MAE.from_hf(_hf_vit()), ValueError, "no MAE decoder"),
    ("random_masking: 2D tokens", lambda: mae.random_masking(torch.zeros(4, 8), 0.5), ValueError, r"\(B, L, D\)"),
    ("random_masking: noise of the wrong shape", lambda: mae.random_masking(torch.zeros(2, 8, 4), 0.5, torch.zeros(2, 7)), ValueError, "noise must have shape"),
    ("tube_masking: tokens not a multiple of the frames", lambda: mae.tube_masking(torch.zeros(2, 9, 4), 0.5, 2), ValueError, "do not split into 2 frames"),
    ("unshuffle: mask token of another width", lambda: mae.unshuffle(torch.zeros(2, 3, 4), torch.zeros(1, 1, 5), torch.zeros(2, 8, dtype=torch.long)), ValueError, "mask_token"),
    ("mae_loss: pred and target of different shapes", lambda: mae.mae_loss(torch.zeros(2, 16, 48), torch.zeros(2, 16, 12), torch.zeros(2, 16)), ValueError, "patchify"),
    ("simmim_loss: mask of the wrong shape", lambda: mae.simmim_loss(torch.zeros(2, 16, 12), torch.zeros(2, 16, 12), torch.zeros(2, 8)), ValueError, r"mask \(B, L\)"),
    ("SimMIM: mask ratio 1", lambda: mae.SimMIM(vit.ViTConfig(dim=16, depth=1, num_heads=2), mask_ratio=1.0), ValueError, "mask_ratio must lie in"),
    # ---- recipes ---------------------------------------------------------------------------
    ("reconstruction_loss: a classifier", lambda: mae_recipes.reconstruction_loss(_vit(), (IMAGES,)), TypeError, "masked autoencoder"),
    ("probe_features: not a ViT encoder", lambda: mae_recipes.probe_features(torch.nn.Identity(), IMAGES), TypeError, "ViT encoder"),
    ("linear_probe: features and labels of different lengths", lambda: mae_recipes.linear_probe((torch.zeros(10, 4), torch.zeros(9, dtype=torch.long)), (torch.zeros(3, 4), torch.zeros(3, dtype=torch.long))), ValueError, "features \\(N, F\\), labels \\(N,\\)"),
    ("encoder_tokens: unknown method", lambda: mae_recipes.encoder_tokens(64, 0.75, "beit"), ValueError, "'mae' or 'simmim'"),
    ("masking_noise: unknown strategy", lambda: mae_recipes.masking_noise("zig", 2, (4, 4), 0.75), ValueError, "unknown masking strategy"),
    ("grid_keep: a ratio no grid gives", lambda: mae_recipes.grid_keep((4, 4), 0.5), ValueError, "1 - 1/s\\^2"),
    ("block_mask: more patches than the grid has", lambda: mae_recipes.block_mask((4, 4), 20), ValueError, "cannot hide 20 patches"),
    # ---- data and plots --------------------------------------------------------------------
    ("scenes: unknown split", lambda: data.scenes(4, "dev"), ValueError, "split must be one of"),
    ("to_tensors: no such column", lambda: data.to_tensors(data.scenes(4, "train"), label_column="nope"), ValueError, "no column 'nope'"),
    ("attribute_labels: unknown attribute", lambda: data.attribute_labels(data.scenes(4, "train"), "weight"), ValueError, "attribute must be one of"),
    ("photo: unknown name", lambda: data.photo("nope"), ValueError, "available"),
    ("to_image: a batch instead of one image", lambda: plot.to_image(torch.zeros(2, 1, 3, 4, 4)), ValueError, "index the batch first"),
]


@pytest.mark.parametrize("call,error,match", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gets_a_clear_typed_error(call, error, match, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing a row might write lands in the repository
    with pytest.raises(error, match=match):
        call()
