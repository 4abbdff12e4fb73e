"""BLIP3-o's released checkpoint layout (``BLIP3o-Model-8B`` / ``-4B``), read and written with safetensors only.

::

    <path>/config.json                       Qwen2.5-VL config in transformers 4.5x's flat format, model_type
                                             "blip3o_qwen" (transformers 5's AutoConfig rejects it: rgpo builds a
                                             Qwen2_5_VLConfig from the JSON), plus BLIP3-o's fields (n_query, ...)
    <path>/model-0000K-of-0000M.safetensors  + model.safetensors.index.json, keys in 4.5x names:
                                             model.* (text model), visual.*, lm_head.*, model.latent_queries,
                                             model.dit.model.* (the DiT, its caption projection under
                                             model.dit.model.caption_projection.*)
    <path>/tokenizer.json, tokenizer_config.json ...   Qwen2's tokenizer with [IMG], [/IMG], <image> added
    <path>/diffusion-decoder/model_index.json
    <path>/diffusion-decoder/{unet, vae, scheduler}/    UNet2DConditionModel, AutoencoderKL, EulerDiscreteScheduler

The DiT's sizes are the release's class defaults (no config file); a model at other sizes (the tiny one) records
them under ``"rgpo_dit_sizes"`` in ``config.json``. The DiT's own flow scheduler is downloaded by the release from
``Alpha-VLLM/Lumina-Next-SFT-diffusers`` at import; rgpo reads ``<path>/scheduler/scheduler_config.json`` when
present, else builds that scheduler's configuration (``FlowMatchEulerDiscreteScheduler``, 1000 steps, shift 1).
Training-only keys (``model.gen_vision_tower.*``, the EVA-CLIP encoder of the targets, ``model.down_projector.*``)
are skipped on load.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    UNet2DConditionModel,
)
from safetensors import safe_open
from safetensors.torch import save_file

if TYPE_CHECKING:
    from .modeling import Blip3o

LAYOUT = {
    "config.json": "the Qwen2.5-VL config (model_type blip3o_qwen) with BLIP3-o's fields",
    "model.safetensors.index.json": "the index of the root safetensors shards (backbone, queries, DiT)",
    "tokenizer_config.json": "Qwen2's tokenizer with [IMG], [/IMG], <image> added",
    "diffusion-decoder/model_index.json": "the diffusion decoder's pipeline index",
    "diffusion-decoder/unet/config.json": "the SDXL-style UNet2DConditionModel",
    "diffusion-decoder/vae/config.json": "the SDXL AutoencoderKL",
    "diffusion-decoder/scheduler/scheduler_config.json": "the renderer's EulerDiscreteScheduler",
}
MODEL_TYPE = "blip3o_qwen"
ARCHITECTURE = "blip3oQwenForInferenceLM"
DIT_SIZES_KEY = "rgpo_dit_sizes"
STEPS_KEY = "rgpo_steps"  # written only for a model whose own step counts are not the release's (tiny)
LUMINA_NEXT_SFT_SCHEDULER = {"num_train_timesteps": 1000, "shift": 1.0}
# BLIP3-o's own fields of the root config (not Qwen2.5-VL's); a loaded config keeps all of its own on export.
RELEASE_FIELDS = {"n_query": 64, "gen_vision_tower": "eva-clip-E-14-plus"}
TRAINING_ONLY = ("model.gen_vision_tower.", "model.down_projector.", "model.mm_projector.", "model.image_newline")
QUERIES_KEY = "model.latent_queries"
DIT_PREFIX = "model.dit.model."


def check_layout(path: str) -> None:
    """FileNotFoundError naming every missing piece; ValueError when the root config is of another model."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"BLIP3-o checkpoint folder {path!r} does not exist")
    missing = [f"{rel} ({what})" for rel, what in LAYOUT.items() if not os.path.isfile(os.path.join(path, rel))]
    if missing:
        raise FileNotFoundError(f"{path!r} is not a complete BLIP3-o checkpoint; missing: " + "; ".join(missing))
    with open(os.path.join(path, "config.json")) as f:
        found = json.load(f).get("model_type")
    if found not in (MODEL_TYPE, "blip3o_qwen_inference", "qwen2_5_vl"):
        raise ValueError(f"{os.path.join(path, 'config.json')} has model_type {found!r}; BLIP3-o's is {MODEL_TYPE!r}")


def qwen_config_from_release(config: dict) -> Any:
    """A ``Qwen2_5_VLConfig`` from the release's root JSON (flat 4.5x format; BLIP3-o's fields dropped)."""
    from transformers import Qwen2_5_VLConfig

    skip = {"model_type", "architectures", "auto_map", DIT_SIZES_KEY, STEPS_KEY, "transformers_version", *RELEASE_FIELDS}
    kept = {k: v for k, v in config.items() if k not in skip and not k.startswith(("mm_", "gen_"))}
    qwen = Qwen2_5_VLConfig(**kept)
    qwen._attn_implementation = "sdpa"
    return qwen


def release_config_from_qwen(qwen: Any, dit_sizes: dict | None, base: dict | None = None) -> dict:
    """The root JSON in the release's flat format: the text fields at the top, ``vision_config`` nested, BLIP3-o's
    fields; ``base`` (a loaded release config) keeps its other keys."""
    text = qwen.text_config.to_dict()
    rope = dict(text.pop("rope_parameters", None) or {})
    flat = {k: v for k, v in text.items() if k not in ("model_type", "dtype", "architectures", "transformers_version",
                                                       "layer_types", "_name_or_path")}
    flat["rope_theta"] = rope.get("rope_theta", 1000000.0)
    flat["rope_scaling"] = {"type": "mrope", "mrope_section": list(rope.get("mrope_section", []))}
    vision = {k: v for k, v in qwen.vision_config.to_dict().items() if k not in ("dtype", "transformers_version")}
    out = dict(base or {})
    out.update(flat)
    out.update({
        "architectures": [ARCHITECTURE], "model_type": MODEL_TYPE, "vision_config": vision,
        "image_token_id": qwen.image_token_id, "video_token_id": qwen.video_token_id,
        "vision_start_token_id": qwen.vision_start_token_id, "vision_end_token_id": qwen.vision_end_token_id,
        "tie_word_embeddings": bool(qwen.tie_word_embeddings),
    })
    for key, value in RELEASE_FIELDS.items():
        out.setdefault(key, value)
    if dit_sizes:
        out[DIT_SIZES_KEY] = dit_sizes
    else:
        out.pop(DIT_SIZES_KEY, None)
    return out


def _to_release_keys(model: Blip3o) -> dict[str, torch.Tensor]:
    """The whole root state dict in the release's key names."""
    out: dict[str, torch.Tensor] = {}
    for key, value in model.hf_vlm().state_dict().items():
        if key.startswith("model.language_model."):
            key = "model." + key.removeprefix("model.language_model.")
        elif key.startswith("model.visual."):
            key = key.removeprefix("model.")
        out[key] = value
    if model.hf_vlm().config.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    out[QUERIES_KEY] = model.queries.latent_queries
    for key, value in model.dit.state_dict().items():
        out[DIT_PREFIX + key.removeprefix("model.")] = value
    return {k: v.detach().contiguous().cpu() for k, v in out.items()}


def _from_release_keys(state: dict[str, torch.Tensor]) -> tuple[dict, dict, torch.Tensor]:
    """Split the release's root keys into (Qwen2.5-VL in transformers 5 names, DiT, queries)."""
    vlm, dit, queries = {}, {}, None
    unknown = []
    for key, value in state.items():
        if key == QUERIES_KEY:
            queries = value
        elif key.startswith(DIT_PREFIX + "caption_projection."):
            dit[key.removeprefix(DIT_PREFIX)] = value
        elif key.startswith(DIT_PREFIX):
            dit["model." + key.removeprefix(DIT_PREFIX)] = value
        elif key.startswith(TRAINING_ONLY):
            continue
        elif key.startswith("visual."):
            vlm["model." + key] = value
        elif key.startswith("model."):
            vlm["model.language_model." + key.removeprefix("model.")] = value
        elif key.startswith("lm_head."):
            vlm[key] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"unexpected keys in the BLIP3-o checkpoint: {unknown[:8]}{' ...' if len(unknown) > 8 else ''}")
    if queries is None:
        raise ValueError(f"the BLIP3-o checkpoint has no {QUERIES_KEY!r}")
    return vlm, dit, queries


def _read_shards(path: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        index = json.load(f)
    state = {}
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(os.path.join(path, shard), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                tensor = f.get_tensor(key)
                state[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    return state


def _load_into(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str, *,
               allowed_missing: tuple[str, ...] = ()) -> None:
    missing, unexpected = module.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if k not in allowed_missing]
    if missing or unexpected:
        raise ValueError(f"{what}: missing keys {missing[:8]}, unexpected keys {unexpected[:8]}")


def load_blip3o(cls: type[Blip3o], path: str, *, dtype: torch.dtype = torch.float32,
                device: torch.device | str | None = None) -> Blip3o:
    """Build ``cls`` from the released layout under ``path`` (module docstring). The backbone and the DiT are
    built with empty weights and filled tensor by tensor in ``dtype`` (no random init of 8 B parameters)."""
    from accelerate import init_empty_weights
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    from .dit import Blip3oDiT
    from .modeling import NUM_QUERIES, LatentQueries

    check_layout(path)
    with open(os.path.join(path, "config.json")) as f:
        release = json.load(f)
    qwen = qwen_config_from_release(release)
    vlm_state, dit_state, queries = _from_release_keys(_read_shards(path, dtype))
    with init_empty_weights(include_buffers=False):  # rotary tables (buffers) are computed as usual
        vlm = Qwen2_5_VLForConditionalGeneration._from_config(qwen)
        ffn = dit_state.get("model.layers.0.feed_forward.linear_1.weight")  # the checkpoint's width decides
        dit = Blip3oDiT(qwen.text_config.hidden_size, ffn_hidden_size=None if ffn is None else ffn.shape[0],
                        **release.get(DIT_SIZES_KEY, {}))
    tied = bool(qwen.tie_word_embeddings)
    _load_into(vlm, vlm_state, f"{path}: the backbone", allowed_missing=("lm_head.weight",) if tied else ())
    if tied:
        vlm.tie_weights()
    _load_into(dit, dit_state, f"{path}: the DiT")
    if queries.shape[1] != NUM_QUERIES:
        raise ValueError(f"{path}: {QUERIES_KEY} has {queries.shape[1]} queries, BLIP3-o uses {NUM_QUERIES}")
    query_module = LatentQueries(NUM_QUERIES, qwen.text_config.hidden_size)
    query_module.latent_queries.data = queries
    leftover = [n for n, t in [*vlm.named_parameters(), *dit.named_parameters()] if t.is_meta]
    if leftover:
        raise RuntimeError(f"{path}: tensors left unloaded: {leftover[:8]}")
    tokenizer = AutoTokenizer.from_pretrained(path)
    processor = _processor(path, tokenizer)
    decoder = os.path.join(path, "diffusion-decoder")
    unet = UNet2DConditionModel.from_pretrained(os.path.join(decoder, "unet"), torch_dtype=dtype)
    vae = AutoencoderKL.from_pretrained(os.path.join(decoder, "vae"), torch_dtype=torch.float32)
    renderer_scheduler = EulerDiscreteScheduler.from_pretrained(os.path.join(decoder, "scheduler"))
    dit_scheduler_dir = os.path.join(path, "scheduler")
    if os.path.isfile(os.path.join(dit_scheduler_dir, "scheduler_config.json")):
        dit_scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(dit_scheduler_dir)
    else:
        dit_scheduler = FlowMatchEulerDiscreteScheduler(**LUMINA_NEXT_SFT_SCHEDULER)
    model = cls(vlm, tokenizer, query_module, dit, unet, vae, dit_scheduler, renderer_scheduler, processor=processor,
                dtype=dtype, release_config=release)
    model.checkpoint_steps.update(release.get(STEPS_KEY, {}))
    return model.to(device) if device is not None else model


def _processor(path: str, tokenizer: Any) -> Any:
    """A Qwen2.5-VL processor around the tokenizer, with the folder's image-processor config when it has one
    (the release pairs the model with Qwen2.5-VL-7B-Instruct's processor)."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    config = os.path.join(path, "preprocessor_config.json")
    image_processor = Qwen2VLImageProcessor.from_pretrained(path) if os.path.isfile(config) else Qwen2VLImageProcessor()
    return Qwen2_5_VLProcessor(image_processor, tokenizer, Qwen2VLVideoProcessor())


def save_blip3o(model: Blip3o, path: str, *, max_shard_size: int | str = "5GB") -> None:
    """Write ``model`` in the released layout. A peft-wrapped backbone is refused (merge the adapters first)."""
    from huggingface_hub import split_torch_state_dict_into_shards

    from .dit import RELEASE_DIT

    if hasattr(model.vlm, "get_base_model"):
        raise ValueError("save_pretrained: the backbone is wrapped by peft; merge the adapters first "
                         "(model.merge_adapters())")
    os.makedirs(path, exist_ok=True)
    for stale in [f for f in os.listdir(path) if f.startswith("model") and f.endswith(".safetensors")]:
        os.remove(os.path.join(path, stale))
    state = _to_release_keys(model)
    split = split_torch_state_dict_into_shards(state, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=max_shard_size)
    total = split.filename_to_tensors.items()
    renamed = {}
    for k, (filename, keys) in enumerate(total):
        name = f"model-{k + 1:05d}-of-{len(total):05d}.safetensors"
        save_file({key: state[key] for key in keys}, os.path.join(path, name), metadata={"format": "pt"})
        renamed[filename] = name
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
             "weight_map": {key: renamed[f] for key, f in split.tensor_to_filename.items()}}
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2)
    dit_sizes = {k: v for k, v in model.dit.sizes.items() if RELEASE_DIT[k] != v}
    config = release_config_from_qwen(model.hf_vlm().config, dit_sizes, model.release_config)
    from .modeling import RELEASE_STEPS

    config.pop(STEPS_KEY, None)
    if model.checkpoint_steps != RELEASE_STEPS:
        config[STEPS_KEY] = model.checkpoint_steps
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    model.tokenizer.save_pretrained(path)
    if model.dit_scheduler.config.get("shift", 1.0) != LUMINA_NEXT_SFT_SCHEDULER["shift"]:
        model.dit_scheduler.save_pretrained(os.path.join(path, "scheduler"))
    decoder = os.path.join(path, "diffusion-decoder")
    model.renderer.save_pretrained(os.path.join(decoder, "unet"), safe_serialization=True)
    model.vae.save_pretrained(os.path.join(decoder, "vae"), safe_serialization=True)
    model.renderer_scheduler.save_pretrained(os.path.join(decoder, "scheduler"))
    index = {"_class_name": "EmuVisualGenerationPipeline", "_diffusers_version": "0.28.0",
             "scheduler": ["diffusers", "EulerDiscreteScheduler"], "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], "feature_extractor": [None, None],
             "safety_checker": [None, None], "multimodal_encoder": [None, None], "tokenizer": [None, None]}
    with open(os.path.join(decoder, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2)
