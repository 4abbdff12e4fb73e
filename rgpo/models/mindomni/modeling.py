"""MindOmni as one :class:`~rgpo.models.base.UnifiedModel`: Qwen2.5-VL -> connector -> OmniGen -> VAE.

Text side: chat-templated prompts, grouped sampling of reasoning chains from one shared prompt prefill, and one
training forward that yields per-token log-probs plus the decoder's conditioning (the VLM's last-layer states
taken BEFORE the final norm, as MindOmni conditions on them). Image side: the connector, our own OmniGen
forward (per-layer features, condition KV cache; see :mod:`rgpo.models.omnigen`), seeded Euler flow sampling
with batched classifier-free guidance, and an fp32 VAE decode.

The VLM may be wrapped by peft after construction (``model.vlm = get_peft_model(model.vlm, cfg)``); every
method reaches the underlying modules through ``get_base_model()``, and :meth:`adapter_disabled` gives the
reference model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.utils import ModelOutput

from rgpo.distributed import any_rank
from rgpo.samplers import FlowSampler
from rgpo.sde import SDETrajectory

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
from .connector import MindOmniConnector
from .omnigen import (
    ConditionCache,
    build_condition_cache,
    decoder_forward,
    decoder_forward_cached,
    num_image_tokens,
)
from .options import INSTRUCTION_PREFIX, NEGATIVE_PROMPT, SYSTEM_PROMPT, MindOmniOptions

ANSWER_CLOSE = "</answer>"
# MindOmni conditions its decoder (stage-2 training and RGPO alike) on the chat-templated conversation with the
# assistant turn cut before ``</answer>`` and its end-of-turn replaced by this newline.
CONDITION_SUFFIX = "\n"
EOS_TOKENS = ("<|im_end|>", "<|endoftext|>")
# Never sampled: a vision placeholder in a completion would desynchronise the image features and positions.
BANNED_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
VISION_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")
SDE_SEED_OFFSET = 0x5DE  # the default SDE-noise generator is seeded with cfg.seed + this (initial noise: cfg.seed)
IMAGE_KL_GRID = 51  # MindOmni draws the image-KL timestep uniformly from linspace(0, 1, 51)


@dataclass
class DecoderInputs(ModelOutput):
    """The OmniGen decoder's inputs for a batch of conditions: connected embeddings and mask (the N condition
    rows, then the N negative rows when ``guidance`` != 1), and the condition KV cache when sampling may use it."""

    embeds: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    guidance: float | None = None  # None: unguided (ModelOutput fields after the first must default to None)
    cache: ConditionCache | None = None


class MindOmni(UnifiedModel):
    """MindOmni's four parts as ONE module (``vlm``, ``connector``, ``decoder``, ``vae``) plus its processor.

    ``dtype`` applies to the VLM, connector and decoder parameters; the VAE is always fp32. Rotary-frequency
    buffers keep fp32 (as transformers' own loading does).
    Tunables (plain attributes): ``logprob_chunk_size`` (tokens per lm_head chunk), ``vae_batch_size``,
    ``decoder_kv_cache`` (reuse condition keys/values across denoising steps), ``synced_generation`` (keep every
    rank stepping until all are done, as ZeRO-3 requires; None = on exactly when ZeRO-3 partitions the VLM),
    ``system_prompt``, ``instruction_prefix``, ``negative_prompt``.
    """

    family = "mindomni"
    parts = {
        "language_model": Part("vlm", "Qwen2.5-VL (LoRA targets: every Linear outside the vision tower)"),
        "connector": Part("connector", "Linear(H_vlm -> 3072) + two causal Phi-3 layers"),
        "generator": Part("decoder", "OmniGen-v1 decoder (Phi-3 blocks, velocity, t = 0 noise)",
                          ("to_q", "to_k", "to_v", "to_out.0")),
        "vae": Part("vae", "SDXL AutoencoderKL, float32"),
    }
    layout = LAYOUT
    options_class = MindOmniOptions
    supported_regularizers = ("feature_kl", "velocity_mse", "gaussian_kl", "none")
    compiled_decode_supported = True
    random_shapes = ("tiny", "mid", "mindomni-7b")
    factories = ("rgpo.models.mindomni.tiny", "build_tiny_mindomni", "build_random_mindomni")
    language_config = "mllm/config.json"

    def __init__(
        self,
        vlm: nn.Module,
        processor: Any,
        connector: nn.Module,
        decoder: nn.Module,
        vae: nn.Module,
        *,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        self.vlm = vlm
        self.connector = connector
        self.decoder = decoder
        self.vae = vae
        self.processor = processor  # not a module: never moved, saved with the VLM folder
        self.tokenizer = processor.tokenizer
        self.tokenizer.padding_side = "left"
        self.system_prompt = SYSTEM_PROMPT
        self.instruction_prefix = INSTRUCTION_PREFIX
        self.negative_prompt = NEGATIVE_PROMPT
        self.logprob_chunk_size = 512
        self.vae_batch_size = 4
        self.decoder_kv_cache = True
        self.synced_generation: bool | None = None
        self._negative: tuple[torch.Tensor, torch.Tensor] | None = None
        self.eos_token_ids = _token_ids(self.tokenizer, EOS_TOKENS)
        self.condition_suffix_ids: list[int] = self.tokenizer(CONDITION_SUFFIX, add_special_tokens=False)["input_ids"]
        self.banned_token_ids = _token_ids(self.tokenizer, BANNED_TOKENS)
        if not self.eos_token_ids:
            raise ValueError(f"the tokenizer has none of the end tokens {EOS_TOKENS}")
        self.pad_token_id = (
            self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_token_ids[-1]
        )
        cast_floating(self.vlm, dtype)
        cast_floating(self.connector, dtype)
        cast_floating(self.decoder, dtype, buffers=True)  # the position table joins bf16 activations
        cast_floating(self.vae, torch.float32, buffers=True)

    # -- plumbing -------------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.decoder.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.dtype

    def hf_vlm(self) -> nn.Module:
        """The ``Qwen2_5_VLForConditionalGeneration`` under any peft wrapper (LoRA layers stay injected)."""
        vlm = self.vlm
        return vlm.get_base_model() if hasattr(vlm, "get_base_model") else vlm

    def understanding_model(self) -> tuple[nn.Module, Any]:
        """The Qwen2.5-VL (adapters as they are: enter ``adapter_disabled`` for the reference) and its processor."""
        return self.hf_vlm(), self.processor

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Activation checkpointing (non-reentrant) for the VLM and the decoder's blocks."""
        if enabled:
            self.vlm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self.decoder.enable_gradient_checkpointing()
        else:
            self.vlm.gradient_checkpointing_disable()
            self.decoder.disable_gradient_checkpointing()

    def lora_targets(self, name: str) -> list[str]:
        """The language model: full names (relative to ``self.vlm``'s HF model) of every Linear outside the
        vision tower, lm_head included (MindOmni's RGPO LoRA targets; before and after peft wrapping). Other
        parts: :meth:`UnifiedModel.lora_targets`."""
        if name != "language_model":
            return super().lora_targets(name)
        names = []
        for full, module in self.hf_vlm().named_modules():
            if "visual" in full:
                continue
            if isinstance(module, nn.Linear) and not any(p.startswith("lora_") for p in full.split(".")):
                names.append(full.removesuffix(".base_layer"))
        return sorted(set(names))

    def apply_options(self, options: MindOmniOptions | None) -> None:
        """Take ``model.options``: prompts left None keep the checkpoint's (``prompts.json``) or MindOmni's."""
        options = options if options is not None else MindOmniOptions()
        self.options = options
        for key in ("system_prompt", "instruction_prefix", "negative_prompt"):
            if getattr(options, key) is not None:
                setattr(self, key, getattr(options, key))
                self.clear_negative_cache()
        for key in ("decoder_kv_cache", "vae_batch_size", "logprob_chunk_size", "synced_generation"):
            setattr(self, key, getattr(options, key))

    @classmethod
    def check_image_size(cls, height: int, width: int) -> str | None:
        if height <= 0 or width <= 0 or height % 16 or width % 16:
            return "a positive multiple of 16: the VAE downsamples by 8 and the decoder patches by 2"
        return None

    @classmethod
    def random_shape_hidden_size(cls, shape: str) -> int | None:
        from .tiny import RANDOM_SHAPES

        return RANDOM_SHAPES.get(shape, {}).get("vlm_hidden", 64 if shape == "tiny" else None)

    # -- prompts --------------------------------------------------------------------------------------------------
    def chat_messages(self, instruction: str, num_images: int = 0) -> list[dict[str, Any]]:
        """[system, user] messages of one prompt; images sit between the instruction prefix and the text."""
        content = [{"type": "text", "text": self.instruction_prefix}]
        content += [{"type": "image"} for _ in range(num_images)]
        content.append({"type": "text", "text": instruction})
        return [
            {"role": "system", "content": [{"type": "text", "text": self.system_prompt}]},
            {"role": "user", "content": content},
        ]

    def build_prompts(self, rows: list[dict[str, Any]]) -> PromptBatch:
        """Left-padded chat prompts (with the assistant generation prompt) from ``{"prompt", "images"?}`` rows."""
        texts, images, counts = [], [], []
        for i, row in enumerate(rows):
            if not isinstance(row.get("prompt"), str):
                raise KeyError(f"row {i} needs a 'prompt' string (got keys {sorted(row)})")
            row_images = list(row.get("images") or [])
            if not all(isinstance(im, Image.Image) for im in row_images):
                raise TypeError(f"row {i}: 'images' must be a list of PIL images")
            messages = self.chat_messages(row["prompt"], len(row_images))
            if row.get("messages"):  # a conversational row: its own chat, the family's system prompt if it has none
                messages = conversation_messages(row["messages"], self.system_prompt, len(row_images))
            texts.append(
                self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            )
            images.extend(im.convert("RGB") for im in row_images)
            counts.append(len(row_images))
        enc = self.processor(
            text=texts, images=images or None, padding=True, padding_side="left", return_tensors="pt"
        )
        # Position ids are rebuilt from the ids, so only the vision tower's inputs travel with the batch.
        vision = {k: enc[k] for k in VISION_KEYS if k in enc} if images else {}
        return PromptBatch(enc["input_ids"], enc["attention_mask"], vision, counts if images else None)

    # -- VLM internals --------------------------------------------------------------------------------------------
    def _position_ids(
        self, ids: torch.Tensor, mask: torch.Tensor, vision: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """Qwen2.5-VL (3, N, S) rope positions: text counts real tokens from 0 (left padding aware); with images
        the model's own 3-D layout. Computed here so generation and training use the very same positions."""
        if "image_grid_thw" in vision or "video_grid_thw" in vision:
            hf = self.hf_vlm()
            types = (ids == hf.config.image_token_id).int() + 2 * (ids == hf.config.video_token_id).int()
            positions, _ = hf.model.get_rope_index(
                ids,
                mm_token_type_ids=types,
                image_grid_thw=vision.get("image_grid_thw"),
                video_grid_thw=vision.get("video_grid_thw"),
                attention_mask=mask,
            )
            return positions
        real = mask.long()
        return ((real.cumsum(-1) - 1).clamp(min=0) * real)[None].expand(3, -1, -1)

    def _backbone(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        vision: dict[str, torch.Tensor],
        *,
        positions: torch.Tensor | None = None,
        attention: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Last-layer PRE-norm hidden states (N, S, H): the input of the language model's final norm (in
        transformers 5, ``hidden_states[-1]`` is post-norm). Gradients flow to any LoRA inside. ``positions``
        (3, N, S) and ``attention`` (N, S, S) bool, query x key, override the rope positions and the causal
        padding mask."""
        hf = self.hf_vlm()
        if attention is not None:
            impl = hf.model.language_model.config._attn_implementation
            if impl not in ("sdpa", "eager") or hf.model.language_model.has_sliding_layers:
                raise ValueError(f"the image condition needs a custom attention mask, which attn_implementation="
                                 f"{impl!r} (sliding layers: {hf.model.language_model.has_sliding_layers}) cannot "
                                 "take: load the VLM with 'sdpa' or 'eager'")
            if impl == "eager":  # eager attention adds the mask to its scores
                attention = torch.zeros(attention.shape, dtype=self.dtype, device=attention.device).masked_fill_(
                    ~attention, torch.finfo(self.dtype).min)
            attention = {"full_attention": attention[:, None]}
        captured: list[torch.Tensor] = []
        hook = hf.model.language_model.norm.register_forward_hook(
            lambda m, args, out: captured.append(args[0])
        )
        vision = {k: v for k, v in vision.items() if k in VISION_KEYS}
        mask_arg = attention if attention is not None else mask
        position_ids = positions if positions is not None else self._position_ids(ids, mask, vision)
        try:
            if self._synced():
                self._backbone_in_step(hf, ids, vision, mask_arg, position_ids)
            elif vision:
                hf.model(input_ids=ids, attention_mask=mask_arg, position_ids=position_ids, use_cache=False, **vision)
            else:  # text only: the text model directly (the VLM wrapper would only embed the ids and call it)
                hf.model.language_model(input_ids=ids, attention_mask=mask_arg, position_ids=position_ids,
                                        use_cache=False)
        finally:
            hook.remove()
        return captured[-1]

    def _backbone_in_step(self, hf: nn.Module, ids, vision: dict, mask, position_ids, use_cache: bool = False):
        """The VLM's forward as its wrapper does it (embeddings, vision tower, text model), module by module and
        the same on every rank: ZeRO-3 gathers each module's weights collectively as it is called and prefetches
        by the order it traced, so a rank whose batch has no input image, while another's has, runs the vision
        tower on a blank image (features dropped), and no rank calls the wrapper module itself."""
        if any(k.endswith("videos") or k == "video_grid_thw" for k in vision):
            raise ValueError("video inputs are not supported under ZeRO-3 on several ranks")
        embeds = hf.model.get_input_embeddings()(ids)
        if any_rank(bool(vision), self.device):  # one all-reduce per forward, which every rank makes
            pixels, grid = (vision["pixel_values"], vision["image_grid_thw"]) if vision else self._blank_image()
            features = hf.model.get_image_features(pixels, grid, return_dict=True).pooler_output
            if vision:
                image_embeds = torch.cat(features, dim=0).to(embeds.device, embeds.dtype)
                image_mask, _ = hf.model.get_placeholder_mask(ids, inputs_embeds=embeds, image_features=image_embeds)
                embeds = embeds.masked_scatter(image_mask, image_embeds)
        return hf.model.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids,
                                       use_cache=use_cache)

    def _blank_image(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The smallest input the vision tower takes: one merge group of patches (pixel_values, image_grid_thw)."""
        vc = self.hf_vlm().config.vision_config
        merge = vc.spatial_merge_size
        grid = torch.tensor([[1, merge, merge]], device=self.device)
        width = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
        visual_dtype = next(self.hf_vlm().model.visual.parameters()).dtype
        return torch.zeros(merge * merge, width, dtype=visual_dtype, device=self.device), grid

    def _completion_logps(self, states: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-norm states (N, T, H) predicting ``targets`` (N, T) -> log-probs (N, T) float32 and the policy's
        entropy at each position (N, T) float32, detached (a diagnostic, as TRL logs it).

        Norm + lm_head run on chunks of ``logprob_chunk_size`` tokens, each under activation checkpointing when
        grads flow, so at most one chunk of full-vocabulary logits is alive (forward or backward)."""
        hf = self.hf_vlm()
        norm, head = hf.model.language_model.norm, hf.lm_head
        flat, flat_t = states.reshape(-1, states.shape[-1]), targets.reshape(-1)
        # ZeRO-3 releases norm / lm_head weights after each module call, the recomputation included, so the saved
        # weights look empty when checkpoint compares them afterwards; its backward hooks fetch them again for the
        # backward, which gives the very gradients of the unchecked run: skip that metadata check.
        check = "none" if any(hasattr(p, "ds_id") for p in head.parameters()) else "default"
        out, entropy = [], []
        for start in range(0, flat.shape[0], self.logprob_chunk_size):
            h, t = (
                flat[start : start + self.logprob_chunk_size],
                flat_t[start : start + self.logprob_chunk_size],
            )
            if torch.is_grad_enabled():
                logp, ent = checkpoint(_chunk_logps, norm, head, h, t, use_reentrant=False, determinism_check=check)
            else:
                logp, ent = _chunk_logps(norm, head, h, t)
            out.append(logp)
            entropy.append(ent)
        return torch.cat(out).view(targets.shape), torch.cat(entropy).view(targets.shape)

    # -- generation -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        prompts: PromptBatch,
        *,
        num_generations: int,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        generator: torch.Generator | None = None,
    ) -> Completions:
        """Sample ``num_generations`` chains per prompt row, grouped (p0 x G, p1 x G, ...).

        Each prompt is prefilled ONCE and its KV cache repeated for its G chains. Sampling draws from a device
        generator seeded from ``generator`` (reproducible), else from torch's global RNG. ``temperature`` 0 is
        greedy. Chains stop at ``<|im_end|>`` / ``<|endoftext|>``; later positions hold the pad token, mask 0.
        """
        if num_generations < 1 or max_new_tokens < 1:
            raise ValueError(
                f"num_generations ({num_generations}) and max_new_tokens ({max_new_tokens}) must be >= 1"
            )
        hf = self.hf_vlm()
        language_model = hf.model.language_model
        device = self.device
        prompts = prompts.to(device)
        rows = prompts.input_ids.shape[0] * num_generations
        sample_gen = None
        if generator is not None:
            seed = int(torch.randint(0, 2**62, (1,), generator=generator))
            sample_gen = torch.Generator(device=device).manual_seed(seed)
        eos = torch.tensor(self.eos_token_ids, device=device)
        banned = torch.tensor(self.banned_token_ids, dtype=torch.long, device=device)
        synced = self._synced()
        # Inference mode (no autograd bookkeeping at all) unless ZeRO-3 partitions the parameters (its fetch hooks
        # then run inside the loop); the sampled ids are copied out of it at the end.
        fast = not hasattr(next(self.vlm.parameters()), "ds_id")
        # Decoding steps build their own attention mask: with SDPA, one query token attends to every real key, so
        # the mask is just the padding mask (None without padding), as transformers would build it each step.
        own_mask = language_model.config._attn_implementation == "sdpa" and not language_model.has_sliding_layers
        padded = not bool(prompts.attention_mask.all())
        was_training = self.vlm.training
        if was_training:
            self.vlm.eval()  # layers drop the KV cache under gradient checkpointing in train mode
        try:
            with torch.inference_mode(fast):
                positions = self._position_ids(prompts.input_ids, prompts.attention_mask, prompts.vision)
                if synced:  # module by module, the same on every rank (see _backbone_in_step)
                    vision = {k: v for k, v in prompts.vision.items() if k in VISION_KEYS}
                    out = self._backbone_in_step(hf, prompts.input_ids, vision, prompts.attention_mask, positions,
                                                 use_cache=True)
                    last_logits = hf.lm_head(out.last_hidden_state[:, -1])
                else:
                    out = hf(
                        input_ids=prompts.input_ids,
                        attention_mask=prompts.attention_mask,
                        position_ids=positions,
                        use_cache=True,
                        logits_to_keep=1,
                        **prompts.vision,
                    )
                    last_logits = out.logits[:, -1]
                cache = out.past_key_values
                compiled = self._compiled_decoder_for(fast, synced, own_mask)
                session = None
                if compiled is not None:  # the G chains share the prefill on the static cache too
                    session = compiled.start(cache, prompts.attention_mask, num_generations, max_new_tokens)
                else:
                    cache.batch_repeat_interleave(num_generations)
                logits = last_logits.float().repeat_interleave(num_generations, 0)
                next_pos = positions.amax(dim=(0, 2)).repeat_interleave(num_generations) + 1  # (rows,)
                mask = prompts.attention_mask.repeat_interleave(num_generations, 0)
                done = torch.zeros(rows, dtype=torch.bool, device=device)
                tokens = []
                for step in range(max_new_tokens):
                    if banned.numel():
                        logits.index_fill_(1, banned, float("-inf"))
                    token = sample_tokens(logits, temperature, top_p, top_k, sample_gen)
                    token.masked_fill_(done, self.pad_token_id)
                    tokens.append(token)
                    done |= torch.isin(token, eos)
                    if step == max_new_tokens - 1 or self._all_done(done, synced):
                        break
                    step_pos = (next_pos + step).view(1, rows, 1).expand(3, -1, -1)
                    if session is not None:
                        logits = session.step(token, step_pos)
                        continue
                    mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                    # The text model and lm_head directly: a decoding step has no vision input, and the outer VLM
                    # wrappers cost as much as the tiny model's own layers.
                    step_mask = mask
                    if own_mask:
                        step_mask = {"full_attention": mask.bool()[:, None, None, :] if padded else None}
                    hidden = language_model(
                        input_ids=token[:, None],
                        attention_mask=step_mask,
                        position_ids=step_pos,
                        past_key_values=cache,
                        use_cache=True,
                    ).last_hidden_state
                    logits = hf.lm_head(hidden[:, -1]).float()
        finally:
            if was_training:
                self.vlm.train(True)
        return self._completions(torch.stack(tokens, dim=1))  # outside inference mode: an ordinary tensor

    def _compiled_decoder_for(self, fast: bool, synced: bool, own_mask: bool):
        """The compiled static-cache decoder when asked for (``set_compiled_decode``) and usable for this call."""
        from ..static_decode import log_once

        if self.decode_compile is None:
            return None
        why = None
        if not fast or synced:
            why = "ZeRO-3 partitions the language model's parameters (its hooks fetch them at every call)"
        elif not own_mask:
            why = "the language model's attention is not 'sdpa' without sliding layers (the static cache's key mask)"
        if why is not None:
            log_once(f"compiled decode off, eager loop instead: {why}")
            return None
        language_model = self.hf_vlm().model.language_model
        return self.compiled_decoder(self._decode_step, language_model.config, self.device)

    def _decode_step(self, token: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache) -> torch.Tensor:
        """One decoding step on a static cache (the function :mod:`rgpo.models.static_decode` compiles): float32
        logits (rows, V) after ``token`` (rows, 1) at ``positions`` (3, rows, 1), keys masked by ``mask``
        (rows, 1, 1, L) bool."""
        hf = self.hf_vlm()
        hidden = hf.model.language_model(input_ids=token, attention_mask={"full_attention": mask},
                                         position_ids=positions, past_key_values=cache,
                                         use_cache=True).last_hidden_state
        return hf.lm_head(hidden[:, -1]).float()

    def _synced(self) -> bool:
        """Whether generation keeps every rank stepping (``synced_generation``; auto: when ZeRO-3 partitions the
        VLM) and there are several ranks."""
        synced = self.synced_generation
        if synced is None:  # auto: ZeRO-3 marks its partitioned parameters with ``ds_id``
            synced = hasattr(next(self.vlm.parameters()), "ds_id")
        return bool(synced) and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    def _all_done(self, done: torch.Tensor, synced: bool | None = None) -> bool:
        """Whether every chain finished, over all ranks when generation is synced: under ZeRO-3 each forward
        gathers parameters collectively, so a rank that stops early would hang the others."""
        if synced is None:
            synced = self._synced()
        if synced:
            pending = torch.tensor([float(not bool(done.all()))], device=done.device)
            dist.all_reduce(pending)
            return pending.item() == 0
        return bool(done.all())

    def _completions(self, ids: torch.Tensor) -> Completions:
        """Sampled ids (N, T) -> masks (1 through the first EOS), decoded texts and condition lengths."""
        is_eos = torch.isin(ids, torch.tensor(self.eos_token_ids, device=ids.device))
        mask = ((is_eos.long().cumsum(1) - is_eos.long()) == 0).long()
        width = int(mask.sum(1).max())  # steps taken only to keep ranks in lockstep leave all-pad columns
        ids, mask, is_eos = ids[:, :width], mask[:, :width], is_eos[:, :width]
        ids = torch.where(mask.bool(), ids, torch.full_like(ids, self.pad_token_id))
        texts, lengths = [], []
        for row, row_eos in zip(ids.tolist(), is_eos.tolist()):
            body = row[: row_eos.index(True)] if True in row_eos else row
            texts.append(self._decode(body))
            lengths.append(answer_condition_length(self._decode, body))
        return Completions(ids, mask, texts, torch.tensor(lengths, dtype=torch.long, device=ids.device))

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def completions_from_texts(self, texts: list[str], eos: bool = True) -> Completions:
        """Tokenise given completion texts (e.g. hand-written or replayed chains) into :class:`Completions`."""
        rows = [
            self.tokenizer(t, add_special_tokens=False)["input_ids"]
            + ([self.eos_token_ids[0]] if eos else [])
            for t in texts
        ]
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [self.pad_token_id] * (width - len(r)) for r in rows], dtype=torch.long)
        length = torch.tensor([len(r) for r in rows])
        comp = self._completions(ids)
        comp.completion_mask = (torch.arange(width)[None] < length[:, None]).long()
        return comp

    # -- training forward -----------------------------------------------------------------------------------------
    def forward_text(
        self, prompts: PromptBatch, completions: Completions, *, with_condition: bool = True
    ) -> ForwardOutput:
        """ONE backbone forward over prompt + completion: log-probs (N, T) and, optionally, the condition.

        The condition is MindOmni's: the pre-norm states of the prompt's real tokens, the first
        ``condition_lengths[i]`` completion tokens and the :data:`CONDITION_SUFFIX` newline after them, re-packed
        left-padded: (N, L, H_vlm) with mask (N, L). The newline rides at the end of the same forward: it attends
        to the prompt and the answer prefix only, at the position right after the prefix, and no token attends to
        it, so its state is that of the sequence MindOmni re-runs and the completion's log-probs do not change.
        """
        device = self.device
        prompts, completions = prompts.to(device), completions.to(device)
        p_len = prompts.input_ids.shape[1]
        comp_ids = completions.completion_ids
        n, t = comp_ids.shape
        ids = torch.cat([prompts.input_ids, comp_ids], dim=1)
        mask = torch.cat(
            [prompts.attention_mask, completions.completion_mask.to(prompts.attention_mask.dtype)], dim=1
        )
        if not with_condition:
            states = self._backbone(ids, mask, prompts.vision)  # (N, P + T, H)
            logps, entropy = self._completion_logps(states[:, p_len - 1 : -1], comp_ids)
            return ForwardOutput(logps, entropy=entropy)
        prefix_end = p_len + completions.condition_lengths  # (N,) index right after each row's answer prefix
        suffix = torch.tensor(self.condition_suffix_ids, dtype=ids.dtype, device=device).expand(n, -1)
        positions = self._position_ids(ids, mask, prompts.vision)  # the suffix continues after the prefix:
        last = positions.gather(2, (prefix_end - 1)[None, :, None].expand(3, -1, 1))  # (3, N, 1)
        suffix_positions = last + torch.arange(1, suffix.shape[1] + 1, device=device)
        states = self._backbone(
            torch.cat([ids, suffix], dim=1),
            torch.cat([mask, torch.ones_like(suffix, dtype=mask.dtype)], dim=1),
            prompts.vision,
            positions=torch.cat([positions, suffix_positions], dim=2),
            attention=condition_attention(mask.bool(), prefix_end, suffix.shape[1]),
        )  # (N, P + T + k, H)
        logps, entropy = self._completion_logps(states[:, p_len - 1 : p_len + t - 1], comp_ids)
        completion_part = torch.arange(t, device=device)[None] < completions.condition_lengths[:, None]
        selected = torch.cat([prompts.attention_mask.bool(), completion_part, torch.ones_like(suffix, dtype=torch.bool)],
                             dim=1)
        condition, cond_mask = pack_left(states, selected)
        return ForwardOutput(logps, Condition(condition, cond_mask), entropy)

    def negative_condition(self, num: int) -> Condition:
        """The negative prompt's states as a :class:`~rgpo.models.base.Condition` (see :meth:`negative_states`)."""
        return Condition(*self.negative_states(num))

    @torch.no_grad()
    def negative_states(self, num: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-norm states of the chat-templated negative prompt (no reasoning), repeated ``num`` times.

        Computed once with the adapter DISABLED (the reference VLM) and cached, so toggling or training the
        adapter never changes the negative branch; call :meth:`clear_negative_cache` after changing the base
        weights, ``negative_prompt`` or ``system_prompt``. Under ZeRO-3 every rank must make the first call.
        """
        cached = self._negative
        if cached is None or cached[0].device != self.device or cached[0].dtype != self.dtype:
            batch = self.build_prompts([{"prompt": self.negative_prompt}]).to(self.device)
            with self.adapter_disabled():
                states = self._backbone(batch.input_ids, batch.attention_mask, {})
            real = batch.attention_mask[0].bool()
            cached = (
                states[:, real].to(self.dtype),
                torch.ones(1, int(real.sum()), dtype=torch.long, device=self.device),
            )
            self._negative = cached
        return cached[0].expand(num, -1, -1).clone(), cached[1].expand(num, -1).clone()

    def clear_negative_cache(self) -> None:
        self._negative = None

    # -- image side -----------------------------------------------------------------------------------------------
    def connect(self, condition: torch.Tensor, condition_mask: torch.Tensor) -> torch.Tensor:
        """VLM states (N, L, H_vlm) -> decoder condition embeddings (N, L, D); as the reference, through the frozen
        copy when :meth:`~rgpo.models.base.UnifiedModel.keep_reference_copies` made one."""
        return self.part("connector")(condition, condition_mask)

    def empty_part_copy(self, name: str) -> nn.Module:
        """The connector's structure on the meta device (no initialisation to pay for: 238 M weights at 7B); other
        parts as :meth:`UnifiedModel.empty_part_copy`."""
        if name != "connector":
            return super().empty_part_copy(name)
        source = self.connector
        with torch.device("meta"):
            return MindOmniConnector(source.proj.in_features, source.config, num_layers=len(source.layers))

    def decode_step(
        self,
        cond_embeds: torch.Tensor,
        cond_mask: torch.Tensor,
        latents: torch.Tensor,
        t: torch.Tensor,
        *,
        return_features: bool = False,
    ) -> GeneratorOutput:
        """Velocity (N, C, h, w) at (latents, t), t (N,) with 0 = noise; features (N, layers + 1, n_img, D)."""
        velocity, features = decoder_forward(
            self.decoder, cond_embeds, cond_mask, latents, t, return_features=return_features
        )
        return GeneratorOutput(velocity, features)

    # -- the image pipeline (the interface) -----------------------------------------------------------------------
    def image_inputs(self, condition: Condition, negative: Condition | None, *, guidance_scale: float = 1.0,
                     exact: bool = False) -> DecoderInputs:
        """Connected condition (and negative) rows, stacked as :meth:`guided_velocity` takes them; with the
        condition KV cache (``decoder_kv_cache``, no gradients) unless ``exact`` (the cached path differs by
        ~1e-5, so the image policy samples and replays without it)."""
        embeds = self.connect(condition.states, condition.mask)
        guided = negative is not None and guidance_scale != 1.0
        neg = self.connect(negative.states, negative.mask) if guided else None
        embeds, mask = guided_batch(embeds, condition.mask, neg, negative.mask if guided else None)
        cache = None
        if self.decoder_kv_cache and not exact and not torch.is_grad_enabled():
            cache = _LazyCache(embeds, mask)
        return DecoderInputs(embeds, mask, guidance_scale if guided else None, cache)

    def image_prediction(self, inputs: DecoderInputs, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        cache = inputs.cache
        if isinstance(cache, _LazyCache):
            cache = cache.build(self.decoder, x)
        return self.guided_velocity(inputs.embeds, inputs.mask, x, t, inputs.guidance or 1.0, cache=cache)

    def generator_output(self, inputs: DecoderInputs, x: torch.Tensor, t: torch.Tensor, *,
                         return_features: bool = False) -> GeneratorOutput:
        if (inputs.guidance or 1.0) != 1.0:
            raise ValueError("generator_output is unguided: build its inputs with guidance_scale=1")
        return self.decode_step(inputs.embeds, inputs.mask, x, t, return_features=return_features)

    def regularizer_times(self, num: int, generator: torch.Generator) -> torch.Tensor:
        """MindOmni's D_IKL timestep: uniform on the 51-point grid linspace(0, 1, 51)."""
        return torch.randint(0, IMAGE_KL_GRID, (num,), generator=generator).float().div(IMAGE_KL_GRID - 1)

    def image_sampler(self, cfg: ImageSamplingConfig) -> FlowSampler:
        """OmniGen's Euler grid (t: 0 -> 1, no shift): exactly what its diffusers scheduler walks."""
        return FlowSampler(euler_grid(cfg.steps))

    def guided_velocity(
        self,
        embeds: torch.Tensor,
        mask: torch.Tensor,
        x: torch.Tensor,
        t: torch.Tensor,
        guidance_scale: float = 1.0,
        *,
        cache: Any = None,
    ) -> torch.Tensor:
        """The float32 velocity (N, C, h, w) that :meth:`sample_latents` integrates, at latents ``x`` (N, C, h, w)
        and time ``t`` (0-dim, or (N,)).

        ``guidance_scale != 1``: ``embeds``/``mask`` (or ``cache``) hold the N condition rows followed by the N
        negative rows (as :func:`cat_left_padded` stacks them); both branches run as ONE batch and
        ``v = v_neg + g (v_cond - v_neg)``. ``cache`` (a :func:`build_condition_cache`, no gradients) runs only
        the time and image tokens; without it the full forward runs, the path gradients flow through. The image
        policy gradient samples with ``decoder_kv_cache = False`` and recomputes its log-probs with this very
        method, so the on-policy ratio is exactly 1 (the cached path differs by ~1e-5)."""
        guided = guidance_scale != 1.0
        x_in = torch.cat([x, x]) if guided else x
        t = t.expand(x_in.shape[0]) if t.dim() == 0 else (torch.cat([t, t]) if guided else t)
        if cache is not None:
            v = decoder_forward_cached(self.decoder, cache, x_in, t).float()
        else:
            v = decoder_forward(self.decoder, embeds, mask, x_in, t)[0].float()
        if guided:
            v_cond, v_neg = v.chunk(2)
            v = v_neg + guidance_scale * (v_cond - v_neg)
        return v

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(C, h, w) of the latents of an image; height and width must be multiples of VAE factor x patch."""
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        step = factor * self.decoder.config.patch_size
        if height % step or width % step:
            raise ValueError(
                f"image size {height}x{width} must be a multiple of {step} (VAE factor x patch size)"
            )
        return self.decoder.config.in_channels, height // factor, width // factor

    @torch.no_grad()
    def sample_latents(
        self,
        cond_embeds: torch.Tensor,
        cond_mask: torch.Tensor,
        neg_embeds: torch.Tensor | None,
        neg_mask: torch.Tensor | None,
        noise: torch.Tensor,
        cfg: ImageSamplingConfig,
        *,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
    ) -> torch.Tensor | SDETrajectory:
        """Flow sampling from ``noise`` over t = 0 -> 1 (``cfg.steps`` uniform steps, OmniGen convention).

        With guidance (``neg_embeds`` given and ``cfg.guidance_scale`` != 1) the condition and negative rows run
        as ONE batch per step, ``v = v_neg + g (v_cond - v_neg)``. Condition keys/values are computed once per
        call (``decoder_kv_cache``). Integration in fp32.

        ``cfg.noise_level == 0``: Euler steps ``x + dt * v``; returns latents (N, C, h, w) float32.
        ``cfg.noise_level > 0``: :func:`rgpo.sde.sample_flow` takes Flow-GRPO's SDE step (with the guided ``v``) at
        the steps of the window (every step without one) and returns its :class:`~rgpo.sde.SDETrajectory`. The
        step noise (and a window start not fixed in ``cfg``) comes from ``generator``: one CPU generator, or one
        per row (the start is then drawn from the first); None: ``torch.Generator().manual_seed(cfg.seed +
        SDE_SEED_OFFSET)``, a stream apart from :meth:`initial_noise`'s.
        """
        guided = neg_embeds is not None and cfg.guidance_scale != 1.0
        embeds, mask = guided_batch(cond_embeds, cond_mask, neg_embeds if guided else None, neg_mask)
        cache = _LazyCache(embeds, mask) if self.decoder_kv_cache else None
        inputs = DecoderInputs(embeds, mask, cfg.guidance_scale if guided else None, cache)
        out = self.sample_image_latents(inputs, noise, cfg, generator=generator,
                                        default_seed=cfg.seed + SDE_SEED_OFFSET)
        return out.latents if cfg.noise_level == 0 else out

    def float32_modules(self) -> list[str]:
        return ["vae"]

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> list[Image.Image]:
        """``latents / scaling_factor`` (no shift) through the VAE, in batches of ``vae_batch_size``. The VAE is
        float32, except under ZeRO-3 in bf16/fp16, whose partitioned parameters all carry the run's dtype."""
        images: list[Image.Image] = []
        first = next(self.vae.parameters())
        for chunk in latents.split(self.vae_batch_size):
            z = chunk.to(first.device, torch.float32) / self.vae.config.scaling_factor
            pixels = self.vae.decode(z.to(first.dtype)).sample.float()
            pixels = (pixels / 2 + 0.5).clamp(0, 1).mul(255).round().to(torch.uint8)
            images += [Image.fromarray(p.permute(1, 2, 0).cpu().numpy()) for p in pixels]
        return images

    # -- checkpoints ----------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path: str,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        **kwargs,
    ) -> MindOmni:
        """Load MindOmni's released layout (``mllm/``, ``image_decoder/``, ``vae/``, ``connector.safetensors``)."""
        from .checkpoint import load_mindomni

        options = kwargs.pop("options", None)
        model = load_mindomni(cls, path, dtype=dtype, device=device, **kwargs)
        model.apply_options(options)
        return model

    def save_pretrained(self, path: str) -> None:
        """Write the released layout (decoder in OmniGen-v1 key names, connector as ``0.*``/``1.*``/``2.*``)."""
        from .checkpoint import save_mindomni

        save_mindomni(self, path)


# -- pure helpers ------------------------------------------------------------------------------------------------


def conversation_messages(chat: list[dict[str, Any]], system_prompt: str, num_images: int) -> list[dict[str, Any]]:
    """A conversational row's messages in the processor's form; the input images go into its first user turn."""
    messages = [] if any(m["role"] == "system" for m in chat) else [
        {"role": "system", "content": [{"type": "text", "text": system_prompt}]}]
    placed = False
    for message in chat:
        content = [{"type": "text", "text": message["content"]}]
        if message["role"] == "user" and not placed:
            content = [{"type": "image"} for _ in range(num_images)] + content
            placed = True
        messages.append({"role": message["role"], "content": content})
    return messages


def _token_ids(tokenizer, tokens: Sequence[str]) -> list[int]:
    """Ids of the tokens the vocabulary really has (unknown ones are skipped)."""
    vocab = tokenizer.get_vocab()
    return [vocab[t] for t in tokens if t in vocab]




def _chunk_logps(
    norm: nn.Module, head: nn.Module, states: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`~rgpo.models.lm.target_logps` of pre-norm states (n, H): norm and lm_head applied here, so one chunk
    at a time can run under activation checkpointing."""
    return target_logps(head(norm(states)).float(), targets)




def answer_condition_length(decode: Callable[[Sequence[int]], str], ids: Sequence[int]) -> int:
    """How many tokens of ``ids`` (a chain without its EOS) come strictly before the tokens spelling the first
    ``</answer>``: the largest k whose decoded prefix stays within the text before ``</answer>``. A token that
    carries the first character of ``</answer>`` (even merged with earlier text) is excluded. No ``</answer>``:
    every token."""
    text = decode(ids)
    offset = text.find(ANSWER_CLOSE)
    if offset < 0:
        return len(ids)
    before = text[:offset]
    lo, hi = 0, len(ids)
    while lo < hi:  # decoded length grows with k, so binary search on "fits before the tag"
        mid = (lo + hi + 1) // 2
        if len(decode(ids[:mid])) <= offset:
            lo = mid
        else:
            hi = mid - 1
    # A prefix cut inside a multi-byte character decodes to U+FFFD and is not a real prefix: step back.
    while lo > 0 and not before.startswith(decode(ids[:lo])):
        lo -= 1
    return lo


def condition_attention(real: torch.Tensor, prefix_end: torch.Tensor, suffix_len: int) -> torch.Tensor:
    """(N, S + k, S + k) bool, query x key, for ``real`` (N, S) tokens followed by ``suffix_len`` = k suffix tokens:
    causal over the real keys; each suffix query sees only the keys before ``prefix_end[i]`` and the suffix up to
    itself. Every query sees itself, so a padding row is never empty (SDPA would give NaN)."""
    n, s = real.shape
    total = s + suffix_len
    index = torch.arange(total, device=real.device)
    keys = torch.cat([real, torch.ones(n, suffix_len, dtype=torch.bool, device=real.device)], dim=1)
    allowed = (index[None, :, None] >= index[None, None, :]) & keys[:, None, :]  # causal x real keys
    prefix_only = (index[None, :] < prefix_end[:, None]) | (index[None, :] >= s)  # (N, keys)
    allowed[:, s:] &= prefix_only[:, None, :]
    return allowed | torch.eye(total, dtype=torch.bool, device=real.device)


def pack_left(states: torch.Tensor, selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather the ``selected`` (N, S) positions of ``states`` (N, S, H) in order, left-padded to the longest row:
    (N, L, H) with pads zeroed, and the mask (N, L) long. Differentiable w.r.t. ``states``."""
    n, s, h = states.shape
    counts = selected.sum(1)
    length = int(counts.max())
    # A stable sort puts unselected positions first and keeps the selected ones in order.
    order = torch.sort(selected.to(torch.int32), dim=1, stable=True).indices[:, s - length :]
    mask = selected.gather(1, order)
    packed = states.gather(1, order[..., None].expand(-1, -1, h)) * mask[..., None].to(states.dtype)
    return packed, mask.long()


def cat_left_padded(
    embeds: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack left-padded batches of different lengths along rows, left-padding each to the longest."""
    length = max(e.shape[1] for e in embeds)
    out_e, out_m = [], []
    for e, m in zip(embeds, masks):
        pad = length - e.shape[1]
        out_e.append(torch.nn.functional.pad(e, (0, 0, pad, 0)))
        out_m.append(torch.nn.functional.pad(m, (pad, 0)))
    return torch.cat(out_e), torch.cat(out_m)


def guided_batch(
    cond_embeds: torch.Tensor,
    cond_mask: torch.Tensor,
    neg_embeds: torch.Tensor | None,
    neg_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoder batch that :meth:`MindOmni.guided_velocity` takes: the N condition rows, then the N negative
    rows (one negative row is broadcast to N), left-padded to a common length; the condition alone without
    negative rows. Sampling and the image policy's recomputation both stack through here, so their velocities
    match exactly."""
    if neg_embeds is None:
        return cond_embeds, cond_mask
    if neg_mask is None:
        raise ValueError("neg_embeds given without neg_mask")
    n = cond_embeds.shape[0]
    if neg_embeds.shape[0] == 1 and n > 1:
        neg_embeds, neg_mask = neg_embeds.expand(n, -1, -1), neg_mask.expand(n, -1)
    return cat_left_padded([cond_embeds, neg_embeds], [cond_mask, neg_mask])


def euler_grid(steps: int) -> torch.Tensor:
    """t_0..t_steps (float32) of OmniGen's Euler sampler: ``1 - linspace(1, 0, steps + 1)``, exactly the times
    ``FlowMatchEulerDiscreteScheduler(invert_sigmas=True, num_train_timesteps=1)`` walks."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return 1 - torch.from_numpy(np.linspace(1, 0, steps + 1).astype(np.float32))


class _LazyCache:
    """The condition KV cache, built at the first prediction (when the latents' size is known) and reused by every
    later step of the same sampling run."""

    def __init__(self, embeds: torch.Tensor, mask: torch.Tensor):
        self.embeds, self.mask, self.cache = embeds, mask, None

    def build(self, decoder: nn.Module, x: torch.Tensor) -> ConditionCache:
        if self.cache is None:
            h, w = x.shape[-2:]
            self.cache = build_condition_cache(decoder, self.embeds, self.mask, num_image_tokens(decoder, h, w))
        return self.cache
