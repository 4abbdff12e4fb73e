"""The adapter interface between the RGPO trainer and a unified reason-then-draw model.

A family (MindOmni today) implements :class:`UnifiedModel`; the trainer only calls what is declared here, so a
new family (BLIP3-o, Nexus-Gen, ...) plugs in without touching the trainer. Register it in
``rgpo.models.registry``.

Conventions shared by every method:
- ``N`` is the number of samples (prompts x chains), ``P`` the padded prompt length (LEFT-padded),
  ``T`` the padded completion length (RIGHT-padded), ``L`` a padded condition length (LEFT-padded),
  ``D`` the decoder's hidden size, ``C, h, w`` the latent shape.
- Masks are integer/bool tensors with 1 for real tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from transformers.utils import ModelOutput

from rgpo.sde import SDETrajectory


@dataclass
class PromptBatch:
    """Tokenised chat prompts, one row per sample, ready for ``generate`` and ``forward``.

    ``vision`` holds the extra model inputs for input images (``pixel_values``, ``image_grid_thw``, ...), already
    aligned with the rows; it is empty for text-only prompts.
    """

    input_ids: torch.Tensor  # (N, P) left-padded
    attention_mask: torch.Tensor  # (N, P)
    vision: dict[str, torch.Tensor] = field(default_factory=dict)
    images_per_row: list[int] | None = None  # None: every row has the same number of input images

    def to(self, device: torch.device | str) -> PromptBatch:
        return PromptBatch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            {k: v.to(device) for k, v in self.vision.items()},
            self.images_per_row,
        )

    def _image_counts(self) -> list[int]:
        rows = self.attention_mask.shape[0]
        if self.images_per_row is not None:
            return list(self.images_per_row)
        grid = self.vision.get("image_grid_thw")
        return [grid.shape[0] // rows if grid is not None else 0] * rows

    def select(self, rows: list[int]) -> PromptBatch:
        """The given rows (in that order), vision inputs included."""
        index = torch.tensor(rows, dtype=torch.long, device=self.input_ids.device)
        counts = self._image_counts()
        return PromptBatch(self.input_ids[index], self.attention_mask[index],
                           _select_vision(self.vision, counts, rows), [counts[r] for r in rows])

    def repeat_interleave(self, repeats: int) -> PromptBatch:
        """Each prompt row repeated ``repeats`` times in place (group layout: p0,p0,p1,p1,...)."""
        rows = [r for r in range(self.attention_mask.shape[0]) for _ in range(repeats)]
        return self.select(rows)


def _select_vision(vision: dict[str, torch.Tensor], images_per_row: list[int], rows: list[int]) -> dict[str, torch.Tensor]:
    """Vision inputs of the given rows. Qwen-style ``pixel_values`` are flat over images (one chunk of
    ``prod(image_grid_thw[i])`` patches per image) and ``image_grid_thw`` has one row per image, so both are
    picked image by image, following how many images each row holds."""
    if not vision:
        return {}
    grid = vision.get("image_grid_thw")
    first_image = [sum(images_per_row[:r]) for r in range(len(images_per_row))]
    images = [first_image[r] + j for r in rows for j in range(images_per_row[r])]
    out = {}
    for key, value in vision.items():
        if key == "pixel_values" and grid is not None:
            chunks = torch.split(value, grid.prod(-1).tolist(), 0)
            out[key] = torch.cat([chunks[i] for i in images]) if images else value[:0]
        elif key == "image_grid_thw":
            out[key] = value[images]
        else:
            out[key] = value[rows]
    return out


@dataclass
class Completions:
    """Sampled reasoning chains.

    ``completion_mask`` is 1 up to and including the first EOS and 0 after it. ``condition_lengths[i]`` is
    how many completion tokens belong to the image condition of sample ``i`` (the tokens before ``</answer>``,
    or every token before EOS when the chain never closed its answer).
    """

    completion_ids: torch.Tensor  # (N, T) right-padded
    completion_mask: torch.Tensor  # (N, T)
    texts: list[str]
    condition_lengths: torch.Tensor  # (N,) long

    def select(self, rows: list[int]) -> Completions:
        index = torch.tensor(rows, dtype=torch.long, device=self.completion_ids.device)
        return Completions(self.completion_ids[index], self.completion_mask[index], [self.texts[r] for r in rows],
                           self.condition_lengths[index])

    def to(self, device: torch.device | str) -> Completions:
        return Completions(
            self.completion_ids.to(device), self.completion_mask.to(device), self.texts, self.condition_lengths.to(device)
        )


# The two outputs of the model's engine calls are ModelOutputs (dict-like dataclasses, as transformers models
# return) because ZeRO-3 hooks the tensors of a module's output only inside tuples, lists and dicts: a plain
# dataclass hides them, the engine's backward bookkeeping then sees gradients reach the model's inputs without
# ever reaching its outputs, and asserts ("active_backward_submodules is empty during backward pass").
@dataclass
class ForwardOutput(ModelOutput):
    """What one forward over ``prompt + completion`` gives the trainer.

    ``logps[i, j]`` is log p(completion_ids[i, j] | everything before it); positions where the completion mask
    is 0 hold arbitrary finite values. ``condition`` / ``condition_mask`` are the decoder's conditioning inputs
    BEFORE the connector: the VLM's last-layer PRE-norm hidden states at the prompt tokens plus the first
    ``condition_lengths[i]`` completion tokens (plus any suffix the family's decoder was trained with, e.g.
    MindOmni's closing newline), re-packed LEFT-padded. ``None`` when not asked for.
    ``entropy[i, j]`` is the entropy of the policy's next-token distribution at ``logps[i, j]``'s position,
    detached (a diagnostic; ``None`` when the family does not compute it).
    """

    logps: torch.Tensor  # (N, T) float32
    condition: torch.Tensor | None = None  # (N, L, H_vlm)
    condition_mask: torch.Tensor | None = None  # (N, L)
    entropy: torch.Tensor | None = None  # (N, T) float32, detached


@dataclass
class ImageSamplingConfig:
    """How images are drawn from the decoder.

    ``noise_level > 0`` switches on SDE sampling (Flow-GRPO's SDE for the decoder's rectified flow, see
    :mod:`rgpo.sde`) for the image-side policy gradient: the stochastic steps draw ``x_next ~ N(mean, std^2)``
    and record their log-probs, and ``sample_latents`` returns an :class:`~rgpo.sde.SDETrajectory`. Every step
    is stochastic unless ``sde_window`` picks ``K`` consecutive ones (Flow-GRPO-Fast), starting at
    ``sde_window_start`` or, when that is None, at a start drawn uniformly so that the window stays inside
    ``sde_window_range`` (a half-open range of step indices; None: all steps). ``noise_level == 0`` (the
    default) is the deterministic Euler sampler, bit for bit, and ignores the window fields.
    """

    height: int = 512
    width: int = 512
    steps: int = 50
    guidance_scale: float = 3.0
    seed: int = 42
    shared_noise: bool = True  # one initial noise per group (MindOmni); False: one per sample
    noise_level: float = 0.0  # Flow-GRPO's a (they use 0.7); 0: deterministic Euler
    sde_window: int | None = None  # K stochastic steps; None: every step
    sde_window_start: int | None = None  # first stochastic step; None: drawn from the SDE generator
    sde_window_range: tuple[int, int] | None = None  # where a drawn window may lie; None: (0, steps)


@dataclass
class DecoderOutput(ModelOutput):
    """Decoder outputs for given condition, latents and t.

    ``features`` stacks every layer's input hidden states at the output-image token positions plus the final
    normed output: (N, num_layers + 1, num_image_tokens, D). ``velocity`` is the predicted velocity (N, C, h, w).
    """

    velocity: torch.Tensor
    features: torch.Tensor | None = None


@contextmanager
def decoder_adapters_disabled(module: torch.nn.Module | None) -> Iterator[None]:
    """Disable every peft LoRA layer injected into ``module`` (``inject_adapter_in_model``, which has no
    ``disable_adapter`` context) for the block. Only the layers' own switch is flipped (not ``requires_grad``,
    which ``enable_adapters`` would reset), and restored on exit."""
    layers = []
    if module is not None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        layers = [m for m in module.modules() if isinstance(m, BaseTunerLayer)]
    before = [m._disable_adapters for m in layers]
    for m in layers:
        m._disable_adapters = True
    try:
        yield
    finally:
        for m, flag in zip(layers, before):
            m._disable_adapters = flag


class UnifiedModel(torch.nn.Module):
    """A VLM that reasons, a connector, a diffusion decoder and a VAE, as ONE module.

    One module so that DeepSpeed wraps, partitions (ZeRO-3) and checkpoints everything together. Which
    parameters are trainable is decided by the trainer (LoRA through peft on ``vlm``'s language model by default).
    """

    family: str = "base"

    def forward(self, method: str, *args, **kwargs):
        """Dispatch to one of the methods below. The trainer calls the DeepSpeed engine as
        ``engine("forward_text", ...)`` so every training computation passes through the engine's forward
        (ZeRO-3 parameter fetching and bookkeeping) while the model keeps several entry points."""
        return getattr(self, method)(*args, **kwargs)

    # -- text side ------------------------------------------------------------------------------------------------
    def build_prompts(self, rows: list[dict[str, Any]]) -> PromptBatch:
        """Chat-template prompts from data rows: ``row["prompt"]`` is the instruction text, ``row.get("images")``
        an optional list of PIL images that reach the VLM's vision tower."""
        raise NotImplementedError

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
        """Sample ``num_generations`` chains per prompt row; rows of the result are grouped (p0 x G, p1 x G, ...)."""
        raise NotImplementedError

    def forward_text(
        self, prompts: PromptBatch, completions: Completions, *, with_condition: bool = True
    ) -> ForwardOutput:
        """ONE forward over ``prompt + completion``: per-token log-probs and (optionally) the condition states.

        ``prompts`` has one row per completion (already repeated). Never materialises a full-vocabulary
        log-softmax for the whole batch."""
        raise NotImplementedError

    def negative_condition(self, num: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-norm hidden states of the fixed negative prompt (no reasoning), repeated ``num`` times:
        ``(condition (num, L, H_vlm), mask (num, L))``. Used for classifier-free guidance."""
        raise NotImplementedError

    # -- image side -----------------------------------------------------------------------------------------------
    def connect(self, condition: torch.Tensor, condition_mask: torch.Tensor) -> torch.Tensor:
        """The connector: VLM states (N, L, H_vlm) -> decoder condition embeddings (N, L, D)."""
        raise NotImplementedError

    def decode_step(
        self,
        cond_embeds: torch.Tensor,
        cond_mask: torch.Tensor,
        latents: torch.Tensor,
        t: torch.Tensor,
        *,
        return_features: bool = False,
    ) -> DecoderOutput:
        """One decoder evaluation: velocity at (latents, t) given the condition; ``t`` (N,) with 0 = noise."""
        raise NotImplementedError

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
        """The float32 velocity ``sample_latents`` integrates at (``x``, ``t``): with ``guidance_scale != 1``,
        ``embeds``/``mask`` hold the N condition rows then the N negative rows, run as one batch, and
        ``v = v_neg + g (v_cond - v_neg)``. The image policy gradient recomputes its SDE log-probs with it."""
        raise NotImplementedError

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(C, h, w) of the decoder's latents for an image of ``height`` x ``width`` pixels."""
        raise NotImplementedError

    def initial_noise(self, num: int, group_size: int, cfg: ImageSamplingConfig, device=None) -> torch.Tensor:
        """Seeded initial latents (num, C, h, w); shared within each group of ``group_size`` when
        ``cfg.shared_noise``."""
        raise NotImplementedError

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
        """Flow-matching sampling from ``noise`` (t: 0 -> 1) with classifier-free guidance (``neg_embeds`` None or
        guidance 1: unguided).

        ``cfg.noise_level == 0``: deterministic Euler; returns the final latents (N, C, h, w) float32.
        ``cfg.noise_level > 0``: SDE steps where ``cfg`` says (:mod:`rgpo.sde`), with the guided velocity, their
        noise drawn from ``generator`` (one CPU generator, or one per row so that a row's noise does not depend
        on the batch; None: derived from ``cfg.seed``); returns an :class:`~rgpo.sde.SDETrajectory` (final
        latents, the latents before and after each stochastic step, their fp32 log-probs and times)."""
        raise NotImplementedError

    def decode_latents(self, latents: torch.Tensor) -> list[Image.Image]:
        """VAE decode (fp32) to PIL images."""
        raise NotImplementedError

    # -- what trains ----------------------------------------------------------------------------------------------
    running_as_reference = False  # True inside adapter_disabled(): parts kept as a frozen copy use the copy

    @contextmanager
    def adapter_disabled(self) -> Iterator[None]:
        """Run as the reference: the VLM's peft adapter and any LoRA injected into the decoder
        (``trainable.decoder_lora_r``) disabled (a no-op for parts that carry none), and a part trained in full
        beside the adapter (the connector) replaced by the copy :meth:`keep_reference_connector` made."""
        self.running_as_reference = True
        try:
            with decoder_adapters_disabled(getattr(self, "decoder", None)):
                if hasattr(self.vlm, "disable_adapter"):
                    with self.vlm.disable_adapter():
                        yield
                else:
                    yield
        finally:
            self.running_as_reference = False

    def keep_reference_connector(self, gathered: Callable[[list[torch.nn.Parameter]], Any] | None = None) -> None:
        """Keep a frozen copy of the connector's current weights for :meth:`adapter_disabled` to run: a LoRA run
        that also trains the connector in full has no adapter to switch off there. ``gathered(params)`` is a
        context that makes partitioned (ZeRO-3) weights whole while they are copied."""
        raise NotImplementedError(f"{type(self).__name__} cannot keep a frozen reference connector")

    def float32_modules(self) -> list[str]:
        """Names of submodules whose weights stay float32 whatever the run's dtype (MindOmni: the VAE). DeepSpeed
        casts every parameter to bf16/fp16; the trainer puts these back afterwards."""
        return []

    def language_model_lora_targets(self) -> list[str]:
        """Module names for the default LoRA (the VLM's language model and lm_head, never the vision tower)."""
        raise NotImplementedError

    # -- checkpoints ----------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str, *, dtype: torch.dtype = torch.float32, **kwargs) -> UnifiedModel:
        raise NotImplementedError

    def save_pretrained(self, path: str) -> None:
        raise NotImplementedError

