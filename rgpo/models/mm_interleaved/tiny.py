"""Tiny, random, offline MM-Interleaved built from the same classes as the real one, its random shapes at the
released sizes, and its released layout on disk.

Tiny: a byte-level tokenizer (``<unk> <s> </s>``, the 256 byte symbols, ``<pad>``; soi and ``<|image|>`` added
last as the release adds them), a 4-layer Llama of 64 (synchronizer in layer 0), a 4-layer CLIP ViT of 32 at
16 px / patch 4 (a 4 x 4 grid: adapter maps 16, 8, 4, 2), 4 image tokens, an 8-query decoder Q-Former of 32, a
2-level UNet (32, 64) and a 3-level VAE (factor 4): 32 px images are 8 x 8 latents. The synchronizers have 4
heads (the release's 16) to keep the tiny model fast.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import CLIPVisionConfig, LlamaConfig, PreTrainedTokenizerFast

from ..base import build_in_shape
from .checkpoint import RELEASE
from .modeling import MMInterleaved, build_parts
from .options import SYSTEM_PROMPT

SD21_SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "clip_sample": False,
                  "num_train_timesteps": 1000, "prediction_type": "epsilon", "set_alpha_to_one": False,
                  "steps_offset": 1, "trained_betas": None}

TINY: dict[str, Any] = dict(
    llm_hidden=64, llm_layers=4, llm_heads=4, llm_intermediate=128, vocab=None,
    vit_hidden=32, vit_layers=4, vit_heads=2, vit_intermediate=64, vit_image=16, vit_patch=4,
    unet_channels=(32, 64), unet_layers=1, unet_heads=8, cross_dim=32, unet_sample=8,
    vae_channels=(8, 8, 16), vae_layers=1, vae_sample=32,
    arch=dict(num_img_token=4, image_embed_dim=32, cross_attention_frequency=4, spatial_shapes=[8, 4, 2],
              vit_image_size=16, conv_inplane=8,
              vision_perceiver=dict(num_queries=4, hidden_size=32, encoder_hidden_size=32,
                                    cross_attention_frequency=1, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=64, qk_normalization=True),
              decoder_perceiver=dict(num_queries=8, hidden_size=32, encoder_hidden_size=64,
                                     cross_attention_frequency=1, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0),
              decoder_image_size=32, mmfs_value_shapes=[16, 8, 4, 2], mmfs_attn_dim=32, mmfs_heads=4,
              llm_mmfs_heads=4, pad_token_id=None, steps=4, guidance_scale=7.5, seed=42),
)
RANDOM_SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {},
    # mm_interleaved_pretrain: Vicuna-13B v1.3 (40 layers of 5120, 40 heads, 13824, 32002 rows, synchronizer in
    # layers 0, 4, ..., 36), CLIP ViT-L/14 at 224 (24 x 1024, 16 heads) + ViT-Adapter, Q-Formers of the release's
    # yaml, SD-2.1-base's UNet (320/640/1280/1280, 2 layers per block, heads 5/10/20/20, cross 1024) and VAE.
    "mm-interleaved-13b": dict(
        llm_hidden=5120, llm_layers=40, llm_heads=40, llm_intermediate=13824, vocab=32002,
        vit_hidden=1024, vit_layers=24, vit_heads=16, vit_intermediate=4096, vit_image=224, vit_patch=14,
        unet_channels=(320, 640, 1280, 1280), unet_layers=2, unet_heads=(5, 10, 20, 20), cross_dim=1024,
        unet_sample=64, vae_channels=(128, 256, 512, 512), vae_layers=2, vae_sample=768, arch={},
    ),
}


def build_tiny_tokenizer(vocab_size: int = 1024, unused: int = 96) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on the fly on rgpo's prompt (so a prompt is tens of tokens, not hundreds):
    ``<unk>`` 0, ``<s>`` 1 (prepended), ``</s>`` 2, then the bytes and merges, ``unused`` spare rows, ``<pad>``."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = [SYSTEM_PROMPT, "USER: ASSISTANT: <think> </think> <answer> </answer> a red apple, a small cat "
              "sitting on a wooden table under a bright sky; draw thing number 0 1 2 3 4 5 6 7 8 9"]
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    # unused rows between the text tokens and the last three, as a real vocabulary has rows no prompt uses
    out.add_special_tokens({"additional_special_tokens": [f"<unused_{i}>" for i in range(unused)]})
    out.add_special_tokens({"pad_token": "<pad>"})
    return out


def _unet_config(s: dict) -> dict:
    levels = len(s["unet_channels"])
    return dict(sample_size=s["unet_sample"], in_channels=4, out_channels=4,
                down_block_types=["CrossAttnDownBlock2D"] * (levels - 1) + ["DownBlock2D"],
                up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (levels - 1),
                block_out_channels=list(s["unet_channels"]), layers_per_block=s["unet_layers"],
                cross_attention_dim=s["cross_dim"], attention_head_dim=s["unet_heads"], use_linear_projection=True,
                norm_num_groups=min(32, s["unet_channels"][0] // 2))


def _vae_config(s: dict) -> dict:
    levels = len(s["vae_channels"])
    return dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * levels,
                up_block_types=["UpDecoderBlock2D"] * levels, block_out_channels=list(s["vae_channels"]),
                layers_per_block=s["vae_layers"], latent_channels=4, norm_num_groups=min(32, s["vae_channels"][0] // 2),
                sample_size=s["vae_sample"], scaling_factor=0.18215)


def build_tiny_mm_interleaved(seed: int = 0, dtype: torch.dtype = torch.float32, **sizes: Any) -> MMInterleaved:
    """A random MM-Interleaved, deterministic in ``seed`` (``sizes`` override :data:`TINY`'s keys; ``arch`` keys
    override the release's hyper-parameters)."""
    from diffusers import DDPMScheduler

    unknown = set(sizes) - set(TINY)
    if unknown:
        raise TypeError(f"build_tiny_mm_interleaved: unknown size overrides {sorted(unknown)}; valid: {sorted(TINY)}")
    s = {**TINY, **sizes}
    arch = copy.deepcopy(RELEASE)
    arch.update(copy.deepcopy(s["arch"]))
    if s["vocab"] is None:
        tokenizer = build_tiny_tokenizer()
        vocab = len(tokenizer) + 2
    else:
        tokenizer, vocab = None, s["vocab"]
    llm = LlamaConfig(vocab_size=vocab, hidden_size=s["llm_hidden"], intermediate_size=s["llm_intermediate"],
                      num_hidden_layers=s["llm_layers"], num_attention_heads=s["llm_heads"],
                      num_key_value_heads=s["llm_heads"], max_position_embeddings=2048, rms_norm_eps=1e-6,
                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    vit = CLIPVisionConfig(hidden_size=s["vit_hidden"], intermediate_size=s["vit_intermediate"],
                           num_hidden_layers=s["vit_layers"], num_attention_heads=s["vit_heads"],
                           image_size=s["vit_image"], patch_size=s["vit_patch"], hidden_act="quick_gelu",
                           layer_norm_eps=1e-5, projection_dim=s["vit_hidden"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        parts = build_parts(arch, llm, vit, _unet_config(s), _vae_config(s))
        if tokenizer is None:
            tokenizer = _placeholder_tokenizer(vocab)
        model = MMInterleaved(**parts, scheduler=DDPMScheduler.from_config(SD21_SCHEDULER), tokenizer=tokenizer, arch=arch,
                              dtype=dtype)
        if s["vocab"] is None:
            # A fresh release model zero-inits the synchronizers' output convs and gates (they add nothing until
            # trained); the tiny model opens them so that its tests see every path carry signal. Its text head
            # starts as the release's: the new tokens' rows of ``head`` zero with bias -100, ``head_new`` zero
            # with bias 95 (soi and <|image|> at logit -5 until trained).
            with torch.no_grad():
                model.soi_token.normal_(std=0.02)
                for block in model.image_decoder.decoder.mmfs_module.modules():
                    if isinstance(block, torch.nn.Conv2d) and block.kernel_size == (1, 1) and block.weight.abs().sum() == 0:
                        block.weight.normal_(std=0.02)
                for layer in model.mm_decoder.layers:
                    if getattr(layer, "llama_cross_attn", None) is not None:
                        layer.llama_cross_attn.gate.fill_(0.5)
                head, new = model.text_decoder.head, model.text_decoder.head_new
                head.weight[-2:] = 0.0
                head.bias[-2:] = -100.0
                new.weight.zero_()
                new.bias.fill_(95.0)
    return model


def _placeholder_tokenizer(vocab: int) -> PreTrainedTokenizerFast:
    """A tokenizer with the released vocabulary's size and special ids (``random:`` shapes hold no real one)."""
    table = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<t{i}>": i for i in range(3, vocab - 2)}}
    tok = Tokenizer(models.WordLevel(vocab=table, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    out.add_special_tokens({"additional_special_tokens": ["<|beginofimage|>", "<|image|>"]})
    return out


def build_random_mm_interleaved(shape: str, seed: int = 0, dtype: torch.dtype = torch.float32,
                                device: str | torch.device | None = None) -> MMInterleaved:
    """An MM-Interleaved of a named shape with random weights, built on ``device`` (``"meta"`` allocates nothing)."""
    return build_in_shape(build_tiny_mm_interleaved, RANDOM_SHAPES, shape, seed, dtype, device)


def write_tiny_checkpoint(root: str, seed: int = 0, **sizes: Any) -> MMInterleaved:
    """Write a tiny random MM-Interleaved in the release's layout under ``root``; returns the model written."""
    model = build_tiny_mm_interleaved(seed, **sizes)
    model.save_pretrained(root)
    with open(os.path.join(root, "mm_interleaved_config.json")) as f:
        json.load(f)  # written for the tiny sizes: the loader reads the hyper-parameters from it
    return model
