"""Nexus-Gen as one :class:`~rgpo.models.base.UnifiedModel`: Qwen2.5-VL + prefill -> adapter -> FLUX.1-dev -> AE.

**Chains.** The model samples free text after the prompt until it emits BOI (``<|vision_start|>``) itself, or an end
of turn, or runs out of tokens. The rule for a chain that ends without BOI: BOI is APPENDED after its text (the
image is always drawn, conditioned on whatever was written), so every chain gets an image and a reward; a chain's
``condition_lengths`` counts its tokens before BOI / the end token. The sampled BOI (or end token) is part of the
completion and trained like any token.

**Condition.** After BOI come 81 positions whose inputs are the learnable prefill embeddings (not token
embeddings), at the 3-D M-RoPE positions of a 1 x 18 x 18 grid merged 2 x 2 (9 x 9: ``(p, p + i, p + j)`` after
BOI at ``p - 1``). Image embedding ``k`` is ``vision_head`` of the POST-norm state at position ``BOI + k``
(k = 0..80; the output at the 81st prefill position is unused, as in the release's generate loop). BOI and the 81
positions ride at the end of the ONE training forward: they attend to the prompt and the chain before BOI and to
themselves, causally, and no chain token attends to them, so the log-probs are those of the chain alone. Rows are
left-padded and each row equals the row computed alone (the release runs batch 1).

**Image.** ``adapter`` (Linear LN ReLU Linear LN) replaces FLUX's T5 states; FLUX.1-dev (diffusers
``FluxTransformer2DModel``) runs with the pooled CLIP-L vector of "" and embedded guidance 3.5; true CFG against
T5("") (512 tokens) + CLIP(""): the condition (81 tokens) and the negative (512 tokens) run as two batches at their
own lengths (no padding, so a row's velocity does not depend on the other branch). Sampling walks the release's
FIXED shift-3 sigmas (DiffSynth ``FlowMatchScheduler``: ``linspace(1, 0.003/1.002, N)`` shifted, then 0); rgpo's time
is ``t = 1 - sigma`` and its velocity ``-prediction``. DiffSynth feeds the DiT ``sigma * 1000``, diffusers takes
``sigma`` and multiplies inside: the model is given the scheduler's exact float32 sigma, looked up from ``t``
(``1 - (1 - sigma)`` can be off by an ulp). Latents are FLUX's 2 x 2-packed 16-channel ones kept on their grid,
``(h/16, w/16, 64)``; the AE decodes ``latent / 0.3611 + 0.1159``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from PIL import Image
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.utils import ModelOutput

from rgpo.distributed import any_rank
from rgpo.samplers import FlowSampler
from rgpo.schedulers import velocity_from_flow_prediction

from ..base import (
    Completions,
    Condition,
    ForwardOutput,
    GeneratorOutput,
    ImageSamplingConfig,
    Part,
    PromptBatch,
    UnifiedModel,
)
from ..lm import cast_floating, sample_tokens, target_logps
from .checkpoint import LAYOUT
from .options import INSTRUCTION_TEMPLATE, SYSTEM_PROMPT, NexusGenOptions

BOI = "<|vision_start|>"
EOS_TOKENS = ("<|im_end|>", "<|endoftext|>")
# Never sampled in a chain: the release bans <|vision_end|>; pads would desynchronise the M-RoPE layout.
BANNED_TOKENS = ("<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
VISION_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")
IMAGE_GRID = (1, 18, 18)  # the release's generation_image_grid_thw
MERGE = 2
NUM_IMAGE_TOKENS = IMAGE_GRID[0] * (IMAGE_GRID[1] // MERGE) * (IMAGE_GRID[2] // MERGE)  # 81
SIGMA_MIN = 0.003 / 1.002  # DiffSynth FlowMatchScheduler's sigma_min
SHIFT = 3.0
TRAIN_TIMESTEPS = 1000  # the release's decoder training draws among 1000 sigmas
SDE_SEED_OFFSET = 0x5DE


def release_sigmas(steps: int) -> torch.Tensor:
    """The ``steps + 1`` sigmas (float32) the release's scheduler walks, in its own float32 arithmetic (DiffSynth's
    ``FlowMatchScheduler``): ``linspace(1, 0.003/1.002, steps)``, the FIXED shift ``3 s / (1 + 2 s)``, then the
    final 0. diffusers' ``FlowMatchEulerDiscreteScheduler(shift=3.0)`` with these unshifted sigmas gives the same
    values to an ulp (it shifts in float64); the release's own rounding is what the model is fed."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    sigmas = torch.linspace(1.0, SIGMA_MIN, steps, dtype=torch.float32)
    sigmas = SHIFT * sigmas / (1 + (SHIFT - 1) * sigmas)
    return torch.cat([sigmas, torch.zeros(1)])


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, H/2, W/2, 4C) in FLUX's (C, P, Q) order (DiffSynth's patchify, diffusers' pack)."""
    n, c, h, w = latents.shape
    return latents.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, h // 2, w // 2, c * 4)


def unpack_latents(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`pack_latents`."""
    n, h, w, d = packed.shape
    c = d // 4
    return packed.view(n, h, w, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(n, c, h * 2, w * 2)


def image_position_ids(start: torch.Tensor) -> torch.Tensor:
    """(3, N, 81) M-RoPE positions of the generated image's tokens, the first at ``start`` (N,): temporal
    ``start``, height ``start + i``, width ``start + j`` over the merged 9 x 9 grid (row-major), as Qwen2.5-VL's
    ``get_rope_index`` lays out an image of grid (1, 18, 18)."""
    h, w = IMAGE_GRID[1] // MERGE, IMAGE_GRID[2] // MERGE
    grid = torch.stack([torch.zeros(h * w, dtype=torch.long),
                        torch.arange(h).repeat_interleave(w), torch.arange(w).repeat(h)]).to(start.device)
    return grid[:, None, :] + start.view(1, -1, 1)


def suffix_attention(real: torch.Tensor, prefix_end: torch.Tensor, suffix_len: int) -> torch.Tensor:
    """(N, S + k, S + k) bool, query x key: causal over the ``real`` (N, S) keys; the k suffix queries see the keys
    before ``prefix_end[i]`` and the suffix up to themselves. Every query sees itself (no empty softmax row)."""
    n, s = real.shape
    total = s + suffix_len
    index = torch.arange(total, device=real.device)
    keys = torch.cat([real, torch.ones(n, suffix_len, dtype=torch.bool, device=real.device)], dim=1)
    allowed = (index[None, :, None] >= index[None, None, :]) & keys[:, None, :]
    prefix_only = (index[None, :] < prefix_end[:, None]) | (index[None, :] >= s)
    allowed[:, s:] &= prefix_only[:, None, :]
    return allowed | torch.eye(total, dtype=torch.bool, device=real.device)


class Prefill(nn.Module):
    """The two modules the stock Qwen2.5-VL class drops: ``embeds`` (the release's ``image_prefill_embeds``,
    Embedding(81, H)) and ``vision_head`` (Linear(H, H), no bias)."""

    def __init__(self, hidden_size: int, num_tokens: int = NUM_IMAGE_TOKENS):
        super().__init__()
        self.embeds = nn.Embedding(num_tokens, hidden_size)
        self.vision_head = nn.Linear(hidden_size, hidden_size, bias=False)


def build_adapter(hidden_size: int, width: int) -> nn.Sequential:
    """Nexus-Gen's adapter (3584 -> 4096 -> 4096 at 7B): its ``{0,1,3,4}`` keys are the release's."""
    return nn.Sequential(nn.Linear(hidden_size, width), nn.LayerNorm(width), nn.ReLU(), nn.Linear(width, width),
                         nn.LayerNorm(width))


@dataclass
class FluxInputs(ModelOutput):
    """FLUX's inputs for N rows: the adapted condition (N, 81, D), the pooled vector (N, D_clip), with guidance the
    negative T5 states (N, 512, D) and the CFG scale; the embedded guidance."""

    embeds: torch.Tensor | None = None
    pooled: torch.Tensor | None = None
    negative: torch.Tensor | None = None
    guidance: float | None = None
    embedded_guidance: float | None = None


class NexusGen(UnifiedModel):
    """Nexus-Gen's parts as ONE module: ``vlm`` (Qwen2.5-VL), ``prefill``, ``adapter``, ``transformer`` (FLUX.1-dev)
    and ``vae`` (the FLUX AE, float32), plus two buffers computed once at load from the FLUX folder's text
    encoders: ``pooled`` (CLIP-L of "") and ``negative`` (T5 of "", 512 tokens)."""

    family = "nexus_gen"
    parts = {
        "language_model": Part("vlm", "Qwen2.5-VL (LoRA targets: every Linear outside the vision tower)"),
        "prefill": Part("prefill", "the 81 prefill embeddings and vision_head (Linear H -> H)"),
        "adapter": Part("adapter", "Linear(H -> 4096) LayerNorm ReLU Linear LayerNorm"),
        "generator": Part("transformer", "FLUX.1-dev DiT (diffusers FluxTransformer2DModel)",
                          ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                           "to_add_out")),
        "vae": Part("vae", "FLUX AE (AutoencoderKL, 16 latent channels), float32"),
    }
    layout = LAYOUT
    options_class = NexusGenOptions
    supported_regularizers = ("feature_kl", "velocity_mse", "gaussian_kl", "none")
    random_shapes = ("tiny", "nexus-gen")
    factories = ("rgpo.models.nexus_gen.tiny", "build_tiny_nexus_gen", "build_random_nexus_gen")
    language_config = "config.json"

    def __init__(self, vlm: nn.Module, processor: Any, prefill: Prefill, adapter: nn.Module, transformer: nn.Module,
                 vae: nn.Module, pooled: torch.Tensor, negative: torch.Tensor, *, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.vlm, self.prefill, self.adapter, self.transformer, self.vae = vlm, prefill, adapter, transformer, vae
        # Constants, recomputed from model.path at every load (not in trainer checkpoints).
        self.register_buffer("pooled", pooled.to(dtype), persistent=False)
        self.register_buffer("negative", negative.to(dtype), persistent=False)
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.tokenizer.padding_side = "left"
        self.system_prompt = SYSTEM_PROMPT
        self.instruction_template = INSTRUCTION_TEMPLATE
        self.embedded_guidance = 3.5
        self.vae_batch_size = 4
        self.logprob_chunk_size = 512
        self.synced_generation: bool | None = None
        self.options = NexusGenOptions()
        vocab = self.tokenizer.get_vocab()
        self.boi_id = vocab[BOI]
        self.eos_token_ids = [vocab[t] for t in EOS_TOKENS if t in vocab]
        self.banned_token_ids = [vocab[t] for t in BANNED_TOKENS if t in vocab]
        self.pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_token_ids[-1]
        self._sigmas: dict[float, float] = {}
        for module in (self.vlm, self.prefill, self.adapter):
            cast_floating(module, dtype)
        cast_floating(self.transformer, dtype, buffers=True)
        cast_floating(self.vae, torch.float32, buffers=True)

    # -- plumbing -------------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    def hf_vlm(self) -> nn.Module:
        vlm = self.vlm
        return vlm.get_base_model() if hasattr(vlm, "get_base_model") else vlm

    def understanding_model(self) -> tuple[nn.Module, Any]:
        """The Qwen2.5-VL (adapters as they are: enter ``adapter_disabled`` for the reference) and its processor."""
        return self.hf_vlm(), self.processor

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        if enabled:
            self.vlm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self.transformer.enable_gradient_checkpointing()
        else:
            self.vlm.gradient_checkpointing_disable()
            self.transformer.disable_gradient_checkpointing()

    def lora_targets(self, name: str) -> list[str]:
        """The language model: every Linear outside the vision tower, lm_head included; others: the default."""
        if name != "language_model":
            return super().lora_targets(name)
        names = []
        for full, module in self.hf_vlm().named_modules():
            if "visual" in full:
                continue
            if isinstance(module, nn.Linear) and not any(p.startswith("lora_") for p in full.split(".")):
                names.append(full.removesuffix(".base_layer"))
        return sorted(set(names))

    def empty_part_copy(self, name: str) -> nn.Module:
        """The prefill and the adapter built from their sizes on the meta device (ZeRO-3 may partition them)."""
        hidden = self.hf_vlm().config.text_config.hidden_size
        with torch.device("meta"):
            if name == "prefill":
                return Prefill(hidden)
            if name == "adapter":
                return build_adapter(hidden, self.transformer.config.joint_attention_dim)
        return super().empty_part_copy(name)

    def float32_modules(self) -> list[str]:
        return ["vae"]

    def apply_options(self, options: NexusGenOptions | None) -> None:
        options = options if options is not None else NexusGenOptions()
        self.options = options
        if options.system_prompt is not None:
            self.system_prompt = options.system_prompt
        if options.instruction_template is not None:
            if "{}" not in options.instruction_template:
                raise ValueError(f"model.options.instruction_template needs a '{{}}' for the instruction, got "
                                 f"{options.instruction_template!r}")
            self.instruction_template = options.instruction_template
        for key in ("embedded_guidance", "vae_batch_size", "logprob_chunk_size", "synced_generation"):
            setattr(self, key, getattr(options, key))

    @classmethod
    def check_image_size(cls, height: int, width: int) -> str | None:
        if height <= 0 or width <= 0 or height % 16 or width % 16:
            return "a positive multiple of 16: the AE downsamples by 8 and FLUX packs 2 x 2"
        return None

    @classmethod
    def random_shape_hidden_size(cls, shape: str) -> int | None:
        from .tiny import RANDOM_SHAPES

        return RANDOM_SHAPES.get(shape, {}).get("vlm_hidden", 64 if shape == "tiny" else None)

    # -- prompts --------------------------------------------------------------------------------------------------
    def chat_messages(self, instruction: str, num_images: int = 0) -> list[dict[str, Any]]:
        content = [{"type": "image"} for _ in range(num_images)]
        content.append({"type": "text", "text": self.instruction_template.format(instruction)})
        return [{"role": "system", "content": [{"type": "text", "text": self.system_prompt}]},
                {"role": "user", "content": content}]

    def build_prompts(self, rows: list[dict[str, Any]]) -> PromptBatch:
        texts, images, counts = [], [], []
        for i, row in enumerate(rows):
            if not isinstance(row.get("prompt"), str):
                raise KeyError(f"row {i} needs a 'prompt' string (got keys {sorted(row)})")
            row_images = list(row.get("images") or [])
            if not all(isinstance(im, Image.Image) for im in row_images):
                raise TypeError(f"row {i}: 'images' must be a list of PIL images")
            texts.append(self.processor.apply_chat_template(self.chat_messages(row["prompt"], len(row_images)),
                                                            tokenize=False, add_generation_prompt=True))
            images.extend(im.convert("RGB") for im in row_images)
            counts.append(len(row_images))
        enc = self.processor(text=texts, images=images or None, padding=True, padding_side="left",
                             return_tensors="pt")
        vision = {k: enc[k] for k in VISION_KEYS if k in enc} if images else {}
        return PromptBatch(enc["input_ids"], enc["attention_mask"], vision, counts if images else None)

    # -- VLM internals --------------------------------------------------------------------------------------------
    def _position_ids(self, ids: torch.Tensor, mask: torch.Tensor, vision: dict[str, torch.Tensor]) -> torch.Tensor:
        """(3, N, S) rope positions: text counts real tokens from 0 (left padding aware); with input images the
        model's own 3-D layout (transformers 5 needs ``mm_token_type_ids`` and the mask for left padding)."""
        if "image_grid_thw" in vision or "video_grid_thw" in vision:
            hf = self.hf_vlm()
            types = (ids == hf.config.image_token_id).int() + 2 * (ids == hf.config.video_token_id).int()
            positions, _ = hf.model.get_rope_index(ids, mm_token_type_ids=types,
                                                   image_grid_thw=vision.get("image_grid_thw"),
                                                   video_grid_thw=vision.get("video_grid_thw"), attention_mask=mask)
            return positions
        real = mask.long()
        return ((real.cumsum(-1) - 1).clamp(min=0) * real)[None].expand(3, -1, -1)

    def _embed(self, ids: torch.Tensor, vision: dict[str, torch.Tensor]) -> torch.Tensor:
        """Token embeddings with the input images' features scattered into their pads."""
        hf = self.hf_vlm()
        embeds = hf.model.get_input_embeddings()(ids)
        if any(k.endswith("videos") or k == "video_grid_thw" for k in vision):
            raise ValueError("video inputs are not supported by the Nexus-Gen family")
        # Under ZeRO-3 on several ranks every rank must call the vision tower as often as the others (its weights
        # are gathered collectively): a rank without input images runs it on a blank image and drops the result.
        has_images = "pixel_values" in vision and vision["pixel_values"].numel() > 0  # a text row of a mixed batch
        run_tower = any_rank(has_images, embeds.device) if self._synced() else has_images
        if run_tower:
            pixels, grid = (vision["pixel_values"], vision["image_grid_thw"]) if has_images else self._blank_image()
            features = hf.model.get_image_features(pixels, grid, return_dict=True).pooler_output
            if has_images:
                image_embeds = torch.cat(features, dim=0).to(embeds.device, embeds.dtype)
                image_mask, _ = hf.model.get_placeholder_mask(ids, inputs_embeds=embeds, image_features=image_embeds)
                embeds = embeds.masked_scatter(image_mask, image_embeds)
        return embeds

    def _blank_image(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The smallest input the vision tower takes: one merge group of patches (pixel_values, image_grid_thw)."""
        vc = self.hf_vlm().config.vision_config
        merge = vc.spatial_merge_size
        grid = torch.tensor([[1, merge, merge]], device=self.device)
        width = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
        visual_dtype = next(self.hf_vlm().model.visual.parameters()).dtype
        return torch.zeros(merge * merge, width, dtype=visual_dtype, device=self.device), grid

    def _attention(self, allowed: torch.Tensor) -> dict[str, torch.Tensor]:
        """A (N, S, S) bool query x key mask as the text model takes it (sdpa: bool; eager: additive)."""
        language_model = self.hf_vlm().model.language_model
        impl = language_model.config._attn_implementation
        if impl not in ("sdpa", "eager") or language_model.has_sliding_layers:
            raise ValueError(f"the prefilled image positions need a custom attention mask, which attn_implementation="
                             f"{impl!r} cannot take: load the VLM with 'sdpa' or 'eager'")
        if impl == "eager":
            allowed = torch.zeros(allowed.shape, dtype=self.dtype, device=allowed.device).masked_fill_(
                ~allowed, torch.finfo(self.dtype).min)
        return {"full_attention": allowed[:, None]}

    def _states(self, embeds: torch.Tensor, mask, positions: torch.Tensor) -> torch.Tensor:
        """POST-norm last states (N, S, H) of the text model."""
        return self.hf_vlm().model.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                                                  use_cache=False).last_hidden_state

    def _logps(self, states: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Post-norm states (N, T, H) predicting ``targets`` -> log-probs and entropy (N, T) float32, the lm_head in
        chunks of ``logprob_chunk_size`` (under activation checkpointing when grads flow)."""
        head = self.hf_vlm().lm_head
        flat, flat_t = states.reshape(-1, states.shape[-1]), targets.reshape(-1)
        check = "none" if any(hasattr(p, "ds_id") for p in head.parameters()) else "default"
        out, entropy = [], []
        for start in range(0, flat.shape[0], self.logprob_chunk_size):
            h, t = flat[start : start + self.logprob_chunk_size], flat_t[start : start + self.logprob_chunk_size]
            if torch.is_grad_enabled():
                logp, ent = checkpoint(_chunk_logps, head, h, t, use_reentrant=False, determinism_check=check)
            else:
                logp, ent = _chunk_logps(head, h, t)
            out.append(logp)
            entropy.append(ent)
        return torch.cat(out).view(targets.shape), torch.cat(entropy).view(targets.shape)

    # -- chains ---------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts: PromptBatch, *, num_generations: int, max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, generator: torch.Generator | None = None) -> Completions:
        """Sample ``num_generations`` chains per prompt row, grouped (p0 x G, p1 x G, ...), each ending at its first
        BOI or end token (module docstring). Each prompt is prefilled once and its KV cache repeated."""
        if num_generations < 1 or max_new_tokens < 1:
            raise ValueError(f"num_generations ({num_generations}) and max_new_tokens ({max_new_tokens}) must be >= 1")
        hf = self.hf_vlm()
        language_model = hf.model.language_model
        device = self.device
        prompts = prompts.to(device)
        rows = prompts.input_ids.shape[0] * num_generations
        sample_gen = None
        if generator is not None:
            sample_gen = torch.Generator(device=device).manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
        stop = torch.tensor([self.boi_id, *self.eos_token_ids], device=device)
        banned = torch.tensor(self.banned_token_ids, dtype=torch.long, device=device)
        synced = self._synced()
        fast = not hasattr(next(self.vlm.parameters()), "ds_id")
        own_mask = language_model.config._attn_implementation == "sdpa" and not language_model.has_sliding_layers
        padded = not bool(prompts.attention_mask.all())
        was_training = self.vlm.training
        if was_training:
            self.vlm.eval()
        try:
            with torch.inference_mode(fast):
                vision = {k: v for k, v in prompts.vision.items() if k in VISION_KEYS}
                positions = self._position_ids(prompts.input_ids, prompts.attention_mask, vision)
                out = language_model(inputs_embeds=self._embed(prompts.input_ids, vision),
                                     attention_mask=prompts.attention_mask, position_ids=positions, use_cache=True)
                logits = hf.lm_head(out.last_hidden_state[:, -1]).float().repeat_interleave(num_generations, 0)
                cache = out.past_key_values
                cache.batch_repeat_interleave(num_generations)
                next_pos = positions.amax(dim=(0, 2)).repeat_interleave(num_generations) + 1
                mask = prompts.attention_mask.repeat_interleave(num_generations, 0)
                done = torch.zeros(rows, dtype=torch.bool, device=device)
                tokens = []
                for step in range(max_new_tokens):
                    if banned.numel():
                        logits.index_fill_(1, banned, float("-inf"))
                    token = sample_tokens(logits, temperature, top_p, top_k, sample_gen)
                    token.masked_fill_(done, self.pad_token_id)
                    tokens.append(token)
                    done |= torch.isin(token, stop)
                    if step == max_new_tokens - 1 or self._all_done(done, synced):
                        break
                    mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                    step_pos = (next_pos + step).view(1, rows, 1).expand(3, -1, -1)
                    step_mask = {"full_attention": mask.bool()[:, None, None, :] if padded else None} if own_mask else mask
                    hidden = language_model(input_ids=token[:, None], attention_mask=step_mask, position_ids=step_pos,
                                            past_key_values=cache, use_cache=True).last_hidden_state
                    logits = hf.lm_head(hidden[:, -1]).float()
        finally:
            if was_training:
                self.vlm.train(True)
        return self._completions(torch.stack(tokens, dim=1))

    def _synced(self) -> bool:
        synced = self.synced_generation
        if synced is None:
            synced = hasattr(next(self.vlm.parameters()), "ds_id")
        return bool(synced) and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    def _all_done(self, done: torch.Tensor, synced: bool) -> bool:
        if synced:
            pending = torch.tensor([float(not bool(done.all()))], device=done.device)
            dist.all_reduce(pending)
            return pending.item() == 0
        return bool(done.all())

    def _completions(self, ids: torch.Tensor) -> Completions:
        """Sampled ids (N, T) -> masks (1 through the first BOI / end token), texts and condition lengths (the
        tokens before that stop token; every token when there is none)."""
        is_stop = torch.isin(ids, torch.tensor([self.boi_id, *self.eos_token_ids], device=ids.device))
        mask = ((is_stop.long().cumsum(1) - is_stop.long()) == 0).long()
        width = max(int(mask.sum(1).max()), 1)
        ids, mask, is_stop = ids[:, :width], mask[:, :width], is_stop[:, :width]
        ids = torch.where(mask.bool(), ids, torch.full_like(ids, self.pad_token_id))
        texts, lengths = [], []
        for row, row_stop in zip(ids.tolist(), is_stop.tolist()):
            body = row[: row_stop.index(True)] if True in row_stop else row[: len(row)]
            texts.append(self.tokenizer.decode(body, skip_special_tokens=True, clean_up_tokenization_spaces=False))
            lengths.append(len(body))
        return Completions(ids, mask, texts, torch.tensor(lengths, dtype=torch.long, device=ids.device))

    def completions_from_texts(self, texts: list[str], boi: bool = True) -> Completions:
        """Tokenise given chains (each followed by BOI unless ``boi`` is False) into :class:`Completions`."""
        rows = [self.tokenizer(t, add_special_tokens=False)["input_ids"] + ([self.boi_id] if boi else []) for t in texts]
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [self.pad_token_id] * (width - len(r)) for r in rows], dtype=torch.long)
        comp = self._completions(ids)
        length = torch.tensor([len(r) for r in rows])
        comp.completion_mask = (torch.arange(ids.shape[1])[None] < length[:, None]).long()
        return comp

    # -- the training forward -------------------------------------------------------------------------------------
    def forward_text(self, prompts: PromptBatch, completions: Completions, *,
                     with_condition: bool = True) -> ForwardOutput:
        """ONE text-model forward over prompt + chain (+ BOI and the 81 prefill positions): log-probs (N, T) and the
        condition (N, 81, H) with mask all ones (module docstring)."""
        device = self.device
        prompts, completions = prompts.to(device), completions.to(device)
        vision = {k: v for k, v in prompts.vision.items() if k in VISION_KEYS}
        p_len = prompts.input_ids.shape[1]
        comp_ids = completions.completion_ids
        n, t = comp_ids.shape
        ids = torch.cat([prompts.input_ids, comp_ids], dim=1)
        mask = torch.cat([prompts.attention_mask, completions.completion_mask.to(prompts.attention_mask.dtype)], dim=1)
        positions = self._position_ids(ids, mask, vision)
        embeds = self._embed(ids, vision)
        if not with_condition:
            states = self._states(embeds, mask, positions)
            logps, entropy = self._logps(states[:, p_len - 1 : -1], comp_ids)
            return ForwardOutput(logps, entropy=entropy)
        prefix_end = p_len + completions.condition_lengths  # (N,) right after each chain's text
        last = positions.gather(2, (prefix_end - 1)[None, :, None].expand(3, -1, 1)).amax(0)[:, 0]  # (N,)
        boi_pos = (last + 1)[None, :, None].expand(3, -1, 1)
        suffix_pos = torch.cat([boi_pos, image_position_ids(last + 2)], dim=2)  # (3, N, 82)
        prefill = self.part("prefill")
        boi = self.hf_vlm().model.get_input_embeddings()(torch.full((n, 1), self.boi_id, device=device))
        # a module call (not ``.weight``): ZeRO-3 gathers a partitioned weight only inside its module's forward
        slots = torch.arange(prefill.embeds.num_embeddings, device=device)[None].expand(n, -1)
        suffix = torch.cat([boi, prefill.embeds(slots).to(boi.dtype)], dim=1)
        k = suffix.shape[1]
        states = self._states(torch.cat([embeds, suffix], dim=1),
                              self._attention(suffix_attention(mask.bool(), prefix_end, k)),
                              torch.cat([positions, suffix_pos], dim=2))
        logps, entropy = self._logps(states[:, p_len - 1 : p_len + t - 1], comp_ids)
        condition = prefill.vision_head(states[:, -k : -k + NUM_IMAGE_TOKENS])  # BOI .. BOI + 80
        return ForwardOutput(logps, Condition(condition, torch.ones(n, NUM_IMAGE_TOKENS, dtype=torch.long,
                                                                    device=device)), entropy)

    # -- images ---------------------------------------------------------------------------------------------------
    def image_inputs(self, condition: Condition, negative: Condition | None, *, guidance_scale: float = 1.0,
                     exact: bool = False) -> FluxInputs:
        """The adapted condition (the adapter replaces T5), the pooled CLIP("") vector, and with guidance the
        T5("") negative; ``negative`` is unused (the family's negative is a constant)."""
        adapter = self.part("adapter")
        embeds = adapter(condition.states.to(next(adapter.parameters()).dtype))
        n = embeds.shape[0]
        guided = guidance_scale != 1.0
        return FluxInputs(embeds, self.pooled.expand(n, -1), self.negative.expand(n, -1, -1) if guided else None,
                          guidance_scale if guided else None, self.embedded_guidance)

    def _sigma(self, t: torch.Tensor) -> torch.Tensor:
        """The scheduler's float32 sigma of each time ``t`` on a grid this model built, else ``1 - t``."""
        flat = t.detach().float().reshape(-1).cpu().tolist()
        return torch.tensor([self._sigmas.get(v, 1.0 - v) for v in flat], dtype=torch.float32).view(t.shape).to(t.device)

    def _flux(self, x: torch.Tensor, embeds: torch.Tensor, pooled: torch.Tensor, sigma: torch.Tensor,
              embedded_guidance: float | None, features: list | None = None) -> torch.Tensor:
        """FLUX's prediction (noise - data), (N, h, w, 64) float32, for packed latents (N, h, w, 64)."""
        transformer = self.transformer
        n, h, w, d = x.shape
        dtype = next(transformer.parameters()).dtype
        img_ids = torch.zeros(h, w, 3, device=x.device)
        img_ids[..., 1] += torch.arange(h, device=x.device)[:, None]
        img_ids[..., 2] += torch.arange(w, device=x.device)[None, :]
        txt_ids = torch.zeros(embeds.shape[1], 3, device=x.device)
        guidance = None
        if transformer.config.guidance_embeds:
            guidance = torch.full((n,), float(embedded_guidance), device=x.device, dtype=torch.float32)
        hooks = []
        if features is not None:
            blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
            hooks = [b.register_forward_hook(lambda m, a, out: features.append(out[1])) for b in blocks]
        try:
            out = transformer(hidden_states=x.reshape(n, h * w, d).to(dtype), encoder_hidden_states=embeds.to(dtype),
                              pooled_projections=pooled.to(dtype), timestep=sigma.to(dtype), img_ids=img_ids.reshape(-1, 3),
                              txt_ids=txt_ids, guidance=guidance, return_dict=False)[0]
        finally:
            for hook in hooks:
                hook.remove()
        return out.float().view(n, h, w, d)

    def image_prediction(self, inputs: FluxInputs, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """rgpo's float32 velocity ``-(neg + g (cond - neg))`` of FLUX's predictions at packed latents ``x``."""
        sigma = self._sigma(t.expand(x.shape[0]) if t.dim() == 0 else t)
        pred = self._flux(x, inputs.embeds, inputs.pooled, sigma, inputs.embedded_guidance)
        if inputs.guidance is not None:
            neg = self._flux(x, inputs.negative, inputs.pooled, sigma, inputs.embedded_guidance)
            pred = neg + inputs.guidance * (pred - neg)
        return velocity_from_flow_prediction(pred)

    def generator_output(self, inputs: FluxInputs, x: torch.Tensor, t: torch.Tensor, *,
                         return_features: bool = False) -> GeneratorOutput:
        """Unguided velocity and, when asked, every FLUX block's image-token states (N, 57, L, D at full size)."""
        if inputs.guidance is not None:
            raise ValueError("generator_output is unguided: build its inputs with guidance_scale=1")
        features: list | None = [] if return_features else None
        sigma = self._sigma(t.expand(x.shape[0]) if t.dim() == 0 else t)
        pred = self._flux(x, inputs.embeds, inputs.pooled, sigma, inputs.embedded_guidance, features)
        stacked = torch.stack(features, dim=1) if return_features else None
        return GeneratorOutput(velocity_from_flow_prediction(pred), stacked)

    def regularizer_times(self, num: int, generator: torch.Generator) -> torch.Tensor:
        """As the release's decoder was trained: a uniform index into the 1000-step shift-3 training schedule."""
        sigmas = release_sigmas(TRAIN_TIMESTEPS)[:-1]
        index = torch.randint(0, TRAIN_TIMESTEPS, (num,), generator=generator)
        grid = 1 - sigmas
        self._sigmas.update(zip(grid.tolist(), sigmas.tolist()))
        return grid[index]

    def image_sampler(self, cfg: ImageSamplingConfig) -> FlowSampler:
        """Euler / Flow-GRPO SDE over ``t = 1 - sigma`` of the release's fixed shift-3 sigmas."""
        sigmas = release_sigmas(cfg.steps)
        grid = 1 - sigmas
        self._sigmas.update(zip(grid.tolist(), sigmas.tolist()))
        return FlowSampler(grid)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(h/16, w/16, 64): FLUX's 2 x 2-packed 16-channel latents on their grid."""
        if self.check_image_size(height, width) is not None:
            raise ValueError(f"image size {height}x{width}: {self.check_image_size(height, width)}")
        channels = self.vae.config.latent_channels
        return height // 16, width // 16, 4 * channels

    def initial_noise(self, num: int, group_size: int, cfg: ImageSamplingConfig, device=None) -> torch.Tensor:
        """Standard normal (C, h/8, w/8) latents per row from a CPU generator seeded with ``cfg.seed`` (DiffSynth's
        layout and order), packed; one draw per group when ``cfg.shared_noise``."""
        if group_size < 1 or num % group_size:
            raise ValueError(f"num ({num}) must be a positive multiple of group_size ({group_size})")
        h, w, d = self.latent_shape(cfg.height, cfg.width)
        gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
        draws = num // group_size if cfg.shared_noise else num
        noise = pack_latents(torch.randn((draws, d // 4, 2 * h, 2 * w), generator=gen))
        if cfg.shared_noise:
            noise = noise.repeat_interleave(group_size, 0)
        return noise.to(device if device is not None else self.device)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> list[Image.Image]:
        """Unpack, ``latent / 0.3611 + 0.1159``, the AE in float32, then DiffSynth's ``uint8`` conversion."""
        images: list[Image.Image] = []
        first = next(self.vae.parameters())
        scale, shift = self.vae.config.scaling_factor, self.vae.config.shift_factor
        for chunk in latents.split(self.vae_batch_size):
            z = unpack_latents(chunk.to(first.device, torch.float32)) / scale + shift
            pixels = self.vae.decode(z.to(first.dtype)).sample.float()
            pixels = ((pixels / 2 + 0.5).clamp(0, 1) * 255).to(torch.uint8)
            images += [Image.fromarray(p.permute(1, 2, 0).cpu().numpy()) for p in pixels]
        return images

    # -- checkpoints ----------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str, *, dtype: torch.dtype = torch.float32, device=None, **kwargs) -> NexusGen:
        """Load the Nexus-GenV2 folder at ``path`` and its FLUX folder (``options.flux_path``)."""
        from .checkpoint import load_nexus_gen

        options = kwargs.pop("options", None)
        model = load_nexus_gen(cls, path, dtype=dtype, flux_path=getattr(options, "flux_path", None),
                               trust_remote_code=kwargs.pop("trust_remote_code", False))
        model.apply_options(options)
        return model.to(device) if device is not None else model

    def save_pretrained(self, path: str, max_shard_size: str | int = "5GB") -> None:
        from .checkpoint import save_nexus_gen

        save_nexus_gen(self, path, max_shard_size)


# -- pure helpers ------------------------------------------------------------------------------------------------


def _chunk_logps(head: nn.Module, states: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`~rgpo.models.lm.target_logps` of post-norm states (n, H) through the lm_head."""
    return target_logps(head(states).float(), targets)




__all__ = ["BOI", "NUM_IMAGE_TOKENS", "FluxInputs", "NexusGen", "Prefill", "build_adapter", "image_position_ids",
           "pack_latents", "release_sigmas", "suffix_attention", "unpack_latents"]
