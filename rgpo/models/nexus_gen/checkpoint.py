"""Nexus-Gen's released layout, read and written, and its key mappings onto library classes.

::

    <path>/                            = Nexus-GenV2/ (``model.path``)
      config.json                      flat Qwen2.5-VL config in the transformers 4.49 format
      model-0000k-of-0000n.safetensors sharded weights (+ model.safetensors.index.json), 4.49 key names, with two
                                       extra keys the stock class drops: ``image_prefill_embeds.weight`` (81, H) and
                                       ``vision_head.weight`` (H, H)
      tokenizer / processor files
      generation_decoder.bin           torch pickle: ``pipe.dit.*`` (FLUX DiT in DiffSynth's fused-qkv names) and
                                       ``adapter.{0,1,3,4}.*``; read with ``weights_only=True``
    <flux>/ = FLUX/FLUX.1-dev/         (the option ``flux_path``; see :class:`~.options.NexusGenOptions`)
      text_encoder/                    CLIP-L (HF ``CLIPTextModel``): only its pooled output of "" is kept
      text_encoder_2/                  T5-XXL encoder (HF ``T5EncoderModel``): only its output for "" is kept
      ae.safetensors                   the FLUX AE in BFL key names
      flux_empty_prompt.safetensors    rgpo's own, written by export: those two constants, so an exported folder
                                       loads without the text encoders (which are never held during training)

Key mappings (pure functions, exact both ways): :func:`diffsynth_to_diffusers_dit` /
:func:`diffusers_to_diffsynth_dit` (DiffSynth fuses q, k, v, and in single blocks the MLP input too, into one
Linear; the final AdaLN keeps diffusers' (scale, shift) order in the release-era DiffSynth) and
:func:`bfl_to_diffusers_vae` / :func:`diffusers_to_bfl_vae` (BFL ``up.i`` = diffusers ``up_blocks.(n-1-i)``, the
mid-block attention's q/k/v/proj as 1x1 convolutions).
"""

from __future__ import annotations

import json
import os
import re
from typing import TYPE_CHECKING

import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel
from safetensors.torch import load_file, save_file

if TYPE_CHECKING:
    from .modeling import NexusGen

DECODER_FILE = "generation_decoder.bin"
FLUX_DIR = os.path.join("FLUX", "FLUX.1-dev")
CONSTANTS_FILE = "flux_empty_prompt.safetensors"
EXTRA_KEYS = ("image_prefill_embeds.weight", "vision_head.weight")
LAYOUT = {
    "config.json": "the Qwen2.5-VL config (flat, transformers 4.49 format)",
    "model.safetensors.index.json": "the index of the sharded Qwen2.5-VL weights (with the prefill and vision_head)",
    DECODER_FILE: "the FLUX DiT (pipe.dit.*, DiffSynth keys) and the adapter (adapter.*)",
}
# The FLUX AE's latent convention (BFL's AutoEncoder: scale_factor, shift_factor): latent = (z - shift) * scale.
AE_SCALING, AE_SHIFT = 0.3611, 0.1159

# -- FLUX DiT: DiffSynth <-> diffusers ------------------------------------------------------------------------------
_DIT_GLOBAL = {  # DiffSynth prefix -> diffusers prefix
    "time_embedder.timestep_embedder.0": "time_text_embed.timestep_embedder.linear_1",
    "time_embedder.timestep_embedder.2": "time_text_embed.timestep_embedder.linear_2",
    "guidance_embedder.timestep_embedder.0": "time_text_embed.guidance_embedder.linear_1",
    "guidance_embedder.timestep_embedder.2": "time_text_embed.guidance_embedder.linear_2",
    "pooled_text_embedder.0": "time_text_embed.text_embedder.linear_1",
    "pooled_text_embedder.2": "time_text_embed.text_embedder.linear_2",
    "context_embedder": "context_embedder",
    "x_embedder": "x_embedder",
    "final_norm_out.linear": "norm_out.linear",
    "final_proj_out": "proj_out",
}
_DIT_DOUBLE = {
    "norm1_a.linear": "norm1.linear",
    "norm1_b.linear": "norm1_context.linear",
    "attn.a_to_out": "attn.to_out.0",
    "attn.b_to_out": "attn.to_add_out",
    "attn.norm_q_a": "attn.norm_q",
    "attn.norm_k_a": "attn.norm_k",
    "attn.norm_q_b": "attn.norm_added_q",
    "attn.norm_k_b": "attn.norm_added_k",
    "ff_a.0": "ff.net.0.proj",
    "ff_a.2": "ff.net.2",
    "ff_b.0": "ff_context.net.0.proj",
    "ff_b.2": "ff_context.net.2",
}
_DIT_FUSED_DOUBLE = {
    "attn.a_to_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "attn.b_to_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
_DIT_SINGLE = {"norm.linear": "norm.linear", "norm_q_a": "attn.norm_q", "norm_k_a": "attn.norm_k",
               "proj_out": "proj_out"}
_DIT_FUSED_SINGLE = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")  # to_qkv_mlp = cat of these (dim 0)


def _split_param(name: str) -> tuple[str, str]:
    prefix, _, suffix = name.rpartition(".")
    return prefix, suffix


def diffsynth_to_diffusers_dit(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DiffSynth ``FluxDiT`` keys (no ``pipe.dit.`` prefix) -> ``FluxTransformer2DModel`` keys. Fused projections
    are split in order (q, k, v[, mlp]); every key must be known (a KeyError names the first that is not)."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        prefix, suffix = _split_param(name)
        parts = prefix.split(".")
        if prefix in _DIT_GLOBAL:
            out[f"{_DIT_GLOBAL[prefix]}.{suffix}"] = tensor
        elif parts[0] == "blocks":
            head, middle = f"transformer_blocks.{parts[1]}", ".".join(parts[2:])
            if middle in _DIT_FUSED_DOUBLE:
                for target, chunk in zip(_DIT_FUSED_DOUBLE[middle], tensor.chunk(3, dim=0)):
                    out[f"{head}.{target}.{suffix}"] = chunk.clone()
            elif middle in _DIT_DOUBLE:
                out[f"{head}.{_DIT_DOUBLE[middle]}.{suffix}"] = tensor
            else:
                raise KeyError(f"unknown DiffSynth FLUX key {name!r}")
        elif parts[0] == "single_blocks":
            head, middle = f"single_transformer_blocks.{parts[1]}", ".".join(parts[2:])
            if middle == "to_qkv_mlp":
                dim = tensor.shape[0] // 7  # q, k, v (dim each) and the MLP input (4 dim)
                for target, chunk in zip(_DIT_FUSED_SINGLE, tensor.split([dim, dim, dim, 4 * dim], dim=0)):
                    out[f"{head}.{target}.{suffix}"] = chunk.clone()
            elif middle in _DIT_SINGLE:
                out[f"{head}.{_DIT_SINGLE[middle]}.{suffix}"] = tensor
            else:
                raise KeyError(f"unknown DiffSynth FLUX key {name!r}")
        else:
            raise KeyError(f"unknown DiffSynth FLUX key {name!r}")
    return out


def diffusers_to_diffsynth_dit(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`diffsynth_to_diffusers_dit` (exact)."""
    global_inv = {v: k for k, v in _DIT_GLOBAL.items()}
    double_inv = {v: k for k, v in _DIT_DOUBLE.items()}
    single_inv = {v: k for k, v in _DIT_SINGLE.items()}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        prefix, suffix = _split_param(name)
        parts = prefix.split(".")
        if prefix in global_inv:
            out[f"{global_inv[prefix]}.{suffix}"] = tensor
        elif parts[0] == "transformer_blocks":
            head, middle = f"blocks.{parts[1]}", ".".join(parts[2:])
            fused = [k for k, members in _DIT_FUSED_DOUBLE.items() if middle in members]
            if fused:
                if middle == _DIT_FUSED_DOUBLE[fused[0]][0]:
                    members = [state[f"transformer_blocks.{parts[1]}.{m}.{suffix}"] for m in _DIT_FUSED_DOUBLE[fused[0]]]
                    out[f"{head}.{fused[0]}.{suffix}"] = torch.cat(members, dim=0)
            elif middle in double_inv:
                out[f"{head}.{double_inv[middle]}.{suffix}"] = tensor
            else:
                raise KeyError(f"unknown diffusers FLUX key {name!r}")
        elif parts[0] == "single_transformer_blocks":
            head, middle = f"single_blocks.{parts[1]}", ".".join(parts[2:])
            if middle in _DIT_FUSED_SINGLE:
                if middle == _DIT_FUSED_SINGLE[0]:
                    members = [state[f"single_transformer_blocks.{parts[1]}.{m}.{suffix}"] for m in _DIT_FUSED_SINGLE]
                    out[f"{head}.to_qkv_mlp.{suffix}"] = torch.cat(members, dim=0)
            elif middle in single_inv:
                out[f"{head}.{single_inv[middle]}.{suffix}"] = tensor
            else:
                raise KeyError(f"unknown diffusers FLUX key {name!r}")
        else:
            raise KeyError(f"unknown diffusers FLUX key {name!r}")
    return out


def axes_dims_rope(head_dim: int) -> tuple[int, int, int]:
    """FLUX's rope split of a head (16, 56, 56 for 128), scaled to ``head_dim`` (a multiple of 32): DiffSynth's
    ``FluxDiT`` hard-codes it, so it is not in any file."""
    if head_dim % 32:
        raise ValueError(f"a FLUX head of {head_dim} cannot take the (1/8, 7/16, 7/16) rope split; use a multiple of 32")
    return head_dim // 8, 7 * head_dim // 16, 7 * head_dim // 16


def flux_kwargs_from_diffsynth(state: dict[str, torch.Tensor]) -> dict:
    """``FluxTransformer2DModel`` arguments read off a DiffSynth state dict's shapes."""
    inner, in_channels = state["x_embedder.weight"].shape
    head_dim = state["blocks.0.attn.norm_q_a.weight"].shape[0]
    return dict(
        patch_size=1,
        in_channels=in_channels,
        num_layers=len({k.split(".")[1] for k in state if k.startswith("blocks.")}),
        num_single_layers=len({k.split(".")[1] for k in state if k.startswith("single_blocks.")}),
        attention_head_dim=head_dim,
        num_attention_heads=inner // head_dim,
        joint_attention_dim=state["context_embedder.weight"].shape[1],
        pooled_projection_dim=state["pooled_text_embedder.0.weight"].shape[1],
        guidance_embeds=any(k.startswith("guidance_embedder.") for k in state),
        axes_dims_rope=axes_dims_rope(head_dim),
    )


# -- FLUX AE: BFL <-> diffusers -------------------------------------------------------------------------------------
def _vae_rules(num_levels: int) -> list[tuple[str, str]]:
    """(BFL regex, diffusers template) pairs; ``\\1``, ``\\2`` are the block indices."""
    rules = [
        (r"(encoder|decoder)\.conv_in\.", r"\1.conv_in."),
        (r"(encoder|decoder)\.conv_out\.", r"\1.conv_out."),
        (r"(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out."),
        (r"(encoder|decoder)\.mid\.block_1\.", r"\1.mid_block.resnets.0."),
        (r"(encoder|decoder)\.mid\.block_2\.", r"\1.mid_block.resnets.1."),
        (r"(encoder|decoder)\.mid\.attn_1\.norm\.", r"\1.mid_block.attentions.0.group_norm."),
        (r"(encoder|decoder)\.mid\.attn_1\.q\.", r"\1.mid_block.attentions.0.to_q."),
        (r"(encoder|decoder)\.mid\.attn_1\.k\.", r"\1.mid_block.attentions.0.to_k."),
        (r"(encoder|decoder)\.mid\.attn_1\.v\.", r"\1.mid_block.attentions.0.to_v."),
        (r"(encoder|decoder)\.mid\.attn_1\.proj_out\.", r"\1.mid_block.attentions.0.to_out.0."),
        (r"encoder\.down\.(\d+)\.block\.(\d+)\.", r"encoder.down_blocks.\1.resnets.\2."),
        (r"encoder\.down\.(\d+)\.downsample\.conv\.", r"encoder.down_blocks.\1.downsamplers.0.conv."),
    ]
    for i in range(num_levels):  # BFL's decoder runs up.(n-1) first; diffusers' up_blocks.0 first
        j = num_levels - 1 - i
        rules.append((rf"decoder\.up\.{i}\.block\.(\d+)\.", rf"decoder.up_blocks.{j}.resnets.\1."))
        rules.append((rf"decoder\.up\.{i}\.upsample\.conv\.", rf"decoder.up_blocks.{j}.upsamplers.0.conv."))
    return rules


def _vae_levels(keys, pattern: str) -> int:
    return 1 + max(int(m.group(1)) for k in keys if (m := re.match(pattern, k)))


def bfl_to_diffusers_vae(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BFL ``ae.safetensors`` keys -> ``AutoencoderKL`` keys (``nin_shortcut`` -> ``conv_shortcut``; the mid-block
    attention's 1x1 convolutions -> Linear weights)."""
    rules = [(re.compile("^" + p), r) for p, r in _vae_rules(_vae_levels(state, r"encoder\.down\.(\d+)\."))]
    out = {}
    for name, tensor in state.items():
        for pattern, repl in rules:
            if pattern.match(name):
                new = pattern.sub(repl, name, count=1).replace(".nin_shortcut.", ".conv_shortcut.")
                break
        else:
            raise KeyError(f"unknown BFL AE key {name!r}")
        if ".attentions.0.to_" in new and new.endswith(".weight") and tensor.dim() == 4:
            tensor = tensor[:, :, 0, 0]
        out[new] = tensor
    return out


def diffusers_to_bfl_vae(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`bfl_to_diffusers_vae` (exact)."""
    levels = _vae_levels(state, r"encoder\.down_blocks\.(\d+)\.")
    rules = [
        (r"(encoder|decoder)\.conv_in\.", r"\1.conv_in."),
        (r"(encoder|decoder)\.conv_out\.", r"\1.conv_out."),
        (r"(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out."),
        (r"(encoder|decoder)\.mid_block\.resnets\.0\.", r"\1.mid.block_1."),
        (r"(encoder|decoder)\.mid_block\.resnets\.1\.", r"\1.mid.block_2."),
        (r"(encoder|decoder)\.mid_block\.attentions\.0\.group_norm\.", r"\1.mid.attn_1.norm."),
        (r"(encoder|decoder)\.mid_block\.attentions\.0\.to_q\.", r"\1.mid.attn_1.q."),
        (r"(encoder|decoder)\.mid_block\.attentions\.0\.to_k\.", r"\1.mid.attn_1.k."),
        (r"(encoder|decoder)\.mid_block\.attentions\.0\.to_v\.", r"\1.mid.attn_1.v."),
        (r"(encoder|decoder)\.mid_block\.attentions\.0\.to_out\.0\.", r"\1.mid.attn_1.proj_out."),
        (r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2."),
        (r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.", r"encoder.down.\1.downsample.conv."),
    ]
    for j in range(levels):
        i = levels - 1 - j
        rules.append((rf"decoder\.up_blocks\.{j}\.resnets\.(\d+)\.", rf"decoder.up.{i}.block.\1."))
        rules.append((rf"decoder\.up_blocks\.{j}\.upsamplers\.0\.conv\.", rf"decoder.up.{i}.upsample.conv."))
    compiled = [(re.compile("^" + p), r) for p, r in rules]
    out = {}
    for name, tensor in state.items():
        for pattern, repl in compiled:
            if pattern.match(name):
                new = pattern.sub(repl, name, count=1).replace(".conv_shortcut.", ".nin_shortcut.")
                break
        else:
            raise KeyError(f"AutoencoderKL key {name!r} has no BFL name (FLUX's AE has no quant convs)")
        if ".attn_1." in new and new.endswith(".weight") and tensor.dim() == 2:
            tensor = tensor[:, :, None, None]
        out[new] = tensor
    return out


def vae_kwargs_from_bfl(state: dict[str, torch.Tensor]) -> dict:
    """``AutoencoderKL`` arguments for a BFL AE state dict (32 norm groups, no quant convs, as BFL's AE)."""
    levels = _vae_levels(state, r"encoder\.down\.(\d+)\.")
    channels = tuple(state[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] for i in range(levels))
    per_level = 1 + max(int(k.split(".")[4]) for k in state if k.startswith("encoder.down.0.block."))
    return dict(
        in_channels=state["encoder.conv_in.weight"].shape[1],
        out_channels=state["decoder.conv_out.weight"].shape[0],
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=channels,
        layers_per_block=per_level,
        latent_channels=state["decoder.conv_in.weight"].shape[1],
        norm_num_groups=32,
        scaling_factor=AE_SCALING,
        shift_factor=AE_SHIFT,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=True,
    )


def load_flux_ae(path: str) -> AutoencoderKL:
    """The FLUX AE from BFL keys (``ae.safetensors``), float32."""
    state = load_file(path)
    vae = AutoencoderKL(**vae_kwargs_from_bfl(state))
    vae.load_state_dict(bfl_to_diffusers_vae(state), strict=True)
    return vae.float()


# -- the Qwen2.5-VL folder ------------------------------------------------------------------------------------------
def flat_qwen_config(config) -> dict:
    """A transformers-5 ``Qwen2_5_VLConfig`` as the flat 4.49 ``config.json`` the release ships."""
    text = config.text_config.to_dict()
    rope = dict(text.get("rope_parameters") or {})
    flat = {k: v for k, v in text.items() if k not in ("rope_parameters", "model_type", "architectures",
                                                       "transformers_version", "dtype", "torch_dtype")}
    flat.update({
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "rope_theta": rope.get("rope_theta", 1000000.0),
        "rope_scaling": {"type": "mrope", "mrope_section": list(rope.get("mrope_section", []))},
        "vision_config": {k: v for k, v in config.vision_config.to_dict().items()
                          if k not in ("transformers_version", "dtype", "torch_dtype")},
        "image_token_id": config.image_token_id,
        "video_token_id": config.video_token_id,
        "vision_start_token_id": config.vision_start_token_id,
        "vision_end_token_id": config.vision_end_token_id,
        "tie_word_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
        "torch_dtype": "bfloat16",
        "transformers_version": "4.49.0",
    })
    flat["vision_config"]["model_type"] = "qwen2_5_vl"
    return flat


def qwen_config_from_flat(flat: dict):
    """``Qwen2_5_VLConfig`` from a flat 4.49 (or a nested 5.x) ``config.json`` dict."""
    from transformers import Qwen2_5_VLConfig

    if "text_config" in flat:
        return Qwen2_5_VLConfig(**{k: v for k, v in flat.items() if k != "model_type"})
    kwargs = {k: v for k, v in flat.items() if k not in ("model_type", "architectures", "transformers_version",
                                                         "torch_dtype")}
    text = {k: v for k, v in kwargs.items() if k not in ("vision_config", "image_token_id", "video_token_id",
                                                         "vision_start_token_id", "vision_end_token_id")}
    rope = dict(text.pop("rope_scaling", None) or {})
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": text.pop("rope_theta", 1000000.0),
                               "mrope_section": list(rope.get("mrope_section", []))}
    vision = dict(kwargs.get("vision_config") or {})
    vision.pop("model_type", None)
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision,
                            **{k: kwargs[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                                      "vision_end_token_id") if k in kwargs},
                            tie_word_embeddings=text.get("tie_word_embeddings", False))


def read_extra_keys(path: str) -> dict[str, torch.Tensor]:
    """``image_prefill_embeds.weight`` and ``vision_head.weight`` from the sharded folder (via its index)."""
    from safetensors import safe_open

    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        weight_map = json.load(f)["weight_map"]
    missing = [k for k in EXTRA_KEYS if k not in weight_map]
    if missing:
        raise KeyError(f"{path}: the index names no {missing}; a Nexus-Gen checkpoint carries both {list(EXTRA_KEYS)}")
    out = {}
    for key in EXTRA_KEYS:
        with safe_open(os.path.join(path, weight_map[key]), framework="pt") as f:
            out[key] = f.get_tensor(key)
    return out


def write_qwen_folder(model: NexusGen, path: str, max_shard_size: str | int = "5GB") -> None:
    """The VLM's shards (4.49 key names, as transformers 5 writes them) plus the two extra keys in a shard of their
    own, the index updated, and the flat 4.49 config."""
    vlm = model.hf_vlm()
    vlm.save_pretrained(path, safe_serialization=True, max_shard_size=max_shard_size)
    model.processor.save_pretrained(path)
    index_file = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(index_file):
        with open(index_file) as f:
            index = json.load(f)
    else:  # one shard only: give it the sharded name the release layout uses
        from safetensors import safe_open

        with safe_open(single, framework="pt") as f:
            names = list(f.keys())
        os.replace(single, os.path.join(path, "model-00001-of-00001.safetensors"))
        index = {"metadata": {}, "weight_map": {k: "model-00001-of-00001.safetensors" for k in names}}
    prefill = model.prefill
    extra = {"image_prefill_embeds.weight": prefill.embeds.weight, "vision_head.weight": prefill.vision_head.weight}
    extra = {k: v.detach().contiguous().cpu() for k, v in extra.items()}
    shard = "model-extra-prefill-vision-head.safetensors"
    save_file(extra, os.path.join(path, shard), metadata={"format": "pt"})
    index["weight_map"].update({k: shard for k in extra})
    total = sum(v.numel() * v.element_size() for v in extra.values())
    index.setdefault("metadata", {})["total_size"] = index["metadata"].get("total_size", 0) + total
    with open(index_file, "w") as f:
        json.dump(index, f, indent=2)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(flat_qwen_config(vlm.config), f, indent=2)


# -- the whole layout -----------------------------------------------------------------------------------------------
def check_layout(path: str) -> None:
    """Raise a FileNotFoundError naming every missing piece of the Nexus-GenV2 folder."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"Nexus-Gen checkpoint folder {path!r} does not exist")
    missing = [f"{rel} ({what})" for rel, what in LAYOUT.items() if not os.path.isfile(os.path.join(path, rel))]
    if missing:
        raise FileNotFoundError(f"{path!r} is not a complete Nexus-GenV2 folder; missing: " + "; ".join(missing))


def resolve_flux_path(path: str, flux_path: str | None) -> str:
    """The FLUX.1-dev folder: the option, else ``<path>/FLUX/FLUX.1-dev``, else ``<path>/../FLUX/FLUX.1-dev``."""
    candidates = [flux_path] if flux_path else [os.path.join(path, FLUX_DIR),
                                                os.path.join(os.path.dirname(os.path.abspath(path)), FLUX_DIR)]
    for candidate in candidates:
        if os.path.isfile(os.path.join(candidate, "ae.safetensors")):
            return candidate
    raise FileNotFoundError(f"no FLUX.1-dev folder (with ae.safetensors) at {candidates}; set model.options.flux_path "
                            "to the folder holding text_encoder/, text_encoder_2/ and ae.safetensors")


@torch.no_grad()
def empty_prompt_constants(flux: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled (1, D_clip), negative (1, 512, D_t5)), float32: CLIP-L's pooled output and T5's states for "" (the
    release's FluxPrompter: CLIP padded to 77, T5 to 512, no attention mask). Read from ``flux_empty_prompt.
    safetensors`` when present, else computed from the two encoders (loaded, used once, dropped).

    The token ids need no tokenizer (DiffSynth ships its own, the FLUX folder none): CLIP-L's "" is
    ``<|startoftext|> <|endoftext|>`` padded with ``<|endoftext|>`` (the last two ids of its vocabulary), pooled at
    the first ``<|endoftext|>``; T5's "" is ``</s>`` padded with ``<pad>``."""
    constants = os.path.join(flux, CONSTANTS_FILE)
    if os.path.isfile(constants):
        state = load_file(constants)
        return state["pooled"].float(), state["negative"].float()
    from transformers import CLIPTextModel, T5EncoderModel

    clip = CLIPTextModel.from_pretrained(os.path.join(flux, "text_encoder"), dtype=torch.float32).eval()
    t5 = T5EncoderModel.from_pretrained(os.path.join(flux, "text_encoder_2"), dtype=torch.float32).eval()
    return empty_prompt_constants_from(clip, t5)


@torch.no_grad()
def empty_prompt_constants_from(clip, t5) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled (1, D_clip), negative (1, 512, D_t5)) float32 of "" from a ``CLIPTextModel`` and a ``T5EncoderModel``
    (see :func:`empty_prompt_constants`)."""
    # Built under ZeRO-3's partitioned construction (deepspeed.zero.Init), the encoders hold empty shards: gather them
    # for this one use (every rank builds and calls them alike).
    partitioned = [p for p in (*clip.parameters(), *t5.parameters()) if hasattr(p, "ds_id")]
    if not partitioned:
        return _constants(clip, t5)
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned):
        return _constants(clip, t5)


@torch.no_grad()
def _constants(clip, t5) -> tuple[torch.Tensor, torch.Tensor]:
    vocab = clip.config.vocab_size
    ids = torch.tensor([[vocab - 2] + [vocab - 1] * 76], device=clip.device)
    pooled = clip(input_ids=ids).last_hidden_state[:, 1]  # post final norm, at the first <|endoftext|>
    ids = torch.full((1, 512), t5.config.pad_token_id, dtype=torch.long, device=t5.device)
    ids[0, 0] = t5.config.eos_token_id
    negative = t5(input_ids=ids).last_hidden_state
    return pooled.float().cpu(), negative.float().cpu()


def load_nexus_gen(cls: type[NexusGen], path: str, *, dtype: torch.dtype = torch.float32,
                   flux_path: str | None = None, trust_remote_code: bool = False) -> NexusGen:
    """Build ``cls`` from the released layout (module docstring)."""
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    from .modeling import Prefill, build_adapter

    check_layout(path)
    with open(os.path.join(path, "config.json")) as f:
        config = qwen_config_from_flat(json.load(f))
    # The two extra keys are read on their own (read_extra_keys): tell the stock class not to report them as
    # unexpected, for this load only (a subclass would lose the class's 4.49 -> 5.x key conversion).
    stock = Qwen2_5_VLForConditionalGeneration
    before = stock._keys_to_ignore_on_load_unexpected
    stock._keys_to_ignore_on_load_unexpected = [*(before or []), r"^image_prefill_embeds\.", r"^vision_head\."]
    try:
        vlm = stock.from_pretrained(path, config=config, dtype=dtype, attn_implementation="sdpa",
                                    trust_remote_code=trust_remote_code)
    finally:
        stock._keys_to_ignore_on_load_unexpected = before
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    extra = read_extra_keys(path)
    hidden = config.text_config.hidden_size
    prefill = Prefill(hidden, extra["image_prefill_embeds.weight"].shape[0])
    prefill.load_state_dict({"embeds.weight": extra["image_prefill_embeds.weight"],
                             "vision_head.weight": extra["vision_head.weight"]})

    state = torch.load(os.path.join(path, DECODER_FILE), map_location="cpu", weights_only=True)
    adapter_state = {k.removeprefix("adapter."): v for k, v in state.items() if k.startswith("adapter.")}
    dit_state = {k.removeprefix("pipe.dit."): v for k, v in state.items() if k.startswith("pipe.dit.")}
    unknown = [k for k in state if not k.startswith(("adapter.", "pipe.dit."))]
    if unknown:
        raise KeyError(f"{DECODER_FILE}: keys outside pipe.dit.* and adapter.*: {unknown[:5]}")
    adapter = build_adapter(hidden, adapter_state["0.weight"].shape[0])
    adapter.load_state_dict(adapter_state, strict=True)
    with torch.device("meta"):
        transformer = FluxTransformer2DModel(**flux_kwargs_from_diffsynth(dit_state))
    transformer.load_state_dict({k: v.to(dtype) for k, v in diffsynth_to_diffusers_dit(dit_state).items()},
                                strict=True, assign=True)

    flux = resolve_flux_path(path, flux_path)
    vae = load_flux_ae(os.path.join(flux, "ae.safetensors"))
    pooled, negative = empty_prompt_constants(flux)
    return cls(vlm, processor, prefill, adapter, transformer, vae, pooled, negative, dtype=dtype)


def save_nexus_gen(model: NexusGen, path: str, max_shard_size: str | int = "5GB") -> None:
    """Write ``model`` in the released layout under ``path`` (the Nexus-GenV2 folder), plus ``FLUX/FLUX.1-dev/`` with
    the AE (BFL keys) and the empty-prompt constants, so the folder loads on its own. Adapters must be merged."""
    if hasattr(model.vlm, "get_base_model") or any("lora_" in n for n, _ in model.named_parameters()):
        raise ValueError("save_pretrained: merge the adapters first (model.merge_adapters()); the released layout "
                         "has no place for them")
    os.makedirs(path, exist_ok=True)
    write_qwen_folder(model, path, max_shard_size)
    dit = diffusers_to_diffsynth_dit({k: v.detach().contiguous().cpu() for k, v in model.transformer.state_dict().items()})
    state = {f"pipe.dit.{k}": v for k, v in dit.items()}
    state.update({f"adapter.{k}": v.detach().contiguous().cpu() for k, v in model.adapter.state_dict().items()})
    torch.save(state, os.path.join(path, DECODER_FILE))
    flux = os.path.join(path, FLUX_DIR)
    os.makedirs(flux, exist_ok=True)
    vae_state = {k: v.detach().contiguous().cpu().float() for k, v in model.vae.state_dict().items()}
    save_file(diffusers_to_bfl_vae(vae_state), os.path.join(flux, "ae.safetensors"))
    save_file({"pooled": model.pooled.detach().float().cpu().contiguous(),
               "negative": model.negative.detach().float().cpu().contiguous()}, os.path.join(flux, CONSTANTS_FILE))
