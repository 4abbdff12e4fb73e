"""MM-Interleaved's released layout, read and written.

::

    <path>/mm_interleaved_pretrain/pytorch_model-00001-of-00002.bin   ONE flat state dict of the whole model,
    <path>/mm_interleaved_pretrain/pytorch_model-00002-of-00002.bin   split in two torch pickles (loaded with
    <path>/mm_interleaved_pretrain/pytorch_model.bin.index.json        weights_only=True) + the index
    <path>/assets/lmsys/vicuna-13b-v1.3/config.json (+ tokenizer)      the LLM's config and tokenizer
    <path>/assets/openai/clip-vit-large-patch14/config.json            the ViT's config (CLIPConfig or CLIPVisionConfig)
    <path>/assets/stabilityai/stable-diffusion-2-1-base/{unet,vae,scheduler}/   the SD-2.1 parts' configs

The state dict's keys are the release module's: ``visual_tokenizer.*``, ``mm_decoder.*`` (a ``LlamaModel``),
``text_decoder.{head,head_new}.*``, ``image_decoder.{perceiver_resampler, neg_prompt_embeds, decoder.unet,
decoder.vae, decoder.mmfs_module}.*``, ``context_feat_proj.*``, ``soi_token``. The release loads it non-strictly:
rgpo requires every weight it has (a missing one is an error naming it) and reports the keys it does not use
(rotary caches, the position-id buffers). A VAE missing from the state dict is read from the SD folder's
``vae/diffusion_pytorch_model.{safetensors,bin}``.

The release's hyper-parameters live in its ``mm_inference.yaml`` (:data:`RELEASE`); a folder written for a model
of other sizes (rgpo's tiny one) records them in ``mm_interleaved_config.json``.
"""

from __future__ import annotations

import json
import logging
import os
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .modeling import MMInterleaved

logger = logging.getLogger(__name__)

WEIGHTS_DIR = "mm_interleaved_pretrain"
INDEX = f"{WEIGHTS_DIR}/pytorch_model.bin.index.json"
LLM_DIR = "assets/lmsys/vicuna-13b-v1.3"
CLIP_DIR = "assets/openai/clip-vit-large-patch14"
SD_DIR = "assets/stabilityai/stable-diffusion-2-1-base"
ARCH_FILE = "mm_interleaved_config.json"
LAYOUT = {
    INDEX: "the index of the two torch-pickle shards of the flat state dict",
    f"{LLM_DIR}/config.json": "Vicuna-13B v1.3's LlamaConfig (and its tokenizer beside it)",
    f"{CLIP_DIR}/config.json": "CLIP ViT-L/14's config",
    f"{SD_DIR}/unet/config.json": "SD-2.1-base's UNet2DConditionModel config",
    f"{SD_DIR}/scheduler/scheduler_config.json": "SD-2.1-base's scheduler config (loaded as DDPMScheduler)",
}

# The release's mm_inference.yaml and the MMInterleaved class defaults.
RELEASE: dict[str, Any] = {
    "num_img_token": 64,
    "image_embed_dim": 1024,
    "cross_attention_frequency": 4,
    "spatial_shapes": [32, 16, 8],
    "seq_len": 2048,
    "vit_image_size": 224,
    "conv_inplane": 64,
    "vision_perceiver": {"num_queries": 64, "hidden_size": 768, "encoder_hidden_size": 1024,
                         "cross_attention_frequency": 2, "num_hidden_layers": 12, "num_attention_heads": 12,
                         "qk_normalization": True},
    "decoder_perceiver": {"num_queries": 77, "hidden_size": 1024, "encoder_hidden_size": 5120,
                          "cross_attention_frequency": 1, "num_hidden_layers": 1, "num_attention_heads": 16,
                          "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0},
    "decoder_image_size": 512,
    "mmfs_value_shapes": [64, 32, 16, 8],
    "mmfs_attn_dim": 1024,
    "mmfs_heads": 16,
    "llm_mmfs_heads": 16,
    "special_tokens": {"bos": "<s>", "eos": "</s>", "soi": "<|beginofimage|>", "image": "<|image|>"},
    "pad_token_id": 31999,
    "steps": 30,
    "guidance_scale": 7.5,
    "seed": 42,
}


def read_arch(path: str) -> dict[str, Any]:
    """The release's hyper-parameters, overridden by ``mm_interleaved_config.json`` when the folder has one."""
    arch = json.loads(json.dumps(RELEASE))
    file = os.path.join(path, ARCH_FILE)
    if os.path.isfile(file):
        with open(file) as f:
            override = json.load(f)
        unknown = set(override) - set(RELEASE)
        if unknown:
            raise ValueError(f"{file}: unknown keys {sorted(unknown)}; known: {sorted(RELEASE)}")
        arch.update(override)
    return arch


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The flat state dict of the shards the index lists (torch pickles, ``weights_only=True``)."""
    index_file = os.path.join(path, INDEX)
    with open(index_file) as f:
        weight_map = json.load(f).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index_file}: no 'weight_map'")
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        file = os.path.join(path, WEIGHTS_DIR, shard)
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{index_file} lists {shard!r}, which {os.path.dirname(file)} lacks")
        state.update(torch.load(file, map_location="cpu", weights_only=True))
    return state


def write_state_dict(state: dict[str, torch.Tensor], path: str, shards: int = 2) -> None:
    """``state`` as ``shards`` torch pickles (keys in order, split by bytes) plus the index."""
    folder = os.path.join(path, WEIGHTS_DIR)
    os.makedirs(folder, exist_ok=True)
    keys = list(state)
    total = sum(t.numel() * t.element_size() for t in state.values())
    parts: list[list[str]] = [[] for _ in range(shards)]
    seen = 0
    for key in keys:
        part = min(shards - 1, int(seen * shards // max(total, 1)))
        parts[part].append(key)
        seen += state[key].numel() * state[key].element_size()
    weight_map = {}
    for i, part in enumerate(parts):
        name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        torch.save({k: state[k].detach().contiguous().cpu() for k in part}, os.path.join(folder, name))
        weight_map.update({k: name for k in part})
    with open(os.path.join(path, INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


# Keys the release's modules hold that rgpo's do not need: rotary caches, position-id buffers, the Q-Former's
# text-branch FFN (never run on queries), the pipeline's copies.
UNUSED_SUFFIXES = ("rotary_emb.inv_freq", "position_ids", ".intermediate.dense.weight", ".intermediate.dense.bias",
                   ".output.dense.weight", ".output.dense.bias", ".output.LayerNorm.weight", ".output.LayerNorm.bias")


HEAD_KEY, HEAD_INSIDE = "text_decoder.", "mm_decoder.text_decoder."  # the release's key / rgpo's module path


def to_release_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {(HEAD_KEY + k[len(HEAD_INSIDE):] if k.startswith(HEAD_INSIDE) else k): v for k, v in state.items()}


def from_release_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {(HEAD_INSIDE + k[len(HEAD_KEY):] if k.startswith(HEAD_KEY) else k): v for k, v in state.items()}


def load_into(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Load ``state`` into ``model``; a weight the model has and ``state`` lacks is an error naming it."""
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith(("clip_mean", "clip_std"))]
    if missing:
        raise ValueError(f"{where}: the checkpoint lacks {len(missing)} weights of MM-Interleaved, e.g. "
                         f"{missing[:5]}")
    mismatched = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in own.items()
                  if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if mismatched:
        raise ValueError(f"{where}: weights of another shape than the configs say (key, checkpoint, model): "
                         f"{mismatched[:5]}")
    unused = [k for k in state if k not in own]
    unexpected = [k for k in unused if not k.endswith(UNUSED_SUFFIXES)]
    if unexpected:
        logger.warning("%s: %d checkpoint keys are not part of the model and were skipped, e.g. %s", where,
                       len(unexpected), unexpected[:5])
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)


def load_mm_interleaved(cls: type[MMInterleaved], path: str, *, dtype: torch.dtype = torch.float32,
                        device=None) -> MMInterleaved:
    from diffusers import DDPMScheduler
    from transformers import AutoTokenizer, CLIPVisionConfig, LlamaConfig

    from .modeling import build_parts

    arch = read_arch(path)
    llm_config = LlamaConfig.from_pretrained(os.path.join(path, LLM_DIR))
    vision_config = CLIPVisionConfig.from_pretrained(os.path.join(path, CLIP_DIR))
    sd = os.path.join(path, SD_DIR)
    with open(os.path.join(sd, "unet", "config.json")) as f:
        unet_config = json.load(f)
    vae_config_file = os.path.join(sd, "vae", "config.json")
    with open(vae_config_file) as f:
        vae_config = json.load(f)
    scheduler = DDPMScheduler.from_pretrained(sd, subfolder="scheduler")
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(path, LLM_DIR))
    with torch.device("meta"):
        parts = build_parts(arch, llm_config, vision_config, unet_config, vae_config)
    model = cls(**parts, scheduler=scheduler, tokenizer=tokenizer, arch=arch, dtype=dtype)
    model.to_empty(device=device or "cpu")
    model.reset_buffers()
    state = read_state_dict(path)
    if not any(k.startswith("image_decoder.decoder.vae.") for k in state):
        state.update({f"image_decoder.decoder.vae.{k}": v for k, v in _sd_vae_weights(sd).items()})
    load_into(model, from_release_keys(state), path)
    model.cast_parts(dtype)
    return model


def _sd_vae_weights(sd: str) -> dict[str, torch.Tensor]:
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
        file = os.path.join(sd, "vae", name)
        if os.path.isfile(file):
            if name.endswith(".safetensors"):
                from safetensors.torch import load_file

                return load_file(file)
            return torch.load(file, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"the checkpoint has no VAE weights and {sd}/vae has none either")


def save_mm_interleaved(model: MMInterleaved, path: str) -> None:
    """Write the released layout (adapters merged first)."""
    from transformers import CLIPConfig

    os.makedirs(path, exist_ok=True)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith(("clip_mean", "clip_std"))}
    write_state_dict(to_release_keys(state), path)
    llm = os.path.join(path, LLM_DIR)
    model.mm_decoder.config.save_pretrained(llm)
    model.tokenizer.save_pretrained(llm)
    clip = CLIPConfig(vision_config=model.visual_tokenizer.encoder.vision_model.config.to_dict())
    clip.save_pretrained(os.path.join(path, CLIP_DIR))
    sd = os.path.join(path, SD_DIR)
    model.image_decoder.decoder.unet.save_config(os.path.join(sd, "unet"))
    model.image_decoder.decoder.vae.save_config(os.path.join(sd, "vae"))
    model.scheduler.save_config(os.path.join(sd, "scheduler"))
    if model.arch != RELEASE:
        with open(os.path.join(path, ARCH_FILE), "w") as f:
            json.dump({k: v for k, v in model.arch.items() if RELEASE.get(k) != v}, f, indent=2)
