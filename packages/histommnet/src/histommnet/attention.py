"""MMNet's attention modules.

Shapes: ``b`` batch, ``m`` magnifications (ordered low to high: 40X, 100X, 200X, 400X),
``c`` feature channels, ``h w`` feature-map size, ``d`` token width, ``s`` pooling scales.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from einops import rearrange
from timm.layers.cbam import ChannelAttn
from torch import nn


class ClinicalChannelAttention(ChannelAttn):
    """Channel attention from average- and max-pooled descriptors through one shared MLP.

    This is CBAM's channel gate; timm's ``ChannelAttn`` implements exactly it, so it is reused
    here under the name the MMNet description gives it. ``[b, c, h, w] -> [b, c, h, w]``.
    """

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__(channels, rd_channels=max(8, channels // reduction))


class MultiScaleAttentionPool(nn.Module):
    """Spatial attention pooling at several receptive fields, ``[b, c, h, w] -> [b, c]``.

    Each scale ``k`` scores every position with a ``k x k`` convolution, softmax-normalises the
    scores over ``h w`` and pools the features with them; the scales are mixed by learned
    softmax weights. (No library offers this pooling, hence written here.)
    """

    def __init__(
        self, channels: int, scales: Sequence[int] = (1, 3, 5), reduction: int = 8
    ) -> None:
        super().__init__()
        hidden = max(8, channels // reduction)
        self.scorers = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(channels, hidden, k, padding=k // 2, bias=False),
                nn.BatchNorm2d(hidden),
                nn.GELU(),
                nn.Conv2d(hidden, 1, 1),
            )
            for k in scales
        )
        self.scale_logits = nn.Parameter(torch.zeros(len(scales)))

    def attention_maps(self, x: torch.Tensor) -> torch.Tensor:
        """Per-scale spatial weights ``[b, s, h, w]``, each summing to one over ``h w``."""
        logits = torch.cat([scorer(x) for scorer in self.scorers], dim=1)
        b, s, h, w = logits.shape
        return logits.flatten(2).softmax(-1).view(b, s, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = self.attention_maps(x)
        pooled = torch.einsum("bshw,bchw->bsc", maps, x)
        return torch.einsum("s,bsc->bc", self.scale_logits.softmax(0), pooled)


class HierarchicalMagnificationAttention(nn.Module):
    """One pre-norm transformer layer over the magnification tokens, ``[b, m, d] -> [b, m, d]``.

    Learned magnification embeddings mark which token is which; a causal mask lets each
    magnification attend only to itself and the lower ones, so 400X reads the 40X/100X/200X
    context while 40X sees only itself.
    """

    def __init__(
        self, dim: int, num_magnifications: int = 4, num_heads: int = 4, dropout: float = 0.1
    ) -> None:
        super().__init__()
        self.mag_embed = nn.Parameter(torch.zeros(num_magnifications, dim))
        nn.init.trunc_normal_(self.mag_embed, std=0.02)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(
            nn.Linear(dim, 2 * dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(2 * dim, dim),
            nn.Dropout(dropout),
        )
        mask = torch.triu(
            torch.ones(num_magnifications, num_magnifications, dtype=torch.bool), diagonal=1
        )
        self.register_buffer("mask", mask, persistent=False)  # True: may not attend (a higher mag)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens ``[b, m, d]`` -> (tokens ``[b, m, d]``, attention weights ``[b, m, m]``)."""
        x = tokens + self.mag_embed
        h = self.norm1(x)
        attended, weights = self.attn(h, h, h, attn_mask=self.mask, need_weights=True)
        x = x + attended
        x = x + self.ffn(self.norm2(x))
        return x, weights


class ClinicalCrossMagFusion(nn.Module):
    """Fuse magnification tokens ``[b, m, d]`` into one vector ``[b, d]``.

    Two views are blended by a learned weight ``g = sigmoid(blend)``: an attention-weighted
    global view (softmax scores over magnifications) and a concatenation path (all tokens
    side by side through a linear layer).
    """

    def __init__(self, dim: int, num_magnifications: int = 4, dropout: float = 0.1) -> None:
        super().__init__()
        self.score = nn.Sequential(nn.Linear(dim, dim // 2), nn.Tanh(), nn.Linear(dim // 2, 1))
        self.concat = nn.Sequential(
            nn.Linear(num_magnifications * dim, dim), nn.GELU(), nn.Dropout(dropout)
        )
        self.blend = nn.Parameter(torch.zeros(()))
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens ``[b, m, d]`` -> (fused ``[b, d]``, magnification weights ``[b, m]``)."""
        weights = self.score(tokens).squeeze(-1).softmax(-1)
        global_view = torch.einsum("bm,bmd->bd", weights, tokens)
        concat_view = self.concat(rearrange(tokens, "b m d -> b (m d)"))
        g = torch.sigmoid(self.blend)
        return self.norm(g * global_view + (1 - g) * concat_view), weights
