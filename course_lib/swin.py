"""Swin Transformer (Liu et al., 2021) and Swin Transformer V2 (Liu et al., 2022).

Swin computes self-attention inside non-overlapping M x M windows, so its cost grows linearly with
the number of tokens instead of quadratically (Swin section 3.2, eq. 1-2). Every second block
shifts the windows by M/2; a cyclic shift of the feature map plus a mask keeps the shifted windows
as cheap as the regular ones (section 3.2, Figure 4). Attention adds a learned bias that depends
only on the relative position of the two tokens (eq. 4). Patch merging halves the resolution and
doubles the width between stages, giving a hierarchy of feature maps like a CNN's.

V2 changes three things to scale up (Swin V2 section 3): the residual branch is normalised after
attention/MLP (res-post-norm), attention uses the cosine of q and k times a learned temperature,
and the position bias comes from a small MLP on log-spaced relative coordinates.

Feature maps travel channels-last, (B, H, W, C), which makes windowing a reshape.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from .hf import cfg, check_model_type, fuse_qkv, load_hf_checkpoint, rename_keys, require_gelu, source_name
from .layers import Attention, DropPath, Mlp, PatchEmbed, as_pair, attention, load_state_dict_checked, merge_heads

# ----------------------------------------------------------------------------------------------
# The pure functions: windows, shift, mask, relative positions
# ----------------------------------------------------------------------------------------------


def _check_map(x: torch.Tensor, where: str) -> None:
    if x.ndim != 4:
        raise ValueError(f"{where} expects a channels-last feature map (B, H, W, C), got shape {tuple(x.shape)}")


def window_partition(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """Cut a feature map into non-overlapping windows, window-major.

    x: (B, H, W, C) with H and W multiples of window_size -> (B * nW, M, M, C), nW = (H/M) * (W/M).
    Windows are ordered image by image, then row by row over the window grid.
    """
    _check_map(x, "window_partition")
    B, H, W, C = x.shape
    M = window_size
    if H % M or W % M:
        raise ValueError(
            f"a {H}x{W} feature map does not split into {M}x{M} windows: pad it first with "
            f"pad_to_window(x, {M}) (to {math.ceil(H / M) * M}x{math.ceil(W / M) * M})"
        )
    x = x.reshape(B, H // M, M, W // M, M, C)  # (B, nH, M, nW_, M, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, M, M, C)  # (B*nH*nW_, M, M, C)


def window_reverse(windows: torch.Tensor, window_size: int, H: int, W: int) -> torch.Tensor:
    """The inverse of `window_partition`: (B * nW, M, M, C) -> (B, H, W, C)."""
    M = window_size
    if H % M or W % M:
        raise ValueError(f"H={H} and W={W} must be multiples of the window size {M}")
    C = windows.shape[-1]
    x = windows.reshape(-1, H // M, W // M, M, M, C)  # (B, nH, nW_, M, M, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, H, W, C)


def pad_to_window(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """Zero-pad (B, H, W, C) at the bottom and right to multiples of the window size, as Swin
    does for feature maps that do not tile (the padded tokens are not masked, like the original)."""
    _check_map(x, "pad_to_window")
    H, W = x.shape[1:3]
    pad_h, pad_w = -H % window_size, -W % window_size
    return F.pad(x, (0, 0, 0, pad_w, 0, pad_h)) if pad_h or pad_w else x


def cyclic_shift(x: torch.Tensor, shift: int) -> torch.Tensor:
    """Roll a (B, H, W, C) map up and left by `shift` (Swin Figure 4): the top rows and left
    columns wrap around to the bottom and right, so shifted windows become regular ones."""
    _check_map(x, "cyclic_shift")
    return torch.roll(x, shifts=(-shift, -shift), dims=(1, 2)) if shift else x


def reverse_cyclic_shift(x: torch.Tensor, shift: int) -> torch.Tensor:
    """The inverse of `cyclic_shift`: roll down and right by `shift`."""
    return torch.roll(x, shifts=(shift, shift), dims=(1, 2)) if shift else x


@functools.lru_cache(maxsize=64)  # the same few shapes every forward pass: computed once (read-only)
def shifted_window_mask(H: int, W: int, window_size: int, shift: int) -> torch.Tensor:
    """Which tokens of a shifted window may attend to which, after `cyclic_shift`.

    Label every cell of the (H, W) map with one of 3 x 3 regions: along each axis, [0, H-M) was
    never wrapped, [H-M, H-shift) is the last regular window, [H-shift, H) wrapped around from the
    top. Two tokens of one window may attend to each other only if they carry the same label.
    Returns a boolean (nW, M*M, M*M), True = may attend, windows ordered as `window_partition`.
    With shift = 0 every entry is True.
    """
    if not 0 <= shift < window_size:
        raise ValueError(f"shift must be in [0, window_size), got shift={shift} for window {window_size}")

    def regions(n: int) -> torch.Tensor:  # (n,) labels 0, 1, 2 along one axis
        i = torch.arange(n)
        return (i >= n - window_size).long() + (i >= n - shift).long() if shift else torch.zeros(n, dtype=torch.long)

    labels = regions(H)[:, None] * 3 + regions(W)[None, :]  # (H, W) region ids 0..8
    windows = window_partition(labels[None, :, :, None], window_size).flatten(1)  # (nW, M*M)
    return windows[:, :, None] == windows[:, None, :]  # (nW, M*M, M*M)


@functools.lru_cache(maxsize=16)  # computed once per window size (read-only)
def relative_position_index(window_size: int) -> torch.Tensor:
    """Index into the ((2M-1)^2, heads) bias table for every pair of tokens in an M x M window.

    For tokens i=(y1, x1) and j=(y2, x2): dy = y1-y2 and dx = x1-x2 lie in [-(M-1), M-1]; offset
    both by M-1 and read the table row-major: (dy + M-1) * (2M-1) + (dx + M-1). Returns (M*M, M*M).
    """
    M = window_size
    if M < 1:
        raise ValueError(f"window_size must be at least 1, got {M}")
    ys, xs = torch.meshgrid(torch.arange(M), torch.arange(M), indexing="ij")
    coords = torch.stack([ys.flatten(), xs.flatten()])  # (2, M*M)
    rel = coords[:, :, None] - coords[:, None, :]  # (2, M*M, M*M), query minus key
    return (rel[0] + M - 1) * (2 * M - 1) + (rel[1] + M - 1)


def relative_position_bias(table: torch.Tensor, window_size: int, table_window: int | None = None) -> torch.Tensor:
    """Gather the bias B (Swin eq. 4) from the learned table: ((2T-1)^2, heads) -> (heads, M*M, M*M).

    A window M smaller than the table's window T (a feature map smaller than the window) reads
    the central (2M-1)^2 entries, which hold exactly the offsets such a window can have.
    """
    T = table_window or window_size
    M = window_size
    if M > T:
        raise ValueError(f"a bias table for {T}x{T} windows cannot serve {M}x{M} windows")
    heads = table.shape[-1]
    table = table.reshape(2 * T - 1, 2 * T - 1, heads)[T - M : T + M - 1, T - M : T + M - 1]
    bias = table.reshape(-1, heads)[relative_position_index(M)]  # (M*M, M*M, heads)
    return bias.permute(2, 0, 1)


def log_spaced_coords(window_size: int, pretrained_window_size: int = 0) -> torch.Tensor:
    """Swin V2's log-spaced relative coordinates (V2 eq. 4) for an M x M window: ((2M-1)^2, 2).

    Offsets dy, dx in [-(M-1), M-1] are scaled to [-8, 8] (by the pretraining window, if given, so
    that a larger fine-tuning window extrapolates) and mapped to sign(d) * log2(1 + |d|) / log2(8).
    """
    M = window_size
    r = torch.arange(-(M - 1), M, dtype=torch.float32)
    coords = torch.stack(torch.meshgrid(r, r, indexing="ij"), dim=-1)  # (2M-1, 2M-1, 2) as (dy, dx)
    scale = pretrained_window_size - 1 if pretrained_window_size > 0 else M - 1
    if scale > 0:
        coords = coords / scale
    coords = coords * 8
    coords = torch.sign(coords) * torch.log2(coords.abs() + 1.0) / math.log2(8)
    return coords.reshape(-1, 2)


def window_and_shift(H: int, W: int, window_size: int, shift: int) -> tuple[int, int]:
    """The window and shift a block really uses on an H x W map: a map not larger than the window
    is one window and needs no shift (Swin's rule, also its official code)."""
    if min(H, W) <= window_size:
        return min(H, W), 0
    return window_size, shift


def merge_patches(x: torch.Tensor) -> torch.Tensor:
    """Concatenate each 2x2 neighbourhood: (B, H, W, C) -> (B, ceil(H/2), ceil(W/2), 4C).

    Order (row, col) = (0,0), (1,0), (0,1), (1,1), the order of the official code: pretrained
    reduction weights depend on it. Odd sizes are zero-padded at the bottom/right.
    """
    _check_map(x, "merge_patches")
    H, W = x.shape[1:3]
    x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
    return torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)


# ----------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------
class WindowAttention(Attention):
    """Multi-head self-attention inside windows with a relative position bias: the course's
    `layers.Attention` (fused qkv, the same heads and the same `attention` function) plus a bias.

    V1: softmax(q k^T / sqrt(d) + B + mask) v, B gathered from a ((2M-1)^2, heads) table.
    V2: softmax(cos(q, k) * tau + 16 sigmoid(CPB) + mask) v, tau = exp(min(logit_scale, ln 100)),
    CPB = a 2-layer MLP on log-spaced coordinates; only q and v have biases.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int, qkv_bias: bool = True,
                 version: int = 1, pretrained_window_size: int = 0):
        super().__init__(dim, num_heads, qkv_bias=qkv_bias and version == 1)
        self.window_size, self.version, self.pretrained_window_size = window_size, version, pretrained_window_size
        if version == 1:
            self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
            nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        else:
            self.q_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
            self.v_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
            self.logit_scale = nn.Parameter(torch.full((num_heads, 1, 1), math.log(10.0)))
            self.cpb_mlp = nn.Sequential(nn.Linear(2, 512), nn.ReLU(), nn.Linear(512, num_heads, bias=False))

    def qkv_heads(self, x: torch.Tensor) -> torch.Tensor:
        if self.version == 1 or self.q_bias is None:
            return super().qkv_heads(x)
        B, L, _ = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])  # V2: no k bias
        qkv = F.linear(x, self.qkv.weight, bias).reshape(B, L, 3, self.num_heads, self.head_dim)
        return qkv.permute(2, 0, 3, 1, 4)  # (B, L, 3, h, d) -> (3, B, h, L, d)

    def position_bias(self, window_size: int) -> torch.Tensor:
        """(heads, M*M, M*M) bias for windows of side `window_size`."""
        if self.version == 1:
            return relative_position_bias(self.relative_position_bias_table, window_size, self.window_size)
        coords = log_spaced_coords(window_size, self.pretrained_window_size).to(self.proj.weight)
        table = 16 * torch.sigmoid(self.cpb_mlp(coords))  # ((2M-1)^2, heads), bounded in (0, 16)
        return table[relative_position_index(window_size)].permute(2, 0, 1)

    def forward(self, x: torch.Tensor, window_size: int, mask: torch.Tensor | None = None,
                return_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: (B*nW, M*M, C) windows; mask: boolean (nW, M*M, M*M) or None.
        Returns (out (B*nW, M*M, C), weights (B*nW, heads, M*M, M*M) or None)."""
        BnW, N, C = x.shape
        q, k, v = self.qkv_heads(x)  # 3 x (B*nW, h, N, d)
        if self.version == 2:
            tau = torch.clamp(self.logit_scale, max=math.log(100.0)).exp()  # (h, 1, 1)
            # attention() divides by sqrt(d); pre-multiplying q gives cos(q, k) * tau exactly.
            q = F.normalize(q, dim=-1) * (tau * math.sqrt(self.head_dim))
            k = F.normalize(k, dim=-1)
        add = self.position_bias(window_size)  # (h, N, N)
        if mask is not None:
            nW = mask.shape[0]
            add = add + torch.zeros_like(mask, dtype=add.dtype).masked_fill(~mask, float("-inf"))[:, None]  # (nW, h, N, N)
            q, k, v = (t.reshape(BnW // nW, nW, self.num_heads, N, self.head_dim) for t in (q, k, v))
        out, weights = attention(q, k, v, add, use_sdpa=self.use_sdpa and not return_weights)
        out = merge_heads(out.reshape(BnW, self.num_heads, N, self.head_dim))  # (B*nW, h, N, d) -> (B*nW, N, C)
        if weights is not None:
            weights = weights.reshape(BnW, self.num_heads, N, N)
        return self.proj(out), weights


class SwinBlock(nn.Module):
    """One Swin block (Swin eq. 3): (shifted-)window attention, then an MLP, each residual.

    V1 normalises before each branch (pre-norm); V2 normalises the branch output before adding it
    (res-post-norm, V2 section 3.1), which keeps activations from growing with depth.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int, shift: int, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, eps: float = 1e-5, drop_path: float = 0.0, version: int = 1,
                 pretrained_window_size: int = 0):
        super().__init__()
        self.window_size, self.shift, self.post_norm = window_size, shift, version == 2
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = WindowAttention(dim, num_heads, window_size, qkv_bias, version, pretrained_window_size)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, return_weights: bool = False):
        """x: (B, H, W, C) -> (B, H, W, C) [, attention weights (B*nW, heads, M*M, M*M)]."""
        B, H, W, C = x.shape
        M, shift = window_and_shift(H, W, self.window_size, self.shift)
        shortcut = x
        if not self.post_norm:
            x = self.norm1(x)
        x = cyclic_shift(pad_to_window(x, M), shift)  # (B, Hp, Wp, C)
        Hp, Wp = x.shape[1:3]
        windows = window_partition(x, M).reshape(-1, M * M, C)  # (B*nW, M, M, C) -> (B*nW, M*M, C)
        mask = shifted_window_mask(Hp, Wp, M, shift).to(x.device) if shift else None
        out, weights = self.attn(windows, M, mask, return_weights)
        x = reverse_cyclic_shift(window_reverse(out.reshape(-1, M, M, C), M, Hp, Wp), shift)
        x = x[:, :H, :W]  # drop the padding
        x = shortcut + self.drop_path(self.norm1(x) if self.post_norm else x)
        if self.post_norm:
            x = x + self.drop_path(self.norm2(self.mlp(x)))
        else:
            x = x + self.drop_path(self.mlp(self.norm2(x)))
        return (x, weights) if return_weights else x


class PatchMerging(nn.Module):
    """2x2 neighbours -> one token: (B, H, W, C) -> (B, H/2, W/2, 2C). V1 normalises the 4C
    concatenation before the linear reduction; V2 normalises the 2C output after it."""

    def __init__(self, dim: int, eps: float = 1e-5, version: int = 1):
        super().__init__()
        self.post_norm = version == 2
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(2 * dim if self.post_norm else 4 * dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = merge_patches(x)  # (B, H/2, W/2, 4C)
        return self.norm(self.reduction(x)) if self.post_norm else self.reduction(self.norm(x))


class SwinStage(nn.Module):
    """`depth` blocks alternating regular (shift 0) and shifted (shift M/2) windows, then an
    optional patch merging."""

    def __init__(self, dim: int, depth: int, num_heads: int, window_size: int, drop_path: list[float],
                 downsample: bool, mlp_ratio: float = 4.0, qkv_bias: bool = True, eps: float = 1e-5,
                 version: int = 1, pretrained_window_size: int = 0):
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinBlock(dim, num_heads, window_size, 0 if i % 2 == 0 else window_size // 2, mlp_ratio,
                      qkv_bias, eps, drop_path[i], version, pretrained_window_size)
            for i in range(depth)
        )
        self.downsample = PatchMerging(dim, eps, version) if downsample else None

    def forward(self, x: torch.Tensor, maps: list | None = None) -> torch.Tensor:
        for block in self.blocks:
            if maps is not None:
                x, w = block(x, return_weights=True)
                maps.append(w)
            else:
                x = block(x)
        return self.downsample(x) if self.downsample is not None else x


@dataclass
class SwinConfig:
    image_size: int | tuple[int, int] = 32  # only a default: any multiple of patch_size works
    patch_size: int = 2
    in_chans: int = 3
    num_classes: int = 10  # 0: a backbone returning the pooled feature
    embed_dim: int = 32
    depths: tuple[int, ...] = (2, 2, 2)
    num_heads: tuple[int, ...] = (2, 4, 8)
    window_size: int = 4
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    eps: float = 1e-5
    drop_path: float = 0.0
    version: int = 1  # 1: Swin, 2: Swin V2
    pretrained_window_sizes: tuple[int, ...] | None = None  # V2: per stage, 0 = normalise by the window

    def __post_init__(self) -> None:
        self.depths, self.num_heads = tuple(self.depths), tuple(self.num_heads)
        for name in ("patch_size", "in_chans", "embed_dim"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not all(isinstance(v, int) and v >= 1 for v in self.depths + self.num_heads):
            raise ValueError(f"depths {self.depths} and num_heads {self.num_heads} must be positive integers")
        if len(self.depths) != len(self.num_heads):
            raise ValueError(f"depths {self.depths} and num_heads {self.num_heads} must list one entry per stage")
        if self.version not in (1, 2):
            raise ValueError(f"version must be 1 (Swin) or 2 (Swin V2), got {self.version}")
        if self.window_size < 2:
            raise ValueError(f"window_size must be at least 2 (a shifted block moves windows by M//2), got {self.window_size}")
        for i, h in enumerate(self.num_heads):
            if (self.embed_dim * 2**i) % h:
                raise ValueError(f"stage {i} has width {self.embed_dim * 2**i}, not divisible by {h} heads")
        pws = self.pretrained_window_sizes or (0,) * len(self.depths)
        if len(pws) != len(self.depths):
            raise ValueError(f"pretrained_window_sizes {pws} must have one entry per stage ({len(self.depths)})")
        self.pretrained_window_sizes = tuple(pws)
        H, W = as_pair(self.image_size)
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(f"image size {H}x{W} is not divisible by the patch size {self.patch_size}")

    @property
    def num_features(self) -> int:
        return self.embed_dim * 2 ** (len(self.depths) - 1)


class Swin(nn.Module):
    """Swin Transformer: patch embedding, stages of window blocks with merging in between, a final
    norm, and a linear head on the average of the last stage's tokens."""

    def __init__(self, config: SwinConfig):
        super().__init__()
        self.config = c = config
        self.patch_embed = PatchEmbed(c.patch_size, c.in_chans, c.embed_dim)
        self.patch_norm = nn.LayerNorm(c.embed_dim, eps=c.eps)
        dpr = torch.linspace(0, c.drop_path, sum(c.depths), device="cpu").tolist()  # stochastic depth grows with depth
        self.stages = nn.ModuleList()
        for i, (depth, heads) in enumerate(zip(c.depths, c.num_heads)):
            start = sum(c.depths[:i])
            self.stages.append(SwinStage(
                c.embed_dim * 2**i, depth, heads, c.window_size, dpr[start : start + depth],
                downsample=i < len(c.depths) - 1, mlp_ratio=c.mlp_ratio, qkv_bias=c.qkv_bias, eps=c.eps,
                version=c.version, pretrained_window_size=c.pretrained_window_sizes[i]))
        self.norm = nn.LayerNorm(c.num_features, eps=c.eps)
        self.head = nn.Linear(c.num_features, c.num_classes) if c.num_classes else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if self.config.version == 2:  # V2 starts each residual branch at zero (res-post-norm)
            for block in (b for s in self.stages for b in s.blocks):
                nn.init.zeros_(block.norm1.weight)
                nn.init.zeros_(block.norm2.weight)

    def no_weight_decay(self) -> set[str]:
        """Bias tables, V2's temperature and position MLP are not decayed (as in the official code)."""
        keys = ("relative_position_bias_table", "logit_scale", "cpb_mlp")
        return {n for n, _ in self.named_parameters() if any(k in n for k in keys)}

    def forward_features(self, images: torch.Tensor, return_attention: bool = False):
        """Images (B, C, H, W) -> the last stage's tokens after the final norm (B, h*w, C_last).
        With return_attention=True also the list of per-block attention weights."""
        x = self.patch_norm(self.patch_embed(images))  # (B, gh*gw, C)
        gh, gw = images.shape[2] // self.config.patch_size, images.shape[3] // self.config.patch_size
        x = x.reshape(x.shape[0], gh, gw, -1)  # tokens -> channels-last map (B, gh, gw, C)
        maps = [] if return_attention else None
        for stage in self.stages:
            x = stage(x, maps)
        x = self.norm(x.flatten(1, 2))  # (B, h, w, C) -> (B, h*w, C)
        return (x, maps) if return_attention else x

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits (B, num_classes), or the pooled feature (B, C_last) for a backbone."""
        return self.head(self.forward_features(images).mean(dim=1))

    @classmethod
    def from_hf(cls, source, **overrides) -> "Swin":
        """Load a `transformers` SwinModel / Swinv2Model (or their ForImageClassification).

        source: a model instance (offline), a save_pretrained folder, or a hub id (online).
        V1 checkpoints give a `Swin`, V2 checkpoints a `SwinV2`.
        """
        hf_config, state = load_hf_checkpoint(source)
        config = config_from_hf(hf_config, state, **overrides)
        if cls is SwinV2 and config.version != 2:
            raise ValueError("this is a Swin V1 checkpoint: load it with Swin.from_hf")
        model = (SwinV2 if config.version == 2 else Swin)(config)
        load_state_dict_checked(model, convert_hf_state_dict(state, config), source=source_name(source))
        return model


class SwinV2(Swin):
    """Swin Transformer V2: res-post-norm, scaled cosine attention, log-spaced continuous position
    bias (Liu et al., 2022). The same model class with `version=2`."""

    def __init__(self, config: SwinConfig):
        super().__init__(replace(config, version=2) if config.version != 2 else config)


# ----------------------------------------------------------------------------------------------
# transformers checkpoints
# ----------------------------------------------------------------------------------------------
def config_from_hf(hf_config, state: dict[str, torch.Tensor], **overrides) -> SwinConfig:
    """Translate a transformers SwinConfig / Swinv2Config into a SwinConfig."""
    model_type = check_model_type(hf_config, ("swin", "swinv2"), "Swin.from_hf")
    if cfg(hf_config, "use_absolute_embeddings", False):
        raise NotImplementedError("Swin with absolute position embeddings is not implemented in course_lib")
    require_gelu(hf_config, "Swin")
    head = state.get("classifier.weight")
    patch = cfg(hf_config, "patch_size")
    kwargs = dict(
        image_size=cfg(hf_config, "image_size"),
        patch_size=patch if isinstance(patch, int) else patch[0],
        in_chans=cfg(hf_config, "num_channels", 3),
        num_classes=head.shape[0] if head is not None else 0,
        embed_dim=cfg(hf_config, "embed_dim"),
        depths=tuple(cfg(hf_config, "depths")),
        num_heads=tuple(cfg(hf_config, "num_heads")),
        window_size=cfg(hf_config, "window_size"),
        mlp_ratio=cfg(hf_config, "mlp_ratio", 4.0),
        qkv_bias=cfg(hf_config, "qkv_bias", True),
        eps=cfg(hf_config, "layer_norm_eps", 1e-5),
        version=2 if model_type == "swinv2" else 1,
        # transformers' default is four zeros whatever the number of stages
        pretrained_window_sizes=tuple(cfg(hf_config, "pretrained_window_sizes", None) or ())[: len(cfg(hf_config, "depths"))] or None,
    )
    return SwinConfig(**{**kwargs, **overrides})


# Both spellings of transformers 5.x: in memory (q_proj, relative_position_bias.*, mlp.fc1) and on
# disk (attention.self.query, attention.self.relative_position_bias_table, intermediate.dense).
_HF_RULES = [
    (r"^(swin|swinv2|model)\.", ""),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^embeddings\.norm\.", "patch_norm."),
    (r"^encoder\.layers\.(\d+)\.", r"stages.\1."),
    (r"\.attention\.(q_proj|self\.query)\.", ".attn.q."),
    (r"\.attention\.(k_proj|self\.key)\.", ".attn.k."),
    (r"\.attention\.(v_proj|self\.value)\.", ".attn.v."),
    (r"\.attention\.(o_proj|output\.dense)\.", ".attn.proj."),
    (r"\.attention\.(relative_position_bias|self)\.relative_position_bias_table$", ".attn.relative_position_bias_table"),
    (r"\.attention\.self\.logit_scale$", ".attn.logit_scale"),
    (r"\.attention\.self\.continuous_position_bias_mlp\.", ".attn.cpb_mlp."),
    (r"\.layernorm_before\.", ".norm1."),
    (r"\.layernorm_after\.", ".norm2."),
    (r"\.intermediate\.dense\.", ".mlp.fc1."),
    (r"(blocks\.\d+)\.output\.dense\.", r"\1.mlp.fc2."),
    (r"^layernorm\.", "norm."),
    (r"^classifier\.", "head."),
]


def convert_hf_state_dict(state: dict[str, torch.Tensor], config: SwinConfig) -> dict[str, torch.Tensor]:
    """transformers weight names (in-memory or on-disk spelling) -> course_lib Swin names."""
    out = rename_keys(state, _HF_RULES)
    # Buffers older checkpoints store (recomputed here) and the SimMIM mask token (unused).
    for k in [k for k in out if k.endswith(("relative_position_index", "relative_coords_table", "mask_token"))]:
        out.pop(k)
    if config.version == 2:  # V2 keeps q and v biases apart: k has none
        for k in [k for k in out if k.endswith((".attn.q.bias", ".attn.v.bias"))]:
            out[k.replace(".attn.q.bias", ".attn.q_bias").replace(".attn.v.bias", ".attn.v_bias")] = out.pop(k)
    return fuse_qkv(out)


# ----------------------------------------------------------------------------------------------
# Sizes (Swin Table 1 / section 3.3; Swin V2 section 4) and the course's small model
# ----------------------------------------------------------------------------------------------
def swin_tiny(**kw) -> Swin:
    return Swin(SwinConfig(**{**dict(image_size=224, patch_size=4, embed_dim=96, depths=(2, 2, 6, 2),
                                     num_heads=(3, 6, 12, 24), window_size=7, num_classes=1000), **kw}))


def swin_small(**kw) -> Swin:
    return swin_tiny(**{**dict(depths=(2, 2, 18, 2)), **kw})


def swin_base(**kw) -> Swin:
    return swin_tiny(**{**dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)), **kw})


def swinv2_tiny(**kw) -> SwinV2:
    return SwinV2(SwinConfig(**{**dict(image_size=256, patch_size=4, embed_dim=96, depths=(2, 2, 6, 2),
                                       num_heads=(3, 6, 12, 24), window_size=8, num_classes=1000, version=2), **kw}))


def swin_micro(**kw) -> Swin:
    """The course's CPU-sized Swin for 32x32 images: patch 2, windows of 4, three stages."""
    return Swin(SwinConfig(**{**dict(image_size=32, patch_size=2, embed_dim=32, depths=(2, 2, 2),
                                     num_heads=(2, 4, 8), window_size=4), **kw}))
