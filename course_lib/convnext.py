"""ConvNeXt (Liu et al., 2022, "A ConvNet for the 2020s") and ConvNeXt V2 (Woo et al., 2023,
"Co-designing and Scaling ConvNets with Masked Autoencoders").

ConvNeXt is a ResNet modernized step by step toward the design of a Swin Transformer: a 4x4
"patchify" stem, stages of (3, 3, 9, 3) blocks, and a block made of a 7x7 depthwise convolution
(the spatial mixing, like attention) followed by a LayerNorm and a 4x MLP (the channel mixing, like
the transformer's feed-forward network). V2 adds Global Response Normalization (GRN) inside the
MLP, drops layer scale, and pretrains with FCMAE, a masked autoencoder whose encoder emulates
sparse convolution so that masked regions stay empty.

Layouts: the network runs channels-first (B, C, H, W); inside a block the MLP and GRN run
channels-last (B, H, W, C), as in the official code, where nn.Linear acts on the last axis.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .hf import cfg, check_model_type, load_hf_checkpoint, rename_keys, require_gelu, source_name
from .layers import DropPath, LayerScale, load_state_dict_checked
from .mae import check_mask_ratio, mae_loss  # FCMAE masks and scores like MAE, on the cells
from .vit import patchify


def _check_layout(x: torch.Tensor, channels: int, layout: str, where: str) -> None:
    """Raise a ValueError that names the layout mix-up, for (B, C, H, W) vs (B, H, W, C)."""
    first, last = "(B, C, H, W)", "(B, H, W, C)"
    want, axis, fix = (first, 1, "x.permute(0, 3, 1, 2)") if layout == "first" else (last, -1, "x.permute(0, 2, 3, 1)")
    if x.ndim != 4:
        raise ValueError(f"{where} expects a 4D tensor {want} with C={channels}, got shape {tuple(x.shape)}")
    if x.shape[axis] != channels:
        other = -1 if axis == 1 else 1
        hint = f": it looks like the other layout, use {fix}" if x.shape[other] == channels else ""
        raise ValueError(f"{where} expects {want} with C={channels}, got shape {tuple(x.shape)}{hint}")


# ----------------------------------------------------------------------------------------------
# The pure functions: LayerNorm over channels, and GRN's three steps
# ----------------------------------------------------------------------------------------------
def layer_norm_2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm over the channels of a channels-first map (ConvNeXt section 2.6).

    x: (B, C, H, W) -> (B, C, H, W). Every pixel's C-vector is normalized on its own (mean 0,
    variance 1 over C), then scaled by weight (C,) and shifted by bias (C,). Unlike BatchNorm it
    uses no batch statistics, so it behaves the same in training and evaluation.
    """
    _check_layout(x, weight.shape[0], "first", "layer_norm_2d")
    x = x.permute(0, 2, 3, 1)  # (B, C, H, W) -> (B, H, W, C): F.layer_norm normalizes the last axis
    x = F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    return x.permute(0, 3, 1, 2)  # back to (B, C, H, W)


def grn_aggregate(x: torch.Tensor) -> torch.Tensor:
    """GRN step 1, global aggregation (ConvNeXt V2 eq. 1): the L2 norm of each channel's map.

    x: (B, H, W, C) -> gx: (B, 1, 1, C), gx[b, 0, 0, i] = ||X_i|| over the H*W positions.
    """
    return torch.linalg.vector_norm(x, ord=2, dim=(1, 2), keepdim=True)


def grn_normalize(gx: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """GRN step 2, divisive normalization (ConvNeXt V2 eq. 2): each channel's norm relative to the
    others. gx: (B, 1, 1, C) -> nx: (B, 1, 1, C).

    The paper divides by the sum over channels; the code (Algorithm 1) divides by the mean, which is
    the sum / C. The two differ by the constant C, which the learned gamma absorbs; the mean keeps
    nx near 1 whatever the width, so the same gamma init works for every layer.
    """
    return gx / (gx.mean(dim=-1, keepdim=True) + eps)


def grn(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Global Response Normalization (ConvNeXt V2 section 3, Algorithm 1), channels-last.

    x: (B, H, W, C), gamma and beta: (C,) -> (B, H, W, C).
    Step 3, calibration (eq. 3 plus a residual and an affine map): gamma * (x * nx) + beta + x.
    Channels whose maps are strong relative to the others are amplified, weak ones suppressed: a
    competition between channels. With gamma = beta = 0 (the initialization) it is the identity.
    """
    _check_layout(x, gamma.shape[-1], "last", "grn")
    nx = grn_normalize(grn_aggregate(x), eps)  # (B, 1, 1, C)
    return gamma * (x * nx) + beta + x


class LayerNorm2d(nn.LayerNorm):
    """`layer_norm_2d` as a module, for channels-first maps (stem and downsampling layers)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm_2d(x, self.weight, self.bias, self.eps)


class GRN(nn.Module):
    """Global Response Normalization on channels-last input (B, H, W, dim); starts as the identity."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(dim))
        self.beta = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return grn(x, self.gamma, self.beta, self.eps)


# ----------------------------------------------------------------------------------------------
# Block, stage, model
# ----------------------------------------------------------------------------------------------
class ConvNeXtBlock(nn.Module):
    """x + drop_path(ls(pwconv2(grn(GELU(pwconv1(LN(dwconv(x)))))))), on (B, C, H, W).

    V1 (ConvNeXt Fig. 4): layer_scale=1e-6, grn=False. V2 (ConvNeXt V2 Fig. 5): layer_scale=None,
    grn=True (GRN on the 4x wide hidden layer, where the paper found feature collapse).
    """

    def __init__(
        self,
        dim: int,
        kernel_size: int = 7,
        mlp_ratio: float = 4.0,
        layer_scale: float | None = 1e-6,
        grn: bool = False,
        drop_path: float = 0.0,
        eps: float = 1e-6,
    ):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.dim = dim
        self.dwconv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)  # depthwise
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.pwconv1 = nn.Linear(dim, hidden)  # a 1x1 conv, written as a Linear on channels-last
        self.act = nn.GELU()
        self.grn = GRN(hidden) if grn else nn.Identity()
        self.pwconv2 = nn.Linear(hidden, dim)
        self.ls = LayerScale(dim, layer_scale) if layer_scale is not None else nn.Identity()
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, C, H, W). keep: optional (B, 1, H, W), 1 = visible cell, 0 = masked: FCMAE's
        emulation of sparse convolution (masked cells stay 0 and GRN's norms see only visible ones)."""
        _check_layout(x, self.dim, "first", "ConvNeXtBlock")
        shortcut = x
        x = self.dwconv(x).permute(0, 2, 3, 1)  # (B, C, H, W) -> (B, H, W, C) for the MLP
        x = self.act(self.pwconv1(self.norm(x)))  # (B, H, W, hidden)
        if keep is not None:
            x = x * keep.permute(0, 2, 3, 1)  # LN and pwconv1 biases made masked cells nonzero
        x = self.ls(self.pwconv2(self.grn(x)))  # (B, H, W, C)
        x = shortcut + self.drop_path(x.permute(0, 3, 1, 2))  # back to (B, C, H, W)
        return x if keep is None else x * keep


class ConvNeXtStage(nn.Module):
    """An optional downsampling layer (LayerNorm2d + 2x2 conv, stride 2: ConvNeXt section 2.6,
    "separate downsampling layers") followed by `depth` blocks."""

    def __init__(self, in_dim: int, dim: int, depth: int, downsample: bool, drop_paths: list[float], **block_kw):
        super().__init__()
        self.downsample = (
            nn.Sequential(LayerNorm2d(in_dim, eps=block_kw.get("eps", 1e-6)), nn.Conv2d(in_dim, dim, 2, stride=2))
            if downsample
            else nn.Identity()
        )
        self.blocks = nn.ModuleList(ConvNeXtBlock(dim, drop_path=p, **block_kw) for p in drop_paths[:depth])

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        x = self.downsample(x)
        if keep is not None:
            x = x * keep  # the downsampling conv's bias fills masked cells: empty them again
        for block in self.blocks:
            x = block(x, keep)
        return x


@dataclass
class ConvNeXtConfig:
    depths: tuple[int, ...] = (3, 3, 9, 3)
    dims: tuple[int, ...] = (96, 192, 384, 768)
    in_chans: int = 3
    num_classes: int = 10  # 0: no head, forward returns the pooled, normalized feature
    patch_size: int = 4  # the patchify stem: a patch_size x patch_size conv with the same stride
    kernel_size: int = 7
    mlp_ratio: float = 4.0
    layer_scale: float | None = 1e-6  # V1; None in V2
    grn: bool = False  # V2
    eps: float = 1e-6
    head_eps: float = 1e-6  # the LayerNorm after global pooling (transformers configs store 1e-12)
    drop_path: float = 0.0

    def __post_init__(self) -> None:
        self.depths, self.dims = tuple(self.depths), tuple(self.dims)
        if len(self.depths) != len(self.dims) or not self.depths:
            raise ValueError(
                f"depths {self.depths} and dims {self.dims} must have one entry per stage (same length)"
            )
        for name, values in (("depths", self.depths), ("dims", self.dims)):
            if not all(isinstance(v, int) and v >= 1 for v in values):
                raise ValueError(f"{name} must be positive integers, one per stage, got {values}")
        for name in ("in_chans", "patch_size", "kernel_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not isinstance(self.num_classes, int) or self.num_classes < 0:
            raise ValueError(f"num_classes must be an integer >= 0 (0: no head), got {self.num_classes!r}")
        if self.kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd so that 'same' padding keeps the size, got {self.kernel_size}")

    @property
    def total_stride(self) -> int:
        """Pixels per cell of the last stage: the stem's stride times 2 per downsampling layer."""
        return self.patch_size * 2 ** (len(self.depths) - 1)


class ConvNeXt(nn.Module):
    """ConvNeXt V1 or V2: stem, stages, global average pooling, LayerNorm, linear head."""

    def __init__(self, config: ConvNeXtConfig):
        super().__init__()
        self.config = c = config
        self.stem = nn.Sequential(
            nn.Conv2d(c.in_chans, c.dims[0], c.patch_size, stride=c.patch_size), LayerNorm2d(c.dims[0], eps=c.eps)
        )
        rates = torch.linspace(0, c.drop_path, sum(c.depths), device="cpu").tolist()  # grows with depth
        block_kw = dict(kernel_size=c.kernel_size, mlp_ratio=c.mlp_ratio, layer_scale=c.layer_scale, grn=c.grn, eps=c.eps)
        self.stages = nn.ModuleList()
        for i, (depth, dim) in enumerate(zip(c.depths, c.dims)):
            first = sum(c.depths[:i])
            in_dim = c.dims[i - 1] if i else dim
            self.stages.append(ConvNeXtStage(in_dim, dim, depth, i > 0, rates[first : first + depth], **block_kw))
        self.norm = nn.LayerNorm(c.dims[-1], eps=c.head_eps)
        self.head = nn.Linear(c.dims[-1], c.num_classes) if c.num_classes else nn.Identity()
        self.init_weights()

    def init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        """GRN's gamma/beta and layer scales (1D, so param_groups skips them anyway)."""
        return {n for n, _ in self.named_parameters() if n.endswith(("grn.gamma", "grn.beta", "ls.gamma"))}

    def _check_images(self, images: torch.Tensor) -> None:
        c = self.config
        _check_layout(images, c.in_chans, "first", "ConvNeXt")
        if not images.is_floating_point():
            raise TypeError(f"images must be floating point, got {images.dtype}: convert uint8 pixels with images.float() / 255")
        if min(images.shape[2:]) < c.total_stride:
            raise ValueError(
                f"image {tuple(images.shape[2:])} is smaller than the network's total stride {c.total_stride}: "
                f"use images of at least {c.total_stride}x{c.total_stride}, or fewer stages"
            )

    def forward_features(
        self, images: torch.Tensor, mask: torch.Tensor | None = None, return_stages: bool = False
    ) -> torch.Tensor | list[torch.Tensor]:
        """Images (B, C, H, W) -> last feature map (B, dims[-1], H/s, W/s), s = total_stride.

        mask: optional (B, H/s, W/s) on the last stage's grid, 1 = masked (FCMAE): masked cells are
        zeroed after the stem and kept at zero in every stage (sparse convolution by re-masking).
        return_stages: return the list of every stage's output instead.
        """
        self._check_images(images)
        keeps = self.keep_masks(mask, images.shape[2:]) if mask is not None else [None] * len(self.stages)
        x = self.stem(images)  # (B, dims[0], H/p, W/p)
        if mask is not None:
            x = x * keeps[0]
        outs = []
        for stage, keep in zip(self.stages, keeps):
            x = stage(x, keep)
            outs.append(x)
        return outs if return_stages else x

    def keep_masks(self, mask: torch.Tensor, image_size: tuple[int, int]) -> list[torch.Tensor]:
        """The coarse mask (B, gh, gw) -> one keep map (B, 1, h, w) per stage, 1 = visible."""
        c, (H, W) = self.config, image_size
        s = c.total_stride
        if H % s or W % s or tuple(mask.shape[1:]) != (H // s, W // s):
            raise ValueError(
                f"the mask must live on the last stage's grid: images {H}x{W} need sizes divisible by {s} "
                f"and a mask of shape (B, {H // s}, {W // s}), got {tuple(mask.shape)}"
            )
        n = len(c.depths)
        return [1 - upsample_mask(mask, 2 ** (n - 1 - i)).to(self.stem[0].weight) for i in range(n)]

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        """Global average pooling then LayerNorm: (B, C, h, w) -> (B, C)."""
        return self.norm(features.mean(dim=(-2, -1)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits (B, num_classes), or the pooled feature (B, dims[-1]) when num_classes=0."""
        return self.head(self.pool(self.forward_features(images)))

    # ------------------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, source, **overrides) -> "ConvNeXt":
        """Load a transformers ConvNextModel / ConvNextV2Model (or their *ForImageClassification).

        source: a model instance (offline), a save_pretrained folder, or a hub id such as
        "facebook/convnextv2-tiny-1k-224" (online). Classification checkpoints keep their head.
        """
        hf_config, state = load_hf_checkpoint(source)
        config = config_from_hf(hf_config, state, **overrides)
        model = cls(config)
        load_state_dict_checked(model, convert_hf_state_dict(state), source=source_name(source))
        return model


def config_from_hf(hf_config, state: dict[str, torch.Tensor], **overrides) -> ConvNeXtConfig:
    """Translate a transformers ConvNext/ConvNextV2 config into a ConvNeXtConfig."""
    model_type = check_model_type(hf_config, ("convnext", "convnextv2"), "ConvNeXt.from_hf")
    require_gelu(hf_config, "ConvNeXt")
    v2 = model_type == "convnextv2"
    ls = cfg(hf_config, "layer_scale_init_value", 0.0)
    head = next((k for k in state if k.endswith("classifier.weight")), None)
    kwargs = dict(
        depths=tuple(cfg(hf_config, "depths")),
        dims=tuple(cfg(hf_config, "hidden_sizes")),
        in_chans=cfg(hf_config, "num_channels", 3),
        num_classes=state[head].shape[0] if head else 0,
        patch_size=cfg(hf_config, "patch_size", 4),
        layer_scale=None if v2 or not ls or ls <= 0 else ls,
        grn=v2,
        head_eps=cfg(hf_config, "layer_norm_eps", 1e-12),
    )
    return ConvNeXtConfig(**{**kwargs, **overrides})


# transformers 5.x writes the same names in memory and on disk for ConvNeXt; both are covered.
_HF_RULES = [
    (r"^(convnext|convnextv2|model)\.", ""),
    (r"^embeddings\.patch_embeddings\.", "stem.0."),
    (r"^embeddings\.layernorm\.", "stem.1."),
    (r"^encoder\.stages\.(\d+)\.downsampling_layer\.", r"stages.\1.downsample."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.", r"stages.\1.blocks.\2."),
    (r"(blocks\.\d+)\.layernorm\.", r"\1.norm."),
    (r"\.layer_scale_parameter$", ".ls.gamma"),
    (r"\.grn\.weight$", ".grn.gamma"),
    (r"\.grn\.bias$", ".grn.beta"),
    (r"^layernorm\.", "norm."),
    (r"^classifier\.", "head."),
]


def convert_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers weight names -> course_lib names; GRN's (1, 1, 1, C) tensors become (C,)."""
    out = rename_keys(state, _HF_RULES)
    return {k: v.reshape(-1) if k.endswith((".grn.gamma", ".grn.beta")) else v for k, v in out.items()}


# ----------------------------------------------------------------------------------------------
# Sizes: ConvNeXt Table 9 / section 3, ConvNeXt V2 Table 5 (depths, dims)
# ----------------------------------------------------------------------------------------------
_SIZES = {
    "atto": ((2, 2, 6, 2), (40, 80, 160, 320)),
    "nano": ((2, 2, 8, 2), (80, 160, 320, 640)),
    "tiny": ((3, 3, 9, 3), (96, 192, 384, 768)),
    "small": ((3, 3, 27, 3), (96, 192, 384, 768)),
    "base": ((3, 3, 27, 3), (128, 256, 512, 1024)),
    "large": ((3, 3, 27, 3), (192, 384, 768, 1536)),
}


def _make(size: str, v2: bool, **kw) -> ConvNeXt:
    """The paper's model: 224 px ImageNet classifiers with the 1,000-class head (num_classes=0 for
    a backbone)."""
    depths, dims = _SIZES[size]
    version = dict(layer_scale=None, grn=True) if v2 else dict(layer_scale=1e-6, grn=False)
    return ConvNeXt(ConvNeXtConfig(**{**dict(depths=depths, dims=dims, num_classes=1000), **version, **kw}))


def convnext_tiny(**kw) -> ConvNeXt:
    return _make("tiny", False, **kw)


def convnext_small(**kw) -> ConvNeXt:
    return _make("small", False, **kw)


def convnext_base(**kw) -> ConvNeXt:
    return _make("base", False, **kw)


def convnextv2_atto(**kw) -> ConvNeXt:
    return _make("atto", True, **kw)


def convnextv2_nano(**kw) -> ConvNeXt:
    return _make("nano", True, **kw)


def convnextv2_tiny(**kw) -> ConvNeXt:
    return _make("tiny", True, **kw)


def convnextv2_base(**kw) -> ConvNeXt:
    return _make("base", True, **kw)


# ----------------------------------------------------------------------------------------------
# FCMAE: the fully convolutional masked autoencoder (ConvNeXt V2 section 2)
# ----------------------------------------------------------------------------------------------
def fcmae_mask(
    batch: int, grid: tuple[int, int], mask_ratio: float = 0.6, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Random masking on the last stage's grid: (B, gh, gw) float, 1 = masked, 0 = visible.

    Exactly int(gh*gw*(1 - mask_ratio)) cells per image stay visible (at least one): those with the
    smallest noise, as in MAE. FCMAE masks 60% of the 32x32 cells of a 224 image.
    """
    check_mask_ratio(mask_ratio)
    gh, gw = grid
    n = gh * gw
    n_keep = max(1, int(n * (1 - mask_ratio)))
    noise = torch.rand(batch, n, generator=generator)
    rank = noise.argsort(dim=1).argsort(dim=1)  # rank of each cell's noise within its image
    return (rank >= n_keep).float().reshape(batch, gh, gw)


def upsample_mask(mask: torch.Tensor, scale: int) -> torch.Tensor:
    """Nearest-neighbour upsampling of a coarse mask: (B, gh, gw) -> (B, 1, gh*scale, gw*scale),
    each cell repeated into a scale x scale square (ready to multiply a (B, C, H, W) map)."""
    if mask.ndim != 3:
        raise ValueError(f"upsample_mask expects a (B, gh, gw) mask, got shape {tuple(mask.shape)}")
    return mask.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)[:, None]


def fcmae_loss(
    images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, patch_size: int, norm_pix: bool = True
) -> torch.Tensor:
    """Mean squared error on the masked cells only (ConvNeXt V2 section 2, as in MAE).

    images: (B, C, H, W); pred: (B, L, p*p*C) in `patchify`'s (row, col, channel) order;
    mask: (B, gh, gw) with L = gh*gw, 1 = masked. norm_pix: the target is each patch normalized by
    its own mean and variance.
    """
    return mae_loss(pred, patchify(images, patch_size), mask.flatten(1).to(pred.dtype), norm_pix=norm_pix)


class FCMAE(nn.Module):
    """ConvNeXt encoder on visible cells (sparse by re-masking), 1x1 projection, mask tokens,
    one ConvNeXt V2 block as decoder, 1x1 prediction of each cell's pixels (ConvNeXt V2 Fig. 2)."""

    def __init__(self, encoder: ConvNeXt, decoder_dim: int = 512, decoder_depth: int = 1, mask_ratio: float = 0.6, norm_pix: bool = True):
        super().__init__()
        if not isinstance(encoder, ConvNeXt):
            raise TypeError(f"FCMAE's encoder is a ConvNeXt, got {type(encoder).__name__}")
        check_mask_ratio(mask_ratio)
        c = encoder.config
        self.encoder, self.mask_ratio, self.norm_pix = encoder, mask_ratio, norm_pix
        self.patch_size = c.total_stride
        self.proj = nn.Conv2d(c.dims[-1], decoder_dim, 1)
        self.mask_token = nn.Parameter(torch.zeros(1, decoder_dim, 1, 1))
        self.decoder = nn.Sequential(*(ConvNeXtBlock(decoder_dim, layer_scale=None, grn=True) for _ in range(decoder_depth)))
        self.pred = nn.Conv2d(decoder_dim, self.patch_size**2 * c.in_chans, 1)
        nn.init.normal_(self.mask_token, std=0.02)

    def no_weight_decay(self) -> set[str]:
        return {"mask_token"} | {"encoder." + n for n in self.encoder.no_weight_decay()}

    def forward(
        self, images: torch.Tensor, mask: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (loss, pred (B, L, p*p*C), mask (B, gh, gw)); a random mask is drawn if none is given."""
        s = self.patch_size
        B, _, H, W = images.shape
        if mask is None:
            mask = fcmae_mask(B, (H // s, W // s), self.mask_ratio, generator).to(images.device)
        x = self.encoder.forward_features(images, mask=mask)  # (B, C, gh, gw), zero in masked cells
        x = self.proj(x)
        m = mask[:, None].to(x)  # (B, 1, gh, gw)
        x = x * (1 - m) + self.mask_token * m  # mask tokens fill the holes for the decoder
        pred = self.pred(self.decoder(x))  # (B, p*p*C, gh, gw)
        pred = pred.flatten(2).transpose(1, 2)  # (B, L, p*p*C)
        return fcmae_loss(images, pred, mask, s, self.norm_pix), pred, mask
