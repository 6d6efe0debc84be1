"""The OneVision Encoder: a pre-norm ViT with 3D (t, h, w) rotary positions and an attention-pooling head.

Loads the published checkpoints unchanged (same module and parameter names). Inputs come in three forms,
all ending up as a sequence of patch tokens with one (t, row, col) position each:

- dense images `[B, C, H, W]` (t = 0) and videos `[B, C, T, H, W]`;
- the published `visible_indices [B, N]` (flat indices into the t·h·w grid) on top of a dense video;
- patch lists `[B, N, C*p*p]` with `patch_positions [B, N, 3]` and an optional `attention_mask [B, N]`,
  so clips with different token counts share one padded batch.

Attention goes through transformers' attention interface (`eager`, `sdpa`, `flash_attention_2`).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .configuration import OneVisionEncoderConfig
from .processing import grid_positions, temporal_slots

try:  # transformers >= 4.52; keeps gradient checkpointing on the usual switch
    from transformers.modeling_layers import GradientCheckpointingLayer
except ImportError:  # pragma: no cover
    GradientCheckpointingLayer = nn.Module


# ----------------------------------------------------------------------------------------------------
# 3D rotary position embedding, 4:6:6
# ----------------------------------------------------------------------------------------------------


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float) -> torch.Tensor:
    """Rotation angles `[..., head_dim]` for (t, h, w) positions `[..., 3]`.

    Half of head_dim carries frequencies, split t:h:w = 4:6:6 (8:12:12 for head_dim 64), each axis with
    its own geometric ladder `theta^(-i/n)`. The half is repeated (`cat(f, f)`), and the rotation pairs
    channels (2i, 2i+1): the two channels of a pair get different angles. That is not a textbook RoPE, but
    it is what the published weights were trained with. Computed on the fly in float32 (never a buffer), so
    meta-device initialisation cannot leave it uninitialised.
    """
    half = head_dim // 2
    n_t, n_hw = half // 4, half * 3 // 8
    pos = positions.float()

    def ladder(n: int) -> torch.Tensor:
        return theta ** (-torch.arange(n, dtype=torch.float32, device=pos.device) / n)

    angles = torch.cat(
        [pos[..., 0:1] * ladder(n_t), pos[..., 1:2] * ladder(n_hw), pos[..., 2:3] * ladder(n_hw)], dim=-1
    )
    return torch.cat([angles, angles], dim=-1)


def rope_cos_sin(angles: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos(F) and a sign-folded sin(F) for `apply_rope`, computed once per forward in float32."""
    sign = torch.tensor([-1.0, 1.0], device=angles.device).repeat(angles.shape[-1] // 2)
    return angles.cos().to(dtype), (angles.sin() * sign).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x·cos(F) + rot(x)·sin(F) with rot(x0, x1, x2, x3, ...) = (-x1, x0, -x3, x2, ...).

    rot(x) is the pair swap (x1, x0, x3, x2, ...) times the signs (-1, +1, ...), which `rope_cos_sin` has
    already folded into the sine: one flip and one fused multiply-add instead of a negate and a stack.
    """
    swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    return (x * cos).addcmul_(swapped, signed_sin)  # in place: one large temporary fewer


# ----------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------


def make_norm(config: OneVisionEncoderConfig) -> nn.Module:
    if config.layer_norm_type == "rms_norm":
        return nn.RMSNorm(config.hidden_size, eps=config.layer_norm_eps)
    return nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class OneVisionEncoderMLP(nn.Module):
    def __init__(self, config: OneVisionEncoderConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q kᵀ · scale + mask) v, with q, k, v `[B, heads, N, head_dim]`; returns `[B, N, heads, head_dim]`."""
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


class OneVisionEncoderAttention(nn.Module):
    """Multi-head self-attention with 3D RoPE on queries and keys."""

    def __init__(self, config: OneVisionEncoderConfig):
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = False
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(
        self,
        hidden_states: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        b, n, c = hidden_states.shape
        shape = (b, n, self.num_heads, self.head_dim)
        q = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)

        # Looked up at every call, the way transformers' own models do, so that set_attn_implementation()
        # after loading switches the backend (transformers recognises this pattern by reading the source).
        attention: Callable = eager_attention_forward  # the only one that materialises the weights
        if not output_attentions:
            if hasattr(ALL_ATTENTION_FUNCTIONS, "get_interface"):  # transformers 5
                attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, attention)
            elif self.config._attn_implementation != "eager":  # transformers 4.x
                attention = ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]
        mask = None
        if attention_mask is not None:  # (additive [B,1,1,N], 0/1 [B,N]); flash-attn unpads with the latter
            additive, keep = attention_mask
            flash = "flash" in self.config._attn_implementation and attention is not eager_attention_forward
            mask = keep if flash else additive
        out, weights = attention(
            self,
            q,
            k,
            v,
            mask,
            dropout=self.config.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            is_causal=False,
        )
        return self.out_proj(out.reshape(b, n, c)), weights


class OneVisionEncoderLayer(GradientCheckpointingLayer):
    """Pre-norm block: x + attn(norm1(x)), then x + mlp(norm2(x)). No layer scale."""

    def __init__(self, config: OneVisionEncoderConfig):
        super().__init__()
        self.layer_norm1 = make_norm(config)
        self.self_attn = OneVisionEncoderAttention(config)
        self.layer_norm2 = make_norm(config)
        self.mlp = OneVisionEncoderMLP(config)

    def forward(self, hidden_states, rope, attention_mask=None, output_attentions=False):
        attn_out, weights = self.self_attn(self.layer_norm1(hidden_states), rope, attention_mask, output_attentions)
        hidden_states = hidden_states + attn_out
        hidden_states = hidden_states + self.mlp(self.layer_norm2(hidden_states))
        return hidden_states, weights


class OneVisionEncoderEncoder(nn.Module):
    def __init__(self, config: OneVisionEncoderConfig):
        super().__init__()
        self.layers = nn.ModuleList(OneVisionEncoderLayer(config) for _ in range(config.num_hidden_layers))


class OneVisionEncoderEmbeddings(nn.Module):
    """Patch embedding: a bias-free Conv2d applied frame by frame (or its matrix form on patch lists)."""

    def __init__(self, config: OneVisionEncoderConfig):
        super().__init__()
        self.patch_size = config.patch_size
        self.patch_embedding = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size, bias=False
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`[B, N, C*p*p]` patch list, `[B, C, H, W]` or `[B, C, T, H, W]` -> tokens `[B, N, hidden]`
        (frames one after another, raster order within a frame)."""
        weight = self.patch_embedding.weight
        pixel_values = pixel_values.to(weight.dtype)
        if pixel_values.ndim == 3:
            return F.linear(pixel_values, weight.flatten(1))
        if pixel_values.ndim == 4:
            pixel_values = pixel_values.unsqueeze(2)
        b, c, t, h, w = pixel_values.shape
        frames = pixel_values.transpose(1, 2).reshape(b * t, c, h, w)
        tokens = self.patch_embedding(frames).flatten(2).transpose(1, 2)  # [B*T, h*w, hidden]
        return tokens.reshape(b, -1, tokens.shape[-1])


class OneVisionEncoderPoolingHead(nn.Module):
    """Attention pooling with one learned probe: a = MHA(probe, x, x); out = a + MLP(RMSNorm(a))."""

    def __init__(self, config: OneVisionEncoderConfig):
        super().__init__()
        self.probe = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.attention = nn.MultiheadAttention(config.hidden_size, config.num_attention_heads, batch_first=True)
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = OneVisionEncoderMLP(config)

    def forward(self, hidden_states: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        probe = self.probe.expand(hidden_states.shape[0], -1, -1)
        pooled, _ = self.attention(probe, hidden_states, hidden_states, key_padding_mask=padding, need_weights=False)
        pooled = pooled + self.mlp(self.norm(pooled))
        return pooled[:, 0]


# ----------------------------------------------------------------------------------------------------
# Input handling: every input form becomes (tokens, positions, mask)
# ----------------------------------------------------------------------------------------------------


def _check_batch(name: str, tensor: torch.Tensor, batch: int) -> None:
    if tensor.shape[0] != batch:
        raise ValueError(f"{name} has batch size {tensor.shape[0]} but pixel_values has {batch}")


def _shape_or_type(value) -> tuple | type:
    """What to name in an error about a wrongly shaped argument: its shape, or its type if not a tensor."""
    return tuple(value.shape) if isinstance(value, torch.Tensor) else type(value)


def _check_integer(name: str, tensor: torch.Tensor) -> None:
    if tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got {tensor.dtype}")


class OneVisionEncoderPreTrainedModel(PreTrainedModel):
    config_class = OneVisionEncoderConfig
    config: OneVisionEncoderConfig
    base_model_prefix = "onevision_encoder"
    main_input_name = "pixel_values"
    input_modalities = ("image", "video")
    supports_gradient_checkpointing = True
    _no_split_modules = ["OneVisionEncoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flash_attn_2 = True  # the name transformers 4.x reads
    _supports_attention_backend = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # Under transformers 5 these torch.nn.init calls are guarded and skip tensors loaded from a checkpoint.
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
            nn.init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.MultiheadAttention):
            nn.init.normal_(module.in_proj_weight, mean=0.0, std=std)
            nn.init.zeros_(module.in_proj_bias)
        elif isinstance(module, OneVisionEncoderPoolingHead):
            nn.init.normal_(module.probe, mean=0.0, std=std)


class OneVisionEncoderModel(OneVisionEncoderPreTrainedModel):
    """The OneVision Encoder. See the module docstring for the input forms."""

    def __init__(self, config: OneVisionEncoderConfig):
        super().__init__(config)
        self.embeddings = OneVisionEncoderEmbeddings(config)
        self.layernorm_pre = make_norm(config)
        self.encoder = OneVisionEncoderEncoder(config)
        self.layernorm_post = make_norm(config) if config.use_head else None
        self.head = OneVisionEncoderPoolingHead(config) if config.use_head else None
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> OneVisionEncoderEmbeddings:
        """The patch embedding, as a module whose output is the tokens of every input form.

        Not its Conv2d alone: patch lists use the Conv2d's weight as a matrix without calling the module, so a
        hook there (`enable_input_require_grads`, which adapter training under reentrant gradient checkpointing
        relies on) would never fire for them.
        """
        return self.embeddings

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.embeddings = value

    def _tokens_and_positions(
        self,
        pixel_values: torch.Tensor,
        visible_indices: torch.Tensor | None,
        patch_positions: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Validate the inputs and return layernorm_pre'd tokens `[B, N, C]` with positions `[B, N, 3]`."""
        cfg, p = self.config, self.config.patch_size
        if not isinstance(pixel_values, torch.Tensor):
            raise ValueError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}")
        if pixel_values.ndim not in (3, 4, 5):
            raise ValueError(
                "pixel_values must be [B, C, H, W] (image), [B, C, T, H, W] (video) or [B, N, C*p*p] "
                f"(patch list), got shape {tuple(pixel_values.shape)}"
            )
        b = pixel_values.shape[0]
        if pixel_values.ndim == 3 and pixel_values.shape[1] == 0:
            raise ValueError("the patch list is empty (pixel_values [B, 0, C*p*p]): nothing to encode")
        if patch_positions is not None:
            if not isinstance(patch_positions, torch.Tensor) or patch_positions.ndim != 3 or patch_positions.shape[-1] != 3:
                got = _shape_or_type(patch_positions)
                raise ValueError(f"patch_positions must be [B, N, 3] (t, row, col), got {got}")
            _check_batch("patch_positions", patch_positions, b)
        if visible_indices is not None:
            if not isinstance(visible_indices, torch.Tensor) or visible_indices.ndim != 2:
                raise ValueError(f"visible_indices must be [B, N], got {_shape_or_type(visible_indices)}")
            _check_integer("visible_indices", visible_indices)
            if visible_indices.shape[1] == 0:
                raise ValueError("visible_indices is empty ([B, 0]): nothing to encode")
            _check_batch("visible_indices", visible_indices, b)

        if pixel_values.ndim == 3:  # patch list
            patch_dim = cfg.num_channels * p * p
            if pixel_values.shape[-1] != patch_dim:
                raise ValueError(
                    f"a patch list needs pixel_values [B, N, {patch_dim}] (C*p*p with C={cfg.num_channels}, "
                    f"p={p}), got last dimension {pixel_values.shape[-1]} (for a single image [C, H, W], add "
                    "the batch dimension)"
                )
            if patch_positions is None:
                raise ValueError("a patch list (pixel_values [B, N, C*p*p]) needs patch_positions [B, N, 3]")
            if visible_indices is not None:
                raise ValueError("visible_indices applies to dense videos; give a patch list patch_positions only")
            if patch_positions.shape[1] != pixel_values.shape[1]:
                raise ValueError(
                    f"patch_positions has {patch_positions.shape[1]} positions for {pixel_values.shape[1]} patches"
                )
            return self.layernorm_pre(self.embeddings(pixel_values)), patch_positions

        c, h, w = pixel_values.shape[1], pixel_values.shape[-2], pixel_values.shape[-1]
        if c != cfg.num_channels:
            raise ValueError(f"pixel_values has {c} channels, the model expects {cfg.num_channels} (dimension 1)")
        if h % p or w % p or h == 0 or w == 0:
            raise ValueError(f"image height {h} and width {w} must be positive multiples of the patch size {p}")
        frames = pixel_values.shape[2] if pixel_values.ndim == 5 else 1
        rows, cols = h // p, w // p
        grid = rows * cols
        tokens = self.layernorm_pre(self.embeddings(pixel_values))  # before any gather, as published
        total = tokens.shape[1]
        device = tokens.device

        if visible_indices is not None:
            n = visible_indices.shape[1]
            gather = n != total
            # dense meaning: the indices only place the tokens on the (up to) 64-slot grid;
            # gather meaning: they pick tokens out of the input frames, whose index is their time slot.
            limit = total if gather else max(frames, cfg.rope_temporal_size) * grid
            if not torch.compiler.is_compiling():  # reads values: checked in eager mode, not in a traced graph
                lo, hi = int(visible_indices.min()), int(visible_indices.max())
                if lo < 0 or hi >= limit:
                    slots = max(frames, cfg.rope_temporal_size)
                    meaning = "input tokens" if gather else f"the {slots}x{rows}x{cols} grid"
                    raise ValueError(
                        f"visible_indices must lie in [0, {limit}) ({meaning}), got values in [{lo}, {hi}]"
                    )
            visible_indices = visible_indices.to(device)
            if gather:
                tokens = tokens.gather(1, visible_indices.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        if patch_positions is not None:
            if patch_positions.shape[1] != tokens.shape[1]:
                raise ValueError(
                    f"patch_positions has {patch_positions.shape[1]} positions for {tokens.shape[1]} tokens"
                )
            return tokens, patch_positions
        if visible_indices is not None:
            positions = torch.stack(
                [visible_indices // grid, visible_indices % grid // cols, visible_indices % cols], dim=-1
            )
            return tokens, positions
        # No positions given: frames of a video are spread over the temporal slots like uniformly sampled
        # frames (T=16 -> t = 0, 4, ..., 63; T=64 -> 0..63); beyond the slot count, t is the frame index.
        t_slots = temporal_slots(frames, cfg.rope_temporal_size) if frames <= cfg.rope_temporal_size else torch.arange(frames)
        return tokens, grid_positions(t_slots, rows, cols).to(device).unsqueeze(0).expand(b, -1, -1)

    def forward(
        self,
        pixel_values: torch.Tensor,
        visible_indices: torch.Tensor | None = None,
        patch_positions: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling | tuple:
        r"""
        Args:
            pixel_values: normalised `[B, C, H, W]` image, `[B, C, T, H, W]` video, or a patch list
                `[B, N, C*p*p]` (each patch flattened in (C, p, p) order).
            visible_indices: `[B, N]` flat indices `t*h*w + row*w + col` into the (64-slot) video grid. If N
                equals the number of input tokens they only give the tokens' positions; otherwise the indexed
                tokens are gathered from the input video (whose frame index is then the time slot).
            patch_positions: `[B, N, 3]` explicit (t, row, col) per token; takes priority over the positions
                `visible_indices` would give (the indices still gather, as published).
            attention_mask: `[B, N]`, 1 for real tokens and 0 for padding. Padding never changes the outputs
                of real tokens or the pooled output; outputs at padded rows are meaningless.
        """
        cfg = self.config
        output_attentions = cfg.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = cfg.output_hidden_states if output_hidden_states is None else output_hidden_states
        return_dict = cfg.return_dict if return_dict is None else return_dict

        hidden_states, positions = self._tokens_and_positions(pixel_values, visible_indices, patch_positions)
        b, n, _ = hidden_states.shape
        padding, masks = self._attention_masks(attention_mask, b, n, hidden_states.dtype, hidden_states.device)

        angles = rope_angles(positions.to(hidden_states.device), cfg.hidden_size // cfg.num_attention_heads, cfg.rope_theta)
        rope = rope_cos_sin(angles.unsqueeze(1), hidden_states.dtype)  # [B, 1, N, head_dim]: broadcast over heads

        all_hidden = (hidden_states,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for layer in self.encoder.layers:
            hidden_states, weights = layer(hidden_states, rope, masks, output_attentions)
            if output_hidden_states:
                all_hidden += (hidden_states,)
            if output_attentions:
                all_attentions += (weights,)

        last_hidden_state = self.layernorm_post(hidden_states) if self.layernorm_post is not None else hidden_states
        pooled = self.head(last_hidden_state, padding) if self.head is not None else None

        if not return_dict:
            return tuple(v for v in (last_hidden_state, pooled, all_hidden, all_attentions) if v is not None)
        return BaseModelOutputWithPooling(
            last_hidden_state=last_hidden_state,
            pooler_output=pooled,
            hidden_states=all_hidden,
            attentions=all_attentions,
        )

    @staticmethod
    def _attention_masks(attention_mask, b, n, dtype, device):
        """From a `[B, N]` 0/1 mask: the head's key padding mask (True = ignore) and the encoder's masks as
        `(additive [B, 1, 1, N] for eager/sdpa, [B, N] for flash-attn's unpadded varlen path)`."""
        if attention_mask is None:
            return None, None
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != (b, n):
            got = _shape_or_type(attention_mask)
            raise ValueError(f"attention_mask must be [B, N] = ({b}, {n}) like the tokens, got {got}")
        keep = attention_mask.to(device=device) != 0
        # Both checks read the mask's values, which torch.compile(fullgraph=True) and torch.export cannot branch
        # on: eager mode validates and skips an all-ones mask; a traced graph always applies the mask (same
        # outputs), and an all-zero row there gives meaningless outputs for that row only.
        if not torch.compiler.is_compiling():
            if not bool(keep.any(dim=1).all()):
                raise ValueError("attention_mask has a row with no real token (all zeros)")
            if bool(keep.all()):
                return None, None  # nothing padded: take the unmasked fast path
        additive = torch.zeros(b, 1, 1, n, dtype=dtype, device=device)
        additive.masked_fill_(~keep[:, None, None, :], torch.finfo(dtype).min)
        return ~keep, (additive, keep.to(torch.int32))
