"""A CLIP text transformer with Hugging Face's CLIPTextModel key layout (minus the `text_model.` prefix).

OpenAI CLIP-L (SD 1.x, SDXL) loads directly; OpenCLIP encoders (SD 2.x, SDXL's bigG) are mapped onto this
layout by their family's key conversion.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from sdserver.models.nn.config import TextEncoderConfig
from sdserver.models.nn.layers import attention


class Embeddings(nn.Module):
    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.max_positions, cfg.width)


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.out_proj(attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads, mask))


class MLP(nn.Module):
    def __init__(self, width: int, intermediate: int, activation: str) -> None:
        super().__init__()
        self.activation = activation
        self.fc1 = nn.Linear(width, intermediate)
        self.fc2 = nn.Linear(intermediate, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        x = x * torch.sigmoid(1.702 * x) if self.activation == "quick_gelu" else F.gelu(x)
        return self.fc2(x)


class EncoderLayer(nn.Module):
    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        self.self_attn = SelfAttention(cfg.width, cfg.heads)
        self.layer_norm1 = nn.LayerNorm(cfg.width)
        self.mlp = MLP(cfg.width, cfg.intermediate, cfg.activation)
        self.layer_norm2 = nn.LayerNorm(cfg.width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.layers))


class CLIPTextModel(nn.Module):
    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.width)
        if cfg.projection_dim:
            self.text_projection = nn.Linear(cfg.width, cfg.projection_dim, bias=False)

    def forward(
        self,
        tokens: torch.Tensor,
        clip_skip: int = 1,
        *,
        final_norm: bool = True,
        token_embeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden states of layer -clip_skip, pooled output).

        `final_norm=False` returns that layer's raw states, as SDXL's encoders use them. The pooled output always
        comes from the last layer, normed, at the first end-of-text token (the highest id), projected when the
        model has a projection. `token_embeds` replaces the token-embedding lookup (textual inversion).
        """
        dtype = self.final_layer_norm.weight.dtype
        x = self.embeddings.token_embedding(tokens) if token_embeds is None else token_embeds.to(dtype)
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = x + self.embeddings.position_embedding(positions)[None]
        t = tokens.shape[1]
        mask = torch.full((t, t), float("-inf"), device=x.device, dtype=x.dtype).triu(1)
        wanted = len(self.encoder.layers) - max(clip_skip, 1)
        hidden = x
        for index, layer in enumerate(self.encoder.layers):
            x = layer(x, mask)
            if index == wanted:
                hidden = x
        last = self.final_layer_norm(x)
        if final_norm:
            hidden = self.final_layer_norm(hidden)
        pooled = last[torch.arange(last.shape[0], device=last.device), tokens.argmax(dim=-1)]
        if self.config.projection_dim:
            pooled = self.text_projection(pooled)
        return hidden, pooled
