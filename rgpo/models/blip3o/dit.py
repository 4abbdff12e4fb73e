"""BLIP3-o's CLIP-feature DiT: diffusers' ``LuminaNextDiT2DModel`` behind a ``PixArtAlphaTextProjection``.

The release (``blip3o/model/nextdit_crossattn.py``) wraps its own copy of Lumina-Next's DiT whose sizes are class
defaults, never written to a config file: dim 1792, 24 layers, 28 heads (28 KV heads), patch 1, qk-norm, an
8 x 8 x 1792 input of EVA-CLIP tokens (1.66 B parameters at 4 x dim; the paper's "1.4 B" is what diffusers'
narrower default width would give), the caption projection (LLM hidden -> dim) applied to the query states, and
a feed-forward hidden width of ``4 x dim`` (rounded up to ``multiple_of``) where diffusers' class builds
``int(8 dim / 3)``: the blocks' feed-forwards are rebuilt at the release's width here. Its rotary table is
``get_2d_rotary_pos_embed_lumina(dim // heads, 384, 384)`` (a plain attribute, not in the checkpoint), and diffusers'
unused ``pad_token`` parameter does not exist in the release: it is removed.

Our forward walks the blocks itself (the same calls as diffusers' forward) to return every block's hidden
states for the feature KL and to checkpoint activations block by block.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import LuminaNextDiT2DModel
from diffusers.models.attention import LuminaFeedForward
from diffusers.models.embeddings import PixArtAlphaTextProjection, get_2d_rotary_pos_embed_lumina
from torch import nn
from torch.utils.checkpoint import checkpoint

# ``NextDiTCrossAttnConfig``'s defaults: the released DiT (its ``latent_embedding_size`` is the LLM's hidden size).
RELEASE_DIT = dict(input_size=8, patch_size=1, in_channels=1792, dim=1792, n_layers=24, n_heads=28, n_kv_heads=28,
                   multiple_of=256, ffn_dim_multiplier=None, norm_eps=1e-5, qk_norm=True)
ROPE_GRID = 384  # the release's rotary table covers 384 x 384 patches


class Blip3oDiT(nn.Module):
    """``caption_projection`` (LLM hidden -> dim) + ``model`` (Lumina-Next, cross-attention width = dim)."""

    def __init__(self, latent_embedding_size: int, *, ffn_hidden_size: int | None = None, **sizes: Any):
        super().__init__()
        unknown = set(sizes) - set(RELEASE_DIT)
        if unknown:
            raise TypeError(f"unknown DiT sizes {sorted(unknown)}; valid: {sorted(RELEASE_DIT)}")
        self.sizes = {**RELEASE_DIT, **sizes}
        self.latent_embedding_size = latent_embedding_size
        s = self.sizes
        dim = s["dim"]
        self.caption_projection = PixArtAlphaTextProjection(in_features=latent_embedding_size, hidden_size=dim)
        self.model = LuminaNextDiT2DModel(
            sample_size=s["input_size"], patch_size=s["patch_size"], in_channels=s["in_channels"], hidden_size=dim,
            num_layers=s["n_layers"], num_attention_heads=s["n_heads"], num_kv_heads=s["n_kv_heads"],
            multiple_of=s["multiple_of"], ffn_dim_multiplier=s["ffn_dim_multiplier"], norm_eps=s["norm_eps"],
            learn_sigma=False, qk_norm=s["qk_norm"], cross_attention_dim=dim,
        )
        # The release's width: 4 x dim (diffusers: 8 dim / 3); ``ffn_hidden_size`` (read from a checkpoint's
        # shapes) overrides it exactly.
        inner, multiple, multiplier = 4 * dim, s["multiple_of"], s["ffn_dim_multiplier"]
        if ffn_hidden_size is not None:
            inner, multiple, multiplier = ffn_hidden_size, 1, None
        for block in self.model.layers:
            block.feed_forward = LuminaFeedForward(dim=dim, inner_dim=inner, multiple_of=multiple,
                                                   ffn_dim_multiplier=multiplier)
        del self.model.pad_token  # diffusers' unused parameter; the release has none
        self.gradient_checkpointing = False
        self._rope: torch.Tensor | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self.caption_projection.linear_1.weight.dtype

    @property
    def ffn_hidden_size(self) -> int:
        return self.model.layers[0].feed_forward.linear_1.out_features

    def rope(self, device: torch.device) -> torch.Tensor:
        if self._rope is None:
            head_dim = self.sizes["dim"] // self.sizes["n_heads"]
            self._rope = get_2d_rotary_pos_embed_lumina(head_dim, ROPE_GRID, ROPE_GRID)
        return self._rope.to(device)

    def project(self, states: torch.Tensor) -> torch.Tensor:
        """Query states (N, L, H_llm) -> the DiT's caption embeddings (N, L, dim)."""
        return self.caption_projection(states.to(self.dtype))

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, caption: torch.Tensor, *,
                return_features: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The prediction (noise - data, sigma convention) (N, C, S, S) at ``x`` (N, C, S, S) and the model
        timestep (N,) (the release passes ``long(sigma * 1000)``), for PROJECTED captions (N, L, dim) with an
        all-ones mask; with ``return_features`` also (N, layers + 1, S*S, dim): the patch embedding and every
        block's output."""
        m = self.model
        mask = torch.ones(caption.shape[:2], device=caption.device)
        hidden, patch_mask, img_size, rope = m.patch_embedder(x.to(self.dtype), self.rope(x.device))
        temb = m.time_caption_embed(timestep, caption, mask)
        mask = mask.bool()
        features = [hidden] if return_features else None
        for layer in m.layers:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                hidden = checkpoint(layer, hidden, patch_mask, rope, caption, mask, temb, {}, use_reentrant=False)
            else:
                hidden = layer(hidden, patch_mask, rope, caption, mask, temb=temb, cross_attention_kwargs={})
            if features is not None:
                features.append(hidden)
        hidden = m.norm_out(hidden, temb)
        p = m.patch_size
        height, width = img_size[0]
        n = hidden.shape[0]
        hidden = hidden[:, : (height // p) * (width // p)].view(n, height // p, width // p, p, p, m.out_channels)
        out = hidden.permute(0, 5, 1, 3, 2, 4).flatten(4, 5).flatten(2, 3)
        return out, (torch.stack(features, 1) if features is not None else None)
