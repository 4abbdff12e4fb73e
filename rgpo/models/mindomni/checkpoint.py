"""MindOmni's released checkpoint layout, read and written with safetensors only (no pickle).

::

    <path>/mllm/                       HF Qwen2.5-VL folder with processor / tokenizer files
    <path>/image_decoder/config.json   plain Phi-3 config (OmniGen-v1)
    <path>/image_decoder/model.safetensors   OmniGen-v1 key names (llm.layers.K.self_attn.qkv_proj, x_embedder, ...)
    <path>/vae/                        diffusers AutoencoderKL folder
    <path>/connector.safetensors       0.* projection, 1.* / 2.* Phi-3 layers
    <path>/prompts.json                optional, rgpo's own: the system prompt, instruction prefix and negative
                                       prompt, written only when they differ from MindOmni's

The decoder is converted to and from diffusers' ``OmniGenTransformer2DModel`` names on the fly
(see :mod:`rgpo.models.omnigen`); the connector reuses the decoder's Phi-3 config, as MindOmni does.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

import torch
from diffusers import AutoencoderKL, OmniGenTransformer2DModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

from .connector import MindOmniConnector, phi3_config_from_dict
from .omnigen import decoder_kwargs_from_v1, diffusers_to_omnigen_v1, omnigen_v1_to_diffusers
from .options import INSTRUCTION_PREFIX, NEGATIVE_PROMPT, SYSTEM_PROMPT

if TYPE_CHECKING:
    from .modeling import MindOmni

LAYOUT = {
    "mllm/config.json": "the Qwen2.5-VL folder (HF format, with processor files)",
    "image_decoder/config.json": "the OmniGen-v1 decoder's Phi-3 config",
    "image_decoder/model.safetensors": "the OmniGen-v1 decoder weights",
    "vae/config.json": "the diffusers AutoencoderKL folder",
    "connector.safetensors": "the connector weights",
}

PROMPTS_FILE = "prompts.json"
PROMPT_ATTRIBUTES = {
    "system_prompt": SYSTEM_PROMPT,
    "instruction_prefix": INSTRUCTION_PREFIX,
    "negative_prompt": NEGATIVE_PROMPT,
}


def check_layout(path: str) -> None:
    """Raise a FileNotFoundError naming every missing piece, or a ValueError when a config is of another model."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"MindOmni checkpoint folder {path!r} does not exist")
    missing = [
        f"{rel} ({what})" for rel, what in LAYOUT.items() if not os.path.isfile(os.path.join(path, rel))
    ]
    if missing:
        raise FileNotFoundError(
            f"{path!r} is not a complete MindOmni checkpoint; missing: " + "; ".join(missing)
        )
    expected = {"mllm/config.json": "qwen2_5_vl", "image_decoder/config.json": "phi3"}
    for rel, model_type in expected.items():
        with open(os.path.join(path, rel)) as f:
            found = json.load(f).get("model_type")
        if found != model_type:
            raise ValueError(
                f"{os.path.join(path, rel)} has model_type {found!r}; a MindOmni checkpoint needs {model_type!r}"
            )
    with open(os.path.join(path, "vae/config.json")) as f:
        vae_class = json.load(f).get("_class_name")
    if vae_class != "AutoencoderKL":
        raise ValueError(
            f"{os.path.join(path, 'vae/config.json')} describes {vae_class!r}, expected 'AutoencoderKL'"
        )


def load_omnigen_v1(weights: str, phi3: dict, dtype: torch.dtype) -> OmniGenTransformer2DModel:
    """An ``OmniGenTransformer2DModel`` from an OmniGen-v1 ``model.safetensors`` and its Phi-3 config dict.

    Built on the meta device and filled tensor by tensor in ``dtype``, so the peak host memory is one copy of
    the decoder in ``dtype`` (not an fp32 model plus an fp32 state dict): it matters with 8 ranks per node.
    """
    with safe_open(weights, framework="pt") as f:
        state = {k: _as(f.get_tensor(k), dtype) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    with torch.device("meta"):
        decoder = OmniGenTransformer2DModel(**decoder_kwargs_from_v1(phi3, state))
    converted = omnigen_v1_to_diffusers(
        state, decoder.config.num_attention_heads, decoder.config.num_key_value_heads
    )
    decoder.load_state_dict(converted, strict=True, assign=True)
    # The one non-persistent buffer (recomputed by every diffusers forward; unused by ours) is still on meta.
    rope = decoder.rope
    rope.inv_freq = 1.0 / (rope.base ** (torch.arange(0, rope.dim, 2, dtype=torch.int64).float() / rope.dim))
    leftover = [n for n, t in list(decoder.named_parameters()) + list(decoder.named_buffers()) if t.is_meta]
    if leftover:
        raise RuntimeError(f"decoder tensors left unloaded from {weights}: {leftover}")
    return decoder


def _as(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def load_mindomni(
    cls: type[MindOmni],
    path: str,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    num_connector_layers: int = 2,
    trust_remote_code: bool = False,
) -> MindOmni:
    """Build ``cls`` from the released layout under ``path`` (see module docstring). ``trust_remote_code`` is
    passed to transformers; the released ``mllm/`` is a stock Qwen2.5-VL folder that does not need it."""
    check_layout(path)
    mllm = os.path.join(path, "mllm")
    vlm = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        mllm, dtype=dtype, trust_remote_code=trust_remote_code, attn_implementation="sdpa"
    )
    processor = AutoProcessor.from_pretrained(mllm, trust_remote_code=trust_remote_code)

    dec_dir = os.path.join(path, "image_decoder")
    with open(os.path.join(dec_dir, "config.json")) as f:
        phi3_dict = json.load(f)
    decoder = load_omnigen_v1(os.path.join(dec_dir, "model.safetensors"), phi3_dict, dtype)

    phi3 = phi3_config_from_dict(phi3_dict)
    connector = MindOmniConnector(vlm.config.text_config.hidden_size, phi3, num_connector_layers)
    connector.load_released_state_dict(load_file(os.path.join(path, "connector.safetensors")))

    vae = AutoencoderKL.from_pretrained(os.path.join(path, "vae"), torch_dtype=torch.float32)
    model = cls(vlm, processor, connector, decoder, vae, dtype=dtype)
    prompts_file = os.path.join(path, PROMPTS_FILE)
    if os.path.isfile(prompts_file):
        with open(prompts_file) as f:
            prompts = json.load(f)
        unknown = set(prompts) - set(PROMPT_ATTRIBUTES)
        if unknown:
            raise ValueError(f"{prompts_file}: unknown keys {sorted(unknown)}; valid: {list(PROMPT_ATTRIBUTES)}")
        for key, value in prompts.items():
            setattr(model, key, value)
    return model.to(device) if device is not None else model


def save_mindomni(model: MindOmni, path: str) -> None:
    """Write ``model`` in the released layout (see module docstring). A peft-wrapped VLM is refused: merge the
    adapter (``merge_and_unload``) or save it with peft, the released layout has no place for it."""
    if hasattr(model.vlm, "get_base_model"):
        raise ValueError(
            "save_pretrained: the VLM is wrapped by peft; merge the adapter first "
            "(model.vlm = model.vlm.merge_and_unload()) or save the adapter with model.vlm.save_pretrained(dir)"
        )
    os.makedirs(path, exist_ok=True)
    mllm = os.path.join(path, "mllm")
    model.vlm.save_pretrained(mllm, safe_serialization=True)
    model.processor.save_pretrained(mllm)

    dec_dir = os.path.join(path, "image_decoder")
    os.makedirs(dec_dir, exist_ok=True)
    model.connector.config.to_json_file(os.path.join(dec_dir, "config.json"))
    state = {k: v.detach().contiguous().cpu() for k, v in model.decoder.state_dict().items()}
    save_file(diffusers_to_omnigen_v1(state), os.path.join(dec_dir, "model.safetensors"))

    model.vae.save_pretrained(os.path.join(path, "vae"), safe_serialization=True)
    connector_state = {
        k: v.detach().contiguous().cpu() for k, v in model.connector.released_state_dict().items()
    }
    save_file(connector_state, os.path.join(path, "connector.safetensors"))
    # A model trained with its own prompts (the toy world's short system prompt) must be sampled with them.
    changed = {k: getattr(model, k) for k, default in PROMPT_ATTRIBUTES.items() if getattr(model, k) != default}
    prompts_file = os.path.join(path, PROMPTS_FILE)
    if changed:
        with open(prompts_file, "w") as f:
            json.dump(changed, f, indent=2)
    elif os.path.exists(prompts_file):
        os.remove(prompts_file)
