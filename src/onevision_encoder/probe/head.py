"""The attentive probe's head, as published (REFERENCE §5): one learned query cross-attends over the frozen
encoder's tokens, `x + MLP(RMSNorm(x))`, LayerNorm, Linear.

Other encoders' tokens get the published sin/cos temporal embedding of their frame ordinal first (our
model's tokens already carry time through their RoPE positions). `standardize` (an option, off by
default) divides out per-dimension token statistics taken from the training set: a randomly initialised
encoder's dimensions differ so much in scale that the head cannot learn from them otherwise.
"""

from __future__ import annotations

import torch
from torch import nn

CLASSIFIER_INIT_SCALE = 1e-3


def temporal_embedding(times: torch.Tensor, dim: int) -> torch.Tensor:
    """`[..., dim]` sin/cos embedding of frame ordinals `times`: angle(t, i) = t·10000^(-2i/dim) for
    i < dim/2, interleaved as [sin, cos, sin, cos, ...]."""
    i = torch.arange(dim // 2, dtype=torch.float32, device=times.device)
    angles = times.float().unsqueeze(-1) * 10000 ** (-2 * i / dim)
    return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(-2)


class AttentiveProbe(nn.Module):
    """tokens `[B, M, D]` (+ frame ordinals `[B, M]`, real-token mask `[B, M]`) -> logits `[B, classes]`."""

    def __init__(self, dim: int, num_classes: int, temporal: bool = False, eps: float = 1e-6,
                 token_mean: torch.Tensor | None = None, token_std: torch.Tensor | None = None):
        super().__init__()
        self.temporal = temporal
        self.standardize = token_mean is not None
        self.query = nn.Parameter(torch.randn(1, 1, dim))  # std 1, as published
        self.attention = nn.MultiheadAttention(dim, max(1, dim // 64), batch_first=True)
        self.norm = nn.RMSNorm(dim, eps=eps)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.out_norm = nn.LayerNorm(dim)
        self.classifier = nn.Linear(dim, num_classes)
        # Per-dimension token statistics (identity unless standardising); saved with the head's weights.
        self.register_buffer("token_mean", torch.zeros(dim) if token_mean is None else token_mean.float().clone())
        self.register_buffer("token_std", torch.ones(dim) if token_std is None else token_std.float().clone())
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        with torch.no_grad():
            self.classifier.weight.mul_(CLASSIFIER_INIT_SCALE)
            self.classifier.bias.mul_(CLASSIFIER_INIT_SCALE)

    def forward(self, tokens: torch.Tensor, times: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = (tokens - self.token_mean) / self.token_std if self.standardize else tokens
        if self.temporal:
            x = x + temporal_embedding(times, x.shape[-1]).to(x.dtype)
        pooled = self.attend(x, mask)
        pooled = pooled + self.mlp(self.norm(pooled))
        return self.classifier(self.out_norm(pooled))

    def attend(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """`self.attention(query, x, x)` for the one query, `[B, D]`, without projecting every token.

        With a single query, head h's logits q_h·(W_k,h x_i + b_k,h) are (W_k,hᵀ q_h)·x_i plus a constant that
        softmax ignores, and its output W_v,h (Σ a_i x_i) + b_v,h; so the tokens are only read twice (logits,
        weighted sum) instead of projected to keys and values: about D/(2·heads) times less work. Same result
        as `nn.MultiheadAttention` (tested)."""
        mha, d = self.attention, x.shape[-1]
        heads, head_dim = mha.num_heads, d // mha.num_heads
        w_q, w_k, w_v = mha.in_proj_weight.chunk(3)
        b_q, _, b_v = mha.in_proj_bias.chunk(3)
        q = (self.query[0, 0] @ w_q.T + b_q).view(heads, head_dim)  # the query's projection, per head
        u = torch.einsum("hj,hjd->hd", q, w_k.view(heads, head_dim, d)) / head_dim**0.5  # [heads, D]
        logits = torch.einsum("bmd,hd->bhm", x, u.to(x.dtype))
        logits = logits.masked_fill(~mask.bool()[:, None, :], float("-inf"))
        mixed = torch.einsum("bhm,bmd->bhd", logits.softmax(-1), x)  # per head, the weighted mean token
        values = torch.einsum("bhd,hjd->bhj", mixed, w_v.view(heads, head_dim, d).to(x.dtype)).flatten(1) + b_v
        return mha.out_proj(values)
