"""BLIP3-o as one :class:`~rgpo.models.base.UnifiedModel`: Qwen2.5-VL -> 64 queries -> Lumina DiT -> UNet -> VAE.

Text side: chat prompts, grouped sampling of reasoning chains that end at ``[IMG]`` (or EOS), and ONE training
forward over ``prompt + chain`` that also runs ``[IMG]`` and the 64 ``latent_queries`` after the chain's
condition prefix. The :class:`~rgpo.models.base.Condition` is the POST-norm last states at the 64 query positions
(mask all ones), as the release reads ``hidden_states[-1][:, -64:]``; positions count real tokens only, so a
left-padded row gives the very numbers of the row alone.

Image side, stage 1 (the generator, what the image policy trains): the DiT samples 8 x 8 x C EVA-CLIP tokens by
flow matching, ``x_sigma = (1 - sigma) x0 + sigma eps``, prediction ``eps - x0``, over
``sigmas = linspace(1, 1/N, N)`` (the scheduler's shift applied), the model fed ``long(sigma * 1000)``, guidance
against the all-ZERO condition batched ``[uncond, cond]``. In rgpo's time ``t = 1 - sigma`` and the velocity is
``-prediction`` (:mod:`rgpo.schedulers`). Stage 2 (:meth:`Blip3o.decode_latents`, a fixed renderer): the SDXL-style
UNet (epsilon, ``EulerDiscreteScheduler``) conditioned on the 64 tokens plus ``text_time`` extras (their mean;
time ids ``[1024, 1024, 0, 0, h, w]``), guidance against the DiT's features for the prompt " " batched
``[cond, negative]``, then the VAE.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
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
from rgpo.schedulers import flow_model_timesteps, flow_time_grid, velocity_from_flow_prediction

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
from .dit import Blip3oDiT
from .options import INSTRUCTION_PREFIX, RENDERER_NEGATIVE_PROMPT, SYSTEM_PROMPT, Blip3oOptions

IMG_START, IMG_END, IMAGE_TOKEN = "[IMG]", "[/IMG]", "<image>"
ADDED_TOKENS = (IMG_START, IMG_END, IMAGE_TOKEN)  # appended to Qwen's vocabulary by the release, in this order
NUM_QUERIES = 64
EOS_TOKENS = ("<|im_end|>", "<|endoftext|>")
BANNED_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", IMG_END, IMAGE_TOKEN)
VISION_KEYS = ("pixel_values", "image_grid_thw")
DIT_STEPS, DIT_GUIDANCE = 30, 3.0  # the release's sample_images defaults (the renderer's negative uses them)
RELEASE_STEPS = {"renderer": 50, "negative_dit": DIT_STEPS}  # the release pipeline's num_inference_steps
TIME_ORIGINAL_SIZE, TIME_CROP = (1024, 1024), (0, 0)  # the release pipeline's text_time ids before (h, w)


@dataclass
class DiTInputs(ModelOutput):
    """The DiT's projected captions: the N condition rows, preceded by N all-zero-condition rows when guided
    (the release's ``[uncond, cond]``)."""

    embeds: torch.Tensor | None = None
    guidance: float | None = None


class LatentQueries(nn.Module):
    """The release's ``model.latent_queries`` (1, 64, H): read through a module call, so ZeRO-3 gathers it."""

    def __init__(self, num_queries: int, hidden_size: int):
        super().__init__()
        self.latent_queries = nn.Parameter(torch.randn(1, num_queries, hidden_size))

    def forward(self, rows: int) -> torch.Tensor:
        return self.latent_queries.expand(rows, -1, -1)


class Blip3o(UnifiedModel):
    """BLIP3-o's parts as ONE module: ``vlm`` (Qwen2.5-VL), ``queries``, ``dit``, ``renderer`` (UNet), ``vae``.

    ``dtype`` applies to every part but the VAE (float32). The schedulers are plain attributes read from the
    checkpoint (``dit_scheduler``: ``FlowMatchEulerDiscreteScheduler``; ``renderer_scheduler``:
    ``EulerDiscreteScheduler``)."""

    family = "blip3o"
    parts = {
        "language_model": Part("vlm", "Qwen2.5-VL with [IMG], [/IMG], <image> added (LoRA: every Linear outside "
                                      "the vision tower; the release froze it)"),
        "queries": Part("queries", "the 64 learnable query embeddings appended after [IMG]"),
        "generator": Part("dit", "caption projection + Lumina-Next DiT over 8 x 8 CLIP tokens (flow, sigma = 1 "
                                 "noise)", ("to_q", "to_k", "to_v", "to_out.0")),
        "renderer": Part("renderer", "SDXL-style UNet (epsilon) rendering the CLIP tokens, a fixed sampler"),
        "vae": Part("vae", "SDXL AutoencoderKL, float32"),
    }
    layout = LAYOUT
    options_class = Blip3oOptions
    supported_regularizers = ("feature_kl", "velocity_mse", "gaussian_kl", "none")
    random_shapes = ("tiny", "blip3o-8b", "blip3o-4b")
    factories = ("rgpo.models.blip3o.tiny", "build_tiny_blip3o", "build_random_blip3o")
    language_config = "config.json"

    def __init__(self, vlm: nn.Module, tokenizer: Any, queries: LatentQueries, dit: Blip3oDiT, renderer: nn.Module,
                 vae: nn.Module, dit_scheduler: Any, renderer_scheduler: Any, *, processor: Any = None,
                 dtype: torch.dtype = torch.float32, release_config: dict | None = None):
        super().__init__()
        self.vlm, self.queries, self.dit, self.renderer, self.vae = vlm, queries, dit, renderer, vae
        self.dit_scheduler, self.renderer_scheduler = dit_scheduler, renderer_scheduler
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "left"
        self.processor = processor
        self.release_config = release_config  # the root config.json as read: written back by save_pretrained
        vocab = tokenizer.get_vocab()
        missing = [t for t in (*ADDED_TOKENS, *EOS_TOKENS[:1]) if t not in vocab]
        if missing:
            raise ValueError(f"the tokenizer lacks BLIP3-o's tokens {missing}")
        self.img_start_id = vocab[IMG_START]
        self.eos_token_ids = [vocab[t] for t in EOS_TOKENS if t in vocab]
        self.end_token_ids = [*self.eos_token_ids, self.img_start_id]  # a chain ends where its image begins
        self.banned_token_ids = [vocab[t] for t in BANNED_TOKENS if t in vocab]
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_token_ids[-1]
        self.rendering_for_rollouts = False
        # The checkpoint's own step counts: the release's (UNet 50; the renderer negative's DiT 30); tiny: fewer.
        self.checkpoint_steps = dict(RELEASE_STEPS)
        self._render_size: tuple[int, int] | None = None
        self._timestep_table: dict[float, int] = {}
        self._renderer_negative: torch.Tensor | None = None
        self.apply_options(None)
        for module in (vlm, queries, dit, renderer):
            cast_floating(module, dtype)
        cast_floating(vae, torch.float32, buffers=True)

    # -- plumbing -------------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.queries.latent_queries.device

    @property
    def dtype(self) -> torch.dtype:
        return self.queries.latent_queries.dtype

    def hf_vlm(self) -> nn.Module:
        """The ``Qwen2_5_VLForConditionalGeneration`` under any peft wrapper."""
        vlm = self.vlm
        return vlm.get_base_model() if hasattr(vlm, "get_base_model") else vlm

    def understanding_model(self) -> tuple[nn.Module, Any]:
        """The Qwen2.5-VL (adapters as they are: enter ``adapter_disabled`` for the reference) and its processor."""
        return self.hf_vlm(), self.processor

    def apply_options(self, options: Blip3oOptions | None) -> None:
        options = options if options is not None else Blip3oOptions()
        self.options = options
        self.system_prompt = options.system_prompt if options.system_prompt is not None else SYSTEM_PROMPT
        self.instruction_prefix = (options.instruction_prefix if options.instruction_prefix is not None
                                   else INSTRUCTION_PREFIX)
        if options.dit_shift is not None:
            self.dit_scheduler = type(self.dit_scheduler).from_config(self.dit_scheduler.config,
                                                                      shift=options.dit_shift)
        self._timestep_table = {}
        self._renderer_negative = None

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        if enabled:
            self.vlm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.vlm.gradient_checkpointing_disable()
        self.dit.gradient_checkpointing = enabled

    def lora_targets(self, name: str) -> list[str]:
        """The language model: every Linear outside the vision tower, lm_head included; others: the default."""
        if name != "language_model":
            return super().lora_targets(name)
        names = [full.removesuffix(".base_layer") for full, m in self.hf_vlm().named_modules()
                 if "visual" not in full and isinstance(m, nn.Linear)
                 and not any(p.startswith("lora_") for p in full.split("."))]
        return sorted(set(names))

    def float32_modules(self) -> list[str]:
        return ["vae"]

    def empty_part_copy(self, name: str) -> nn.Module:
        """The queries' structure on the meta device (ZeRO-3 may partition them); others: the default."""
        if name != "queries":
            return super().empty_part_copy(name)
        with torch.device("meta"):
            return LatentQueries(NUM_QUERIES, self.hf_vlm().config.text_config.hidden_size)

    @classmethod
    def check_image_size(cls, height: int, width: int) -> str | None:
        if height <= 0 or width <= 0 or height % 32 or width % 32:
            return "a positive multiple of 32: the VAE downsamples by 8 and the renderer's UNet by 4 more"
        return None

    @classmethod
    def random_shape_hidden_size(cls, shape: str) -> int | None:
        from .tiny import RANDOM_SHAPES

        return RANDOM_SHAPES.get(shape, {}).get("vlm_hidden", 64 if shape == "tiny" else None)

    # -- prompts --------------------------------------------------------------------------------------------------
    def chat_text(self, instruction: str, num_images: int = 0) -> str:
        """The release's ChatML conversation (``conv_templates["qwen"]``) up to the assistant's turn; input images
        sit before the instruction as Qwen's vision placeholders."""
        vision = "<|vision_start|><|image_pad|><|vision_end|>" * num_images
        return (f"<|im_start|>system\n{self.system_prompt}<|im_end|>\n<|im_start|>user\n{vision}"
                f"{self.instruction_prefix}{instruction}<|im_end|>\n<|im_start|>assistant\n")

    def build_prompts(self, rows: list[dict[str, Any]]) -> PromptBatch:
        texts, images, counts = [], [], []
        for i, row in enumerate(rows):
            if not isinstance(row.get("prompt"), str):
                raise KeyError(f"row {i} needs a 'prompt' string (got keys {sorted(row)})")
            row_images = list(row.get("images") or [])
            if not all(isinstance(im, Image.Image) for im in row_images):
                raise TypeError(f"row {i}: 'images' must be a list of PIL images")
            texts.append(self.chat_text(row["prompt"], len(row_images)))
            images.extend(im.convert("RGB") for im in row_images)
            counts.append(len(row_images))
        if images:
            if self.processor is None:
                raise ValueError("this BLIP3-o has no image processor: prompts with images need one")
            enc = self.processor(text=texts, images=images, padding=True, padding_side="left", return_tensors="pt")
            vision = {k: enc[k] for k in VISION_KEYS if k in enc}
            return PromptBatch(enc["input_ids"], enc["attention_mask"], vision, counts)
        enc = self.tokenizer(texts, padding=True, padding_side="left", return_tensors="pt", add_special_tokens=False)
        return PromptBatch(enc["input_ids"], enc["attention_mask"])

    # -- the backbone ---------------------------------------------------------------------------------------------
    def _position_ids(self, ids: torch.Tensor, mask: torch.Tensor, vision: dict[str, torch.Tensor]) -> torch.Tensor:
        """(3, N, S) rope positions: text counts real tokens from 0 (left padding aware); with images, the
        model's own 3-D layout."""
        if "image_grid_thw" in vision:
            hf = self.hf_vlm()
            types = (ids == hf.config.image_token_id).int()
            positions, _ = hf.model.get_rope_index(ids, mm_token_type_ids=types, image_grid_thw=vision["image_grid_thw"],
                                                   attention_mask=mask)
            return positions
        real = mask.long()
        return ((real.cumsum(-1) - 1).clamp(min=0) * real)[None].expand(3, -1, -1)

    def _embed(self, ids: torch.Tensor, vision: dict[str, torch.Tensor]) -> torch.Tensor:
        """Token embeddings with the vision tower's features in the image placeholders."""
        hf = self.hf_vlm()
        embeds = hf.model.get_input_embeddings()(ids)
        if vision:
            if self._synced():
                raise NotImplementedError("prompts with images are not supported under ZeRO-3 on several ranks")
            features = hf.model.get_image_features(vision["pixel_values"], vision["image_grid_thw"],
                                                   return_dict=True).pooler_output
            image_embeds = torch.cat(list(features), 0).to(embeds.device, embeds.dtype)
            image_mask, _ = hf.model.get_placeholder_mask(ids, inputs_embeds=embeds, image_features=image_embeds)
            embeds = embeds.masked_scatter(image_mask, image_embeds)
        return embeds

    def _language_model(self, embeds: torch.Tensor, mask: Any, positions: torch.Tensor, **kwargs):
        return self.hf_vlm().model.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                                                  **kwargs)

    def _completion_logps(self, states: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """POST-norm states (N, T, H) predicting ``targets`` (N, T) -> log-probs and entropies (N, T) float32; the
        lm_head runs on chunks of ``logprob_chunk_size`` tokens (checkpointed when grads flow)."""
        head = self.hf_vlm().lm_head
        if targets.numel() == 0:
            empty = states.new_zeros(targets.shape, dtype=torch.float32)
            return empty, empty
        flat, flat_t = states.reshape(-1, states.shape[-1]), targets.reshape(-1)
        check = "none" if any(hasattr(p, "ds_id") for p in head.parameters()) else "default"
        size = self.options.logprob_chunk_size
        out, entropy = [], []
        for start in range(0, flat.shape[0], size):
            h, t = flat[start : start + size], flat_t[start : start + size]
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
        """Sample ``num_generations`` chains per prompt (grouped), each prompt prefilled ONCE; a chain ends at
        ``[IMG]`` (where its image begins) or at EOS."""
        if num_generations < 1 or max_new_tokens < 1:
            raise ValueError(f"num_generations ({num_generations}) and max_new_tokens ({max_new_tokens}) must be >= 1")
        hf = self.hf_vlm()
        device = self.device
        prompts = prompts.to(device)
        rows = prompts.input_ids.shape[0] * num_generations
        sample_gen = None
        if generator is not None:
            seed = int(torch.randint(0, 2**62, (1,), generator=generator))
            sample_gen = torch.Generator(device=device).manual_seed(seed)
        ends = torch.tensor(self.end_token_ids, device=device)
        banned = torch.tensor(self.banned_token_ids, dtype=torch.long, device=device)
        synced = self._synced()
        fast = not hasattr(next(self.vlm.parameters()), "ds_id")
        was_training = self.vlm.training
        if was_training:
            self.vlm.eval()  # layers drop the KV cache under gradient checkpointing in train mode
        try:
            with torch.inference_mode(fast):
                positions = self._position_ids(prompts.input_ids, prompts.attention_mask, prompts.vision)
                out = self._language_model(self._embed(prompts.input_ids, prompts.vision), prompts.attention_mask,
                                           positions, use_cache=True)
                cache = out.past_key_values
                cache.batch_repeat_interleave(num_generations)
                logits = hf.lm_head(out.last_hidden_state[:, -1]).float().repeat_interleave(num_generations, 0)
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
                    done |= torch.isin(token, ends)
                    if step == max_new_tokens - 1 or self._all_done(done, synced):
                        break
                    mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                    step_pos = (next_pos + step).view(1, rows, 1).expand(3, -1, -1)
                    embeds = hf.model.get_input_embeddings()(token[:, None])
                    hidden = self._language_model(embeds, mask, step_pos, past_key_values=cache,
                                                  use_cache=True).last_hidden_state
                    logits = hf.lm_head(hidden[:, -1]).float()
        finally:
            if was_training:
                self.vlm.train(True)
        return self._completions(torch.stack(tokens, dim=1))

    def _synced(self) -> bool:
        synced = self.options.synced_generation
        if synced is None:
            synced = hasattr(next(self.vlm.parameters()), "ds_id")
        return bool(synced) and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    def _all_done(self, done: torch.Tensor, synced: bool) -> bool:
        if synced:  # every forward gathers ZeRO-3 parameters collectively: no rank may stop alone
            return not any_rank(not bool(done.all()), done.device)
        return bool(done.all())

    def _completions(self, ids: torch.Tensor) -> Completions:
        """Sampled ids (N, T) -> masks (1 through the first end token), texts and condition lengths (the tokens
        before ``[IMG]`` or EOS)."""
        is_end = torch.isin(ids, torch.tensor(self.end_token_ids, device=ids.device))
        mask = ((is_end.long().cumsum(1) - is_end.long()) == 0).long()
        width = max(int(mask.sum(1).max()), 1)
        ids, mask, is_end = ids[:, :width], mask[:, :width], is_end[:, :width]
        ids = torch.where(mask.bool(), ids, torch.full_like(ids, self.pad_token_id))
        texts, lengths = [], []
        for row, row_end, row_mask in zip(ids.tolist(), is_end.tolist(), mask.tolist()):
            body = row[: row_end.index(True)] if True in row_end else row[: sum(row_mask)]
            texts.append(self.tokenizer.decode(body, skip_special_tokens=True, clean_up_tokenization_spaces=False))
            lengths.append(len(body))
        return Completions(ids, mask, texts, torch.tensor(lengths, dtype=torch.long, device=ids.device))

    def completions_from_texts(self, texts: list[str], end: str = "[IMG]") -> Completions:
        """Tokenise given chains (e.g. hand-written), each followed by ``end`` ("" for none)."""
        rows = [self.tokenizer(t + end, add_special_tokens=False)["input_ids"] for t in texts]
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [self.pad_token_id] * (width - len(r)) for r in rows], dtype=torch.long)
        comp = self._completions(ids)
        comp.completion_mask = (torch.arange(ids.shape[1])[None] < torch.tensor([len(r) for r in rows])[:, None]).long()
        return comp

    # -- the training forward -------------------------------------------------------------------------------------
    def forward_text(self, prompts: PromptBatch, completions: Completions, *,
                     with_condition: bool = True) -> ForwardOutput:
        """ONE backbone forward over prompt + completion: log-probs (N, T) and, optionally, the condition.

        With the condition, ``[IMG]`` and the 64 queries ride at the end of the same forward: they attend to the
        prompt and the first ``condition_lengths[i]`` completion tokens only, at the positions right after that
        prefix, and no token attends to them, so their states are those of the sequence the release runs
        (``prompt + chain + [IMG] + queries``) and the completion's log-probs do not change."""
        device = self.device
        prompts, completions = prompts.to(device), completions.to(device)
        p_len = prompts.input_ids.shape[1]
        comp_ids = completions.completion_ids
        n, t = comp_ids.shape
        ids = torch.cat([prompts.input_ids, comp_ids], dim=1)
        mask = torch.cat([prompts.attention_mask, completions.completion_mask.to(prompts.attention_mask.dtype)], 1)
        positions = self._position_ids(ids, mask, prompts.vision)
        embeds = self._embed(ids, prompts.vision)
        if not with_condition:
            states = self._language_model(embeds, mask, positions, use_cache=False).last_hidden_state
            logps, entropy = self._completion_logps(states[:, p_len - 1 : -1], comp_ids)
            return ForwardOutput(logps, entropy=entropy)
        prefix_end = p_len + completions.condition_lengths
        start = self.hf_vlm().model.get_input_embeddings()(torch.full((n, 1), self.img_start_id, device=device))
        suffix = torch.cat([start, self.part("queries")(n).to(start.dtype)], dim=1)  # [IMG] + 64 queries
        k = suffix.shape[1]
        last = positions.gather(2, (prefix_end - 1)[None, :, None].expand(3, -1, 1))
        suffix_positions = last + torch.arange(1, k + 1, device=device)
        attention = condition_attention(mask.bool(), prefix_end, k)
        states = self._language_model(torch.cat([embeds, suffix], 1), self._full_mask(attention),
                                      torch.cat([positions, suffix_positions], 2), use_cache=False).last_hidden_state
        logps, entropy = self._completion_logps(states[:, p_len - 1 : p_len + t - 1], comp_ids)
        queries = states[:, -NUM_QUERIES:]
        return ForwardOutput(logps, Condition(queries, torch.ones(queries.shape[:2], dtype=torch.long,
                                                                  device=device)), entropy)

    def _full_mask(self, attention: torch.Tensor) -> dict[str, torch.Tensor]:
        """A (N, S, S) bool query x key mask as the language model takes a custom one (sdpa or eager)."""
        lm = self.hf_vlm().model.language_model
        impl = lm.config._attn_implementation
        if impl not in ("sdpa", "eager"):
            raise ValueError(f"the query condition needs a custom attention mask, which attn_implementation={impl!r} "
                             "cannot take: load the model with 'sdpa' or 'eager'")
        if impl == "eager":
            attention = torch.zeros(attention.shape, dtype=self.dtype, device=attention.device).masked_fill_(
                ~attention, torch.finfo(self.dtype).min)
        return {"full_attention": attention[:, None]}

    @torch.no_grad()
    def query_states(self, texts: Sequence[str]) -> torch.Tensor:
        """The release's ``generate_image`` condition for raw texts (no chat template): post-norm states at the 64
        queries after ``text + [IMG]`` (N, 64, H); rows left-padded, positions counting real tokens."""
        enc = self.tokenizer(list(texts), padding=True, padding_side="left", return_tensors="pt",
                             add_special_tokens=False)
        prompts = PromptBatch(enc["input_ids"], enc["attention_mask"])
        empty = torch.zeros(len(texts), 0, dtype=torch.long)
        comp = Completions(empty, empty, [""] * len(texts), torch.zeros(len(texts), dtype=torch.long))
        return self.forward_text(prompts, comp).condition.states

    # -- images: stage 1, the DiT ---------------------------------------------------------------------------------
    def negative_condition(self, num: int) -> Condition:
        """The release's unconditional branch: an all-ZERO condition."""
        hidden = self.hf_vlm().config.text_config.hidden_size
        return Condition(torch.zeros(num, NUM_QUERIES, hidden, dtype=self.dtype, device=self.device),
                         torch.ones(num, NUM_QUERIES, dtype=torch.long, device=self.device))

    def image_inputs(self, condition: Condition, negative: Condition | None, *, guidance_scale: float = 1.0,
                     exact: bool = False) -> DiTInputs:
        """Caption-projected rows: ``[negative, condition]`` when guided (the release's order), else the condition."""
        guided = negative is not None and guidance_scale != 1.0
        states = torch.cat([negative.states.to(condition.states.dtype), condition.states]) if guided \
            else condition.states
        return DiTInputs(self.part("generator").project(states), guidance_scale if guided else None)

    def model_timesteps(self, t: torch.Tensor, rows: int) -> torch.Tensor:
        """(rows,) long timesteps the DiT is fed at rgpo time ``t`` (0-dim or (rows,)): ``long(sigma * 1000)`` of
        the scheduler's sigma at that step, looked up by the grid's time (never recomputed as ``1 - t``, which can
        be an ulp off and flip the floor); times off every grid (the regulariser's) use ``(1 - t) * 1000``."""
        t = t.float().reshape(-1).expand(rows) if t.dim() == 0 or t.numel() == 1 else t.float()
        fallback = ((1 - t) * self.dit_scheduler.config.num_train_timesteps).long()
        if not self._timestep_table:
            return fallback.to(self.device)
        keys = torch.tensor(list(self._timestep_table), dtype=torch.float32, device=t.device)
        values = torch.tensor(list(self._timestep_table.values()), dtype=torch.long, device=t.device)
        hit = t[:, None] == keys[None]
        return torch.where(hit.any(1), values[hit.long().argmax(1)], fallback).to(self.device)

    def dit_prediction(self, inputs: DiTInputs, x: torch.Tensor, t: torch.Tensor, *, guidance: float | None = None,
                       return_features: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        guided = guidance is not None and guidance != 1.0
        x_in = torch.cat([x, x]) if guided else x
        timestep = self.model_timesteps(t if not guided or t.dim() == 0 else torch.cat([t, t]), x_in.shape[0])
        pred, features = self.part("generator")(x_in, timestep, inputs.embeds, return_features=return_features)
        pred = pred.float()
        if guided:
            uncond, cond = pred.chunk(2)
            pred = uncond + guidance * (cond - uncond)
        return pred, features

    def image_prediction(self, inputs: DiTInputs, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """rgpo's velocity (= -prediction) of the guided DiT, float32."""
        return velocity_from_flow_prediction(self.dit_prediction(inputs, x, t, guidance=inputs.guidance)[0])

    def generator_output(self, inputs: DiTInputs, x: torch.Tensor, t: torch.Tensor, *,
                         return_features: bool = False) -> GeneratorOutput:
        if (inputs.guidance or 1.0) != 1.0:
            raise ValueError("generator_output is unguided: build its inputs with guidance_scale=1")
        pred, features = self.dit_prediction(inputs, x, t, return_features=return_features)
        return GeneratorOutput(velocity_from_flow_prediction(pred), features)

    def dit_sigmas(self, steps: int) -> np.ndarray:
        """The release's ``np.linspace(1, 1 / N, N)`` (before the scheduler's shift)."""
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        return np.linspace(1.0, 1 / steps, steps)

    def image_sampler(self, cfg: ImageSamplingConfig) -> FlowSampler:
        """The DiT scheduler's grid ``t = 1 - sigma`` over :meth:`dit_sigmas`; also remembers the model timestep
        of each grid time and the image size :meth:`decode_latents` renders at (``cfg.height`` x ``cfg.width``)."""
        sigmas = self.dit_sigmas(cfg.steps)
        grid = flow_time_grid(self.dit_scheduler, cfg.steps, sigmas=sigmas)
        fed = flow_model_timesteps(self.dit_scheduler, cfg.steps, sigmas=sigmas)
        for time, value in zip(grid[:-1].tolist(), fed.to(torch.long).tolist()):
            self._timestep_table[time] = value
        self._render_size = (cfg.height, cfg.width)
        return FlowSampler(grid)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(C, 8, 8): the DiT's CLIP tokens, whatever the pixel size (the renderer draws at ``height`` x ``width``)."""
        valid = self.check_image_size(height, width)
        if valid is not None:
            raise ValueError(f"image size {height}x{width}: must be {valid}")
        self._render_size = (height, width)
        s = self.dit.sizes
        return s["in_channels"], s["input_size"], s["input_size"]

    @property
    def latent_dtype(self) -> torch.dtype:
        return self.dit.dtype

    # -- images: stage 2, the renderer ----------------------------------------------------------------------------
    def rollout_context(self):
        """The trainer's rollouts render with ``options.rollout_renderer_steps`` (:meth:`rollout_rendering`)."""
        return self.rollout_rendering()

    @contextmanager
    def rollout_rendering(self) -> Iterator[None]:
        """Render with ``options.rollout_renderer_steps`` inside the block (rollouts); outside it, with the
        release's ``renderer_steps``."""
        before = self.rendering_for_rollouts
        self.rendering_for_rollouts = True
        try:
            yield
        finally:
            self.rendering_for_rollouts = before

    def renderer_steps(self) -> int:
        """The UNet steps of the next render: ``rollout_renderer_steps`` inside :meth:`rollout_rendering`, else
        ``renderer_steps``, else the checkpoint's own (the release's 50)."""
        o = self.options
        if self.rendering_for_rollouts and o.rollout_renderer_steps:
            return o.rollout_renderer_steps
        return o.renderer_steps or self.checkpoint_steps["renderer"]

    @torch.no_grad()
    def renderer_negative(self) -> torch.Tensor:
        """(1, 64, C) the DiT's CLIP features for the prompt " " (the release's renderer negative): its raw text +
        ``[IMG]`` + queries, the release's 30 DiT steps (tiny: 3) at guidance 3 against the zero condition, from seed
        ``options.negative_seed``; computed as the reference and cached."""
        cached = self._renderer_negative
        if cached is not None and cached.device == self.device:
            return cached
        with self.adapter_disabled():
            states = self.query_states([RENDERER_NEGATIVE_PROMPT])
            condition = Condition(states, torch.ones(states.shape[:2], dtype=torch.long, device=self.device))
            inputs = self.image_inputs(condition, self.negative_condition(1), guidance_scale=DIT_GUIDANCE)
            s = self.dit.sizes
            noise = torch.randn((1, s["in_channels"], s["input_size"], s["input_size"]),
                                generator=torch.Generator().manual_seed(self.options.negative_seed)).to(self.device)
            size = self._render_size
            cfg = ImageSamplingConfig(steps=self.checkpoint_steps["negative_dit"], guidance_scale=DIT_GUIDANCE)
            latents = self.sample_image_latents(inputs, noise, cfg).latents
            self._render_size = size
        self._renderer_negative = clip_tokens(latents)
        return self._renderer_negative

    @torch.no_grad()
    def render(self, features: torch.Tensor, height: int, width: int, *, steps: int | None = None) -> torch.Tensor:
        """The release's UNet stage: CLIP tokens (N, 64, C) -> VAE latents (N, 4, h/8, w/8) float32."""
        from diffusers import EulerDiscreteScheduler

        unet = self.part("renderer")
        dtype = next(unet.parameters()).dtype
        device = features.device
        scheduler = EulerDiscreteScheduler.from_config(self.renderer_scheduler.config)
        scheduler.set_timesteps(steps or self.renderer_steps(), device=device)
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        shape = (unet.config.in_channels, height // factor, width // factor)
        n = features.shape[0]
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(self.options.renderer_seed))
        latents = noise.to(device).expand(n, *shape) * scheduler.init_noise_sigma
        guidance = self.options.renderer_guidance_scale
        guided = guidance > 1.0  # as the release's pipeline decides
        embeds = features.float()
        if guided:
            embeds = torch.cat([embeds, self.renderer_negative().float().expand(n, -1, -1)])
        text_embeds = embeds.mean(1)
        time_ids = torch.tensor([*TIME_ORIGINAL_SIZE, *TIME_CROP, height, width], device=device)
        time_ids = time_ids.expand(embeds.shape[0], -1)
        unused_noise = torch.Generator(device=device)  # Euler's churn noise is drawn even at s_churn 0
        for t in scheduler.timesteps:
            x_in = torch.cat([latents, latents]) if guided else latents
            x_in = scheduler.scale_model_input(x_in, t)
            eps = unet(x_in.to(dtype), t, encoder_hidden_states=embeds.to(dtype),
                       added_cond_kwargs={"text_embeds": text_embeds.to(dtype), "time_ids": time_ids}).sample.float()
            if guided:
                cond, negative = eps.chunk(2)
                eps = negative + guidance * (cond - negative)
            latents = scheduler.step(eps, t, latents, generator=unused_noise).prev_sample
        return latents

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> list[Image.Image]:
        """DiT latents (N, C, 8, 8) -> CLIP tokens -> the UNet stage at the size of the last
        :meth:`image_sampler` / :meth:`latent_shape` call -> ``latents / scaling_factor`` through the VAE."""
        if self._render_size is None:
            raise ValueError("decode_latents renders at the size of the last image_sampler(cfg) call: none yet")
        height, width = self._render_size
        images: list[Image.Image] = []
        first = next(self.vae.parameters())
        for chunk in latents.split(self.options.vae_batch_size):
            rendered = self.render(clip_tokens(chunk.to(self.device)), height, width)
            z = rendered.to(first.device, torch.float32) / self.vae.config.scaling_factor
            pixels = self.vae.decode(z.to(first.dtype)).sample.float()
            pixels = (pixels / 2 + 0.5).clamp(0, 1).mul(255).round().to(torch.uint8)
            images += [Image.fromarray(p.permute(1, 2, 0).cpu().numpy()) for p in pixels]
        return images

    # -- checkpoints ----------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str, *, dtype: torch.dtype = torch.float32, device=None, **kwargs) -> Blip3o:
        """Load the released layout (root config + shards + tokenizer, ``diffusion-decoder/``)."""
        from .checkpoint import load_blip3o

        options = kwargs.pop("options", None)
        kwargs.pop("trust_remote_code", None)  # a stock Qwen2.5-VL config: nothing remote to trust
        model = load_blip3o(cls, path, dtype=dtype, device=device, **kwargs)
        model.apply_options(options)
        return model

    def save_pretrained(self, path: str, *, max_shard_size: int | str = "5GB") -> None:
        """Write the released layout (adapters must be merged first)."""
        from .checkpoint import save_blip3o

        save_blip3o(self, path, max_shard_size=max_shard_size)


# -- pure helpers ------------------------------------------------------------------------------------------------


def clip_tokens(latents: torch.Tensor) -> torch.Tensor:
    """DiT latents (N, C, S, S) -> CLIP tokens (N, S*S, C): the release's ``view(.., C, -1).permute(0, 2, 1)``
    done per row (its ``view(1, ...)`` holds for batch 1 only)."""
    n, c = latents.shape[:2]
    return latents.reshape(n, c, -1).permute(0, 2, 1).contiguous()


def condition_attention(real: torch.Tensor, prefix_end: torch.Tensor, suffix_len: int) -> torch.Tensor:
    """(N, S + k, S + k) bool, query x key, for ``real`` (N, S) tokens followed by k suffix tokens: causal over the
    real keys; each suffix query sees only the keys before ``prefix_end[i]`` and the suffix up to itself. Every
    query sees itself, so a padding row is never empty (SDPA would give NaN)."""
    n, s = real.shape
    total = s + suffix_len
    index = torch.arange(total, device=real.device)
    keys = torch.cat([real, torch.ones(n, suffix_len, dtype=torch.bool, device=real.device)], dim=1)
    allowed = (index[None, :, None] >= index[None, None, :]) & keys[:, None, :]
    prefix_only = (index[None, :] < prefix_end[:, None]) | (index[None, :] >= s)
    allowed[:, s:] &= prefix_only[:, None, :]
    return allowed | torch.eye(total, dtype=torch.bool, device=real.device)




def _chunk_logps(head: nn.Module, states: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`~rgpo.models.lm.target_logps` of post-norm states (n, H) through the lm_head."""
    return target_logps(head(states).float(), targets)
