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
from .modeling import MindOmni

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
    vision_intermediate_size: int | None = None,
    vision_heads: int = 2,
    vision_fullatt_blocks: Sequence[int] | None = None,
    vocab_size: int | None = None,
    mrope_section: Sequence[int] | None = None,
) -> Qwen2_5_VLForConditionalGeneration:
    """Random Qwen2.5-VL whose special-token ids match ``tokenizer``; built with ``_from_config`` (ZeRO-3 safe).

    ``vocab_size`` (embedding rows) defaults to the tokenizer's length; a larger one is what released checkpoints
    carry too (Qwen2.5-VL-7B: 152064 rows for 151665 tokens)."""
    head_dim = hidden_size // num_heads
    half = head_dim // 2
    # sums to head_dim / 2, as Qwen requires (the released 7B uses [16, 24, 24])
    mrope = list(mrope_section) if mrope_section else [half - 2 * (half // 3), half // 3, half // 3]
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=vocab_size or len(tokenizer),
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
            intermediate_size=vision_intermediate_size or 2 * vision_hidden_size,
            num_heads=vision_heads,
            out_hidden_size=hidden_size,
            fullatt_block_indexes=list(vision_fullatt_blocks or [vision_depth - 1]),
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
}


def build_random_mindomni(
    shape: str, seed: int = 0, dtype: torch.dtype = torch.float32, device: str | torch.device | None = None
) -> MindOmni:
    """A MindOmni of a named shape (``RANDOM_SHAPES``) with random weights, built directly on ``device`` (a 7B
    initialised on a GPU takes seconds, on a CPU minutes; ``"meta"`` allocates nothing)."""
    if shape not in RANDOM_SHAPES:
        raise ValueError(f"unknown random model shape {shape!r}; known: {sorted(RANDOM_SHAPES)}")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialised in the run's dtype: no float32 copy of a 7B on the way
    try:
        with torch.device(device or "cpu"):
            return build_tiny_mindomni(seed, dtype, **RANDOM_SHAPES[shape])
    finally:
        torch.set_default_dtype(previous)


def write_tiny_checkpoint(path: str, seed: int = 0, **sizes: Any) -> MindOmni:
    """Write a tiny random MindOmni in the released layout under ``path``; returns the model that was written."""
    model = build_tiny_mindomni(seed, **sizes)
    model.save_pretrained(path)
    return model
