"""The pipeline-level interface between rgpo's trainer and a family of unified reason-then-draw models.

A family (``rgpo/models/<family>/``) subclasses :class:`UnifiedModel` and registers itself in
:mod:`rgpo.models.registry`; the trainer, the image policy, the CLI and the demo call only what is declared here.
The seam is the one every family in the README's "Model families" table fits:

1. **chains**: :meth:`~UnifiedModel.build_prompts` -> :meth:`~UnifiedModel.generate` samples reasoning chains,
   each ending where the family's image begins (MindOmni ``</answer>`` + newline, Nexus-Gen BOI, BLIP3-o
   ``[IMG]``, MM-Interleaved soi); ``Completions.image_slots`` says how many image slots a chain holds.
2. **one forward** over prompt + chain: per-token log-probs and an OPAQUE :class:`Condition` per chain (pre-norm
   states, prefill states, query states, a Q-Former output: the trainer only selects, repeats and detaches it).
3. **images**: :meth:`~UnifiedModel.image_inputs` turns a condition (and the family's guidance negative) into the
   generator's inputs, :meth:`~UnifiedModel.image_sampler` gives the sampler over the family's scheduler
   (:mod:`rgpo.samplers`; stochastic steps with Gaussian log-probs for the image policy gradient),
   :meth:`~UnifiedModel.image_prediction` is the guided prediction that sampler integrates, and
   :meth:`~UnifiedModel.decode_latents` renders pixels (itself a sampler for two-stage families).
   An **interleaved** family (:attr:`~UnifiedModel.interleaved`, MM-Interleaved) draws images INSIDE its chains:
   ``generate(..., draw=drawer)`` hands the drawer (:class:`rgpo.interleaved.InterleavedDrawer`, which owns the
   noise and records each image's steps keyed by (chain, slot)) the condition of every image slot as the chain
   reaches it, puts the drawn image back into the chain, and continues; ``Completions.images`` carries the
   images so that :meth:`~UnifiedModel.forward_text` scores later text with them in place and returns one
   condition row per image slot (chain-major).
4. **what trains**: the model's parts by name (:attr:`~UnifiedModel.parts`), each with its LoRA targets; the
   reference is every adapter disabled plus frozen copies of the parts trained in full.
5. **checkpoints**: the family's released layout in (:meth:`~UnifiedModel.from_pretrained`, detected by
   :meth:`~UnifiedModel.matches_layout`) and out (:meth:`~UnifiedModel.save_pretrained`); typed options
   (:attr:`~UnifiedModel.options_class`, the config's ``model.options``).

Conventions: ``N`` samples (prompts x chains), ``P`` padded prompt length (LEFT-padded), ``T`` padded completion
length (RIGHT-padded); masks are integer/bool tensors with 1 for real tokens. Images are always a list per chain.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from PIL import Image
from transformers.utils import ModelOutput

from rgpo.samplers import ImageSampler
from rgpo.sde import Generators, SDETrajectory

# The image regularisers the trainer knows (``loss.image_regularizer``); a family lists those it supports.
IMAGE_REGULARIZERS = ("feature_kl", "velocity_mse", "gaussian_kl", "none")

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
    how many completion tokens of sample ``i`` come before its (first) image slot and so condition its image
    (the family decides: MindOmni counts the tokens before ``</answer>``). ``image_slots[i]`` is how many images
    chain ``i`` holds (1 for the families that draw one image at the end of a chain).
    """

    completion_ids: torch.Tensor  # (N, T) right-padded
    completion_mask: torch.Tensor  # (N, T)
    texts: list[str]
    condition_lengths: torch.Tensor  # (N,) long
    image_slots: list[int] | None = None  # None: one image slot per chain
    # An interleaved family's images drawn INSIDE the chains (a list per chain, in order; None: the images are
    # drawn after the chain): the training forward puts them back in their slots, so later text is scored with
    # the very images it saw when sampled.
    images: list[list[Any]] | None = None

    def slots(self) -> list[int]:
        """Image slots per chain."""
        return list(self.image_slots) if self.image_slots is not None else [1] * len(self.texts)

    def select(self, rows: list[int]) -> Completions:
        index = torch.tensor(rows, dtype=torch.long, device=self.completion_ids.device)
        slots = None if self.image_slots is None else [self.image_slots[r] for r in rows]
        images = None if self.images is None else [self.images[r] for r in rows]
        return Completions(self.completion_ids[index], self.completion_mask[index], [self.texts[r] for r in rows],
                           self.condition_lengths[index], slots, images)

    def to(self, device: torch.device | str) -> Completions:
        return Completions(self.completion_ids.to(device), self.completion_mask.to(device), self.texts,
                           self.condition_lengths.to(device), self.image_slots, self.images)


# The model's engine-call outputs are ModelOutputs (dict-like dataclasses, as transformers models return) because
# ZeRO-3 hooks the tensors of a module's output only inside tuples, lists and dicts: a plain dataclass hides them,
# the engine's backward bookkeeping then sees gradients reach the model's inputs without ever reaching its
# outputs, and asserts ("active_backward_submodules is empty during backward pass").
@dataclass
class Condition(ModelOutput):
    """What a chain hands its image generator, OPAQUE to the trainer: one row per chain.

    The default is the shape three of the four families share, left-padded states with a mask (MindOmni: the
    pre-norm states of the conversation, variable length; Nexus-Gen: 81 prefill states; BLIP3-o: 64 query
    states); a family with another shape subclasses it and overrides these four methods.
    """

    states: torch.Tensor | None = None  # (N, L, H) left-padded
    mask: torch.Tensor | None = None  # (N, L)

    @property
    def num_rows(self) -> int:
        return self.states.shape[0]

    def select(self, rows: Sequence[int]) -> Condition:
        """These rows, trimmed to the left padding they need: the exact shapes (and so the exact numbers) of the
        same rows computed on their own, which keeps policy == reference bit-exact when an adapter is zero."""
        index = torch.as_tensor(list(rows), dtype=torch.long, device=self.states.device)
        states, mask = self.states[index], self.mask[index]
        keep = int(mask.sum(1).max()) if mask.numel() else 0
        return type(self)(states[:, states.shape[1] - keep :], mask[:, mask.shape[1] - keep :])

    def repeat_interleave(self, repeats: int) -> Condition:
        """Each row ``repeats`` times in place (one row per image of an N x M rollout)."""
        return type(self)(self.states.repeat_interleave(repeats, 0), self.mask.repeat_interleave(repeats, 0))

    def detach(self) -> Condition:
        return type(self)(self.states.detach(), self.mask)

    def with_gradient_of(self, other: Condition) -> Condition:
        """This condition's VALUE with ``other``'s gradient path (same shape): the image loss replays the
        recorded condition exactly (on-policy ratio 1) while its gradient still reaches the language model."""
        if other.states.shape != self.states.shape:
            raise ValueError(f"the update's condition {tuple(other.states.shape)} does not match the recorded one "
                             f"{tuple(self.states.shape)} of the same chains")
        return type(self)(self.states + (other.states - other.states.detach()), self.mask)


@dataclass
class ForwardOutput(ModelOutput):
    """What one forward over ``prompt + completion`` gives the trainer.

    ``logps[i, j]`` is log p(completion_ids[i, j] | everything before it); positions where the completion mask
    is 0 hold arbitrary finite values. ``condition`` is the chains' :class:`Condition` (None when not asked
    for). ``entropy[i, j]`` is the entropy of the policy's next-token distribution at ``logps[i, j]``'s
    position, detached (a diagnostic; None when the family does not compute it).
    """

    logps: torch.Tensor | None = None  # (N, T) float32
    condition: Condition | None = None
    entropy: torch.Tensor | None = None  # (N, T) float32, detached


@dataclass
class GeneratorOutput(ModelOutput):
    """One unguided evaluation of the image generator: its ``prediction`` (float32, in its sampler's
    parameterisation) and, when asked, ``features`` (N, layers, tokens, D): every block's hidden states at the
    image positions, for the layer-wise feature KL."""

    prediction: torch.Tensor | None = None
    features: torch.Tensor | None = None


@dataclass
class ImageSamplingConfig:
    """How images are drawn.

    ``noise_level > 0`` switches on stochastic sampling for the image-side policy gradient: the stochastic steps
    draw ``x_next ~ N(mean, std^2)`` (Flow-GRPO's SDE for flow families, the ancestral step for epsilon ones) and
    record their log-probs; sampling then returns an :class:`~rgpo.sde.SDETrajectory`. Every step is stochastic
    unless ``sde_window`` picks ``K`` consecutive ones (Flow-GRPO-Fast), starting at ``sde_window_start`` or,
    when that is None, at a start drawn uniformly so that the window stays inside ``sde_window_range`` (a
    half-open range of step indices; None: all steps). ``noise_level == 0`` (the default) is the deterministic
    sampler, bit for bit, and ignores the window fields.
    """

    height: int = 512
    width: int = 512
    steps: int = 50
    guidance_scale: float = 3.0
    seed: int = 42
    shared_noise: bool = True  # one initial noise per group (MindOmni); False: one per sample
    noise_level: float = 0.0  # Flow-GRPO's a (they use 0.7); 0: deterministic
    sde_window: int | None = None  # K stochastic steps; None: every step
    sde_window_start: int | None = None  # first stochastic step; None: drawn from the SDE generator
    sde_window_range: tuple[int, int] | None = None  # where a drawn window may lie; None: (0, steps)


@contextmanager
def injected_adapters_disabled(module: torch.nn.Module | None) -> Iterator[None]:
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


@dataclass
class Part:
    """One named part of a family's model: the attribute holding it, what it is, and its default LoRA targets
    (module-name suffixes inside it; None: every ``nn.Linear`` the family's :meth:`UnifiedModel.lora_targets`
    lists)."""

    attribute: str
    description: str
    lora_targets: tuple[str, ...] | None = None


class UnifiedModel(torch.nn.Module):
    """A model that reasons, then draws, as ONE module (so DeepSpeed wraps, partitions (ZeRO-3) and checkpoints
    every part together). Subclasses fill in the class attributes and the methods that raise here."""

    family: ClassVar[str] = "base"
    """The registry name (``model.family``)."""
    parts: ClassVar[dict[str, Part]] = {}
    """Every part by name. Two names are required: ``language_model`` (what samples the chains) and
    ``generator`` (what the image sampler integrates, and the image policy gradient trains)."""
    layout: ClassVar[dict[str, str]] = {}
    """The released checkpoint folder: relative path -> what it holds (for detection and error messages)."""
    options_class: ClassVar[type | None] = None
    """The dataclass of the family's typed options (``model.options`` in the config), docstring per field."""
    supported_regularizers: ClassVar[tuple[str, ...]] = ("gaussian_kl", "none")
    """Which of :data:`IMAGE_REGULARIZERS` the family can compute."""
    random_shapes: ClassVar[tuple[str, ...]] = ()
    """Names accepted by ``model.path: random:<shape>`` (random weights at a named size)."""
    factories: ClassVar[tuple[str, str, str] | None] = None
    """Where the family builds models in memory: ``(module, tiny function, random function)``, called as
    ``tiny(seed=, dtype=)`` and ``random(shape, seed=, dtype=, device=)`` by :meth:`build_tiny` and
    :meth:`build_random`."""
    language_config: ClassVar[str | None] = None
    """The language model's ``config.json`` inside the released folder (for :meth:`language_hidden_size`)."""

    interleaved: ClassVar[bool] = False
    """Whether the family can draw images INSIDE its chains (MM-Interleaved): ``generate(..., draw=...)`` then
    calls ``draw(condition, chains, slots)`` at each image slot and continues the text after the image
    (:mod:`rgpo.interleaved`); :meth:`draws_inside_chains` says whether this model does so now."""

    running_as_reference = False  # True inside adapter_disabled(): parts kept as frozen copies use the copy
    compiled_decode_supported: ClassVar[bool] = False
    """Whether :meth:`generate` can decode with a compiled step on a static KV cache
    (:mod:`rgpo.models.static_decode`)."""
    decode_compile: dict[str, Any] | None = None  # set by set_compiled_decode; None: the eager loop

    def forward(self, method: str, *args, **kwargs):
        """Dispatch to one of the methods below. The trainer calls the DeepSpeed engine as
        ``engine("forward_text", ...)`` so every training computation passes through the engine's forward
        (ZeRO-3 parameter fetching and bookkeeping) while the model keeps several entry points."""
        return getattr(self, method)(*args, **kwargs)

    # -- checkpoints and construction -------------------------------------------------------------------------
    @classmethod
    def matches_layout(cls, path: str) -> bool:
        """Whether the folder ``path`` is in this family's released layout (every :attr:`layout` entry there)."""
        import os

        return bool(cls.layout) and all(os.path.exists(os.path.join(path, rel)) for rel in cls.layout)

    @classmethod
    def from_pretrained(cls, path: str, *, dtype: torch.dtype = torch.float32, options: Any = None,
                        **kwargs) -> UnifiedModel:
        """Load the released layout at ``path``."""
        raise NotImplementedError

    def save_pretrained(self, path: str) -> None:
        """Write the released layout (adapters must be merged first: :meth:`merge_adapters`)."""
        raise NotImplementedError

    @classmethod
    def _factory(cls, index: int) -> Callable[..., UnifiedModel]:
        # Imported when first used: a family's factory module imports its modeling module.
        import importlib

        module, *functions = cls.factories
        return getattr(importlib.import_module(module), functions[index])

    @classmethod
    def build_tiny(cls, seed: int = 0, dtype: torch.dtype = torch.float32, options: Any = None) -> UnifiedModel:
        """A tiny random model built in memory (tests, smoke runs), with the typed ``options``."""
        if cls.factories is None:
            raise NotImplementedError(f"family {cls.family!r} has no tiny factory")
        model = cls._factory(0)(seed=seed, dtype=dtype)
        model.apply_options(options)
        return model

    @classmethod
    def build_random(cls, shape: str, seed: int = 0, dtype: torch.dtype = torch.float32,
                     device: torch.device | str | None = None, options: Any = None) -> UnifiedModel:
        """Random weights in one of :attr:`random_shapes` (``"meta"`` allocates nothing), with ``options``."""
        if cls.factories is None or not cls.random_shapes:
            raise ValueError(f"family {cls.family!r} has no random shapes")
        model = cls._factory(1)(shape, seed=seed, dtype=dtype, device=device)
        model.apply_options(options)
        return model

    @classmethod
    def language_hidden_size(cls, path: str | None) -> int | None:
        """The language model's hidden size, read without loading the model (it sizes ZeRO's communication
        buckets, as transformers' DeepSpeed integration does): from :attr:`language_config` inside a checkpoint
        folder, or from :meth:`random_shape_hidden_size` for a model built in memory; None when unknown."""
        import json
        import os

        if path in (None, "", "tiny") or str(path).startswith("random:"):
            return cls.random_shape_hidden_size("tiny" if path in (None, "", "tiny") else str(path).split(":", 1)[1])
        config_file = os.path.join(path, cls.language_config) if cls.language_config else None
        if config_file is None or not os.path.isfile(config_file):
            return None
        with open(config_file) as f:
            config = json.load(f)
        return (config.get("text_config") or {}).get("hidden_size") or config.get("hidden_size")

    @classmethod
    def random_shape_hidden_size(cls, shape: str) -> int | None:
        """The language model's hidden size of a ``random:<shape>`` (``tiny`` included); None when unknown."""
        return None

    def apply_options(self, options: Any) -> None:
        """Take the typed options (an instance of :attr:`options_class`)."""
        self.options = options

    # -- parts and what trains ----------------------------------------------------------------------------------
    def part(self, name: str) -> torch.nn.Module:
        """The module of part ``name``; as the reference, the frozen copy :meth:`keep_reference_copies` made."""
        if name not in self.parts:
            raise KeyError(f"family {self.family!r} has no part {name!r}; its parts: {sorted(self.parts)}")
        frozen = self.__dict__.get("_reference_copies", {}).get(name)
        if frozen is not None and self.running_as_reference:
            return frozen
        return getattr(self, self.parts[name].attribute)

    def set_part(self, name: str, module: torch.nn.Module) -> None:
        """Replace part ``name`` (e.g. by its peft-wrapped self)."""
        setattr(self, self.parts[name].attribute, module)

    def lora_targets(self, name: str) -> list[str]:
        """Module-name suffixes inside part ``name`` that a LoRA on it wraps: the part's declared targets, else
        every ``nn.Linear`` in it (peft's own LoRA layers excluded)."""
        declared = self.parts[name].lora_targets
        if declared is not None:
            return list(declared)
        module = self.part(name)
        if hasattr(module, "get_base_model"):
            module = module.get_base_model()
        names = []
        for full, sub in module.named_modules():
            if isinstance(sub, torch.nn.Linear) and not any(p.startswith("lora_") for p in full.split(".")):
                names.append(full.removesuffix(".base_layer"))
        return sorted(set(names))

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Activation checkpointing in the parts that support it."""

    def float32_modules(self) -> list[str]:
        """Submodule names whose weights stay float32 whatever the run's dtype (e.g. a VAE). DeepSpeed casts every
        parameter to bf16/fp16; the trainer puts these back afterwards."""
        return []

    @contextmanager
    def adapter_disabled(self) -> Iterator[None]:
        """Run as the reference: every peft adapter of every part disabled (a wrapped part's
        ``disable_adapter()``, LoRA layers injected into a part switched off), and the parts trained in full
        replaced by the frozen copies :meth:`keep_reference_copies` made. Re-entrant: a nested use (the negative
        prompt encoded as the reference while drawing as the reference) changes nothing, and its exit does not
        switch the adapters back on under the outer one."""
        if self.running_as_reference:
            yield
            return
        self.running_as_reference = True
        try:
            with _all_adapters_disabled([getattr(self, p.attribute, None) for p in self.parts.values()]):
                yield
        finally:
            self.running_as_reference = False

    def keep_reference_copies(self, names: Sequence[str],
                              gathered: Callable[[list[torch.nn.Parameter]], Any] | None = None) -> None:
        """Keep frozen copies of the parts ``names`` as they are now, for :meth:`adapter_disabled`: a LoRA run
        that also trains a part in full has no adapter to switch off there. ``gathered(params)`` is a context that
        makes partitioned (ZeRO-3) weights whole while they are copied."""
        copies = self.__dict__.setdefault("_reference_copies", {})
        for name in names:
            source = getattr(self, self.parts[name].attribute)
            frozen = self.empty_part_copy(name)
            frozen.to_empty(device=next(source.parameters()).device if not _partitioned(source) else _device(self))
            with gathered(list(source.parameters())) if gathered is not None else nullcontext():
                whole = {**dict(source.named_parameters()), **dict(source.named_buffers())}  # buffers: never split
                for key, tensor in [*frozen.named_parameters(), *frozen.named_buffers()]:
                    tensor.data = whole[key].detach().clone()
            frozen.requires_grad_(False).eval()
            # Outside the module tree on purpose: not trained, not partitioned by ZeRO-3, not in checkpoints (a
            # resume rebuilds it from model.path, which still holds the part as it was before training).
            copies[name] = frozen

    def empty_part_copy(self, name: str) -> torch.nn.Module:
        """A module of part ``name``'s structure on the meta device (weights copied in afterwards). The default
        deep-copies the structure; families whose parts ZeRO-3 may partition build it from their config."""
        source = getattr(self, self.parts[name].attribute)
        if _partitioned(source):
            raise NotImplementedError(f"family {self.family!r} cannot copy its partitioned part {name!r}")
        return copy.deepcopy(source).to("meta")

    def merge_adapters(self) -> None:
        """Fold every LoRA into its base weights and drop the adapter modules (for sampling and export)."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        for name, spec in self.parts.items():
            module = getattr(self, spec.attribute, None)
            if module is None:
                continue
            if hasattr(module, "merge_and_unload"):
                self.set_part(name, module.merge_and_unload())
                continue
            for parent in list(module.modules()):
                for child_name, child in list(parent.named_children()):
                    if isinstance(child, BaseTunerLayer):
                        child.merge()
                        setattr(parent, child_name, child.get_base_layer())

    # -- chains -------------------------------------------------------------------------------------------------
    def set_compiled_decode(self, enabled: bool, *, backend: Any = "inductor", mode: str | None = None) -> None:
        """Decode chains with a compiled one-token step on a static KV cache (``rollout.compiled_decode``), or
        with the eager loop. ``backend`` / ``mode`` go to ``torch.compile`` (mode None: CUDA graphs on CUDA;
        backend None: the static cache without compiling). A family without the compiled step keeps its eager
        loop, and says so once."""
        from .static_decode import log_once

        if enabled and not self.compiled_decode_supported:
            log_once(f"compiled decode off, eager loop instead: family {self.family!r} has no compiled decode step")
            enabled = False
        settings = {"backend": backend, "mode": mode} if enabled else None
        decoder = getattr(self, "_compiled_decoder", None)
        # Switching off and on again keeps what was compiled; other compile settings need a new decoder.
        if settings is not None and decoder is not None and decoder.settings != settings:
            self._compiled_decoder = None
        self.decode_compile = settings

    def compiled_decoder(self, step_fn: Callable, config: Any, device: torch.device):
        """The family's :class:`~rgpo.models.static_decode.CompiledDecoder` when :meth:`set_compiled_decode`
        asked for one and it can run on ``device``; None otherwise (the reason logged once)."""
        from .static_decode import CompiledDecoder, log_once

        if self.decode_compile is None:
            return None
        if getattr(self, "_compiled_decoder", None) is None:
            self._compiled_decoder = CompiledDecoder(step_fn, config, **self.decode_compile)
        reason = self._compiled_decoder.unavailable(device)
        if reason is not None:
            log_once(f"compiled decode off, eager loop instead: {reason}")
            return None
        return self._compiled_decoder

    def build_prompts(self, rows: list[dict[str, Any]]) -> PromptBatch:
        """Prompts from data rows: ``row["prompt"]`` is the instruction text (or a list of chat messages),
        ``row.get("images")`` an optional list of PIL images for the family's vision input."""
        raise NotImplementedError

    def generate(self, prompts: PromptBatch, *, num_generations: int, max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, generator: torch.Generator | None = None) -> Completions:
        """Sample ``num_generations`` chains per prompt row; rows of the result are grouped (p0 x G, p1 x G, ...)."""
        raise NotImplementedError

    def draws_inside_chains(self) -> bool:
        """Whether rollouts of this model are interleaved (its images drawn inside the chains, several per chain);
        False for the families that draw one image after each chain."""
        return False

    def forward_text(self, prompts: PromptBatch, completions: Completions, *,
                     with_condition: bool = True) -> ForwardOutput:
        """ONE forward over ``prompt + completion``: per-token log-probs and (optionally) the chains' condition.
        ``prompts`` has one row per completion (already repeated)."""
        raise NotImplementedError

    def understanding_model(self) -> tuple[torch.nn.Module, Any] | None:
        """The family's understanding VLM as a transformers image-text-to-text model, with its processor (the
        policy's own weights: a judge reward then needs no second model in memory); None when it has none."""
        return None

    # -- images -------------------------------------------------------------------------------------------------
    def negative_condition(self, num: int) -> Condition | None:
        """The guidance negative as a condition of ``num`` rows (a negative prompt through the reference
        language model, an all-zero condition, ...); None when the family's negative lives inside
        :meth:`image_inputs` (a constant text-encoder output, a learned embedding). Never trained: computed as
        the reference."""
        return None

    def image_inputs(self, condition: Condition, negative: Condition | None, *, guidance_scale: float = 1.0,
                     exact: bool = False) -> Any:
        """The generator's inputs for these conditions (connector / adapter / projection applied; with guidance,
        the negative rows batched with the condition rows). ``exact``: the path the image policy replays (no
        approximate cache), so sampling and recomputation match bit for bit. Opaque to the trainer."""
        raise NotImplementedError

    def image_prediction(self, inputs: Any, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The float32 guided prediction the sampler integrates, at latents ``x`` and time ``t`` (the sampler's
        own time: 0-dim or (N,))."""
        raise NotImplementedError

    def generator_output(self, inputs: Any, x: torch.Tensor, t: torch.Tensor, *,
                         return_features: bool = False) -> GeneratorOutput:
        """One UNGUIDED generator evaluation (inputs built with guidance 1): for the feature KL / velocity MSE."""
        raise NotImplementedError

    def regularizer_times(self, num: int, generator: torch.Generator) -> torch.Tensor:
        """(num,) times at which the feature KL / velocity MSE compare policy and reference, drawn as the family's
        release does; the default: uniform on [0, 1)."""
        return torch.rand(num, generator=generator)

    def image_sampler(self, cfg: ImageSamplingConfig) -> ImageSampler:
        """The family's sampler for ``cfg.steps`` steps (its scheduler's times; see :mod:`rgpo.samplers`)."""
        raise NotImplementedError

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        """The shape of one image's initial noise for ``height`` x ``width`` pixels."""
        raise NotImplementedError

    @classmethod
    def check_image_size(cls, height: int, width: int) -> str | None:
        """None when images of this size can be drawn, else what is valid (e.g. "a multiple of 16"); checked
        before any model is built."""
        return None

    @property
    def latent_dtype(self) -> torch.dtype:
        """The dtype the initial noise is handed to the generator in."""
        return next(self.part("generator").parameters()).dtype

    def decode_latents(self, latents: torch.Tensor) -> list[Image.Image]:
        """Final latents -> PIL images (a VAE, or a second sampler for two-stage families)."""
        raise NotImplementedError

    def rollout_context(self) -> AbstractContextManager[None]:
        """A context the trainer draws its rollout images in (evaluation and sampling draw outside it): a family
        with a cheaper rollout setting (BLIP3-o's fewer renderer steps) switches it here; the default does
        nothing."""
        return nullcontext()

    # -- the image pipeline, for every family -------------------------------------------------------------------
    @torch.no_grad()
    def sample_image_latents(self, inputs: Any, noise: torch.Tensor, cfg: ImageSamplingConfig, *,
                             generator: Generators = None, default_seed: int | None = None) -> SDETrajectory:
        """Run :meth:`image_sampler` from ``noise`` with :meth:`image_prediction`: the deterministic sampler when
        ``cfg.noise_level == 0`` (nothing recorded), else stochastic steps where ``cfg`` says, their noise from
        ``generator`` (one CPU generator, or one per row so a row's noise does not depend on its batch; None:
        seeded with ``default_seed``, else ``cfg.seed``)."""
        sampler = self.image_sampler(cfg)

        def predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.image_prediction(inputs, x, t)

        if cfg.noise_level == 0:
            return sampler.sample(predict, noise)
        if generator is None:
            generator = torch.Generator().manual_seed(cfg.seed if default_seed is None else default_seed)
        stochastic = sampler.window(cfg.sde_window, cfg.sde_window_start, cfg.sde_window_range, generator)
        return sampler.sample(predict, noise, noise_level=cfg.noise_level, stochastic=stochastic,
                              generator=generator)

    @torch.no_grad()
    def draw(self, condition: Condition, noise: torch.Tensor, cfg: ImageSamplingConfig, *,
             negative_from: UnifiedModel | None = None) -> list[Image.Image]:
        """One deterministic image per condition row from ``noise``: inputs with the guidance negative (computed
        by ``negative_from``, the trainer's reference, else by this model as its reference), the sampler, the
        decode."""
        guided = cfg.guidance_scale != 1.0
        negative = (negative_from or self).negative_condition(condition.num_rows) if guided else None
        inputs = self.image_inputs(condition, negative, guidance_scale=cfg.guidance_scale)
        latents = self.sample_image_latents(inputs, noise, dataclasses.replace(cfg, noise_level=0.0)).latents
        return self.decode_latents(latents)

    def initial_noise(self, num: int, group_size: int, cfg: ImageSamplingConfig, device=None) -> torch.Tensor:
        """Standard normal latents (num, ...) from a CPU generator seeded with ``cfg.seed`` (device independent);
        one draw per group of ``group_size`` rows when ``cfg.shared_noise``, else one per row."""
        if group_size < 1 or num % group_size:
            raise ValueError(f"num ({num}) must be a positive multiple of group_size ({group_size})")
        shape = self.latent_shape(cfg.height, cfg.width)
        gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
        if cfg.shared_noise:
            noise = torch.randn((num // group_size, *shape), generator=gen).repeat_interleave(group_size, 0)
        else:
            noise = torch.randn((num, *shape), generator=gen)
        return noise.to(device if device is not None else _device(self))


def build_in_shape(build: Callable[..., UnifiedModel], shapes: dict[str, dict[str, Any]], shape: str, seed: int,
                   dtype: torch.dtype, device: torch.device | str | None) -> UnifiedModel:
    """``build(seed, dtype, **shapes[shape])`` with random weights made directly on ``device`` in ``dtype`` (no
    float32 copy of a 7B on the way; ``"meta"`` allocates nothing): a family's ``random:<shape>`` factory."""
    if shape not in shapes:
        raise ValueError(f"unknown random model shape {shape!r}; known: {sorted(shapes)}")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device or "cpu"):
            return build(seed, dtype, **shapes[shape])
    finally:
        torch.set_default_dtype(previous)


def _partitioned(module: torch.nn.Module) -> bool:
    return any(hasattr(p, "ds_id") for p in module.parameters())


def _device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


@contextmanager
def _all_adapters_disabled(modules: Sequence[torch.nn.Module | None]) -> Iterator[None]:
    """Every module's adapters off: a peft-wrapped module through its own ``disable_adapter()``, LoRA layers
    injected into a plain module through their switches."""
    from contextlib import ExitStack

    with ExitStack() as stack:
        for module in modules:
            if module is None:
                continue
            if hasattr(module, "disable_adapter") and hasattr(module, "get_base_model"):
                stack.enter_context(module.disable_adapter())
            else:
                stack.enter_context(injected_adapters_disabled(module))
        yield
