"""Tiny, random, offline BLIP3-o built from the same classes as the released model (tests, smoke runs), and the
named random shapes at the released sizes (``model.path: random:blip3o-8b``).

Everything is built in memory: a byte-level BPE tokenizer trained in milliseconds on a built-in corpus with
Qwen's special tokens and BLIP3-o's three added ones, a ~200k-parameter Qwen2.5-VL, the 64 queries, a 2-block
Lumina DiT over 8 x 8 x 16 CLIP tokens, a 2-level SDXL-style UNet with ``text_time`` extras and a 4-block VAE
(factor 8). :func:`write_tiny_checkpoint` writes it in the released layout.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    UNet2DConditionModel,
)
from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2Tokenizer,
    Qwen2VLImageProcessor,
)
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX
from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

from ..base import build_in_shape
from .checkpoint import LUMINA_NEXT_SFT_SCHEDULER
from .dit import RELEASE_DIT, Blip3oDiT
from .modeling import ADDED_TOKENS, NUM_QUERIES, Blip3o, LatentQueries

QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                       "<|image_pad|>", "<|video_pad|>")
# SDXL's EulerDiscreteScheduler, as the release's diffusion-decoder/scheduler holds it.
SDXL_EULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                  prediction_type="epsilon", timestep_spacing="leading", steps_offset=1, interpolation_type="linear",
                  use_karras_sigmas=False)

_CORPUS = [
    "<think> The user wants an image. Let me think about the colors and the objects. </think>"
    "<answer> A photo of a red apple on a wooden table. </answer>",
    "<think> reasoning process here </think><answer> answer here </answer>",
    "You are a helpful assistant. When the user requests an image, the assistant first thinks about the reasoning "
    "process in the mind and then provides the user with a concise caption as the answer, then draws it.",
    "Please generate image based on the following caption: ",
    "a photo of a cat, a dog, a bird, a house, a tree, a car, the sky, the sea, red green blue yellow black white",
    "draw thing number one two three four five six seven eight nine",
]


def build_tiny_tokenizer(vocab_size: int = 384, corpus: Sequence[str] = ()) -> Qwen2Tokenizer:
    """Qwen2 byte-level BPE (256 byte symbols + merges learnt on a built-in corpus), Qwen's specials, then
    BLIP3-o's ``[IMG]``, ``[/IMG]``, ``<image>`` added after them, as the release adds them."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False, min_frequency=1)
    bpe.train_from_iterator(_CORPUS * 4 + list(corpus), trainer)
    model = json.loads(bpe.to_str())["model"]
    vocab = dict(model["vocab"])
    for token in (*QWEN_SPECIAL_TOKENS, *ADDED_TOKENS):
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[tuple(m) for m in model["merges"]],
                               pad_token="<|endoftext|>", eos_token="<|im_end|>")
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS],
                         special_tokens=True)
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in ADDED_TOKENS], special_tokens=True)
    tokenizer.padding_side = "left"
    return tokenizer


def build_tiny_vlm(tokenizer: Qwen2Tokenizer, *, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                   num_kv_heads: int = 2, intermediate_size: int = 128, vision_hidden_size: int = 32,
                   vision_depth: int = 2, vision_intermediate_size: int | None = None, vision_heads: int = 2,
                   vision_fullatt_blocks: Sequence[int] | None = None, vocab_size: int | None = None,
                   mrope_section: Sequence[int] | None = None, tie_word_embeddings: bool = False
                   ) -> Qwen2_5_VLForConditionalGeneration:
    """Random Qwen2.5-VL whose special-token ids match ``tokenizer``."""
    half = hidden_size // num_heads // 2
    mrope = list(mrope_section) if mrope_section else [half - 2 * (half // 3), half // 3, half // 3]
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=vocab_size or len(tokenizer), hidden_size=hidden_size,
                         intermediate_size=intermediate_size, num_hidden_layers=num_layers,
                         num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                         max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": mrope},
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"], tie_word_embeddings=tie_word_embeddings),
        vision_config=dict(depth=vision_depth, hidden_size=vision_hidden_size,
                           intermediate_size=vision_intermediate_size or 2 * vision_hidden_size,
                           num_heads=vision_heads, out_hidden_size=hidden_size,
                           fullatt_block_indexes=list(vision_fullatt_blocks or [vision_depth - 1])),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=tie_word_embeddings,
    )
    config._attn_implementation = "sdpa"
    return Qwen2_5_VLForConditionalGeneration._from_config(config)


def build_tiny_renderer(*, clip_dim: int = 16, block_out_channels: Sequence[int] = (16, 32),
                        transformer_layers: Sequence[int] = (0, 1), heads: Sequence[int] = (2, 4),
                        time_embed_dim: int = 8, layers_per_block: int = 1, norm_num_groups: int = 4,
                        sample_size: int = 4) -> UNet2DConditionModel:
    """An SDXL-style UNet (first level without attention, ``text_time`` extras of 6 time ids + the pooled
    tokens, linear projections) over 4 latent channels, cross-attending to ``clip_dim`` tokens."""
    down = tuple("CrossAttnDownBlock2D" if n else "DownBlock2D" for n in transformer_layers)
    up = tuple("CrossAttnUpBlock2D" if n else "UpBlock2D" for n in reversed(transformer_layers))
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, down_block_types=down, up_block_types=up,
        block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
        transformer_layers_per_block=tuple(max(n, 1) for n in transformer_layers), attention_head_dim=tuple(heads),
        cross_attention_dim=clip_dim, norm_num_groups=norm_num_groups, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=6 * time_embed_dim + clip_dim,
    )


def build_tiny_vae(block_out_channels: Sequence[int] = (8, 8, 8, 8), layers_per_block: int = 1,
                   norm_num_groups: int = 4) -> AutoencoderKL:
    """An AutoencoderKL with 4 latent channels, factor 2**(blocks-1), SDXL's scaling factor."""
    blocks = len(block_out_channels)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * blocks,
                         up_block_types=("UpDecoderBlock2D",) * blocks, block_out_channels=tuple(block_out_channels),
                         layers_per_block=layers_per_block, latent_channels=4, norm_num_groups=norm_num_groups,
                         sample_size=64, scaling_factor=0.13025)


TINY_EMBEDDING_ROWS = 512  # more rows than tokens, as released (Qwen2.5-VL-7B: 152064 rows, 151668 tokens)
TINY_STEPS = {"renderer": 4, "negative_dit": 3}
TINY_DIT = dict(input_size=8, patch_size=1, in_channels=16, dim=32, n_layers=2, n_heads=2, n_kv_heads=2,
                multiple_of=16)
SIZE_KEYS = {
    "vlm_hidden", "vlm_layers", "vlm_heads", "vlm_kv_heads", "vlm_intermediate", "vlm_vocab", "mrope_section",
    "vision_hidden", "vision_depth", "vision_intermediate", "vision_heads", "vision_fullatt_blocks", "tie_embeddings",
    "dit", "unet_channels", "unet_transformer_layers", "unet_heads", "unet_time_dim", "unet_layers_per_block",
    "unet_groups", "unet_sample_size", "vae_channels", "vae_layers_per_block", "vae_norm_groups", "vocab_size",
}


def build_tiny_blip3o(seed: int = 0, dtype: torch.dtype = torch.float32, corpus: Sequence[str] = (),
                      **sizes: Any) -> Blip3o:
    """A random tiny BLIP3-o, deterministic in ``seed``. ``sizes`` overrides (``SIZE_KEYS``; ``dit`` is a dict of
    DiT sizes); ``RANDOM_SHAPES`` holds named sets of them."""
    unknown = set(sizes) - SIZE_KEYS
    if unknown:
        raise TypeError(f"build_tiny_blip3o: unknown size overrides {sorted(unknown)}; valid: {sorted(SIZE_KEYS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = build_tiny_tokenizer(sizes.get("vocab_size", 384), corpus)
        vlm = build_tiny_vlm(
            tokenizer, hidden_size=sizes.get("vlm_hidden", 64), num_layers=sizes.get("vlm_layers", 2),
            num_heads=sizes.get("vlm_heads", 4), num_kv_heads=sizes.get("vlm_kv_heads", 2),
            intermediate_size=sizes.get("vlm_intermediate", 128), vision_hidden_size=sizes.get("vision_hidden", 32),
            vision_depth=sizes.get("vision_depth", 2), vision_intermediate_size=sizes.get("vision_intermediate"),
            vision_heads=sizes.get("vision_heads", 2), vision_fullatt_blocks=sizes.get("vision_fullatt_blocks"),
            vocab_size=sizes.get("vlm_vocab", TINY_EMBEDDING_ROWS), mrope_section=sizes.get("mrope_section"),
            tie_word_embeddings=sizes.get("tie_embeddings", False),
        )
        hidden = vlm.config.text_config.hidden_size
        queries = LatentQueries(NUM_QUERIES, hidden)
        dit_sizes = sizes.get("dit", TINY_DIT)
        dit = Blip3oDiT(hidden, **dit_sizes)
        clip_dim = dit.sizes["in_channels"]
        renderer = build_tiny_renderer(
            clip_dim=clip_dim, block_out_channels=sizes.get("unet_channels", (16, 32)),
            transformer_layers=sizes.get("unet_transformer_layers", (0, 1)), heads=sizes.get("unet_heads", (2, 4)),
            time_embed_dim=sizes.get("unet_time_dim", 8), layers_per_block=sizes.get("unet_layers_per_block", 1),
            norm_num_groups=sizes.get("unet_groups", 4), sample_size=sizes.get("unet_sample_size", 4))
        vae = build_tiny_vae(tuple(sizes.get("vae_channels", (8, 8, 8, 8))), sizes.get("vae_layers_per_block", 1),
                             sizes.get("vae_norm_groups", 4))
    image_processor = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=56 * 56)
    processor = Qwen2_5_VLProcessor(image_processor, tokenizer, Qwen2VLVideoProcessor())
    with torch.device("cpu"):  # schedulers keep CPU tables whatever device the weights are built on
        schedulers = FlowMatchEulerDiscreteScheduler(**LUMINA_NEXT_SFT_SCHEDULER), EulerDiscreteScheduler(**SDXL_EULER)
    model = Blip3o(vlm, tokenizer, queries, dit, renderer, vae, *schedulers, processor=processor, dtype=dtype)
    if not sizes:  # the tiny model renders in a few steps (tests); named shapes keep the release's 50
        model.checkpoint_steps.update(TINY_STEPS)
    return model


# Named shapes for ``model.path: random:<shape>``.
_QWEN_7B = dict(vlm_hidden=3584, vlm_layers=28, vlm_heads=28, vlm_kv_heads=4, vlm_intermediate=18944,
                vlm_vocab=152064, mrope_section=(16, 24, 24), vision_hidden=1280, vision_depth=32,
                vision_intermediate=3420, vision_heads=16, vision_fullatt_blocks=(7, 15, 23, 31))
# The diffusion decoder: SDXL's UNet (320/640/1280, 1/2/10 transformer layers, 5/10/20 heads, 256-wide time ids)
# cross-attending to 1792-wide EVA-CLIP tokens, and SDXL's VAE.
_DECODER = dict(unet_channels=(320, 640, 1280), unet_transformer_layers=(0, 2, 10), unet_heads=(5, 10, 20),
                unet_time_dim=256, unet_layers_per_block=2, unet_groups=32, unet_sample_size=128,
                vae_channels=(128, 256, 512, 512), vae_layers_per_block=2, vae_norm_groups=32)
RANDOM_SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {},
    # BLIP3o-Model-8B: Qwen2.5-VL-7B-Instruct + the release's DiT (1.4 B) + the decoder.
    "blip3o-8b": dict(**_QWEN_7B, dit=dict(RELEASE_DIT), **_DECODER),
    # BLIP3o-Model-4B: Qwen2.5-VL-3B-Instruct (36 x 2048, 16/2 heads, tied embeddings) + the same DiT and decoder.
    "blip3o-4b": dict(vlm_hidden=2048, vlm_layers=36, vlm_heads=16, vlm_kv_heads=2, vlm_intermediate=11008,
                      vlm_vocab=151936, mrope_section=(16, 24, 24), vision_hidden=1280, vision_depth=32,
                      vision_intermediate=3420, vision_heads=16, vision_fullatt_blocks=(7, 15, 23, 31),
                      tie_embeddings=True, dit=dict(RELEASE_DIT), **_DECODER),
}


def build_random_blip3o(shape: str, seed: int = 0, dtype: torch.dtype = torch.float32,
                        device: str | torch.device | None = None) -> Blip3o:
    """A BLIP3-o of a named shape with random weights, built directly on ``device`` (``"meta"``: nothing
    allocated)."""
    return build_in_shape(build_tiny_blip3o, RANDOM_SHAPES, shape, seed, dtype, device)


def write_tiny_checkpoint(path: str, seed: int = 0, max_shard_size: int | str = "256KB", **sizes: Any) -> Blip3o:
    """Write a tiny random BLIP3-o in the released layout under ``path`` (several root shards, as released);
    returns the model that was written."""
    model = build_tiny_blip3o(seed, **sizes)
    model.save_pretrained(path, max_shard_size=max_shard_size)
    return model
