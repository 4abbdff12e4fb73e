"""MM-Interleaved's image side before the LLM: CLIP ViT-L/14 inside a ViT-Adapter, and the Q-Former tokenizers.

**ViT-Adapter** (the release's ``encoders/vit_adapter``): the CLIP embeddings and encoder layers (transformers'
``CLIPVisionEmbeddings`` / ``CLIPEncoderLayer``; no post-norm: the release replaces it by the identity) interleaved
with four interaction blocks. The pixels, resized bilinearly to ``image_size // patch_size * 16``, run through a
CNN "spatial prior" giving maps at strides 4, 8, 16, 32 (``c1..c4``); ``c2..c4`` (plus a level embedding) are
concatenated as ``c``. Block ``i`` injects ``c`` into the ViT tokens (deformable attention over 3 levels, scaled by
``gamma``), runs its quarter of the ViT layers (with the CLS token), then extracts the tokens back into ``c``
(deformable attention over 1 level plus a depth-wise-conv FFN; the last block twice more). Out come the multiscale
features ``c1 + up(x1), c2 + up(x2), c3 + x3, c4 + down(x4)`` (4H, 2H, H, H/2 for an H x H patch grid) and
``[cls, x4]`` as the last hidden state.

**Visual tokenizer**: CLIP-normalised pixels -> ViT-Adapter; every multiscale map gets the 2-D sin-cos table
(bicubically resized); the Q-Former (64 queries, per-head LayerNorm on queries and keys: the release's
``blip2_qknorm_monkey_patch``) reads ``post_ln(pos_ln(pos_proj(last_hidden)) + pos)`` and ``proj`` maps its 64
outputs to the LLM's width.

**Q-Former** (:class:`PerceiverResampler`): transformers' ``Blip2QFormerModel`` and learned ``queries``; with
``qk_normalization`` every attention of it gets the release's ``q_norm`` / ``k_norm``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel, CLIPVisionConfig
from transformers.models.blip_2.modeling_blip_2 import Blip2QFormerMultiHeadAttention
from transformers.models.clip.modeling_clip import CLIPEncoderLayer, CLIPVisionEmbeddings

from .deform import MSDeformAttn, reference_points

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ------------------------------------------------------------------------------------------------ sin-cos tables
def sincos_1d(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """(M, D) [sin | cos] of positions ``pos`` (MAE's ``get_1d_sincos_pos_embed_from_grid``, float32 numpy)."""
    if embed_dim % 2:
        raise ValueError(f"a sin-cos table needs an even width, got {embed_dim}")
    omega = np.arange(embed_dim // 2, dtype=np.float32)
    omega /= embed_dim / 2.0
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(embed_dim: int, grid_size: int, cls_token: bool = False) -> np.ndarray:
    """(G*G (+1), D) MAE's 2-D table: [h-table | w-table] (width first in the mesh), a zero row first for CLS."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape([2, 1, grid_size, grid_size])
    emb = np.concatenate([sincos_1d(embed_dim // 2, grid[1]), sincos_1d(embed_dim // 2, grid[0])], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)
    return emb


def resized_table(table: torch.Tensor, target: int) -> torch.Tensor:
    """The release's ``get_abs_pos``: a square (G*G (+1 CLS), C) table resized bicubically to ``target`` rows."""
    src, tgt = int(math.sqrt(table.size(0))), int(math.sqrt(target))
    if src == tgt:
        return table
    cls = src * src != table.size(0)
    head, body = (table[:1], table[1:]) if cls else (None, table)
    body = F.interpolate(body.float().reshape(1, src, src, -1).permute(0, 3, 1, 2), size=(tgt, tgt),
                         mode="bicubic", align_corners=False).permute(0, 2, 3, 1).flatten(0, 2).to(table.dtype)
    return torch.cat([head, body]) if cls else body


# ------------------------------------------------------------------------------------------------ ViT-Adapter
class ChannelsFirstLayerNorm(nn.Module):
    """LayerNorm over the channels of (B, C, H, W), in float32 (the adapter's ``LayerNorm(channels_first)``)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return (self.weight[:, None, None].float() * x + self.bias[:, None, None].float()).to(dtype)


def _conv_block(cin: int, cout: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), ChannelsFirstLayerNorm(cout), nn.ReLU(inplace=True)]


class SpatialPriorModule(nn.Module):
    """The CNN branch: maps at strides 4 (``c1``, B x C x h x w) and 8, 16, 32 (``c2..c4``, flattened tokens)."""

    def __init__(self, inplanes: int, embed_dim: int):
        super().__init__()
        self.stem = nn.Sequential(*_conv_block(3, inplanes, 2), *_conv_block(inplanes, inplanes, 1),
                                  *_conv_block(inplanes, inplanes, 1), nn.MaxPool2d(3, 2, 1))
        self.conv2 = nn.Sequential(*_conv_block(inplanes, 2 * inplanes, 2))
        self.conv3 = nn.Sequential(*_conv_block(2 * inplanes, 4 * inplanes, 2))
        self.conv4 = nn.Sequential(*_conv_block(4 * inplanes, 4 * inplanes, 2))
        self.fc1 = nn.Conv2d(inplanes, embed_dim, 1)
        self.fc2 = nn.Conv2d(2 * inplanes, embed_dim, 1)
        self.fc3 = nn.Conv2d(4 * inplanes, embed_dim, 1)
        self.fc4 = nn.Conv2d(4 * inplanes, embed_dim, 1)

    def forward(self, x: torch.Tensor):
        c1 = self.stem(x)
        c2 = self.conv2(c1)
        c3 = self.conv3(c2)
        c4 = self.conv4(c3)
        c1, c2, c3, c4 = self.fc1(c1), self.fc2(c2), self.fc3(c3), self.fc4(c4)
        b, d = c1.shape[:2]
        return c1, *(c.view(b, d, -1).transpose(1, 2) for c in (c2, c3, c4))


class DWConv(nn.Module):
    """A depth-wise 3x3 conv over the three maps (2H, H, H/2) packed in ``c``'s 21 * n tokens."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, bias=True, groups=dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, n_tokens, c = x.shape
        n = n_tokens // 21
        maps = [(x[:, : 16 * n], 2 * h, 2 * w), (x[:, 16 * n : 20 * n], h, w), (x[:, 20 * n :], h // 2, w // 2)]
        return torch.cat([self.dwconv(t.transpose(1, 2).reshape(b, c, hh, ww)).flatten(2).transpose(1, 2)
                          for t, hh, ww in maps], dim=1)


class ConvFFN(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DWConv(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return self.fc2(self.act(self.dwconv(self.fc1(x), h, w)))


class Injector(nn.Module):
    """``x + gamma * MSDeformAttn(norm(x), norm(c))`` over ``c``'s 3 levels."""

    def __init__(self, dim: int, heads: int, points: int, ratio: float):
        super().__init__()
        self.query_norm = nn.LayerNorm(dim)
        self.feat_norm = nn.LayerNorm(dim)
        self.attn = MSDeformAttn(d_model=dim, n_levels=3, n_heads=heads, n_points=points, ratio=ratio)
        self.gamma = nn.Parameter(torch.zeros(dim))

    def forward(self, query, reference, feat, shapes):
        return query + self.gamma * self.attn(self.query_norm(query), reference, self.feat_norm(feat), shapes)


class Extractor(nn.Module):
    """``c + MSDeformAttn(norm(c), norm(x))`` over the ViT's one level, then ``c + ConvFFN(norm(c))``."""

    def __init__(self, dim: int, heads: int, points: int, ratio: float, ffn_ratio: float):
        super().__init__()
        self.query_norm = nn.LayerNorm(dim)
        self.feat_norm = nn.LayerNorm(dim)
        self.attn = MSDeformAttn(d_model=dim, n_levels=1, n_heads=heads, n_points=points, ratio=ratio)
        self.ffn = ConvFFN(dim, int(dim * ffn_ratio))
        self.ffn_norm = nn.LayerNorm(dim)

    def forward(self, query, reference, feat, shapes, h: int, w: int):
        query = query + self.attn(self.query_norm(query), reference, self.feat_norm(feat), shapes)
        return query + self.ffn(self.ffn_norm(query), h, w)


class InteractionBlock(nn.Module):
    """The release's ``InteractionBlockWithCls``: inject, run the block's ViT layers with the CLS token, extract."""

    def __init__(self, dim: int, heads: int, points: int = 4, ratio: float = 0.5, ffn_ratio: float = 0.25,
                 extra_extractor: bool = False):
        super().__init__()
        self.injector = Injector(dim, heads, points, ratio)
        self.extractor = Extractor(dim, heads, points, ratio, ffn_ratio)
        self.extra_extractors = nn.Sequential(*[Extractor(dim, heads, points, ratio, ffn_ratio) for _ in range(2)]) \
            if extra_extractor else None

    def forward(self, x, c, cls, layers: Callable[[torch.Tensor], torch.Tensor], inputs1, inputs2, h: int, w: int):
        x = self.injector(x, inputs1[0], c, inputs1[1])
        x = layers(torch.cat((cls, x), dim=1))
        cls, x = x[:, :1], x[:, 1:]
        c = self.extractor(c, inputs2[0], x, inputs2[1], h, w)
        for extractor in self.extra_extractors or ():
            c = extractor(c, inputs2[0], x, inputs2[1], h, w)
        return x, c, cls


class CLIPEncoderLayers(nn.Module):
    """transformers' CLIP encoder layers under the release's key names (``encoder.layers.N``)."""

    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.layers = nn.ModuleList([CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers)])


def interaction_indexes(depth: int) -> list[tuple[int, int]]:
    """The ViT layers of each interaction block: quarters of the depth (ViT-L: 0-5, 6-11, 12-17, 18-23)."""
    if depth % 4:
        raise ValueError(f"the ViT-Adapter splits the ViT into 4 blocks: depth {depth} is not a multiple of 4")
    q = depth // 4
    return [(i * q, (i + 1) * q - 1) for i in range(4)]


class ViTAdapter(nn.Module):
    """CLIP ViT + ViT-Adapter (module docstring) under the release's names (``vision_model.*``)."""

    def __init__(self, config: CLIPVisionConfig, conv_inplane: int = 64, n_points: int = 4):
        super().__init__()
        self.config = config
        dim = config.hidden_size
        self.interaction_indexes = interaction_indexes(config.num_hidden_layers)
        self.embeddings = CLIPVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.encoder = CLIPEncoderLayers(config)
        self.adapter_level_embed = nn.Parameter(torch.zeros(3, dim))
        self.adapter_spm = SpatialPriorModule(conv_inplane, dim)
        self.adapter_interactions = nn.Sequential(*[
            InteractionBlock(dim, config.num_attention_heads, n_points, extra_extractor=(i == 3)) for i in range(4)])
        self.adapter_up = nn.ConvTranspose2d(dim, dim, 2, 2)

    def _layers(self, first: int, last: int) -> Callable[[torch.Tensor], torch.Tensor]:
        def run(x: torch.Tensor) -> torch.Tensor:
            for layer in self.encoder.layers[first : last + 1]:
                out = layer(x, None)
                x = out[0] if isinstance(out, tuple) else out
            return x
        return run

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """CLIP-normalised pixels (B, 3, S, S) -> ``[cls, x4]`` (B, 1 + H*W, C) and the 4 multiscale maps."""
        hidden = self.pre_layrnorm(self.embeddings(pixel_values))
        bs, _, dim = hidden.shape
        h = w = pixel_values.shape[-1] // self.config.patch_size
        size = self.config.image_size // self.config.patch_size * 16
        resized = F.interpolate(pixel_values, size=(size, size), mode="bilinear", align_corners=False)
        shapes1 = [(size // 8, size // 8), (size // 16, size // 16), (size // 32, size // 32)]
        inputs1 = (reference_points([(size // 16, size // 16)], hidden.device), shapes1)
        inputs2 = (reference_points(shapes1, hidden.device), [(size // 16, size // 16)])
        c1, c2, c3, c4 = self.adapter_spm(resized)
        c2, c3, c4 = c2 + self.adapter_level_embed[0], c3 + self.adapter_level_embed[1], c4 + self.adapter_level_embed[2]
        c = torch.cat([c2, c3, c4], dim=1)
        x, cls = hidden[:, 1:], hidden[:, :1]
        outs = []
        for block, (first, last) in zip(self.adapter_interactions, self.interaction_indexes):
            x, c, cls = block(x, c, cls, self._layers(first, last), inputs1, inputs2, h, w)
            outs.append(x.transpose(1, 2).reshape(bs, dim, h, w))
        n2, n3 = c2.size(1), c3.size(1)
        c2 = c[:, :n2].transpose(1, 2).reshape(bs, dim, 2 * h, 2 * w)
        c3 = c[:, n2 : n2 + n3].transpose(1, 2).reshape(bs, dim, h, w)
        c4 = c[:, n2 + n3 :].transpose(1, 2).reshape(bs, dim, h // 2, w // 2)
        c1 = self.adapter_up(c2) + c1
        x1, x2, x3, x4 = outs
        last = torch.cat([cls, x4.flatten(2).transpose(1, 2)], dim=1)
        x1 = F.interpolate(x1, scale_factor=4, mode="bilinear", align_corners=False)
        x2 = F.interpolate(x2, scale_factor=2, mode="bilinear", align_corners=False)
        x4 = F.interpolate(x4, scale_factor=0.5, mode="bilinear", align_corners=False)
        return last, [c1 + x1, c2 + x2, c3 + x3, c4 + x4]


class AdapterEncoder(nn.Module):
    """Holds the adapter as ``vision_model`` (the release's ``CLIPVisionAdapterModel``)."""

    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.vision_model = ViTAdapter(config)

    def forward(self, pixel_values):
        return self.vision_model(pixel_values)


# ------------------------------------------------------------------------------------------------ Q-Former
class QKNormQFormerAttention(Blip2QFormerMultiHeadAttention):
    """The Q-Former's attention with the release's per-head LayerNorm on queries and keys (eps of the config)."""

    def __init__(self, config, is_cross_attention: bool = False):
        super().__init__(config, is_cross_attention)
        self.q_norm = nn.LayerNorm(self.attention_head_size, eps=config.layer_norm_eps)
        self.k_norm = nn.LayerNorm(self.attention_head_size, eps=config.layer_norm_eps)

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                **kwargs):
        cross = encoder_hidden_states is not None
        states = encoder_hidden_states if cross else hidden_states
        mask = encoder_attention_mask if cross else attention_mask
        d = self.attention_head_size
        q = self.q_norm(self.query(hidden_states).view(*hidden_states.shape[:-1], -1, d).transpose(1, 2))
        k = self.k_norm(self.key(states).view(*states.shape[:-1], -1, d).transpose(1, 2))
        v = self.value(states).view(*states.shape[:-1], -1, d).transpose(1, 2)
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(d)
        if mask is not None:
            scores = scores + _additive(mask, scores.dtype)
        probs = F.dropout(F.softmax(scores, dim=-1), p=self.attention_dropout if self.training else 0.0)
        out = torch.matmul(probs, v).permute(0, 2, 1, 3).contiguous()
        return out.reshape(*out.shape[:2], -1), None


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean (keep) or additive mask as the additive bias the scores take."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    return mask.to(dtype)


class PerceiverResampler(nn.Module):
    """The release's ``PerceiverResampler``: ``Blip2QFormerModel(query_embeds=queries, encoder states)``."""

    def __init__(self, num_queries: int, hidden_size: int, qk_normalization: bool = False, **config: Any):
        super().__init__()
        cfg = Blip2QFormerConfig(hidden_size=hidden_size, **config)
        cfg._attn_implementation = "eager"
        self.blip2qformer = Blip2QFormerModel(cfg)
        if qk_normalization:
            for layer in self.blip2qformer.encoder.layer:
                layer.attention.attention = QKNormQFormerAttention(cfg)
                if getattr(layer, "has_cross_attention", False):
                    layer.crossattention.attention = QKNormQFormerAttention(cfg, is_cross_attention=True)
        self.queries = nn.Parameter(torch.zeros(1, num_queries, hidden_size).normal_(0, cfg.initializer_range))

    def forward(self, encoder_hidden_states: torch.Tensor, encoder_attention_mask: torch.Tensor | None = None):
        queries = self.queries.expand(encoder_hidden_states.shape[0], -1, -1)
        return self.blip2qformer(query_embeds=queries, encoder_hidden_states=encoder_hidden_states,
                                 encoder_attention_mask=encoder_attention_mask).last_hidden_state


class VisualTokenizer(nn.Module):
    """Pixels in [0, 1] (B, 3, S, S) -> 64 LLM tokens and the adapter's 4 multiscale maps (module docstring)."""

    def __init__(self, vision_config: CLIPVisionConfig, perceiver_config: dict[str, Any], llm_hidden_size: int,
                 grid_size: int = 16):
        super().__init__()
        width = perceiver_config["encoder_hidden_size"]
        self.encoder = AdapterEncoder(vision_config)
        self.pos_proj = nn.Linear(width, width)
        self.pos_ln = nn.LayerNorm(width, eps=1e-6)
        self.pos_embed = nn.Parameter(torch.from_numpy(sincos_2d(width, grid_size, cls_token=True)).float(),
                                      requires_grad=False)
        self.perceiver_resampler = PerceiverResampler(**perceiver_config)
        self.post_ln = nn.LayerNorm(width, eps=1e-6)
        self.proj = nn.Linear(perceiver_config["hidden_size"], llm_hidden_size)
        self.register_buffer("clip_mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1))
        self.register_buffer("clip_std", torch.tensor(CLIP_STD).view(1, 3, 1, 1))

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        image = (image - self.clip_mean.to(image.dtype)) / self.clip_std.to(image.dtype)
        last, features = self.encoder(image)
        maps = []
        for feat in features:
            table = resized_table(self.pos_embed[1:], feat.size(2) * feat.size(3))
            maps.append(feat + table.reshape(feat.size(2), feat.size(3), -1).permute(2, 0, 1))
        table = resized_table(self.pos_embed, last.size(1))
        inputs = self.post_ln(self.pos_ln(self.pos_proj(last)) + table)
        return self.proj(self.perceiver_resampler(inputs)), maps
