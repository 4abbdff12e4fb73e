"""MM-Interleaved's language side: Vicuna (transformers' ``LlamaModel``) with the feature synchronizer in layers
0, k, 2k, ... (k = ``cross_attention_frequency``, 4 in the release), and the text head.

In a synchronized layer the release adds, between the self-attention's residual and the MLP::

    h = h + tanh(gate) * MMFS(RMSNorm_1(h), RMSNorm_2(vision))

with the query at reference point (0.5, 0.5) of every level, 16 heads, 8 points, value width = the image feature
width (1024), the levels of the LLM's ``spatial_shapes`` (32, 16, 8: the adapter's c2..c4) and the mask "token l
sees image n when image n's first token is at or before l and after l's nearest BOS". Key names are the release's
(``layers.N.llama_cross_attn.{gate, attn.*, norm1, norm2}``).

The text head (``text_decoder``) is ``head`` (Linear with bias, over all 32002 rows) plus ``head_new`` (Linear with
bias over the 2 new tokens, soi and ``<|image|>``) added onto the last 2 logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import LlamaConfig, LlamaModel
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm

from .deform import MMFS

MMFS_HEADS, MMFS_POINTS, MMFS_MAX_IMAGES = 16, 8, 50


class LlamaMMFSAttention(nn.Module):
    """``tanh(gate) * MMFS(norm1(h), norm2(vision))`` (module docstring)."""

    def __init__(self, config: LlamaConfig, image_embed_dim: int, spatial_shapes: Sequence[int], heads: int):
        super().__init__()
        self.spatial_shapes = [(s, s) for s in spatial_shapes]
        self.gate = nn.Parameter(torch.tensor([0.0]))
        self.attn = MMFS(d_model=config.hidden_size, d_query=config.hidden_size, d_value=image_embed_dim,
                         d_out=config.hidden_size, n_levels=len(spatial_shapes), n_heads=heads, n_points=MMFS_POINTS,
                         ratio=image_embed_dim / config.hidden_size, offset_init_magnitude=3.0,
                         spatial_shapes=list(spatial_shapes), base_spatial_shape=16,
                         max_num_image_per_seq=MMFS_MAX_IMAGES)
        self.norm1 = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.norm2 = LlamaRMSNorm(image_embed_dim, eps=config.rms_norm_eps)

    def forward(self, hidden: torch.Tensor, vision: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        reference = torch.full((1, hidden.shape[1], 1, 2), 0.5, dtype=torch.float32, device=hidden.device)
        out = self.attn(self.norm1(hidden), reference, self.norm2(vision), self.spatial_shapes, mask)
        return out * self.gate.tanh()


class MMFSDecoderLayer(LlamaDecoderLayer):
    """A Llama layer with the synchronizer after the self-attention (``llama_cross_attn``); without vision inputs
    it is transformers' layer."""

    def __init__(self, config: LlamaConfig, layer_idx: int, image_embed_dim: int, spatial_shapes: Sequence[int],
                 heads: int = MMFS_HEADS):
        super().__init__(config, layer_idx)
        self.llama_cross_attn = LlamaMMFSAttention(config, image_embed_dim, spatial_shapes, heads)

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False,
                position_embeddings=None, vision_hidden_states=None, cross_attention_mask=None, **kwargs):
        residual = hidden_states
        hidden_states, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states),
                                          attention_mask=attention_mask, position_ids=position_ids,
                                          past_key_values=past_key_values, use_cache=use_cache,
                                          position_embeddings=position_embeddings, **kwargs)
        hidden_states = residual + hidden_states
        if vision_hidden_states is not None:
            hidden_states = hidden_states + self.llama_cross_attn(hidden_states, vision_hidden_states,
                                                                  cross_attention_mask)
        residual = hidden_states
        hidden_states = self.mlp(self.post_attention_layernorm(hidden_states))
        return residual + hidden_states


def build_mm_decoder(config: LlamaConfig, image_embed_dim: int, spatial_shapes: Sequence[int],
                     cross_attention_frequency: int, mmfs_heads: int = MMFS_HEADS) -> LlamaModel:
    """transformers' ``LlamaModel`` with :class:`MMFSDecoderLayer` at layers ``0, k, 2k, ...``."""
    model = LlamaModel(config)
    for idx in range(0, config.num_hidden_layers, cross_attention_frequency):
        model.layers[idx] = MMFSDecoderLayer(config, idx, image_embed_dim, spatial_shapes, mmfs_heads)
    return model


class TextDecoder(nn.Module):
    """``head(h)`` with ``head_new(h)`` added onto the logits of the tokens after ``orig_vocab_size``."""

    def __init__(self, hidden_size: int, vocab_size: int, orig_vocab_size: int):
        super().__init__()
        if not 0 < orig_vocab_size < vocab_size:
            raise ValueError(f"the text head's original vocabulary ({orig_vocab_size}) must be below its full one "
                             f"({vocab_size})")
        self.orig_vocab_size = orig_vocab_size
        self.head = nn.Linear(hidden_size, vocab_size, bias=True)
        self.head_new = nn.Linear(hidden_size, vocab_size - orig_vocab_size, bias=True)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.head(hidden)
        return torch.cat([logits[..., : self.orig_vocab_size],
                          logits[..., self.orig_vocab_size :] + self.head_new(hidden)], dim=-1)
