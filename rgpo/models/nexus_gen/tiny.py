"""Tiny, random, offline Nexus-Gen built from the same classes as the real one, and its released layout on disk.

The Qwen2.5-VL side reuses MindOmni's tiny builders (a byte-level BPE tokenizer with Qwen's specials, the processor,
a ~200k-parameter Qwen2.5-VL). FLUX: a 1 + 1 block ``FluxTransformer2DModel`` (2 heads of 32, rope split 4/14/14,
guidance embedder); the AE: a 4-level ``AutoencoderKL`` with 16 latent channels (factor 8, like FLUX's) and
64/32/32/32 channels (BFL hard-codes 32 norm groups, and one channel per group before the output convolution would
normalise an image's brightness away); CLIP-L and T5 stand-ins that exist only to be written to disk and read back
once by the loader.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from ..base import build_in_shape
from ..qwen_tiny import build_tiny_processor, build_tiny_tokenizer, build_tiny_vlm
from .checkpoint import AE_SCALING, AE_SHIFT, FLUX_DIR, axes_dims_rope, diffusers_to_bfl_vae
from .modeling import NexusGen, Prefill, build_adapter

# Named shapes for ``model.path: random:<shape>`` (random weights).
RANDOM_SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {},
    # Nexus-GenV2: Qwen2.5-VL-7B (28 layers of 3584, GQA 28/4, 152064 rows, 32-block ViT of 1280) + prefill (81 x
    # 3584) + vision_head (3584^2) -> adapter (3584 -> 4096 -> 4096) -> FLUX.1-dev (19 + 38 blocks, 24 heads of 128,
    # T5 width 4096, CLIP-L pooled 768, guidance) -> FLUX AE (128/256/512/512, 2 layers per block, 16 latents).
    "nexus-gen": dict(
        vlm_hidden=3584, vlm_layers=28, vlm_heads=28, vlm_kv_heads=4, vlm_intermediate=18944, vlm_vocab=152064,
        mrope_section=(16, 24, 24), vision_hidden=1280, vision_depth=32, vision_intermediate=3420, vision_heads=16,
        vision_fullatt_blocks=(7, 15, 23, 31), flux_layers=19, flux_single_layers=38, flux_heads=24,
        flux_head_dim=128, t5_dim=4096, clip_dim=768, vae_channels=(128, 256, 512, 512), vae_layers_per_block=2,
    ),
}
_TINY = dict(vlm_hidden=64, vlm_layers=2, vlm_heads=4, vlm_kv_heads=2, vlm_intermediate=128, vlm_vocab=None,
             mrope_section=None, vision_hidden=32, vision_depth=2, vision_intermediate=None, vision_heads=2,
             vision_fullatt_blocks=None, flux_layers=1, flux_single_layers=1, flux_heads=2, flux_head_dim=32,
             t5_dim=32, clip_dim=16, vae_channels=(64, 32, 32, 32), vae_layers_per_block=1)


def build_tiny_flux(layers: int = 1, single_layers: int = 1, heads: int = 2, head_dim: int = 32, t5_dim: int = 32,
                    clip_dim: int = 16) -> FluxTransformer2DModel:
    return FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=layers, num_single_layers=single_layers,
                                  attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=t5_dim,
                                  pooled_projection_dim=clip_dim, guidance_embeds=True,
                                  axes_dims_rope=axes_dims_rope(head_dim))


def build_tiny_ae(channels: tuple[int, ...] = (64, 32, 32, 32), layers_per_block: int = 1) -> AutoencoderKL:
    levels = len(channels)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
                         up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=tuple(channels),
                         layers_per_block=layers_per_block, latent_channels=16, norm_num_groups=32,
                         scaling_factor=AE_SCALING, shift_factor=AE_SHIFT, use_quant_conv=False,
                         use_post_quant_conv=False, mid_block_add_attention=True)


def tiny_text_encoders(clip_dim: int = 16, t5_dim: int = 32) -> tuple[CLIPTextModel, T5EncoderModel]:
    """Random CLIP-L and T5 stand-ins (vocabularies of 1000 and 100)."""
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=1000, hidden_size=clip_dim, intermediate_size=2 * clip_dim,
                                        num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77,
                                        bos_token_id=998, eos_token_id=999, pad_token_id=999))
    t5 = T5EncoderModel(T5Config(vocab_size=100, d_model=t5_dim, d_kv=8, d_ff=2 * t5_dim, num_layers=1, num_heads=2,
                                 pad_token_id=0, eos_token_id=1))
    return clip.eval(), t5.eval()


def build_tiny_nexus_gen(seed: int = 0, dtype: torch.dtype = torch.float32, *, with_encoders: bool = False,
                         **sizes: Any):
    """A random tiny Nexus-Gen, deterministic in ``seed`` (``sizes`` override ``_TINY``'s keys). The empty-prompt
    constants come from random stand-in encoders; ``with_encoders`` also returns them (model, clip, t5)."""
    unknown = set(sizes) - set(_TINY)
    if unknown:
        raise TypeError(f"build_tiny_nexus_gen: unknown size overrides {sorted(unknown)}; valid: {sorted(_TINY)}")
    s = {**_TINY, **sizes}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        processor = build_tiny_processor(build_tiny_tokenizer())
        vlm = build_tiny_vlm(processor.tokenizer, hidden_size=s["vlm_hidden"], num_layers=s["vlm_layers"],
                             num_heads=s["vlm_heads"], num_kv_heads=s["vlm_kv_heads"],
                             intermediate_size=s["vlm_intermediate"], vision_hidden_size=s["vision_hidden"],
                             vision_depth=s["vision_depth"], vision_intermediate_size=s["vision_intermediate"],
                             vision_heads=s["vision_heads"], vision_fullatt_blocks=s["vision_fullatt_blocks"],
                             vocab_size=s["vlm_vocab"], mrope_section=s["mrope_section"])
        prefill = Prefill(s["vlm_hidden"])
        adapter = build_adapter(s["vlm_hidden"], s["t5_dim"])
        transformer = build_tiny_flux(s["flux_layers"], s["flux_single_layers"], s["flux_heads"], s["flux_head_dim"],
                                      s["t5_dim"], s["clip_dim"])
        vae = build_tiny_ae(tuple(s["vae_channels"]), s["vae_layers_per_block"])
        if torch.empty(0).device.type == "meta" or s["t5_dim"] > 256:  # a released size: random constants
            clip = t5 = None
            pooled, negative = torch.randn(1, s["clip_dim"]), torch.randn(1, 512, s["t5_dim"])
        else:
            from .checkpoint import empty_prompt_constants_from

            clip, t5 = tiny_text_encoders(s["clip_dim"], s["t5_dim"])
            pooled, negative = empty_prompt_constants_from(clip, t5)
    model = NexusGen(vlm, processor, prefill, adapter, transformer, vae, pooled, negative, dtype=dtype)
    return (model, clip, t5) if with_encoders else model


def build_random_nexus_gen(shape: str, seed: int = 0, dtype: torch.dtype = torch.float32,
                           device: str | torch.device | None = None) -> NexusGen:
    """A Nexus-Gen of a named shape with random weights, built on ``device`` (``"meta"`` allocates nothing)."""
    return build_in_shape(build_tiny_nexus_gen, RANDOM_SHAPES, shape, seed, dtype, device)


def write_tiny_checkpoint(root: str, seed: int = 0, max_shard_size: str | int = "200KB", **sizes: Any) -> NexusGen:
    """Write a tiny random Nexus-Gen in the release's layout: ``root/Nexus-GenV2/`` (sharded, flat 4.49 config, the
    two extra keys, ``generation_decoder.bin``) and ``root/FLUX/FLUX.1-dev/{text_encoder, text_encoder_2,
    ae.safetensors}`` (the encoders, not rgpo's constants file). Returns the model that was written."""
    from .checkpoint import CONSTANTS_FILE

    model, clip, t5 = build_tiny_nexus_gen(seed, with_encoders=True, **sizes)
    path = os.path.join(root, "Nexus-GenV2")
    model.save_pretrained(path, max_shard_size=max_shard_size)
    # The release's Nexus-GenV2 folder has no FLUX folder inside: move ours next to it, as the release's models/.
    import shutil

    shutil.rmtree(os.path.join(path, "FLUX"))
    flux = os.path.join(root, FLUX_DIR)
    os.makedirs(flux, exist_ok=True)
    clip.save_pretrained(os.path.join(flux, "text_encoder"), safe_serialization=True)
    t5.save_pretrained(os.path.join(flux, "text_encoder_2"), safe_serialization=True)
    vae_state = {k: v.detach().contiguous() for k, v in model.vae.state_dict().items()}
    save_file(diffusers_to_bfl_vae(vae_state), os.path.join(flux, "ae.safetensors"))
    assert not os.path.exists(os.path.join(flux, CONSTANTS_FILE))
    return model
