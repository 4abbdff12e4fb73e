"""Tiny, random, offline Qwen2.5-VL pieces every Qwen-based family's tiny factory builds on: a byte-level BPE
tokenizer trained in a few milliseconds on a built-in corpus (so ``<think>``-style text stays short) with Qwen's
special tokens and chat template, a Qwen2.5-VL processor, and a ~200k-parameter Qwen2.5-VL. No hub access.
Shared here so that no family package imports another's.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

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
