"""Masked image modeling: MAE (He et al., 2022) and SimMIM (Xie et al., 2022).

Both hide most of an image's patches and train a network to paint them back in pixels. They
differ in where the hidden patches go:
- MAE drops them before the encoder. The encoder (a plain ViT) sees only the visible 25%, a small
  decoder receives the encoded tokens plus one shared mask token per hidden patch, and the loss
  is the mean squared error on the hidden patches only (He et al., 2022, section 3).
- SimMIM keeps every patch in the encoder, replaces the hidden ones by a learned mask token, and
  predicts their pixels with one linear layer under an L1 loss (Xie et al., 2022, section 3).

Masking is one pure function, `random_masking`, shared by both; the other strategies of MAE's
ablation (block, grid; Table 1f) and VideoMAE's tube masking (Tong et al., 2022) only change the
`noise` it sorts. Convention everywhere: in a mask, 0 = keep (visible), 1 = remove (hidden).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from .hf import cfg, check_model_type, encoder_fields, load_hf_checkpoint, rename_keys, require_gelu, source_name
from .layers import Block, as_pair, load_state_dict_checked, resample_pos_embed, sincos_2d_pos_embed
from .vit import ViT, ViTConfig, convert_hf_state_dict, patchify, unpatchify


# ----------------------------------------------------------------------------------------------
# Masking: the pure functions
# ----------------------------------------------------------------------------------------------
def check_mask_ratio(mask_ratio: float) -> None:
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(
            f"mask_ratio must lie in [0, 1), got {mask_ratio}: it is the fraction of patches hidden "
            "(MAE uses 0.75, SimMIM 0.6); 1 would leave the encoder nothing to see"
        )


def num_kept(length: int, mask_ratio: float) -> int:
    """How many of `length` tokens stay visible: int(L * (1 - r)), as in MAE's code."""
    check_mask_ratio(mask_ratio)
    keep = int(length * (1 - mask_ratio))
    if keep < 1:
        raise ValueError(
            f"mask_ratio {mask_ratio} keeps no patch out of {length}: lower the ratio to at most "
            f"{1 - 1 / length:.3f} or use more patches (larger images or smaller patches)"
        )
    return keep


def random_masking(
    x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep a random subset of tokens, per sample (He et al., 2022, section 3 "Masking").

    x: (B, L, D) tokens (position embeddings already added). noise: (B, L), uniform in [0, 1) by
    default; the tokens with the smallest noise are kept, so a chosen noise fixes the mask.
    Returns
      x_kept      (B, K, D) with K = int(L * (1 - mask_ratio)), in shuffled order;
      mask        (B, L) float, 0 = keep, 1 = remove, in the original token order;
      ids_restore (B, L) long: gathering [x_kept, mask tokens] with it restores the original order.
    """
    if x.ndim != 3:
        raise ValueError(f"random_masking expects tokens of shape (B, L, D), got {tuple(x.shape)}")
    B, L, D = x.shape
    if noise is None:
        noise = torch.rand(B, L, device=x.device)
    return _keep_lowest_noise(x, noise, num_kept(L, mask_ratio))


def _keep_lowest_noise(x: torch.Tensor, noise: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The mechanics of `random_masking` for a given number of tokens to keep."""
    B, L, D = x.shape
    if noise.shape != (B, L):
        raise ValueError(f"noise must have shape (B, L) = {(B, L)}, got {tuple(noise.shape)}")
    ids_shuffle = torch.argsort(noise, dim=1)  # ascending: the first `keep` are visible
    ids_restore = torch.argsort(ids_shuffle, dim=1)  # the inverse permutation
    ids_keep = ids_shuffle[:, :keep]
    x_kept = torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, D))  # (B, K, D)
    # The mask is simple in shuffled order (K zeros, then ones); unshuffle it like the tokens.
    mask = torch.ones(B, L, device=x.device)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return x_kept, mask, ids_restore


def unshuffle(x_kept: torch.Tensor, mask_token: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
    """MAE's decoder input: append one mask token per hidden patch, then undo the shuffle.

    x_kept: (B, K, D), mask_token: (1, 1, D), ids_restore: (B, L) -> (B, L, D) where row i is the
    encoded token of patch i if it was visible and the mask token if it was hidden.
    """
    B, K, D = x_kept.shape
    L = ids_restore.shape[1]
    if mask_token.shape != (1, 1, D) or ids_restore.shape[0] != B or L < K:
        raise ValueError(
            f"unshuffle expects x_kept (B, K, D), mask_token (1, 1, D) and ids_restore (B, L) with L >= K, got "
            f"{tuple(x_kept.shape)}, {tuple(mask_token.shape)}, {tuple(ids_restore.shape)}"
        )
    x = torch.cat([x_kept, mask_token.expand(B, L - K, D)], dim=1)  # (B, L, D), shuffled order
    return torch.gather(x, 1, ids_restore[..., None].expand(-1, -1, D))


def tube_masking(
    x: torch.Tensor, mask_ratio: float, num_frames: int, noise: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """VideoMAE's tube masking (Tong et al., 2022): the same spatial patches are hidden in every
    frame, so a hidden patch cannot be copied from its neighbour in time.

    x: (B, T*N, D) video tokens, frame by frame; noise: (B, N) over the spatial positions.
    Returns (x_kept (B, T*K, D), mask (B, T*N), ids_restore (B, T*N)) as `random_masking` does.
    """
    B, TN, D = x.shape
    if TN % num_frames:
        raise ValueError(f"{TN} tokens do not split into {num_frames} frames: expected (B, T*N, D)")
    N = TN // num_frames
    keep = num_kept(N, mask_ratio)
    noise = torch.rand(B, N, device=x.device) if noise is None else noise
    if noise.shape != (B, N):
        raise ValueError(f"tube noise must have shape (B, N) = {(B, N)} (one value per spatial patch), got {tuple(noise.shape)}")
    rank = torch.argsort(torch.argsort(noise, dim=1), dim=1)  # (B, N): 0 = smallest noise
    t = torch.arange(num_frames, device=x.device)[None, :, None]  # (1, T, 1)
    # A sort key over all T*N tokens: visible tubes first (frame by frame), then hidden ones.
    key = (rank[:, None, :] >= keep) * TN + t * N + rank[:, None, :]  # (B, T, N)
    return _keep_lowest_noise(x, key.reshape(B, TN).float(), num_frames * keep)


# ----------------------------------------------------------------------------------------------
# Targets and losses
# ----------------------------------------------------------------------------------------------
def normalized_pixel_target(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """MAE's normalized-pixel target (section 3, Table 1d): each patch minus its mean, divided by
    its standard deviation (unbiased variance, + eps). (B, L, P) -> (B, L, P)."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + eps) ** 0.5


def mae_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix: bool = False) -> torch.Tensor:
    """Mean squared error on the hidden patches only (He et al., 2022, section 3).

    pred, target: (B, L, P) patch pixels (target from `patchify`); mask: (B, L), 1 = hidden.
    The per-patch MSE is summed over hidden patches and divided by their number. Visible patches
    do not count: the paper's footnote in section 3 reports ~0.5% lower accuracy when they do. With no hidden
    patch at all (mask ratio 0) the loss is 0 rather than 0/0.
    """
    _check_loss_shapes(pred, target, mask)
    if norm_pix:
        target = normalized_pixel_target(target)
    return masked_mean(((pred - target) ** 2).mean(dim=-1), mask)  # per-patch MSE (B, L)


def simmim_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """SimMIM's L1 loss on the hidden patches only (Xie et al., 2022, eq. 1). Shapes as `mae_loss`."""
    _check_loss_shapes(pred, target, mask)
    return masked_mean((pred - target).abs().mean(dim=-1), mask)  # per-patch L1 (B, L)


def masked_mean(per_patch: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of a per-patch loss (B, L) over the hidden patches (mask 1); 0 when none is hidden."""
    return (per_patch * mask).sum() / mask.sum().clamp(min=1)


def _check_loss_shapes(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> None:
    if pred.ndim != 3 or pred.shape != target.shape or mask.shape != pred.shape[:2]:
        raise ValueError(
            f"expected pred and target of one shape (B, L, P) and a mask (B, L), got pred {tuple(pred.shape)}, "
            f"target {tuple(target.shape)}, mask {tuple(mask.shape)}: the target is patchify(images, patch_size)"
        )


def paste_reconstruction(
    images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, patch_size: int, norm_pix: bool = False
) -> torch.Tensor:
    """Visible patches from the input, hidden patches from the prediction: (B, C, H, W).

    A model trained on normalized pixels predicts each patch up to its mean and scale; for a
    picture we borrow those from the true patch, as MAE's demo does.
    """
    target = patchify(images, patch_size)
    if norm_pix:
        mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        pred = pred * (var + 1e-6) ** 0.5 + mean
    m = mask[..., None]
    return unpatchify(target * (1 - m) + pred * m, patch_size, images.shape[2:], images.shape[1])


# ----------------------------------------------------------------------------------------------
# MAE
# ----------------------------------------------------------------------------------------------
@dataclass
class MAEConfig:
    image_size: int | tuple[int, int] = 32
    patch_size: int = 4
    in_chans: int = 3
    dim: int = 192
    depth: int = 6
    num_heads: int = 3
    mlp_ratio: float = 4.0
    decoder_dim: int = 128  # the decoder is narrower and shallower than the encoder (Table 1a-b)
    decoder_depth: int = 2
    decoder_num_heads: int = 4
    decoder_mlp_ratio: float = 4.0
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True
    qkv_bias: bool = True
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.decoder_dim % self.decoder_num_heads != 0:
            raise ValueError(
                f"decoder width {self.decoder_dim} is not divisible by {self.decoder_num_heads} decoder heads: "
                "change decoder_dim or decoder_num_heads"
            )
        check_mask_ratio(self.mask_ratio)
        num_kept(self.grid[0] * self.grid[1], self.mask_ratio)
        self.encoder_config()  # validates the image and patch sizes

    @property
    def grid(self) -> tuple[int, int]:
        (H, W), p = as_pair(self.image_size), self.patch_size
        return H // p, W // p

    def encoder_config(self) -> ViTConfig:
        """The encoder is a plain ViT backbone with a CLS token and a frozen sin-cos table."""
        return ViTConfig(
            image_size=self.image_size, patch_size=self.patch_size, in_chans=self.in_chans, num_classes=0,
            dim=self.dim, depth=self.depth, num_heads=self.num_heads, mlp_ratio=self.mlp_ratio,
            qkv_bias=self.qkv_bias, pos_embed="learned", eps=self.eps,
        )


def _sincos_table(grid: tuple[int, int], dim: int) -> torch.Tensor:
    """(1, 1 + gh*gw, dim): MAE's fixed 2D sin-cos table with a zero row for CLS."""
    table = sincos_2d_pos_embed(grid, dim)
    return torch.cat([table.new_zeros(1, dim), table])[None]


def _prefix_and_patch_positions(encoder: ViT, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor | float]:
    """The CLS token with its position (1, 1, D), and the patch positions (1, L, D) for `grid`."""
    pos = encoder.position_embedding(grid)
    if pos is None:
        return encoder.cls_token, 0.0
    return encoder.cls_token + pos[:, :1], pos[:, 1:]


def _transformer(encoder: ViT, x: torch.Tensor) -> torch.Tensor:
    for block in encoder.blocks:
        x = block(x)
    return encoder.norm(x)


class MAE(nn.Module):
    """Masked autoencoder: ViT encoder on visible patches, light decoder with mask tokens."""

    def __init__(self, config: MAEConfig):
        super().__init__()
        self.config = c = config
        self.encoder = ViT(c.encoder_config())
        self.encoder.pos_embed.requires_grad_(False)  # fixed sin-cos, as in the paper's code
        self.decoder_embed = nn.Linear(c.dim, c.decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, c.decoder_dim))
        n_pos = 1 + c.grid[0] * c.grid[1]
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, n_pos, c.decoder_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            Block(c.decoder_dim, c.decoder_num_heads, int(c.decoder_dim * c.decoder_mlp_ratio), c.qkv_bias, c.eps)
            for _ in range(c.decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(c.decoder_dim, eps=c.eps)
        self.decoder_pred = nn.Linear(c.decoder_dim, c.patch_size**2 * c.in_chans)
        self.init_weights()

    def init_weights(self) -> None:
        """MAE's initialisation: sin-cos tables, Xavier-uniform linears (the patch projection
        treated as a linear layer), N(0, 0.02) for the CLS and mask tokens."""
        with torch.no_grad():
            self.encoder.pos_embed.copy_(_sincos_table(self.config.grid, self.config.dim))
            self.decoder_pos_embed.copy_(_sincos_table(self.config.grid, self.config.decoder_dim))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.encoder.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.encoder.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)

    def no_weight_decay(self) -> set[str]:
        return {"encoder.cls_token", "encoder.pos_embed", "mask_token", "decoder_pos_embed"}

    def _grid(self, images: torch.Tensor) -> tuple[int, int]:
        p = self.config.patch_size
        return images.shape[2] // p, images.shape[3] // p

    def forward_encoder(
        self, images: torch.Tensor, mask_ratio: float | None = None, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Images (B, C, H, W) -> (latent (B, 1 + K, D), mask (B, L), ids_restore (B, L))."""
        ratio = self.config.mask_ratio if mask_ratio is None else mask_ratio
        enc = self.encoder
        x = enc.patch_embed(images)  # (B, L, D)
        cls, patch_pos = _prefix_and_patch_positions(enc, self._grid(images))
        # Positions are added before masking, so each kept token still knows where it came from.
        x, mask, ids_restore = random_masking(x + patch_pos, ratio, noise)  # (B, K, D)
        x = torch.cat([cls.expand(x.shape[0], -1, -1), x], dim=1)  # CLS joins after masking
        return _transformer(enc, x), mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """latent (B, 1 + K, D) -> predicted pixels of every patch (B, L, p*p*C)."""
        grid = grid or self.config.grid
        x = self.decoder_embed(latent)  # (B, 1 + K, Dd)
        patches = unshuffle(x[:, 1:], self.mask_token, ids_restore)  # (B, L, Dd)
        x = torch.cat([x[:, :1], patches], dim=1)
        x = x + resample_pos_embed(self.decoder_pos_embed, grid, self.config.grid, 1)
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]  # drop CLS

    def forward(
        self, images: torch.Tensor, noise: torch.Tensor | None = None, mask_ratio: float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (loss, pred (B, L, p*p*C), mask (B, L) with 1 = hidden)."""
        latent, mask, ids_restore = self.forward_encoder(images, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore, self._grid(images))
        loss = mae_loss(pred, patchify(images, self.config.patch_size), mask, self.config.norm_pix_loss)
        return loss, pred, mask

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, noise: torch.Tensor | None = None, mask_ratio: float | None = None):
        """(masked input, reconstruction with visible patches pasted back, mask) for pictures."""
        _, pred, mask = self(images, noise, mask_ratio)
        p = self.config.patch_size
        masked = unpatchify(patchify(images, p) * (1 - mask[..., None]), p, images.shape[2:], images.shape[1])
        return masked, paste_reconstruction(images, pred, mask, p, self.config.norm_pix_loss), mask

    # ------------------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, source, **overrides) -> "MAE":
        """Load a `transformers` ViTMAEForPreTraining (instance or save_pretrained folder)."""
        hf_config, state = load_hf_checkpoint(source)
        if not any(k.startswith("decoder.") for k in state):
            raise ValueError(
                "this checkpoint has no MAE decoder (a ViTMAEModel?): load its encoder with "
                "course_lib.vit.ViT.from_hf, or pass a ViTMAEForPreTraining checkpoint"
            )
        config = mae_config_from_hf(hf_config, **overrides)
        model = cls(config)
        load_state_dict_checked(model, convert_hf_state_dict_mae(state, config), source=source_name(source))
        return model


def mae_config_from_hf(hf_config, **overrides) -> MAEConfig:
    """Translate a transformers ViTMAEConfig into an MAEConfig."""
    check_model_type(hf_config, ("vit_mae",), "MAE.from_hf")
    require_gelu(hf_config, "MAE")
    fields, ddim = encoder_fields(hf_config), cfg(hf_config, "decoder_hidden_size")
    kwargs = dict(
        **fields,
        mlp_ratio=cfg(hf_config, "intermediate_size") / fields["dim"],
        decoder_dim=ddim,
        decoder_depth=cfg(hf_config, "decoder_num_hidden_layers"),
        decoder_num_heads=cfg(hf_config, "decoder_num_attention_heads"),
        decoder_mlp_ratio=cfg(hf_config, "decoder_intermediate_size") / ddim,
        mask_ratio=cfg(hf_config, "mask_ratio", 0.75),
        norm_pix_loss=cfg(hf_config, "norm_pix_loss", False),
    )
    return MAEConfig(**{**kwargs, **overrides})


# The decoder's blocks are spelled like the encoder's once their prefix is renamed; vit.py's
# converter then handles both transformers spellings (in memory and on disk).
_HF_DECODER_RULES = [(r"^decoder\.(decoder_layers|decoder_encoder\.layer)\.(\d+)\.", r"layers.\2.")]


def convert_hf_state_dict_mae(state: dict[str, torch.Tensor], config: MAEConfig) -> dict[str, torch.Tensor]:
    """transformers ViTMAEForPreTraining weight names -> course_lib MAE names."""
    enc = {k: v for k, v in state.items() if k.startswith("vit.")}
    out = {f"encoder.{k}": v for k, v in convert_hf_state_dict(enc, config.encoder_config()).items()}
    dec = rename_keys({k: v for k, v in state.items() if k.startswith("decoder.")}, _HF_DECODER_RULES)
    for k, v in convert_hf_state_dict(dec, config.encoder_config()).items():
        out[k.replace("blocks.", "decoder_blocks.", 1) if k.startswith("blocks.") else k.removeprefix("decoder.")] = v
    return out


def mae_vit_base(**kw) -> MAE:
    """ViT-B/16 encoder with the paper's default decoder: 8 blocks of width 512 (Table 1a-b)."""
    base = dict(image_size=224, patch_size=16, dim=768, depth=12, num_heads=12, decoder_dim=512, decoder_depth=8, decoder_num_heads=16)
    return MAE(MAEConfig(**{**base, **kw}))


def mae_vit_large(**kw) -> MAE:
    return mae_vit_base(**{**dict(dim=1024, depth=24, num_heads=16), **kw})


def mae_vit_huge(**kw) -> MAE:
    return mae_vit_base(**{**dict(patch_size=14, dim=1280, depth=32, num_heads=16), **kw})


def mae_scenes(**kw) -> MAE:
    """The course's MAE for 32x32 scenes, the model of the shipped checkpoint mae_scenes.safetensors
    (scripts/train_mae_scenes.py): patch 4, width 64, 4 + 2 blocks. Unnormalized pixel targets
    (the paper's default in Table 1d), so that reconstructions show without borrowing each true
    patch's mean and variance."""
    base = dict(image_size=32, patch_size=4, dim=64, depth=4, num_heads=4, mlp_ratio=2.0, decoder_dim=64,
                decoder_depth=2, decoder_num_heads=4, decoder_mlp_ratio=2.0, mask_ratio=0.75, norm_pix_loss=False)
    return MAE(MAEConfig(**{**base, **kw}))


# ----------------------------------------------------------------------------------------------
# SimMIM
# ----------------------------------------------------------------------------------------------
class SimMIM(nn.Module):
    """SimMIM: all patches through the encoder, hidden ones replaced by a learned mask token, a
    one-layer linear head to pixels, L1 loss on the hidden patches (Xie et al., 2022)."""

    def __init__(self, config: ViTConfig, mask_ratio: float = 0.6):
        super().__init__()
        if not config.class_token or config.distilled or config.num_registers:
            raise ValueError("SimMIM here uses a plain ViT encoder: class_token=True, no distillation token, no registers")
        check_mask_ratio(mask_ratio)
        self.config = config = replace(config, num_classes=0)
        self.mask_ratio = mask_ratio
        self.encoder = ViT(config)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, config.dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        ph, pw = as_pair(config.patch_size)
        self.head = nn.Linear(config.dim, ph * pw * config.in_chans)  # the one-layer prediction head

    def no_weight_decay(self) -> set[str]:
        return {f"encoder.{n}" for n in self.encoder.no_weight_decay()} | {"mask_token"}

    def forward(
        self, images: torch.Tensor, noise: torch.Tensor | None = None, mask_ratio: float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (loss, pred (B, L, p*p*C), mask (B, L) with 1 = hidden), like MAE."""
        enc = self.encoder
        x = enc.patch_embed(images)  # (B, L, D)
        B, L, _ = x.shape
        _, mask, _ = random_masking(x, self.mask_ratio if mask_ratio is None else mask_ratio, noise)
        w = mask[..., None]  # (B, L, 1)
        x = x * (1 - w) + self.mask_token * w  # every token stays; hidden ones become [M]
        p = enc.patch_embed.patch_size
        cls, patch_pos = _prefix_and_patch_positions(enc, (images.shape[2] // p[0], images.shape[3] // p[1]))
        x = torch.cat([cls.expand(B, -1, -1), x + patch_pos], dim=1)
        pred = self.head(_transformer(enc, x)[:, 1:])  # (B, L, p*p*C)
        return simmim_loss(pred, patchify(images, p), mask), pred, mask
