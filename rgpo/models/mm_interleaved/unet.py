"""MM-Interleaved's image decoder: SD-2.1's UNet (diffusers' ``UNet2DConditionModel``) with the feature synchronizer
on every skip connection and on the mid block, fed by a Q-Former over the LLM context.

The release (``decoders/sd_mmfs.py`` + its UNet forward patch) runs the UNet's down and mid blocks unchanged, then,
before the up blocks, adds ``MMFSBlock_i(res_i)`` to each skip tensor ``res_i`` (conv_in's output and every down
block's outputs, ``1 + sum(layers_per_block + downsampler)`` of them) and ``MMFSBlock_mid(mid)`` to the mid block's
output, like ControlNet's residuals. An ``MMFSBlock`` is::

    q   = LayerNorm(res as tokens) + 2-D sin-cos table (grid = the latent size, bicubically resized to the map)
    out = zero-init 1x1 conv(MMFS(q, LayerNorm(image features)))   (16 heads, 8 points, width 1024)

reading the 4 adapter maps of the previous image of the chain (``mmfs_mask`` 0: no previous image, only the
"ignore" slot). The block's level rule is the release's construction rule: block ``j`` (in the order above) takes
``base = latent_size >> (j // 3)`` (the mid block the smallest) and scales its offsets by ``value_shape / base``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .deform import MMFS, reference_points
from .vision import PerceiverResampler, resized_table, sincos_2d


class MMFSBlock(nn.Module):
    def __init__(self, query_dim: int, feat_dim: int, spatial_shapes: Sequence[int], base_spatial_shape: int,
                 grid_size: int, attn_dim: int = 1024, heads: int = 16, points: int = 8,
                 max_num_image_per_seq: int = 10):
        super().__init__()
        self.query_norm = nn.LayerNorm(query_dim, eps=1e-6)
        self.feat_norm = nn.LayerNorm(feat_dim, eps=1e-6)
        self.mmfs = MMFS(d_model=attn_dim, d_query=query_dim, d_value=feat_dim, d_out=query_dim,
                         n_levels=len(spatial_shapes), n_heads=heads, n_points=points, ratio=1.0,
                         offset_init_magnitude=1, spatial_shapes=list(spatial_shapes),
                         base_spatial_shape=base_spatial_shape, max_num_image_per_seq=max_num_image_per_seq)
        self.pos_embed = nn.Parameter(torch.from_numpy(sincos_2d(query_dim, grid_size)).float(), requires_grad=False)
        self.conv = nn.Conv2d(query_dim, query_dim, kernel_size=1)
        # zero-init (new parameters, not in-place writes: a module built inside zero.Init is partitioned empty)
        self.conv.weight = nn.Parameter(torch.zeros(query_dim, query_dim, 1, 1))
        self.conv.bias = nn.Parameter(torch.zeros(query_dim))

    def forward(self, sample: torch.Tensor, features: torch.Tensor, mask: torch.Tensor,
                spatial_shapes: Sequence[tuple[int, int]]) -> torch.Tensor:
        """``sample`` (B, C, H, W), ``features`` (B, n, sum h w, D), ``mask`` (B, n) -> the residual (B, C, H, W)."""
        b, c, h, w = sample.shape
        query = self.query_norm(sample.flatten(2).transpose(1, 2))
        query = query + resized_table(self.pos_embed, h * w).to(query.dtype)
        out = self.mmfs(query, reference_points([(h, w)], sample.device), self.feat_norm(features), spatial_shapes,
                        mask)
        return self.conv(out.transpose(1, 2).reshape(b, c, h, w))


class MMFSNet(nn.Module):
    """One :class:`MMFSBlock` per skip tensor of the UNet and one on the mid block (module docstring)."""

    def __init__(self, input_channel: int, block_out_channels: Sequence[int], layers_per_block: int,
                 value_shapes: Sequence[int], latent_size: int, attn_dim: int = 1024, heads: int = 16):
        super().__init__()
        base = [latent_size >> i for i in range(len(value_shapes))]

        def block(channels: int, index: int) -> MMFSBlock:
            return MMFSBlock(channels, input_channel, value_shapes, base[index], latent_size, attn_dim, heads)

        blocks = [block(block_out_channels[0], 0)]
        for i, channels in enumerate(block_out_channels):
            for _ in range(layers_per_block):
                blocks.append(block(channels, len(blocks) // 3))
            if i < len(block_out_channels) - 1:
                blocks.append(block(channels, len(blocks) // 3))
        self.mmfs_down_blocks = nn.ModuleList(blocks)
        self.mmfs_mid_block = block(block_out_channels[-1], -1)

    def forward(self, sample, down_samples, features: list[torch.Tensor], mask: torch.Tensor):
        """Adds each block's residual; ``features``: the 4 maps (B, n, C, h, w) of the images each row sees."""
        if len(down_samples) != len(self.mmfs_down_blocks):
            raise ValueError(f"the UNet gave {len(down_samples)} skip tensors for {len(self.mmfs_down_blocks)} "
                             "synchronizer blocks")
        shapes = [(f.shape[-2], f.shape[-1]) for f in features]
        flat = torch.cat([f.flatten(3).transpose(2, 3) for f in features], dim=2)
        down = tuple(s + blk(s, flat, mask, shapes) for s, blk in zip(down_samples, self.mmfs_down_blocks))
        return sample + self.mmfs_mid_block(sample, flat, mask, shapes), down


def unet_with_mmfs(unet, mmfs: MMFSNet | None, sample: torch.Tensor, timestep: torch.Tensor,
                   encoder_hidden_states: torch.Tensor, features: list[torch.Tensor] | None,
                   mask: torch.Tensor | None, *, return_features: bool = False):
    """diffusers' ``UNet2DConditionModel.forward`` (the SD-2.1 path: no class / added embeddings) with the
    synchronizer between the mid and up blocks, as the release patches it. Returns the prediction and, with
    ``return_features``, every up block's output (B, C, H, W) list."""
    upsample_factor = 2**unet.num_upsamplers
    forward_upsample_size = any(s % upsample_factor for s in sample.shape[-2:])
    emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), None)
    sample = unet.conv_in(sample)
    down = (sample,)
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            sample, res = block(hidden_states=sample, temb=emb, encoder_hidden_states=encoder_hidden_states)
        else:
            sample, res = block(hidden_states=sample, temb=emb)
        down += res
    if unet.mid_block is not None:
        sample = unet.mid_block(sample, emb, encoder_hidden_states=encoder_hidden_states)
    if mmfs is not None and features is not None:
        sample, down = mmfs(sample, down, features, mask)
    outputs = []
    for i, block in enumerate(unet.up_blocks):
        res = down[-len(block.resnets):]
        down = down[: -len(block.resnets)]
        size = down[-1].shape[2:] if i < len(unet.up_blocks) - 1 and forward_upsample_size else None
        if getattr(block, "has_cross_attention", False):
            sample = block(hidden_states=sample, temb=emb, res_hidden_states_tuple=res,
                           encoder_hidden_states=encoder_hidden_states, upsample_size=size)
        else:
            sample = block(hidden_states=sample, temb=emb, res_hidden_states_tuple=res, upsample_size=size)
        if return_features:
            outputs.append(sample)
    if unet.conv_norm_out is not None:
        sample = unet.conv_act(unet.conv_norm_out(sample))
    return unet.conv_out(sample), outputs


class ImageDecoder(nn.Module):
    """The release's ``ImageDecoder``: ``perceiver_resampler`` (77 queries over the context), the learned
    ``neg_prompt_embeds`` (1, 77, 1024), and ``decoder`` holding ``unet``, ``vae`` and ``mmfs_module``."""

    def __init__(self, perceiver_config: dict, unet, vae, mmfs_module: MMFSNet, seq_len: int, embed_dim: int):
        super().__init__()
        self.perceiver_resampler = PerceiverResampler(**perceiver_config)
        self.neg_prompt_embeds = nn.Parameter(torch.zeros(1, seq_len, embed_dim).normal_(std=0.02))
        self.decoder = nn.Module()
        self.decoder.unet, self.decoder.vae, self.decoder.mmfs_module = unet, vae, mmfs_module

    def forward(self, rows: int) -> torch.Tensor:
        """The learned negative for ``rows`` rows (read through a module call, so ZeRO-3 gathers it)."""
        return self.neg_prompt_embeds.expand(rows, -1, -1)
