"""Tiny, random, offline MindOmni built from the same classes as the real model (for tests and the toy demo).

Everything is built in memory: a byte-level BPE tokenizer trained in a few milliseconds on a built-in corpus
(so ``<think>``-style text stays short), Qwen's special tokens and chat template, a Qwen2.5-VL processor, a
~200k-parameter Qwen2.5-VL, the Phi-3 connector, an OmniGen decoder and a 4-block AutoencoderKL (factor 8, so
images of H x W give H*W/256 image tokens as in the real model). No hub access.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from diffusers import AutoencoderKL, OmniGenTransformer2DModel
from transformers import (
    Phi3Config,
)

from ..base import build_in_shape
from ..qwen_tiny import QWEN_SPECIAL_TOKENS, build_tiny_processor, build_tiny_tokenizer, build_tiny_vlm
from .connector import MindOmniConnector, phi3_config_from_dict
from .modeling import MindOmni

__all__ = ["QWEN_SPECIAL_TOKENS", "build_tiny_processor", "build_tiny_tokenizer", "build_tiny_vlm",
           "build_tiny_mindomni", "build_random_mindomni", "write_tiny_checkpoint", "RANDOM_SHAPES"]

def tiny_decoder_config(
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 128,
    vocab_size: int = 128,
) -> Phi3Config:
    """OmniGen-v1-style Phi-3 config (``su`` rope with all-one factors) shared by the decoder and the connector."""
    half = hidden_size // num_heads // 2
    return phi3_config_from_dict(
        dict(
            model_type="phi3",
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_heads,
            max_position_embeddings=131072,
            original_max_position_embeddings=4096,
            rope_scaling={"type": "su", "short_factor": [1.0] * half, "long_factor": [1.0] * half},
            rope_theta=10000.0,
            rms_norm_eps=1e-5,
            pad_token_id=vocab_size - 1,
            bos_token_id=1,
            eos_token_id=2,
        )
    )


def build_tiny_decoder(
    phi3: Phi3Config, *, time_step_dim: int = 32, pos_embed_max_size: int = 32
) -> OmniGenTransformer2DModel:
    """Random OmniGen decoder following ``phi3`` (4 latent channels, patch 2)."""
    rope = phi3.rope_parameters
    return OmniGenTransformer2DModel(
        in_channels=4,
        patch_size=2,
        hidden_size=phi3.hidden_size,
        rms_norm_eps=phi3.rms_norm_eps,
        num_attention_heads=phi3.num_attention_heads,
        num_key_value_heads=phi3.num_key_value_heads,
        intermediate_size=phi3.intermediate_size,
        num_layers=phi3.num_hidden_layers,
        pad_token_id=phi3.pad_token_id,
        vocab_size=phi3.vocab_size,
        max_position_embeddings=phi3.max_position_embeddings,
        original_max_position_embeddings=phi3.original_max_position_embeddings,
        rope_base=rope["rope_theta"],
        rope_scaling={"short_factor": list(rope["short_factor"]), "long_factor": list(rope["long_factor"])},
        pos_embed_max_size=pos_embed_max_size,
        time_step_dim=time_step_dim,
    )


def build_tiny_vae(
    block_out_channels: tuple[int, ...] = (8, 8, 8, 8), layers_per_block: int = 1, norm_num_groups: int = 4
) -> AutoencoderKL:
    """Random AutoencoderKL with 4 latent channels and factor 2**(blocks-1) (8 by default), SDXL's scaling."""
    blocks = len(block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        latent_channels=4,
        norm_num_groups=norm_num_groups,
        sample_size=64,
        scaling_factor=0.13025,
    )


def build_tiny_mindomni(
    seed: int = 0, dtype: torch.dtype = torch.float32, corpus: Sequence[str] = (), **sizes: Any
) -> MindOmni:
    """A random tiny MindOmni (all four parts + processor), deterministic in ``seed``; the tokenizer's merges
    are also learnt on ``corpus``.

    ``sizes`` overrides: vlm_hidden, vlm_layers, vlm_heads, vlm_kv_heads, vlm_intermediate, vlm_vocab (embedding
    rows), mrope_section, vision_hidden, vision_depth, vision_intermediate, vision_heads, vision_fullatt_blocks,
    dec_hidden, dec_layers, dec_heads, dec_intermediate, dec_vocab, time_step_dim, pos_embed_max_size,
    vae_channels (tuple), vae_layers_per_block, vae_norm_groups, vocab_size (tokenizer). ``RANDOM_SHAPES`` holds
    named sets of them.
    """
    known = {
        "vlm_hidden", "vlm_layers", "vlm_heads", "vlm_kv_heads", "vlm_intermediate", "vlm_vocab", "mrope_section",
        "vision_hidden", "vision_depth", "vision_intermediate", "vision_heads", "vision_fullatt_blocks",
        "dec_hidden", "dec_layers", "dec_heads", "dec_intermediate", "dec_vocab", "time_step_dim",
        "pos_embed_max_size", "vae_channels", "vae_layers_per_block", "vae_norm_groups", "vocab_size",
    }  # fmt: skip
    unknown = set(sizes) - known
    if unknown:
        raise TypeError(
            f"build_tiny_mindomni: unknown size overrides {sorted(unknown)}; valid: {sorted(known)}"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        processor = build_tiny_processor(build_tiny_tokenizer(sizes.get("vocab_size", 512), corpus))
        vlm = build_tiny_vlm(
            processor.tokenizer,
            hidden_size=sizes.get("vlm_hidden", 64),
            num_layers=sizes.get("vlm_layers", 2),
            num_heads=sizes.get("vlm_heads", 4),
            num_kv_heads=sizes.get("vlm_kv_heads", 2),
            intermediate_size=sizes.get("vlm_intermediate", 128),
            vision_hidden_size=sizes.get("vision_hidden", 32),
            vision_depth=sizes.get("vision_depth", 2),
            vision_intermediate_size=sizes.get("vision_intermediate"),
            vision_heads=sizes.get("vision_heads", 2),
            vision_fullatt_blocks=sizes.get("vision_fullatt_blocks"),
            vocab_size=sizes.get("vlm_vocab"),
            mrope_section=sizes.get("mrope_section"),
        )
        phi3 = tiny_decoder_config(
            hidden_size=sizes.get("dec_hidden", 64),
            num_layers=sizes.get("dec_layers", 2),
            num_heads=sizes.get("dec_heads", 4),
            intermediate_size=sizes.get("dec_intermediate", 128),
            vocab_size=sizes.get("dec_vocab", 128),
        )
        connector = MindOmniConnector(vlm.config.text_config.hidden_size, phi3)
        decoder = build_tiny_decoder(
            phi3,
            time_step_dim=sizes.get("time_step_dim", 32),
            pos_embed_max_size=sizes.get("pos_embed_max_size", 32),
        )
        vae = build_tiny_vae(tuple(sizes.get("vae_channels", (8, 8, 8, 8))), sizes.get("vae_layers_per_block", 1),
                             sizes.get("vae_norm_groups", 4))
    return MindOmni(vlm, processor, connector, decoder, vae, dtype=dtype)


# Named shapes for ``model.path: random:<shape>`` (random weights, e.g. for benchmarks at the real size).
RANDOM_SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {},
    # MindOmni: Qwen2.5-VL-7B (28 layers of 3584, GQA 28/4 heads, 152064 embedding rows, 32-block vision tower
    # of 1280 with full attention in blocks 7/15/23/31) -> connector -> OmniGen-v1 (Phi-3-mini: 32 layers of
    # 3072, 32 heads, 32064 rows) -> SDXL's VAE (128/256/512/512 channels, 2 layers per block, 32 groups).
    "mindomni-7b": dict(
        vlm_hidden=3584, vlm_layers=28, vlm_heads=28, vlm_kv_heads=4, vlm_intermediate=18944, vlm_vocab=152064,
        mrope_section=(16, 24, 24), vision_hidden=1280, vision_depth=32, vision_intermediate=3420, vision_heads=16,
        vision_fullatt_blocks=(7, 15, 23, 31), dec_hidden=3072, dec_layers=32, dec_heads=32, dec_intermediate=8192,
        dec_vocab=32064, time_step_dim=256, pos_embed_max_size=192, vae_channels=(128, 256, 512, 512),
        vae_layers_per_block=2, vae_norm_groups=32,
    ),
    # A mid size where work, not Python overhead, dominates a CPU step (the floor benchmark): a 99 M-parameter
    # VLM (12 layers of 768, GQA 12/2 heads, 16384 embedding rows, untied head) -> a 7 M connector -> a 28 M
    # decoder (8 layers of 512) -> a 0.3 M VAE.
    "mid": dict(
        vlm_hidden=768, vlm_layers=12, vlm_heads=12, vlm_kv_heads=2, vlm_intermediate=2048, vlm_vocab=16384,
        mrope_section=(8, 12, 12), vision_hidden=64, vision_depth=2, vision_heads=2, dec_hidden=512, dec_layers=8,
        dec_heads=8, dec_intermediate=1536, dec_vocab=128, time_step_dim=64, pos_embed_max_size=32,
        vae_channels=(16, 32, 32, 32), vae_layers_per_block=1, vae_norm_groups=8,
    ),
}


def build_random_mindomni(
    shape: str, seed: int = 0, dtype: torch.dtype = torch.float32, device: str | torch.device | None = None
) -> MindOmni:
    """A MindOmni of a named shape (``RANDOM_SHAPES``) with random weights, built directly on ``device`` (a 7B
    initialised on a GPU takes seconds, on a CPU minutes; ``"meta"`` allocates nothing)."""
    return build_in_shape(build_tiny_mindomni, RANDOM_SHAPES, shape, seed, dtype, device)


def write_tiny_checkpoint(path: str, seed: int = 0, **sizes: Any) -> MindOmni:
    """Write a tiny random MindOmni in the released layout under ``path``; returns the model that was written."""
    model = build_tiny_mindomni(seed, **sizes)
    model.save_pretrained(path)
    return model
