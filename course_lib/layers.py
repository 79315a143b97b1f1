"""Building blocks shared by every model family in the course.

Attention (a fused SDPA path and an explicit softmax path that give the same numbers), the MLP,
the pre-norm transformer block of ViT (Dosovitskiy et al., 2021, eq. 2-3), stochastic depth,
layer scale, 2D sin-cos position embeddings, position-embedding resampling, and the helpers that
load weights with errors a student can act on.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn


# ----------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    use_sdpa: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scaled dot-product attention, softmax(q k^T / sqrt(d) + mask) v (Vaswani et al., 2017).

    q: (..., Lq, d), k: (..., Lk, d), v: (..., Lk, dv).
    mask: broadcastable to (..., Lq, Lk); boolean (True = may attend) or additive float
    (0 or -inf, or a learned bias such as Swin's relative position bias).
    Returns (out (..., Lq, dv), weights (..., Lq, Lk) or None). The SDPA path is fused and does
    not materialise the weights, so it returns None for them; the explicit path returns them.
    """
    if q.shape[-1] != k.shape[-1] or k.shape[-2] != v.shape[-2]:
        raise ValueError(
            f"attention needs q (..., Lq, d), k (..., Lk, d), v (..., Lk, dv): got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if use_sdpa:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask), None
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (..., Lq, Lk)
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask
    weights = scores.softmax(dim=-1)
    return weights @ v, weights


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, L, heads * d) -> (B, heads, L, d): each head attends on its own slice of the width."""
    B, L, C = x.shape
    if C % num_heads != 0:
        raise ValueError(f"width {C} is not divisible by {num_heads} heads")
    return x.reshape(B, L, num_heads, C // num_heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, heads, L, d) -> (B, L, heads * d): the inverse of `split_heads`."""
    B, H, L, d = x.shape
    return x.transpose(1, 2).reshape(B, L, H * d)


def causal_mask(length: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(L, L) boolean, True where query i may attend to key j, i.e. j <= i (GPT-2's mask, used by
    CLIP's text encoder and every decoder-only language model): each token sees itself and the
    tokens before it."""
    if length < 1:
        raise ValueError(f"a causal mask needs a length of at least 1, got {length}")
    return torch.ones(length, length, dtype=torch.bool, device=device).tril()


class Attention(nn.Module):
    """Multi-head attention, the one attention module of the course.

    Self-attention (`context_dim=None`): queries, keys and values all come from x, through one
    fused projection `qkv` (one matmul). Cross-attention (`context_dim` given): queries come from
    x (B, Lq, dim), keys and values from `context` (B, Lk, context_dim) through `q`, `k`, `v`;
    the context may have another width (an image encoder's, say). The inner width is
    num_heads * head_dim (head_dim defaults to dim // num_heads).

    forward(x, context=None, mask=None, rotary=None, cache=None, return_weights=False):
    - mask: broadcastable to (B, heads, Lq, Lk), boolean (True = may attend) or additive float;
    - rotary: a function (q, k) -> (q, k) applied to the split heads before the scores (RoPE);
    - cache: an object with `update(k, v) -> (k, v)` that appends this call's keys and values to
      the earlier ones (a language model's KV cache for generation).
    Returns (out (B, Lq, dim), weights (B, heads, Lq, Lk) or None). `use_sdpa` switches between
    the fused kernel and the explicit softmax (the same numbers); `use_explicit_attention(model)`
    flips it for a whole model, and `return_weights=True` always takes the explicit path.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        context_dim: int | None = None,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        proj_bias: bool = True,
    ):
        super().__init__()
        if num_heads < 1:
            raise ValueError(f"num_heads must be at least 1, got {num_heads}")
        if head_dim is None and dim % num_heads != 0:
            raise ValueError(
                f"width {dim} is not divisible by {num_heads} heads: choose a head count that "
                f"divides the width (e.g. {[h for h in range(1, 17) if dim % h == 0]})"
            )
        self.num_heads = num_heads
        self.head_dim = head_dim or dim // num_heads
        inner = num_heads * self.head_dim
        self.is_cross = context_dim is not None
        if self.is_cross:
            self.q = nn.Linear(dim, inner, bias=qkv_bias)
            self.k = nn.Linear(context_dim, inner, bias=qkv_bias)
            self.v = nn.Linear(context_dim, inner, bias=qkv_bias)
        else:
            self.qkv = nn.Linear(dim, 3 * inner, bias=qkv_bias)
        self.proj = nn.Linear(inner, dim, bias=proj_bias)
        self.use_sdpa = True

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        *,
        rotary=None,
        cache=None,
        return_weights: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if x.ndim != 3:
            raise ValueError(f"attention expects tokens of shape (batch, length, width), got {tuple(x.shape)}")
        B, L, _ = x.shape
        if self.is_cross:
            if context is None:
                raise ValueError("this is a cross-attention layer: pass the context (keys and values) to attend to")
            if context.shape[-1] != self.k.in_features:
                raise ValueError(
                    f"the context has width {context.shape[-1]}, this layer expects {self.k.in_features}: "
                    "build it with context_dim equal to the width of what it attends to"
                )
            q = split_heads(self.q(x), self.num_heads)  # (B, h, Lq, d)
            k = split_heads(self.k(context), self.num_heads)  # (B, h, Lk, d)
            v = split_heads(self.v(context), self.num_heads)
        else:
            if context is not None:
                raise ValueError("this is a self-attention layer: build it with context_dim=... to attend to a context")
            q, k, v = self.qkv_heads(x)
        if rotary is not None:
            q, k = rotary(q, k)
        if cache is not None:
            k, v = cache.update(k, v)  # (B, h, past + L, d)
        out, weights = attention(q, k, v, mask, use_sdpa=self.use_sdpa and not return_weights)
        return self.proj(merge_heads(out)), weights  # (B, h, Lq, d) -> (B, Lq, h*d) -> (B, Lq, dim)


    def qkv_heads(self, x: torch.Tensor) -> torch.Tensor:
        """Self-attention's fused projection, split into heads: x (B, L, dim) -> (3, B, heads, L, d),
        unpacked as q, k, v. One matmul for all three; subclasses change the bias (Swin V2)."""
        B, L, _ = x.shape
        qkv = self.qkv(x).reshape(B, L, 3, self.num_heads, self.head_dim)
        return qkv.permute(2, 0, 3, 1, 4)  # (B, L, 3, h, d) -> (3, B, h, L, d)


def use_explicit_attention(model: nn.Module, explicit: bool = True) -> nn.Module:
    """Switch every attention module of `model` to the explicit softmax (or back to SDPA)."""
    for m in model.modules():
        if hasattr(m, "use_sdpa"):
            m.use_sdpa = not explicit
    return model


# ----------------------------------------------------------------------------------------------
# Feed-forward, stochastic depth, layer scale, the pre-norm block
# ----------------------------------------------------------------------------------------------
class Mlp(nn.Module):
    """Two linear layers with a GELU between them (the transformer's feed-forward network)."""

    def __init__(self, dim: int, hidden_dim: int, out_dim: int | None = None, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, out_dim or dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth (Huang et al., 2016): drop the whole residual branch per sample.

    Survivors are scaled by 1/(1-p) so the expected value is unchanged.
    """
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - p)
    return x * keep / (1 - p)


class DropPath(nn.Module):
    def __init__(self, p: float = 0.0):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"the drop-path rate is a probability in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class LayerScale(nn.Module):
    """Per-channel learnable scale of a residual branch (Touvron et al., CaiT, 2021)."""

    def __init__(self, dim: int, init: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block: x + Attn(LN(x)), then x + MLP(LN(x)) (ViT eq. 2-3)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_dim: int,
        qkv_bias: bool = True,
        eps: float = 1e-6,
        layer_scale: float | None = None,
        drop_path: float = 0.0,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias)
        self.ls1 = LayerScale(dim, layer_scale) if layer_scale is not None else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, mlp_dim, dropout=dropout)
        self.ls2 = LayerScale(dim, layer_scale) if layer_scale is not None else nn.Identity()
        self.drop_path = DropPath(drop_path)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, return_weights: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        a, weights = self.attn(self.norm1(x), mask=mask, return_weights=return_weights)
        x = x + self.drop_path(self.ls1(a))
        x = x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))
        return (x, weights) if return_weights else x


# ----------------------------------------------------------------------------------------------
# Patch embedding (ViT eq. 1; also Swin's first layer)
# ----------------------------------------------------------------------------------------------
def as_pair(x: int | tuple[int, int]) -> tuple[int, int]:
    """An image or patch size as (height, width): 16 -> (16, 16)."""
    return (x, x) if isinstance(x, int) else (int(x[0]), int(x[1]))


def check_positive(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_image_size(height: int, width: int, patch: tuple[int, int]) -> None:
    """A ValueError that says how to fix an image whose sides the patch does not divide."""
    for p in patch:
        check_positive("patch_size", p)
    for name, size, p in (("height", height, patch[0]), ("width", width, patch[1])):
        if size % p != 0:
            fixed = (size // p + 1) * p
            raise ValueError(
                f"image {name} {size} is not divisible by the patch size {p}: "
                f"resize or pad the images to {fixed} (or {size - size % p}), or pick a patch size that divides {size}"
            )


class PatchEmbed(nn.Module):
    """Patch embedding as a strided convolution: kernel = stride = patch size.

    This is the same linear map as `patchify` followed by nn.Linear (see `as_linear`), computed
    in one fused op.
    """

    def __init__(self, patch_size: int | tuple[int, int], in_chans: int, dim: int):
        super().__init__()
        self.patch_size = as_pair(patch_size)
        self.in_chans = in_chans
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=self.patch_size, stride=self.patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != self.in_chans:
            raise ValueError(
                f"expected images of shape (B, {self.in_chans}, H, W), got {tuple(images.shape)}"
                + (" (channels-last? use images.permute(0, 3, 1, 2))" if images.ndim == 4 and images.shape[-1] == self.in_chans else "")
            )
        if not images.is_floating_point():
            raise TypeError(
                f"images must be floating point, got {images.dtype}: convert uint8 pixels with images.float() / 255"
            )
        check_image_size(images.shape[2], images.shape[3], self.patch_size)
        return self.proj(images).flatten(2).transpose(1, 2)  # (B, D, gh, gw) -> (B, N, D)

    def as_linear(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The conv weight as a (D, p*p*C) matrix matching `patchify`'s (row, col, channel) order."""
        w = self.proj.weight  # (D, C, ph, pw)
        return w.permute(0, 2, 3, 1).reshape(w.shape[0], -1), self.proj.bias


# ----------------------------------------------------------------------------------------------
# Position embeddings
# ----------------------------------------------------------------------------------------------
def sincos_1d(positions: torch.Tensor, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Sine-cosine embedding of 1D positions (Vaswani et al., 2017): (L,) -> (L, dim)."""
    if dim % 2 != 0:
        raise ValueError(f"sin-cos embedding needs an even width, got {dim}")
    omega = 1.0 / temperature ** (torch.arange(dim // 2, dtype=torch.float64) / (dim // 2))
    angles = positions.double()[:, None] * omega[None, :]  # (L, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def sincos_2d_pos_embed(grid: tuple[int, int], dim: int) -> torch.Tensor:
    """Fixed 2D sin-cos position embedding (as in MAE): half the channels encode the row,
    half the column. Returns (grid_h * grid_w, dim), row-major like the patch sequence."""
    if dim % 4 != 0:
        raise ValueError(f"2D sin-cos embedding needs a width divisible by 4, got {dim}")
    gh, gw = grid
    rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    emb_w = sincos_1d(cols.flatten(), dim // 2)  # MAE puts the column (x) half first
    emb_h = sincos_1d(rows.flatten(), dim // 2)
    return torch.cat([emb_w, emb_h], dim=1)


def resample_pos_embed(
    pos_embed: torch.Tensor,
    new_grid: tuple[int, int],
    old_grid: tuple[int, int] | None = None,
    num_prefix_tokens: int = 1,
    antialias: bool = False,
) -> torch.Tensor:
    """Resample a learned position table to a new patch grid (ViT section 3.2).

    pos_embed: (1, P + h*w, D) with P prefix tokens (CLS, distillation) first; they carry no
    grid position and are kept as they are. The grid part is reshaped to (D, h, w), resized by
    bicubic interpolation in float32 and flattened back row-major. `old_grid` defaults to a square
    grid; both grids may be non-square, and a grid with the same token count but another shape
    is resampled too. Returns (1, P + new_h*new_w, D) in the input's dtype.
    """
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed must have shape (1, tokens, dim), got {tuple(pos_embed.shape)}")
    n_grid = pos_embed.shape[1] - num_prefix_tokens
    if old_grid is None:
        side = math.isqrt(n_grid)
        if side * side != n_grid:
            raise ValueError(
                f"{n_grid} grid tokens do not form a square grid: pass old_grid=(rows, cols)"
            )
        old_grid = (side, side)
    if old_grid[0] * old_grid[1] != n_grid:
        raise ValueError(f"old_grid {old_grid} has {old_grid[0] * old_grid[1]} cells, table has {n_grid}")
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    D = grid.shape[-1]
    grid = grid.reshape(1, old_grid[0], old_grid[1], D).permute(0, 3, 1, 2)  # (1, D, h, w)
    grid = F.interpolate(
        grid.float(), size=tuple(new_grid), mode="bicubic", align_corners=False, antialias=antialias
    ).to(pos_embed.dtype)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], D)  # (1, h'*w', D)
    return torch.cat([prefix, grid], dim=1)


# ----------------------------------------------------------------------------------------------
# Weight decay and weight loading
# ----------------------------------------------------------------------------------------------
def param_groups(model: nn.Module, weight_decay: float, skip: Iterable[str] = ()) -> list[dict]:
    """Two AdamW groups: decayed weight matrices, and undecayed biases, norms and the names in
    `skip` (position tables, CLS/register tokens, relative-position bias tables, ...).

    A plain "decay every tensor with dim >= 2" rule would decay the CLS token (1, 1, D) and the
    position table (1, N, D); models list those in `no_weight_decay()`.
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    skip = set(skip) | set(getattr(model, "no_weight_decay", lambda: set())())
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or name in skip or name.endswith(".bias"):
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def load_state_dict_checked(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str = "") -> None:
    """`load_state_dict(strict=True)` with one error that names every missing, unexpected and
    mis-shaped tensor, and says what usually causes it."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state_dict))
        if own[k].shape != state_dict[k].shape
    ]
    if missing or unexpected or shapes:
        lines = [f"the weights{' from ' + source if source else ''} do not fit this model:"]
        if missing:
            lines.append(f"  missing ({len(missing)}): {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            lines.append(f"  unexpected ({len(unexpected)}): {', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}")
        if shapes:
            lines.append("  wrong shape: " + "; ".join(shapes[:8]))
        lines.append(
            "  Build the model from the checkpoint's own config (use from_hf), or check that the "
            "checkpoint belongs to this model family."
        )
        raise ValueError("\n".join(lines))
    model.load_state_dict(state_dict, strict=True)


# ----------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def greedy_decode(
    next_logits: Callable[[torch.Tensor], torch.Tensor],
    embed: Callable[[torch.Tensor], torch.Tensor],
    prompt: torch.Tensor,
    max_new_tokens: int,
    eos_id: int | None = None,
    incremental: bool = False,
) -> torch.Tensor:
    """Greedy decoding for any decoder-only language model: the new ids (B, <= max_new_tokens).

    next_logits(embeddings (B, T, D)) -> logits of the last position (B, V); embed(ids (B, 1)) ->
    (B, 1, D); prompt: the prompt's embeddings (B, T, D) (text, or a soft prompt then text).
    `incremental=True` feeds only the newest token at each step (the model keeps a KV cache);
    otherwise the whole sequence is fed again. Stops when every row has produced `eos_id`; rows
    that finished early are filled with `eos_id`.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    step_input, new = prompt, []
    done = torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
    for _ in range(max_new_tokens):
        next_id = next_logits(step_input).argmax(-1)  # (B,)
        if eos_id is not None:
            next_id = torch.where(done, torch.full_like(next_id, eos_id), next_id)
            done |= next_id == eos_id
        new.append(next_id)
        next_embed = embed(next_id[:, None])  # (B, 1, D)
        step_input = next_embed if incremental else torch.cat([step_input, next_embed], dim=1)
        if eos_id is not None and bool(done.all()):
            break
    return torch.stack(new, dim=1)
