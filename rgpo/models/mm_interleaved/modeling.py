"""MM-Interleaved as one :class:`~rgpo.models.base.UnifiedModel`: interleaved text and images from one LLM.

**Sequence.** ``BOS prompt [soi <|image|> x 64] text ...``: a ``<|image|>`` position holds the image's
Q-Former token (:mod:`.vision`) instead of a word embedding, a soi position its word embedding plus the learned
``soi_token``. Positions count real tokens only (left padding and the padding holes generation leaves are
skipped), so a row's numbers do not depend on its batch. The synchronizer in the LLM (:mod:`.llm`) lets token
``l`` read the adapter maps (levels 32/16/8) of every image whose first token is at or before ``l``.

**Chains.** Text is sampled until EOS or soi. Without an interleaved ``draw`` the chain ends at its first soi
(one image slot, drawn afterwards from that soi's condition); with one (``generate(..., draw=...)``), each soi
draws an image right away from its condition, the image is re-encoded (the release's centre crop to the ViT's
size) into the 64 slots that follow, and the text continues seeing it, up to ``options.max_images`` images.

**Condition** (:class:`InterleavedCondition`, one row per image slot): the release's decoder context, the
POST-norm LLM states from BOS through the slot's soi, REVERSED (soi first), right-padded, through
``context_feat_proj``, plus the 1-D sin-cos table; and the synchronizer input of the UNet: the adapter maps of
the PREVIOUS image of the chain (an input or an earlier drawn image; the mask is 0 when there is none). The
image generator (``image_decoder``) turns the context into 77 x 1024 with its Q-Former; guidance 7.5 runs
``[neg_prompt_embeds, condition]`` with the SAME synchronizer features in both halves (the release's pipeline).

**Images.** SD-2.1's UNet predicts epsilon; the release samples it with ``DDPMScheduler`` (30 steps, ancestral,
one generator for the initial latents and every step's noise: :class:`~rgpo.samplers.DDPMSampler`), or DDIM as an
option. A DDPM step has no deterministic version, so :meth:`MMInterleaved.draw` (evaluation, ``rgpo sample``) is
the release's own draw: every step stochastic, its noise from a generator seeded with ``cfg.seed`` (the same
image for the same seed, as the release gives).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from transformers.utils import ModelOutput

from rgpo.samplers import DDIMSampler, DDPMSampler
from rgpo.sde import Generators, SDETrajectory

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
from .llm import TextDecoder, build_mm_decoder
from .options import SYSTEM_PROMPT, MMInterleavedOptions
from .unet import ImageDecoder, MMFSNet, unet_with_mmfs
from .vision import VisualTokenizer, sincos_1d

UNET_LORA_SUFFIXES = ("to_q", "to_k", "to_v", "to_out.0")
Draw = Callable[["InterleavedCondition", list[int], list[int]], list[torch.Tensor]]


def build_parts(arch: dict[str, Any], llm_config, vision_config, unet_config: dict, vae_config: dict) -> dict:
    """The release's modules from its hyper-parameters and the parts' configs (random weights)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    llm_config._attn_implementation = "sdpa"
    hidden = llm_config.hidden_size
    visual = VisualTokenizer(vision_config, arch["vision_perceiver"], hidden,
                             grid_size=vision_config.image_size // vision_config.patch_size)
    mm_decoder = build_mm_decoder(llm_config, arch["image_embed_dim"], arch["spatial_shapes"],
                                  arch["cross_attention_frequency"], arch["llm_mmfs_heads"])
    text_decoder = TextDecoder(hidden, llm_config.vocab_size, llm_config.vocab_size - 2)
    unet = UNet2DConditionModel.from_config(unet_config)
    vae = AutoencoderKL.from_config(vae_config)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    mmfs = MMFSNet(arch["image_embed_dim"], unet.config.block_out_channels, unet.config.layers_per_block,
                   arch["mmfs_value_shapes"], arch["decoder_image_size"] // factor, arch["mmfs_attn_dim"],
                   arch["mmfs_heads"])
    decoder_q = arch["decoder_perceiver"]
    image_decoder = ImageDecoder(decoder_q, unet, vae, mmfs, decoder_q["num_queries"], decoder_q["hidden_size"])
    return dict(visual_tokenizer=visual, mm_decoder=mm_decoder, text_decoder=text_decoder,
                image_decoder=image_decoder, context_feat_proj=nn.Linear(hidden, hidden))


@dataclass
class InterleavedCondition(Condition):
    """One row per image slot: ``states`` (N, L, H) the projected, REVERSED context, RIGHT-padded (``mask``);
    ``features`` (N, 1, S, C) the previous image's 4 adapter maps flattened, ``feature_mask`` (N, 1) whether it
    exists."""

    features: torch.Tensor | None = None
    feature_mask: torch.Tensor | None = None

    def select(self, rows: Sequence[int]) -> InterleavedCondition:
        index = torch.as_tensor(list(rows), dtype=torch.long, device=self.states.device)
        mask = self.mask[index]
        keep = int(mask.sum(1).max()) if mask.numel() else 0
        return InterleavedCondition(self.states[index][:, :keep], mask[:, :keep], self.features[index],
                                    self.feature_mask[index])

    def repeat_interleave(self, repeats: int) -> InterleavedCondition:
        return InterleavedCondition(*(t.repeat_interleave(repeats, 0) for t in
                                      (self.states, self.mask, self.features, self.feature_mask)))

    def detach(self) -> InterleavedCondition:
        return InterleavedCondition(self.states.detach(), self.mask, self.features.detach(), self.feature_mask)

    def with_gradient_of(self, other: Condition) -> InterleavedCondition:
        if other.states.shape != self.states.shape:
            raise ValueError(f"the update's condition {tuple(other.states.shape)} does not match the recorded one "
                             f"{tuple(self.states.shape)} of the same chains")
        return InterleavedCondition(self.states + (other.states - other.states.detach()), self.mask,
                                    self.features, self.feature_mask)


@dataclass
class UNetInputs(ModelOutput):
    """The UNet's text states (77 x 1024; ``[negative, condition]`` when guided) and synchronizer inputs."""

    embeds: torch.Tensor | None = None
    features: torch.Tensor | None = None
    feature_mask: torch.Tensor | None = None
    guidance: float | None = None


class MMInterleaved(UnifiedModel):
    """The release's modules as ONE module, under its state-dict names (module docstring)."""

    family = "mm_interleaved"
    parts = {
        "language_model": Part("mm_decoder", "Vicuna (LlamaModel) with the feature synchronizer in layers 0, 4, 8, "
                                             "... (LoRA: every Linear in it)"),
        "text_head": Part("text_decoder", "the text head: Linear with bias plus head_new for soi and <|image|> "
                                          "(held by the language model: its LoRA covers the head)"),
        "vision": Part("visual_tokenizer", "CLIP ViT-L/14 + ViT-Adapter + Q-Former (64 image tokens), frozen in "
                                           "the release"),
        "context_projection": Part("context_feat_proj", "the Linear projecting the reversed LLM context"),
        "generator": Part("image_decoder", "Q-Former (77 queries) + learned negative + SD-2.1 UNet with the "
                                           "synchronizer on its skips (LoRA: the UNet's attention projections)"),
    }
    layout = LAYOUT
    interleaved = True
    options_class = MMInterleavedOptions
    supported_regularizers = ("feature_kl", "velocity_mse", "gaussian_kl", "none")
    random_shapes = ("tiny", "mm-interleaved-13b")
    factories = ("rgpo.models.mm_interleaved.tiny", "build_tiny_mm_interleaved", "build_random_mm_interleaved")
    language_config = "assets/lmsys/vicuna-13b-v1.3/config.json"

    def __init__(self, visual_tokenizer: VisualTokenizer, mm_decoder: nn.Module, text_decoder: TextDecoder,
                 image_decoder: ImageDecoder, context_feat_proj: nn.Linear, *, scheduler, tokenizer, arch: dict,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.visual_tokenizer, self.mm_decoder = visual_tokenizer, mm_decoder
        # The text head lives inside the LLM module (its state-dict keys are mapped back to the release's
        # ``text_decoder.*`` on disk), so a LoRA on the language model covers the head as the other families'
        # LoRA covers their lm_head.
        mm_decoder.text_decoder = text_decoder
        self.image_decoder, self.context_feat_proj = image_decoder, context_feat_proj
        hidden = mm_decoder.config.hidden_size
        self.soi_token = nn.Parameter(torch.zeros(1, hidden))
        self.scheduler, self.tokenizer, self.arch = scheduler, tokenizer, arch
        self.tokenizer.padding_side = "left"
        vocab = tokenizer.get_vocab()
        names = arch["special_tokens"]
        missing = [names[k] for k in ("soi", "image") if names[k] not in vocab]
        if missing:
            tokenizer.add_special_tokens({"additional_special_tokens": missing})
            vocab = tokenizer.get_vocab()
        self.soi_id, self.image_id = vocab[names["soi"]], vocab[names["image"]]
        self.bos_id, self.eos_id = vocab[names["bos"]], vocab[names["eos"]]
        if {self.soi_id, self.image_id} != {len(vocab) - 2, len(vocab) - 1} or len(vocab) != mm_decoder.config.vocab_size:
            raise ValueError(f"MM-Interleaved's soi and <|image|> must be the last 2 of its {mm_decoder.config.vocab_size} "
                             f"tokens; the tokenizer has {len(vocab)} with them at {self.soi_id}, {self.image_id}")
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else arch["pad_token_id"]
        self.tokenizer.pad_token_id = self.pad_id
        self.num_img_token = arch["num_img_token"]
        self.checkpoint_sampling = {k: arch[k] for k in ("steps", "guidance_scale", "seed")}
        self.apply_options(None)
        self.cast_parts(dtype)

    # -- plumbing -------------------------------------------------------------------------------------------------
    def cast_parts(self, dtype: torch.dtype) -> None:
        """Every part in ``dtype`` but the VAE (float32), the LLM's rotary buffers float32."""
        for module in (self.visual_tokenizer, self.mm_decoder, self.text_decoder, self.context_feat_proj):
            cast_floating(module, dtype)
        cast_floating(self.image_decoder, dtype)
        cast_floating(self.image_decoder.decoder.vae, torch.float32, buffers=True)
        self.soi_token.data = self.soi_token.data.to(dtype)

    def reset_buffers(self) -> None:
        """Recompute the buffers no checkpoint holds (after building on the meta device and ``to_empty``)."""
        from .deform import MMFS
        from .vision import CLIP_MEAN, CLIP_STD

        with torch.no_grad():
            vt = self.visual_tokenizer
            vt.clip_mean.copy_(torch.tensor(CLIP_MEAN).view(1, 3, 1, 1))
            vt.clip_std.copy_(torch.tensor(CLIP_STD).view(1, 3, 1, 1))
            rotary = self.llm().rotary_emb
            init = rotary.compute_default_rope_parameters if rotary.rope_type == "default" else None
            if init is None:
                from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

                init = ROPE_INIT_FUNCTIONS[rotary.rope_type]
            inv_freq, rotary.attention_scaling = init(rotary.config)
            rotary.inv_freq.copy_(inv_freq)
            rotary.original_inv_freq.copy_(inv_freq)
            for module in self.modules():
                if isinstance(module, MMFS):
                    module.scale_ratios.copy_(torch.tensor(module.scale_values))
            emb = vt.encoder.vision_model.embeddings
            emb.position_ids.copy_(torch.arange(emb.num_positions).expand(1, -1))

    @property
    def text_decoder(self) -> TextDecoder:
        """The text head (``head`` + ``head_new``), held by the language model module."""
        return self.llm().text_decoder

    @property
    def device(self) -> torch.device:
        return self.soi_token.device

    @property
    def dtype(self) -> torch.dtype:
        return self.soi_token.dtype

    def llm(self) -> nn.Module:
        """The ``LlamaModel`` under any peft wrapper."""
        m = self.part("language_model")
        return m.get_base_model() if hasattr(m, "get_base_model") else m

    def apply_options(self, options: MMInterleavedOptions | None) -> None:
        self.options = options if options is not None else MMInterleavedOptions()
        self.system_prompt = self.options.system_prompt if self.options.system_prompt is not None else SYSTEM_PROMPT

    def train(self, mode: bool = True) -> MMInterleaved:
        """As ``nn.Module.train``, but the image tokenizer stays in eval mode: its Q-Former has the release's
        dropout (0.1, transformers' default, which its yaml keeps), and an update must compute the very function
        the rollout sampled with (on-policy ratio 1)."""
        super().train(mode)
        self.visual_tokenizer.eval()
        return self

    def draws_inside_chains(self) -> bool:
        """Interleaved rollouts when a chain may hold several images (``options.max_images > 1``); with one, a
        chain ends at its soi and its image is drawn afterwards, as for the other families."""
        return self.options.max_images > 1

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        if enabled:
            self.llm().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.llm().gradient_checkpointing_disable()

    def lora_targets(self, name: str) -> list[str]:
        """The generator: the UNet's attention projections only (the VAE's attention has the same names)."""
        if name != "generator":
            return super().lora_targets(name)
        return sorted(n.removesuffix(".base_layer") for n, m in self.image_decoder.decoder.unet.named_modules()
                      if isinstance(m, nn.Linear) and n.endswith(UNET_LORA_SUFFIXES) and "lora_" not in n)

    def float32_modules(self) -> list[str]:
        return ["image_decoder.decoder.vae"]

    @property
    def vit_size(self) -> int:
        return self.visual_tokenizer.encoder.vision_model.config.image_size

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.image_decoder.decoder.vae.config.block_out_channels) - 1)

    # -- construction ---------------------------------------------------------------------------------------------
    @classmethod
    def random_shape_hidden_size(cls, shape: str) -> int | None:
        from .tiny import RANDOM_SHAPES, TINY

        return {**TINY, **RANDOM_SHAPES.get(shape, {})}["llm_hidden"] if shape in RANDOM_SHAPES else None

    @classmethod
    def from_pretrained(cls, path: str, *, dtype: torch.dtype = torch.float32, device=None, **kwargs) -> MMInterleaved:
        from .checkpoint import load_mm_interleaved

        options = kwargs.pop("options", None)
        kwargs.pop("trust_remote_code", None)
        model = load_mm_interleaved(cls, path, dtype=dtype, device=device)
        model.apply_options(options)
        return model

    def save_pretrained(self, path: str) -> None:
        from .checkpoint import save_mm_interleaved

        save_mm_interleaved(self, path)

    @classmethod
    def check_image_size(cls, height: int, width: int) -> str | None:
        # The checkpoint's own unit is checked when it draws (the released model: 64, its VAE downsamples by 8 and
        # its UNet by 8 more; the tiny one: 32); before any model is built only the shape rule is known.
        if height != width or height <= 0 or height % 8:
            return "square and a positive multiple of 8 (the released model: of 64)"
        return None

    def _check_size(self, height: int, width: int) -> None:
        unit = self.vae_factor * 2 ** (len(self.image_decoder.decoder.unet.config.block_out_channels) - 1)
        if height != width or height <= 0 or height % unit:
            raise ValueError(f"image size {height}x{width}: this MM-Interleaved draws square images of a multiple "
                             f"of {unit} pixels")

    # -- prompts and sequences ------------------------------------------------------------------------------------
    def image_text(self) -> str:
        return self.arch["special_tokens"]["soi"] + self.arch["special_tokens"]["image"] * self.num_img_token

    def build_prompts(self, rows: list[dict[str, Any]]) -> PromptBatch:
        """``{system}\\n USER: [images] {prompt} ASSISTANT:`` (Vicuna v1.3's format), BOS first; a row's input
        images go before its text, each as soi + 64 image tokens (pixels centre-cropped to the ViT's size)."""
        texts, pixels, counts = [], [], []
        for i, row in enumerate(rows):
            prompt = row.get("prompt")
            if isinstance(prompt, list):
                prompt = "\n".join(str(m.get("content", "")) for m in prompt if isinstance(m, dict))
            if not isinstance(prompt, str):
                raise ValueError(f"row {i}: 'prompt' must be a string or a list of chat messages, got "
                                 f"{type(prompt).__name__}")
            images = row.get("images") or []
            texts.append(f"{self.system_prompt} USER: {self.image_text() * len(images)}{prompt} ASSISTANT:")
            pixels.append([self.pixels_of(im) for im in images])
            counts.append(len(images))
        enc = self.tokenizer(texts, padding=True, padding_side="left", return_tensors="pt")
        vision = {}
        if any(counts):
            most = max(counts)
            blank = torch.zeros(3, self.vit_size, self.vit_size)
            vision["pixel_values"] = torch.stack([torch.stack(p + [blank] * (most - len(p))) for p in pixels])
        return PromptBatch(enc["input_ids"], enc["attention_mask"], vision, counts)

    def pixels_of(self, image: Image.Image | torch.Tensor) -> torch.Tensor:
        """(3, S, S) in [0, 1] at the ViT's size: the release's ``center_crop_arr`` (halving by BOX while the
        short side is at least twice the size, bicubic resize, centre crop) of an RGB image."""
        if isinstance(image, torch.Tensor):
            return image.float()
        image = image.convert("RGB")
        size = self.vit_size
        while min(*image.size) >= 2 * size:
            image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
        scale = size / min(*image.size)
        image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
        arr = np.array(image)
        y, x = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
        arr = arr[y : y + size, x : x + size].astype(np.float32).transpose(2, 0, 1) / 255.0
        return torch.from_numpy(arr)

    def encode_images(self, pixels: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(B, 3, S, S) in [0, 1] -> 64 LLM tokens (B, 64, H) and the adapter's 4 maps (B, C, h, w)."""
        if pixels.shape[0] == 0:
            raise ValueError("encode_images got no images")
        return self.part("vision")(pixels.to(self.device, self.dtype))

    def _embed(self, ids: torch.Tensor, tokens: torch.Tensor | None) -> torch.Tensor:
        """Word embeddings with each ``<|image|>`` run replaced by ``tokens`` (images in reading order, flat:
        (n_images * 64, H)) and the learned ``soi_token`` added at soi."""
        embeds = self.llm().get_input_embeddings()(ids)
        is_image = ids == self.image_id
        if int(is_image.sum()):
            if tokens is None or tokens.shape[0] != int(is_image.sum()):
                raise ValueError(f"{int(is_image.sum())} <|image|> positions for "
                                 f"{0 if tokens is None else tokens.shape[0]} image tokens")
            embeds = embeds.masked_scatter(is_image[..., None], tokens.to(embeds.dtype))
        return embeds + (ids == self.soi_id)[..., None].to(embeds.dtype) * self._soi_token().to(embeds.dtype)

    def _soi_token(self) -> torch.Tensor:
        """The learned soi embedding (1, H). ZeRO-3 gathers a module's own parameters only when the module is
        called; the root is not when a method runs outside the engine (the reference, the guards), so a
        partitioned ``soi_token`` is gathered here (collective: every rank runs the same forwards). It is part
        of no trainable part, so its value is all that is needed."""
        token = self.soi_token
        if not hasattr(token, "ds_id"):
            return token
        import deepspeed
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        if token.ds_status == ZeroParamStatus.AVAILABLE:  # already gathered (the engine's call, a rollout)
            return token
        with deepspeed.zero.GatheredParameters([token]):
            return token.detach().clone()

    def _llm_features(self, maps: list[torch.Tensor]) -> torch.Tensor:
        """The LLM's synchronizer input of images: their maps of the LLM's levels, flattened: (B, S, C)."""
        keep = [m for m in maps if m.shape[-1] in self.arch["spatial_shapes"]]
        return torch.cat([m.flatten(2).transpose(1, 2) for m in keep], dim=1)

    @staticmethod
    def _unet_features(maps: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([m.flatten(2).transpose(1, 2) for m in maps], dim=1)

    def _run_llm(self, embeds, mask, positions, vision, cross, cache=None, use_cache=False):
        return self.part("language_model")(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                               past_key_values=cache, use_cache=use_cache, vision_hidden_states=vision,
                               cross_attention_mask=cross)

    @staticmethod
    def _cross_mask(starts: torch.Tensor, bos: torch.Tensor, query_index: torch.Tensor) -> torch.Tensor:
        """(N, Lq, n) the release's LLM synchronizer mask: image ``n`` (first token at ``starts[:, n]``, -1: none)
        is seen by the query at sequence index ``q`` when ``bos < start <= q``."""
        s = starts[:, None, :]
        return ((s > bos[:, None, None]) & (s <= query_index[:, :, None]) & (s >= 0)).float()

    # -- chains -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts: PromptBatch, *, num_generations: int, max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, generator: torch.Generator | None = None,
                 draw: Draw | None = None) -> Completions:
        """Sample ``num_generations`` chains per prompt (grouped). Without ``draw`` a chain ends at soi or EOS. With
        ``draw(condition, chains, slots) -> pixel tensors`` (one (3, S, S) image in [0, 1], or a PIL image, per
        condition row: row ``j`` is image ``slots[j]`` of chain ``chains[j]``), each soi draws its image at once,
        the image fills the 64 slots after it and the text goes on, up to ``options.max_images`` images; the
        drawn images come back in ``Completions.images``."""
        if num_generations < 1 or max_new_tokens < 1:
            raise ValueError(f"num_generations ({num_generations}) and max_new_tokens ({max_new_tokens}) must be >= 1")
        device = self.device
        prompts = prompts.to(device)
        n_prompts = prompts.input_ids.shape[0]
        rows = n_prompts * num_generations
        sample_gen = None
        if generator is not None:
            seed = int(torch.randint(0, 2**62, (1,), generator=generator))
            sample_gen = torch.Generator(device=device).manual_seed(seed)
        k_max = self.options.max_images if draw is not None else 0
        was_training = self.mm_decoder.training
        self.mm_decoder.eval()
        try:
            ids = prompts.input_ids.repeat_interleave(num_generations, 0)
            mask = prompts.attention_mask.repeat_interleave(num_generations, 0).long()
            prompt_images = self._prompt_images(prompts)
            images: list[list[torch.Tensor]] = [list(prompt_images[r // num_generations]) for r in range(rows)]
            starts = [[int(p) + 1 for p in (ids[r] == self.soi_id).nonzero()[:, 0]] for r in range(rows)]
            maps = self._maps_of([im for chain in images for im in chain])
            drawn: list[list[torch.Tensor]] = [[] for _ in range(rows)]
            bos = self._bos(ids, mask)
            states = []  # post-norm states of every sequence index (for the decoder context)
            out = self._step_llm(ids, None, mask, None, images, maps, starts, bos, 0)
            cache, hidden = out.past_key_values, out.last_hidden_state
            states.append(hidden)
            logits = self.part("text_head")(hidden[:, -1]).float()
            tokens = torch.full((rows, 0), self.pad_id, dtype=torch.long, device=device)
            real = torch.zeros((rows, 0), dtype=torch.long, device=device)  # 1: a sampled token of the chain
            done = torch.zeros(rows, dtype=torch.bool, device=device)
            for _step in range(max_new_tokens):
                counts = torch.tensor([len(d) for d in drawn], device=device)
                if k_max:  # the chain's images are drawn: soi is no longer sampled
                    logits[counts >= k_max, self.soi_id] = float("-inf")
                logits[:, self.image_id] = float("-inf")
                token = sample_tokens(logits, temperature, top_p, top_k, sample_gen)
                token = torch.where(done, torch.full_like(token, self.pad_id), token)
                tokens = torch.cat([tokens, token[:, None]], 1)
                real = torch.cat([real, (~done).long()[:, None]], 1)
                is_soi = (token == self.soi_id) & ~done
                ended = (token == self.eos_id) | (is_soi & (counts >= k_max))
                if bool((done | ended).all()):
                    done |= ended
                    break
                fed = ~done
                mask = torch.cat([mask, fed.long()[:, None]], 1)
                ids = torch.cat([ids, token[:, None]], 1)
                out = self._step_llm(token[:, None], None, mask, cache, images, maps, starts, bos,
                                     ids.shape[1] - 1)
                hidden = out.last_hidden_state
                states.append(hidden)
                logits = self.part("text_head")(hidden[:, -1]).float()
                done |= ended
                pending = [r for r in range(rows) if bool(is_soi[r]) and not bool(done[r])]
                if pending:
                    self._draw_into(pending, draw, drawn, images, starts, ids, mask, torch.cat(states, 1), bos)
                    maps = self._maps_of([im for chain in images for im in chain])
                    block = self._image_block(pending, images, rows)
                    ids = torch.cat([ids, block[0]], 1)
                    mask = torch.cat([mask, block[1]], 1)
                    out = self._step_llm(block[0], block[2], mask, cache, images, maps, starts,
                                         bos, ids.shape[1] - block[0].shape[1])
                    states.append(out.last_hidden_state)
                    pend = torch.tensor(pending, device=device)
                    logits[pend] = self.part("text_head")(out.last_hidden_state[pend, -1]).float()
                    tokens = torch.cat([tokens, torch.where(block[1].bool(), block[0], self.pad_id)], 1)
                    real = torch.cat([real, torch.zeros_like(block[1])], 1)  # image slots: not sampled
        finally:
            if was_training:
                self.mm_decoder.train(True)
        return self._completions(tokens, real, drawn if draw is not None else None)

    def _prompt_images(self, prompts: PromptBatch) -> list[list[torch.Tensor]]:
        pixels = prompts.vision.get("pixel_values")
        counts = prompts.images_per_row or [0] * prompts.input_ids.shape[0]
        return [[pixels[r, j] for j in range(counts[r])] if pixels is not None else [] for r in range(len(counts))]

    def _maps_of(self, pixels: list[torch.Tensor]) -> list[torch.Tensor] | None:
        if not pixels:
            return None
        return self.encode_images(torch.stack(pixels))

    def _bos(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Each row's first real index (its BOS)."""
        return mask.long().argmax(1)

    def _step_llm(self, ids, tokens, mask, cache, images, maps, starts, bos, offset):
        """One LLM call over new positions ``offset..`` of every row (``tokens``: the image tokens of the
        ``<|image|>`` positions among them; None: those of ``maps``), the synchronizer reading every image the
        rows hold (``maps``: all images, chain-major, as :meth:`encode_images` gives them)."""
        if tokens is None and maps is not None and bool((ids == self.image_id).any()):
            tokens = maps[0].flatten(0, 1)
        embeds = self._embed(ids, tokens)
        vision, start = self._vision_inputs(images, maps, starts, embeds.device)
        positions = (mask.cumsum(1) - 1).clamp(min=0)[:, offset:]
        query_index = torch.arange(offset, offset + ids.shape[1], device=embeds.device).expand(ids.shape[0], -1)
        cross = self._cross_mask(start, bos, query_index)
        return self._run_llm(embeds, mask, positions, vision, cross, cache, use_cache=True)

    def _vision_inputs(self, images, maps, starts, device):
        """(N, n, S, C) synchronizer features (zeros past a row's images; one masked image when none) and the
        (N, n) first-token indices (-1: none)."""
        rows = len(images)
        most = max(1, max(len(s) for s in starts))
        start = torch.full((rows, most), -1, dtype=torch.long, device=device)
        for r, s in enumerate(starts):
            start[r, : len(s)] = torch.tensor(s, dtype=torch.long, device=device)
        if maps is None:
            c = self.arch["image_embed_dim"]
            size = sum(s * s for s in self.arch["spatial_shapes"])
            return torch.zeros(rows, most, size, c, dtype=self.dtype, device=device), start
        flat = self._llm_features(maps[1])
        vision = flat.new_zeros(rows, most, *flat.shape[1:])
        i = 0
        for r, chain in enumerate(images):
            for j in range(len(chain)):
                vision[r, j] = flat[i]
                i += 1
        return vision, start

    def _draw_into(self, pending, draw, drawn, images, starts, ids, mask, states, bos) -> None:
        """Draw the images of the chains that just fed a soi (``pending``), from their condition."""
        soi_index = ids.shape[1] - 1
        contexts = [states[r, int(bos[r]) : soi_index + 1][mask[r, int(bos[r]) : soi_index + 1].bool()]
                    for r in pending]
        previous = [images[r][-1] if images[r] else None for r in pending]
        condition = self._condition(contexts, previous)
        pictures = draw(condition, pending, [len(drawn[r]) for r in pending])
        if len(pictures) != len(pending):
            raise ValueError(f"draw returned {len(pictures)} images for {len(pending)} image slots")
        for r, picture in zip(pending, pictures):
            pixels = self.pixels_of(picture).to(self.device)
            drawn[r].append(pixels)
            images[r].append(pixels)
            starts[r].append(soi_index + 1)

    def _image_block(self, pending, images, rows):
        """64 new positions: the image tokens of the chains in ``pending``, masked holes for the others."""
        n = self.num_img_token
        device = self.device
        ids = torch.full((rows, n), self.pad_id, dtype=torch.long, device=device)
        mask = torch.zeros((rows, n), dtype=torch.long, device=device)
        for r in pending:
            ids[r] = self.image_id
            mask[r] = 1
        tokens = self.encode_images(torch.stack([images[r][-1] for r in pending]))[0].flatten(0, 1)
        return ids, mask, tokens

    def _completions(self, tokens: torch.Tensor, real: torch.Tensor, drawn) -> Completions:
        """Sampled positions -> right-padded chains without the generation holes; the completion mask is 1 on
        sampled tokens through the first end, 0 on image slots and padding."""
        rows = tokens.shape[0]
        kept_ids, kept_mask, texts, lengths, slots = [], [], [], [], []
        for r in range(rows):
            keep = (tokens[r] != self.pad_id) | real[r].bool()
            row = tokens[r][keep].tolist()
            sampled = real[r][keep].tolist()
            out_ids, out_mask = [], []
            for tok, s in zip(row, sampled):
                out_ids.append(tok)
                out_mask.append(int(s))
                if s and (tok == self.eos_id or (tok == self.soi_id and drawn is None)):
                    break
            while out_ids and out_mask[-1] == 0 and out_ids[-1] == self.pad_id:
                out_ids.pop()
                out_mask.pop()
            kept_ids.append(out_ids)
            kept_mask.append(out_mask)
            first_soi = out_ids.index(self.soi_id) if self.soi_id in out_ids else None
            first_eos = out_ids.index(self.eos_id) if self.eos_id in out_ids else len(out_ids)
            lengths.append(first_soi if first_soi is not None else first_eos)
            body = [t for t in out_ids[: first_eos] if t not in (self.soi_id, self.image_id)]
            texts.append(self.tokenizer.decode(body, skip_special_tokens=True, clean_up_tokenization_spaces=False))
            slots.append(len(drawn[r]) if drawn is not None else 1)
        width = max(1, max(len(r) for r in kept_ids))
        ids = torch.full((rows, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((rows, width), dtype=torch.long)
        for r in range(rows):
            ids[r, : len(kept_ids[r])] = torch.tensor(kept_ids[r], dtype=torch.long)
            mask[r, : len(kept_mask[r])] = torch.tensor(kept_mask[r], dtype=torch.long)
        return Completions(ids.to(self.device), mask.to(self.device), texts,
                           torch.tensor(lengths, dtype=torch.long, device=self.device),
                           slots if drawn is not None else None,
                           images=[list(d) for d in drawn] if drawn is not None else None)

    def completions_from_texts(self, texts: list[str], end: str | None = None) -> Completions:
        """Tokenise given chains, each followed by ``end`` (default soi; "" for none)."""
        end = self.arch["special_tokens"]["soi"] if end is None else end
        rows = [self.tokenizer(t + end, add_special_tokens=False)["input_ids"] for t in texts]
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [self.pad_id] * (width - len(r)) for r in rows], dtype=torch.long)
        real = (torch.arange(width)[None] < torch.tensor([len(r) for r in rows])[:, None]).long()
        return self._completions(ids.to(self.device), real.to(self.device), None)

    # -- the training forward -------------------------------------------------------------------------------------
    def forward_text(self, prompts: PromptBatch, completions: Completions, *,
                     with_condition: bool = True) -> ForwardOutput:
        """ONE LLM forward over prompt + completion with every image (input and drawn) in its slots: the
        completion's log-probs (N, T) and, optionally, the condition of every image slot (chain-major)."""
        device = self.device
        prompts, completions = prompts.to(device), completions.to(device)
        p_len = prompts.input_ids.shape[1]
        comp = completions.completion_ids
        n, t = comp.shape
        ids = torch.cat([prompts.input_ids, comp], 1)
        comp_real = self._completion_attention(completions)
        mask = torch.cat([prompts.attention_mask.long(), comp_real], 1)
        images = self._prompt_images(prompts)
        drawn = completions.images or [[] for _ in range(n)]
        images = [list(images[r]) + [self.pixels_of(p).to(device) for p in drawn[r]] for r in range(n)]
        flat = [im for chain in images for im in chain]
        encoded = self.encode_images(torch.stack(flat)) if flat else None
        starts = [[int(p) + 1 for p in ((ids[r] == self.soi_id) & mask[r].bool()).nonzero()[:, 0]][: len(images[r])]
                  for r in range(n)]
        for r in range(n):
            if len(starts[r]) < len(images[r]):
                raise ValueError(f"chain {r} holds {len(images[r])} images (prompt and drawn) but only "
                                 f"{len(starts[r])} soi tokens to put them after")
        bos = self._bos(ids, mask)
        embeds = self._embed(ids, encoded[0].flatten(0, 1) if encoded is not None else None)
        vision, start = self._vision_inputs(images, encoded, starts, device)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        index = torch.arange(ids.shape[1], device=device).expand(n, -1)
        out = self._run_llm(embeds, mask, positions, vision, self._cross_mask(start, bos, index))
        states = out.last_hidden_state
        logps, entropy = self._completion_logps(states[:, p_len - 1 : p_len + t - 1], comp)
        if not with_condition:
            return ForwardOutput(logps, entropy=entropy)
        interleaved = completions.images is not None
        first_image = np.cumsum([0] + [len(c) for c in images]).tolist()
        contexts: list[torch.Tensor | None] = []
        previous: list[list[torch.Tensor] | None] = []
        appended = []  # slots whose soi the completion lacks (the chain ended at EOS or by length)
        for r in range(n):
            before = len(images[r]) - len(drawn[r])  # the prompt's images
            sois = [q - 1 for q in starts[r][before:]] if interleaved else []
            if not interleaved:
                soi = p_len + int(completions.condition_lengths[r])
                sois = [soi] if soi < ids.shape[1] and int(ids[r, soi]) == self.soi_id and mask[r, soi] else []
            for s in range(completions.slots()[r]):
                if s < len(sois):
                    keep = mask[r, int(bos[r]) : sois[s] + 1].bool()
                    contexts.append(states[r, int(bos[r]) : sois[s] + 1][keep])
                else:
                    appended.append((len(contexts), r))
                    contexts.append(None)
                k = before + s - 1  # the image just before the slot's soi: its UNet synchronizer input
                previous.append(None if k < 0 else [m[first_image[r] + k] for m in encoded[1]])
        if appended:
            for (slot, _), ctx in zip(appended, self._appended_contexts([r for _, r in appended], prompts,
                                                                        completions)):
                contexts[slot] = ctx
        return ForwardOutput(logps, self._condition(contexts, previous, encoded_maps=True), entropy)

    def _completion_attention(self, completions: Completions) -> torch.Tensor:
        """Real completion positions: everything through the last sampled token (image slots included)."""
        m = completions.completion_mask.long()
        t = m.shape[1]
        last = torch.where(m.bool(), torch.arange(t, device=m.device), -1).max(1).values
        return (torch.arange(t, device=m.device)[None] <= last[:, None]).long()

    def _appended_contexts(self, rows: list[int], prompts: PromptBatch, completions: Completions):
        """The post-norm states of ``prompt + chain + soi`` for chains without their soi (a chain that ended at
        EOS still gets its image, conditioned on the text before the EOS)."""
        sub = completions.select(rows)
        lengths = sub.condition_lengths.tolist()
        body = [sub.completion_ids[i, : lengths[i]].tolist() + [self.soi_id] for i in range(len(rows))]
        width = max(len(b) for b in body)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long, device=self.device)
        real = torch.zeros_like(ids)
        for i, b in enumerate(body):
            ids[i, : len(b)] = torch.tensor(b, device=self.device)
            real[i, : len(b)] = 1
        appended = Completions(ids, real, [""] * len(rows), torch.tensor(lengths, device=self.device))
        prompt_rows = prompts.select(rows)
        p = prompt_rows.to(self.device)
        all_ids = torch.cat([p.input_ids, ids], 1)
        mask = torch.cat([p.attention_mask.long(), self._completion_attention(appended)], 1)
        images = self._prompt_images(p)
        flat = [im for chain in images for im in chain]
        encoded = self.encode_images(torch.stack(flat)) if flat else None
        starts = [[int(q) + 1 for q in (all_ids[r] == self.soi_id).nonzero()[:, 0]][: len(images[r])]
                  for r in range(len(rows))]
        bos = self._bos(all_ids, mask)
        embeds = self._embed(all_ids, encoded[0].flatten(0, 1) if encoded is not None else None)
        vision, start = self._vision_inputs(images, encoded, starts, self.device)
        index = torch.arange(all_ids.shape[1], device=self.device).expand(len(rows), -1)
        states = self._run_llm(embeds, mask, (mask.cumsum(1) - 1).clamp(min=0), vision,
                               self._cross_mask(start, bos, index)).last_hidden_state
        p_len = p.input_ids.shape[1]
        out = []
        for i, b in enumerate(body):
            end = p_len + len(b)
            real_i = mask[i, int(bos[i]) : end].bool()
            out.append(states[i, int(bos[i]) : end][real_i])
        return out

    def _condition(self, contexts: list[torch.Tensor], previous, encoded_maps: bool = False) -> InterleavedCondition:
        """The release's decoder context (reversed, right-padded, projected, + 1-D sin-cos) and the UNet's
        synchronizer input (the previous image's maps, or a masked zero image)."""
        h = contexts[0].shape[-1]
        longest = max(c.shape[0] for c in contexts)
        if longest > self.arch["seq_len"]:
            raise ValueError(f"a decoder context of {longest} tokens exceeds the release's seq_len "
                             f"{self.arch['seq_len']}")
        padded = contexts[0].new_zeros(len(contexts), longest, h)
        mask = torch.zeros(len(contexts), longest, dtype=torch.long, device=contexts[0].device)
        for i, c in enumerate(contexts):
            padded[i, : c.shape[0]] = c.flip(0)
            mask[i, : c.shape[0]] = 1
        table = torch.from_numpy(sincos_1d(h, np.arange(self.arch["seq_len"], dtype=np.float32))).to(padded)
        states = self.part("context_projection")(padded) + table[None, :longest]
        if not encoded_maps:
            previous = [None if p is None else [m[0] for m in self.encode_images(p[None])[1]] for p in previous]
        features, fmask = self._unet_inputs_of(previous, states)
        return InterleavedCondition(states, mask, features, fmask)

    def _unet_inputs_of(self, previous, like: torch.Tensor):
        sizes = self._unet_map_sizes()
        c = self.arch["image_embed_dim"]
        total = sum(s * s for s in sizes)
        features = like.new_zeros(len(previous), 1, total, c)
        fmask = torch.zeros(len(previous), 1, dtype=torch.long, device=like.device)
        for i, p in enumerate(previous):
            if p is not None:
                features[i, 0] = self._unet_features([m[None] for m in p])[0].to(like.dtype)
                fmask[i, 0] = 1
        return features, fmask

    def _unet_map_sizes(self) -> list[int]:
        grid = self.vit_size // self.visual_tokenizer.encoder.vision_model.config.patch_size
        return [4 * grid, 2 * grid, grid, grid // 2]

    def _completion_logps(self, states: torch.Tensor, targets: torch.Tensor):
        n, t, h = states.shape
        flat, flat_targets = states.reshape(-1, h), targets.reshape(-1)
        out, entropy = [], []
        for start in range(0, flat.shape[0], self.options.logprob_chunk_size):
            chunk = slice(start, start + self.options.logprob_chunk_size)
            lp, ent = target_logps(self.part("text_head")(flat[chunk]).float(), flat_targets[chunk])
            out.append(lp)
            entropy.append(ent)
        if not out:
            empty = states.new_zeros((n, t), dtype=torch.float32)
            return empty, empty
        return torch.cat(out).view(n, t), torch.cat(entropy).view(n, t)

    # -- images ---------------------------------------------------------------------------------------------------
    def decoder_condition(self, condition: InterleavedCondition) -> torch.Tensor:
        """The release's decoder condition: the Q-Former's 77 x 1024 over the context (N, 77, 1024)."""
        return self.part("generator").perceiver_resampler(condition.states, condition.mask)

    def image_inputs(self, condition: InterleavedCondition, negative: Condition | None, *,
                     guidance_scale: float = 1.0, exact: bool = False) -> UNetInputs:
        """The Q-Former's 77 x 1024 rows; with guidance ``[neg_prompt_embeds, condition]`` and the synchronizer
        features of each row in BOTH halves (the release's pipeline)."""
        gen = self.part("generator")
        embeds = gen.perceiver_resampler(condition.states, condition.mask)
        features, fmask = condition.features, condition.feature_mask
        guided = guidance_scale != 1.0
        if guided:
            embeds = torch.cat([gen(embeds.shape[0]).to(embeds.dtype), embeds])
            features, fmask = torch.cat([features, features]), torch.cat([fmask, fmask])
        return UNetInputs(embeds, features, fmask, guidance_scale if guided else None)

    def _unet(self, inputs: UNetInputs, x: torch.Tensor, t: torch.Tensor, *, return_features: bool = False):
        gen = self.part("generator")
        unet = gen.decoder.unet
        dtype = next(unet.parameters()).dtype
        guided = inputs.guidance is not None
        x_in = torch.cat([x, x]) if guided else x
        t = t.long().to(x.device)
        if t.dim() > 0 and guided:
            t = torch.cat([t, t])
        maps = self._split_maps(inputs.features)
        pred, feats = unet_with_mmfs(unet, gen.decoder.mmfs_module, x_in.to(dtype), t, inputs.embeds.to(dtype),
                                     maps, inputs.feature_mask, return_features=return_features)
        return pred.float(), feats

    def _split_maps(self, features: torch.Tensor) -> list[torch.Tensor]:
        """(B, n, S, C) flattened maps -> the 4 maps (B, n, C, h, w)."""
        out, start = [], 0
        for s in self._unet_map_sizes():
            chunk = features[:, :, start : start + s * s]
            out.append(chunk.transpose(2, 3).reshape(*features.shape[:2], features.shape[-1], s, s))
            start += s * s
        return out

    def image_prediction(self, inputs: UNetInputs, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The guided epsilon, float32: ``uncond + g * (cond - uncond)``."""
        pred, _ = self._unet(inputs, x, t)
        if inputs.guidance is not None:
            uncond, cond = pred.chunk(2)
            pred = uncond + inputs.guidance * (cond - uncond)
        return pred

    def generator_output(self, inputs: UNetInputs, x: torch.Tensor, t: torch.Tensor, *,
                         return_features: bool = False) -> GeneratorOutput:
        """One unguided UNet evaluation at scheduler timesteps ``t``; times in [0, 1) (the regulariser's draws)
        map to ``long(t * num_train_timesteps)``."""
        if inputs.guidance is not None:
            raise ValueError("generator_output is unguided: build its inputs with guidance_scale=1")
        steps = self.scheduler.config.num_train_timesteps
        timesteps = t if not t.is_floating_point() or float(t.max()) >= 1 else (t.float() * steps).long()
        pred, feats = self._unet(inputs, x, timesteps, return_features=return_features)
        # the last up block's output as (N, 1 layer, h*w tokens, C): every up block has its own width
        features = feats[-1].float().flatten(2).transpose(1, 2)[:, None] if return_features else None
        return GeneratorOutput(pred, features)

    def image_sampler(self, cfg: ImageSamplingConfig):
        """``DDPMSampler`` over the checkpoint's scheduler (the release), or ``DDIMSampler`` (options.sampler)."""
        if self.options.sampler == "ddim":
            from diffusers import DDIMScheduler

            return DDIMSampler(DDIMScheduler.from_config(self.scheduler.config), cfg.steps,
                               eta=self.options.ddim_eta)
        return DDPMSampler(self.scheduler, cfg.steps)

    @torch.no_grad()
    def sample_image_latents(self, inputs: Any, noise: torch.Tensor, cfg: ImageSamplingConfig, *,
                             generator: Generators = None, default_seed: int | None = None) -> SDETrajectory:
        """As the base; ``noise_level == 0`` with the DDPM sampler is the release's draw (every step ancestral, its
        noise from ``generator`` or a generator seeded with ``cfg.seed``), recorded like any stochastic run."""
        if cfg.noise_level == 0 and self.options.sampler == "ddpm":
            cfg = dataclasses.replace(cfg, noise_level=1.0, sde_window=None)
        return super().sample_image_latents(inputs, noise, cfg, generator=generator, default_seed=default_seed)

    @torch.no_grad()
    def draw(self, condition: Condition, noise: torch.Tensor, cfg: ImageSamplingConfig, *,
             negative_from: UnifiedModel | None = None) -> list[Image.Image]:
        """One image per condition row from ``noise``: the release's ancestral DDPM draw with step noise seeded by
        ``cfg.seed`` (DDIM eta 0 with ``options.sampler: ddim``)."""
        inputs = self.image_inputs(condition, None, guidance_scale=cfg.guidance_scale)
        latents = self.sample_image_latents(inputs, noise, dataclasses.replace(cfg, noise_level=0.0)).latents
        return self.decode_latents(latents)

    @torch.no_grad()
    def release_images(self, condition: InterleavedCondition, *, seed: int | None = None, size: int | None = None,
                       steps: int | None = None, guidance_scale: float | None = None) -> list[Image.Image]:
        """The release's ``generate_images`` for these slots: ONE generator seeded with ``seed`` (the release's
        ``sd_base_seed`` 42) draws the batch's initial latents and then every DDPM step's noise, ``steps``
        ancestral steps (30) at guidance 7.5 against the learned negative, the VAE at ``size`` (512)."""
        size = size or self.arch["decoder_image_size"]
        cfg = ImageSamplingConfig(height=size, width=size, steps=steps or self.arch["steps"],
                                  guidance_scale=guidance_scale or self.arch["guidance_scale"],
                                  seed=self.arch["seed"] if seed is None else seed, noise_level=1.0)
        generator = torch.Generator(device=self.device).manual_seed(cfg.seed)
        shape = (condition.num_rows, *self.latent_shape(size, size))
        noise = torch.randn(shape, generator=generator, device=self.device)
        inputs = self.image_inputs(condition, None, guidance_scale=cfg.guidance_scale)
        sampler = DDPMSampler(self.scheduler, cfg.steps)
        latents = sampler.sample(lambda x, t: self.image_prediction(inputs, x, t), noise, noise_level=1.0,
                                 generator=generator).latents
        return self.decode_latents(latents)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        self._check_size(height, width)
        f = self.vae_factor
        return self.image_decoder.decoder.unet.config.in_channels, height // f, width // f

    @property
    def latent_dtype(self) -> torch.dtype:
        return next(self.image_decoder.decoder.unet.parameters()).dtype

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> list[Image.Image]:
        """``latents / scaling_factor`` through the VAE (float32), ``(x / 2 + 0.5).clamp(0, 1)``, then the
        release's ``tensor_to_pil`` (``x * 255 + 0.5`` truncated: what its inference re-encodes)."""
        vae = self.image_decoder.decoder.vae
        z = latents.to(next(vae.parameters()).device, torch.float32) / vae.config.scaling_factor
        pixels = (vae.decode(z).sample.float() / 2 + 0.5).clamp(0, 1)
        pixels = pixels.mul(255).add(0.5).clamp(0, 255).to(torch.uint8)
        return [Image.fromarray(p.permute(1, 2, 0).cpu().numpy()) for p in pixels]
