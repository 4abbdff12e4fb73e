"""Multi-scale deformable attention in pure PyTorch: the ViT-Adapter's ``MSDeformAttn`` and MM-Interleaved's
multi-image feature synchronizer ``MMFS``.

The release computes both with Deformable-DETR's CUDA op (``MultiScaleDeformableAttention``). That op samples level
``l`` of the value at ``loc * (W_l, H_l) - 0.5`` bilinearly with zeros outside, which is exactly
``F.grid_sample(..., mode="bilinear", padding_mode="zeros", align_corners=False)`` at ``2 * loc - 1``, so
:func:`ms_deform_attn` is the same function on any device:

    out[n, q, h] = sum_l sum_p  A[n, q, h, l, p] * bilinear(V_l[n, :, :, h], loc[n, q, h, l, p])

``MMFS`` (the release's ``utils/ops/modules/mmfs.py``) attends from each query to every image of its row: the
query is projected once per image (``dynamic_offset_mask``) plus an embedding of the image's recency (1 = the most
recent visible image, 0 = not visible), each image contributes its own ``n_levels`` feature maps, offsets are
shared by an image's levels and scaled by ``spatial_shape / base_spatial_shape``, and every (image, level) pair has
one extra "ignore" logit fixed at ``-log(n_images * n_levels)`` whose value is the ``ignore_token``; invisible
images get ``-10000`` on their logits. Parameter names are the release's, so its state dict loads as is.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

Shapes = Sequence[tuple[int, int]]


def ms_deform_attn(value: torch.Tensor, spatial_shapes: Shapes, sampling_locations: torch.Tensor,
                   attention_weights: torch.Tensor) -> torch.Tensor:
    """Deformable attention over ``len(spatial_shapes)`` levels.

    Args:
        value: (N, S, M, D), the levels' values flattened row-major one after the other (S = sum H_l W_l).
        spatial_shapes: (H_l, W_l) per level.
        sampling_locations: (N, Lq, M, L, P, 2) in [0, 1] (x, y), (0, 0) the top-left corner of the map.
        attention_weights: (N, Lq, M, L, P).
    Returns:
        (N, Lq, M * D).
    """
    n, _, heads, dim = value.shape
    _, lq, _, levels, points, _ = sampling_locations.shape
    if levels != len(spatial_shapes):
        raise ValueError(f"sampling locations cover {levels} levels, spatial_shapes has {len(spatial_shapes)}")
    values = value.split([h * w for h, w in spatial_shapes], dim=1)
    grids = 2 * sampling_locations - 1
    sampled = []
    for level, (h, w) in enumerate(spatial_shapes):
        v = values[level].flatten(2).transpose(1, 2).reshape(n * heads, dim, h, w)
        g = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)  # (N*M, Lq, P, 2)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    weights = attention_weights.transpose(1, 2).reshape(n * heads, 1, lq, levels * points)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1).view(n, heads * dim, lq)
    return out.transpose(1, 2).contiguous()


def reference_points(spatial_shapes: Shapes, device=None) -> torch.Tensor:
    """(1, sum H W, 1, 2) pixel-centre reference points (x, y) in [0, 1] of each map, row-major."""
    refs = []
    for h, w in spatial_shapes:
        ref_y, ref_x = torch.meshgrid(torch.linspace(0.5, h - 0.5, h, dtype=torch.float32, device=device),
                                      torch.linspace(0.5, w - 0.5, w, dtype=torch.float32, device=device),
                                      indexing="ij")
        refs.append(torch.stack((ref_x.reshape(-1)[None] / w, ref_y.reshape(-1)[None] / h), -1))
    return torch.cat(refs, 1)[:, :, None]


def _locations(reference: torch.Tensor, offsets: torch.Tensor, spatial_shapes: Shapes) -> torch.Tensor:
    """``reference`` (N or 1, Lq, 1 or L, 2) plus ``offsets`` (N, Lq, M, L, P, 2) in pixels of each level."""
    normalizer = torch.tensor([[w, h] for h, w in spatial_shapes], dtype=offsets.dtype, device=offsets.device)
    return reference[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]


def _xavier(like: torch.Tensor) -> torch.Tensor:
    return nn.init.xavier_uniform_(torch.empty(like.shape, dtype=like.dtype))


def _init(linear: nn.Linear, weight, bias) -> None:
    """Give ``linear`` fresh parameters (``weight(old) -> tensor`` or None to keep it; ``bias`` a tensor or a
    constant): new ``nn.Parameter`` objects rather than in-place writes, so that a module built inside
    DeepSpeed's ``zero.Init`` (whose parameters are partitioned empty as soon as each submodule is built) still
    gets the release's initialisation."""
    shape_w = (linear.out_features, linear.in_features)
    if weight is not None:
        linear.weight = nn.Parameter(weight(torch.empty(shape_w)))
    value = bias if isinstance(bias, torch.Tensor) else torch.full((linear.out_features,), float(bias))
    linear.bias = nn.Parameter(value.clone().float())


class MSDeformAttn(nn.Module):
    """Deformable DETR's multi-scale deformable attention with the ViT-Adapter's value ``ratio`` (value width
    ``int(d_model * ratio)``)."""

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4,
                 ratio: float = 1.0):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.d_model, self.n_levels, self.n_heads, self.n_points, self.ratio = d_model, n_levels, n_heads, n_points, ratio
        self.value_dim = int(d_model * ratio)
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, self.value_dim)
        self.output_proj = nn.Linear(self.value_dim, d_model)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.n_heads, 1, 1, 2)
        grid = grid.repeat(1, self.n_levels, self.n_points, 1)
        for i in range(self.n_points):
            grid[:, :, i, :] *= i + 1
        _init(self.sampling_offsets, torch.zeros_like, grid.view(-1))
        _init(self.attention_weights, torch.zeros_like, 0.0)
        _init(self.value_proj, _xavier, 0.0)
        _init(self.output_proj, _xavier, 0.0)

    def forward(self, query: torch.Tensor, reference: torch.Tensor, features: torch.Tensor,
                spatial_shapes: Shapes) -> torch.Tensor:
        """``query`` (N, Lq, C), ``reference`` (1 or N, Lq, 1 or L, 2), ``features`` (N, sum H W, C) -> (N, Lq, C)."""
        n, lq, _ = query.shape
        value = self.value_proj(features).view(n, features.shape[1], self.n_heads, self.value_dim // self.n_heads)
        offsets = self.sampling_offsets(query).view(n, lq, self.n_heads, self.n_levels, self.n_points, 2)
        weights = self.attention_weights(query).view(n, lq, self.n_heads, self.n_levels * self.n_points)
        weights = F.softmax(weights, -1).view(n, lq, self.n_heads, self.n_levels, self.n_points)
        locations = _locations(reference, offsets, spatial_shapes).to(value.dtype)
        return self.output_proj(ms_deform_attn(value, spatial_shapes, locations, weights))


class MMFS(nn.Module):
    """The multi-image multi-scale feature synchronizer (module docstring); names as the release's."""

    def __init__(self, d_model: int = 256, d_query: int = -1, d_value: int = 256, d_out: int = -1, n_levels: int = 4,
                 n_heads: int = 8, n_points: int = 8, ratio: float = 1.0, offset_init_magnitude: float = 3.0,
                 spatial_shapes: Sequence[int] = (16,), base_spatial_shape: int = 16,
                 max_num_image_per_seq: int = 50):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        if len(spatial_shapes) != n_levels:
            raise ValueError(f"MMFS: {len(spatial_shapes)} spatial shapes for n_levels={n_levels}")
        d_query = d_model if d_query < 0 else d_query
        d_out = d_model if d_out < 0 else d_out
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.offset_init_magnitude = offset_init_magnitude
        self.max_num_image_per_seq = max_num_image_per_seq
        self.value_dim = int(d_model * ratio)
        # Offsets are in units of the query's own map; each value level rescales them by its size over that map's.
        self.scale_values = [s / base_spatial_shape for s in spatial_shapes]
        self.register_buffer("scale_ratios", torch.tensor(self.scale_values), persistent=False)
        self.sampling_offsets = nn.Linear(d_query, n_heads * n_points * 2)
        self.ignore_token = nn.Parameter(torch.zeros(1, 1, 1, self.value_dim), requires_grad=False)
        self.dynamic_offset_mask = nn.Linear(d_query, d_query)
        self.attention_weights = nn.Linear(d_query, n_heads * n_levels * (n_points + 1))
        self.value_proj = nn.Linear(d_value, self.value_dim)
        self.output_proj = nn.Linear(self.value_dim, d_out)
        self.query_relpos = nn.Embedding(max_num_image_per_seq, d_query)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        grid = torch.empty(self.n_heads, 1, self.n_points, 2).uniform_(-self.offset_init_magnitude,
                                                                       self.offset_init_magnitude)
        _init(self.sampling_offsets, torch.zeros_like, grid.view(-1))
        _init(self.attention_weights, None, 0.0)
        _init(self.value_proj, _xavier, 0.0)
        _init(self.output_proj, _xavier, 0.0)
        _init(self.dynamic_offset_mask, None, 0.0)
        self.query_relpos.weight = nn.Parameter(nn.init.trunc_normal_(
            torch.empty(self.query_relpos.num_embeddings, self.query_relpos.embedding_dim), std=0.02))

    def forward(self, query: torch.Tensor, reference: torch.Tensor, features: torch.Tensor, spatial_shapes: Shapes,
                attention_mask: torch.Tensor) -> torch.Tensor:
        """Attend from ``query`` to the images of each row.

        Args:
            query: (N, Lq, d_query).
            reference: (1 or N, Lq, 1, 2) reference points in [0, 1].
            features: (N, n_images, sum_l H_l W_l, d_value): each image's ``n_levels`` maps, flattened.
            spatial_shapes: the (H_l, W_l) of ONE image's levels.
            attention_mask: (N, n_images) or (N, Lq, n_images) (or (N, 1, n_images): every query as the last),
                1 where the query sees the image.
        Returns:
            (N, Lq, d_out).
        """
        n, lq, _ = query.shape
        _, n_images, hw, _ = features.shape
        if attention_mask.shape[-1] != n_images or attention_mask.dim() not in (2, 3):
            raise ValueError(f"MMFS attention_mask {tuple(attention_mask.shape)} does not fit {n_images} images")
        levels = n_images * self.n_levels
        mask = attention_mask.long()
        relpos = (mask.sum(-1, keepdim=True) + 1 - mask.cumsum(-1)) * mask  # 1: the most recent visible image
        if mask.dim() == 2:
            relpos = relpos[:, :, None].expand(n, n_images, lq)
        else:
            if mask.shape[1] != lq:
                relpos = relpos[:, -1:]
            relpos = relpos.transpose(1, 2)
        if int(relpos.max()) >= self.max_num_image_per_seq:
            raise ValueError(f"MMFS sees {int(relpos.max())} images; its recency table holds "
                             f"{self.max_num_image_per_seq}")

        value = self.value_proj(features).reshape(n, n_images * hw, self.n_heads, self.value_dim // self.n_heads)
        q = self.dynamic_offset_mask(query[:, None].expand(n, n_images, lq, query.shape[-1]))
        q = q + self.query_relpos(relpos)
        offsets = self.sampling_offsets(q).view(n, n_images, lq, self.n_heads, 1, self.n_points, 2)
        offsets = offsets.permute(0, 2, 3, 1, 4, 5, 6) * self.scale_ratios.view(1, 1, 1, 1, -1, 1, 1)
        offsets = offsets.reshape(n, lq, self.n_heads, levels, self.n_points, 2)
        weights = self.attention_weights(q).view(n, n_images, lq, self.n_heads, self.n_levels, self.n_points + 1)
        weights = weights.permute(0, 2, 3, 1, 4, 5).reshape(n, lq, self.n_heads, levels, self.n_points + 1)

        bias = (1.0 - attention_mask.to(weights.dtype)) * -10000.0
        if bias.dim() == 2:
            bias = bias[:, None, None, :, None]
        else:
            bias = (bias[:, -1:] if bias.shape[1] != lq else bias)[:, :, None, :, None]
        weights = weights + bias.repeat_interleave(self.n_levels, dim=3)
        # The release sets every ignore logit to -log(levels) last, whatever the mask did to it.
        ignore_logit = torch.full_like(weights[..., -1:], -math.log(levels))
        weights = torch.cat([weights[..., :-1], ignore_logit], -1)
        weights = F.softmax(weights.view(n, lq, self.n_heads, -1), -1).view(n, lq, self.n_heads, levels,
                                                                             self.n_points + 1)
        ignore_weight, weights = weights[..., -1:], weights[..., :-1].contiguous()
        ignore = self.ignore_token.view(1, 1, self.n_heads, 1, -1) * ignore_weight  # (N, Lq, M, levels, d)
        ignore = ignore.sum(-2).reshape(n, lq, self.value_dim)

        shapes = list(spatial_shapes) * n_images
        locations = _locations(reference, offsets, shapes).to(value.dtype)
        return self.output_proj(ms_deform_attn(value, shapes, locations, weights) + ignore)
