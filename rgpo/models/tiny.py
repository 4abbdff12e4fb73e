"""Tiny, random, offline MindOmni built from the same classes as the real model (for tests and the toy demo).

Everything is built in memory: a byte-level BPE tokenizer trained in a few milliseconds on a built-in corpus
(so ``<think>``-style text stays short), Qwen's special tokens and chat template, a Qwen2.5-VL processor, a
~200k-parameter Qwen2.5-VL, the Phi-3 connector, an OmniGen decoder and a 4-block AutoencoderKL (factor 8, so
images of H x W give H*W/256 image tokens as in the real model). No hub access.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import torch
from diffusers import AutoencoderKL, OmniGenTransformer2DModel
from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    Phi3Config,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2Tokenizer,
    Qwen2VLImageProcessor,
)
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX
from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

from .connector import MindOmniConnector, phi3_config_from_dict
from .mindomni import MindOmni

QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Qwen2-VL's chat template (system / user / assistant turns; images as vision_start, image_pad, vision_end).
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "<think> The user wants an image. Let me think about the colors and the objects. </think>"
    "<answer> A photo of a red apple on a wooden table. </answer>",
    "<think> reasoning process here </think><answer> answer here </answer>",
    "You are a helpful assistant. When the user requests an image, the assistant first thinks about the "
    "reasoning process in the mind and then provides the user with concise prompt as the answer. The reasoning "
    "process and answer are enclosed within <think> </think> and <answer> </answer> tags, respectively, i.e., "
    "<think> reasoning process here </think><answer> answer here </answer>.",
    "Generate an image according to the following instructions\n",
    "a photo of a cat, a dog, a bird, a house, a tree, a car, the sky, the sea, red green blue yellow black white",
    "The object most commonly admired during the festival is the moon. A small square in the middle of the image.",
    "low quality, jpeg artifacts, ugly, duplicate, morbid, mutilated, extra fingers, poorly drawn hands, "
    "poorly drawn face, deformed, blurry, bad anatomy, bad proportions, extra limbs, cloned face, disfigured",
]


def build_tiny_tokenizer(vocab_size: int = 512, corpus: Sequence[str] = ()) -> Qwen2Tokenizer:
    """Qwen2 byte-level BPE tokenizer: the 256 byte symbols, merges learnt on a built-in corpus (plus ``corpus``),
    Qwen's specials.

    Any text round-trips (byte level); the special tokens sit after the BPE vocabulary, as in Qwen.
    """
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(QWEN_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        min_frequency=1,
    )
    bpe.train_from_iterator(_CORPUS * 4 + list(corpus), trainer)
    model = json.loads(bpe.to_str())["model"]
    vocab = dict(model["vocab"])
    for token in QWEN_SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[tuple(m) for m in model["merges"]])
    tokenizer.add_tokens(
        [AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS], special_tokens=True
    )
    tokenizer.chat_template = QWEN2_VL_CHAT_TEMPLATE
    tokenizer.padding_side = "left"
    return tokenizer


def build_tiny_processor(tokenizer: Qwen2Tokenizer | None = None) -> Qwen2_5_VLProcessor:
    """Qwen2.5-VL processor around the tiny tokenizer; any small image becomes 56x56 pixels = 4 image tokens."""
    tokenizer = tokenizer if tokenizer is not None else build_tiny_tokenizer()
    image_processor = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=56 * 56)
    return Qwen2_5_VLProcessor(
        image_processor, tokenizer, Qwen2VLVideoProcessor(), chat_template=QWEN2_VL_CHAT_TEMPLATE
    )


def build_tiny_vlm(
    tokenizer: Qwen2Tokenizer,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    vision_hidden_size: int = 32,
    vision_depth: int = 2,
) -> Qwen2_5_VLForConditionalGeneration:
    """Random Qwen2.5-VL whose special-token ids match ``tokenizer``; built with ``_from_config`` (ZeRO-3 safe)."""
    head_dim = hidden_size // num_heads
    half = head_dim // 2
    mrope = [half - 2 * (half // 3), half // 3, half // 3]  # sums to head_dim / 2, as Qwen requires
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads,
            max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": mrope},
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
            tie_word_embeddings=False,
        ),
        vision_config=dict(
            depth=vision_depth,
            hidden_size=vision_hidden_size,
            intermediate_size=2 * vision_hidden_size,
            num_heads=2,
            out_hidden_size=hidden_size,
            fullatt_block_indexes=[vision_depth - 1],
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    config._attn_implementation = "sdpa"
    return Qwen2_5_VLForConditionalGeneration._from_config(config)


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


def build_tiny_vae(block_out_channels: tuple[int, ...] = (8, 8, 8, 8)) -> AutoencoderKL:
    """Random AutoencoderKL with 4 latent channels and factor 2**(blocks-1) (8 by default), SDXL's scaling."""
    blocks = len(block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=0.13025,
    )


def build_tiny_mindomni(
    seed: int = 0, dtype: torch.dtype = torch.float32, corpus: Sequence[str] = (), **sizes: Any
) -> MindOmni:
    """A random tiny MindOmni (all four parts + processor), deterministic in ``seed``; the tokenizer's merges
    are also learnt on ``corpus``.

    ``sizes`` overrides: vlm_hidden, vlm_layers, vlm_heads, vlm_kv_heads, vlm_intermediate, vision_hidden,
    vision_depth, dec_hidden, dec_layers, dec_heads, dec_intermediate, time_step_dim, pos_embed_max_size,
    vae_channels (tuple), vocab_size (tokenizer).
    """
    known = {
        "vlm_hidden", "vlm_layers", "vlm_heads", "vlm_kv_heads", "vlm_intermediate", "vision_hidden",
        "vision_depth", "dec_hidden", "dec_layers", "dec_heads", "dec_intermediate", "time_step_dim",
        "pos_embed_max_size", "vae_channels", "vocab_size",
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
        )
        phi3 = tiny_decoder_config(
            hidden_size=sizes.get("dec_hidden", 64),
            num_layers=sizes.get("dec_layers", 2),
            num_heads=sizes.get("dec_heads", 4),
            intermediate_size=sizes.get("dec_intermediate", 128),
        )
        connector = MindOmniConnector(vlm.config.text_config.hidden_size, phi3)
        decoder = build_tiny_decoder(
            phi3,
            time_step_dim=sizes.get("time_step_dim", 32),
            pos_embed_max_size=sizes.get("pos_embed_max_size", 32),
        )
        vae = build_tiny_vae(tuple(sizes.get("vae_channels", (8, 8, 8, 8))))
    return MindOmni(vlm, processor, connector, decoder, vae, dtype=dtype)


def write_tiny_checkpoint(path: str, seed: int = 0, **sizes: Any) -> MindOmni:
    """Write a tiny random MindOmni in the released layout under ``path``; returns the model that was written."""
    model = build_tiny_mindomni(seed, **sizes)
    model.save_pretrained(path)
    return model
