"""Human-preference image rewards from local weights: PickScore, HPSv2.1 and the LAION aesthetic predictor.

Each loads its model once per process (shared by every instance with the same paths and device), scores the
images of a batch in batches of ``batch_size``, and gives a chain that drew several images the mean over them.
Nothing downloads; point the kwargs at weights fetched beforehand::

    rewards:
      functions:
        # PickScore (Kirstain et al. 2023): the model folder of yuvalkirstain/PickScore_v1 and the processor
        # folder of laion/CLIP-ViT-H-14-laion2B-s32B-b79K (the one the authors load it with).
        - {name: pickscore, kwargs: {model_path: /weights/PickScore_v1, processor_path: /weights/CLIP-ViT-H-14}}
        # HPSv2.1 (Wu et al. 2023): open_clip ViT-H-14 with HPS_v2.1_compressed.pt ({"state_dict": ...}).
        - {name: hpsv2, kwargs: {checkpoint: /weights/HPS_v2.1_compressed.pt}}
        # LAION improved aesthetic predictor: the MLP sac+logos+ava1-l14-linearMSE.pth on the image embedding of
        # openai/clip-vit-large-patch14 (a transformers CLIPModel folder).
        - {name: aesthetic, kwargs: {clip_path: /weights/clip-vit-large-patch14,
                                     mlp_path: /weights/sac+logos+ava1-l14-linearMSE.pth}}

The values are the published scores, unscaled: PickScore is ``logit_scale.exp() * cos(image, text)`` (about
18-23 for real images), HPSv2.1 the cosine ``cos(image, text)`` (about 0.2-0.35), the aesthetic score the MLP
output on the L2-normalised CLIP image embedding (about 1-10). Scale them with the reward's ``weight``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .pairs import (
    ANSWER,
    cached,
    check_batch_size,
    frozen,
    local_path,
    per_chain_mean,
    resolve_device,
    texts_for,
    torch_dtype,
)
from .registry import RewardError, register_reward

__all__ = ["AestheticMLP", "AestheticReward", "HPSv2Reward", "PickScoreReward"]

def _features(output: Any) -> torch.Tensor:
    """The projected embedding of ``CLIPModel.get_*_features``: a tensor in transformers 4, the pooler output
    of a model output in transformers 5."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _load_hf_clip(reward: str, model_path: Any, processor_path: Any, key: str, device: str,
                  dtype: torch.dtype) -> tuple[Any, Any]:
    """(CLIPModel, CLIPProcessor) from local folders, once per process."""
    model_dir = local_path(reward, key, model_path, "a transformers CLIPModel (config.json and weights)", folder=True)
    processor_dir = model_dir if processor_path is None else local_path(
        reward, "processor_path", processor_path, "a CLIP processor (preprocessor_config.json, tokenizer files)",
        folder=True)

    def build() -> tuple[Any, Any]:
        from transformers import CLIPModel, CLIPProcessor

        try:
            processor = CLIPProcessor.from_pretrained(processor_dir, local_files_only=True)
        except Exception as e:
            raise RewardError(f"reward {reward!r}: cannot load a CLIP processor from {processor_dir} "
                              f"({type(e).__name__}: {e}); give kwargs.processor_path") from e
        model = CLIPModel.from_pretrained(model_dir, local_files_only=True, dtype=dtype)
        return frozen(model.to(device)), processor

    return cached(("hf_clip", str(model_dir), str(processor_dir), device, dtype), build)


# ------------------------------------------------------------------------------------------------ PickScore
@register_reward("pickscore")
class PickScoreReward:
    """PickScore: ``logit_scale.exp() * cos(image, text)`` under the PickScore CLIP (a transformers ``CLIPModel``).

    Args:
        model_path: local folder of the model (``yuvalkirstain/PickScore_v1``).
        processor_path: local folder of its processor (``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``); default
            ``model_path``.
        text_column: data column with the text the image should show (``"gt_prompt"``), or ``"answer"``.
        device: None: the current CUDA device, else the CPU.
        batch_size: images per forward.
        dtype: ``float32``, ``bfloat16`` or ``float16``.
    """

    name = "pickscore"

    def __init__(self, model_path: str | None = None, processor_path: str | None = None,
                 text_column: str = "gt_prompt", device: str | None = None, batch_size: int = 16,
                 dtype: str = "float32") -> None:
        check_batch_size(self.name, batch_size)
        self.device = resolve_device(device)
        self.model, self.processor = _load_hf_clip(self.name, model_path, processor_path, "model_path", self.device,
                                                   torch_dtype(self.name, dtype))
        self.text_column, self.batch_size = text_column, batch_size
        self.required_columns: tuple[str, ...] = () if text_column == ANSWER else (text_column,)

    def __call__(self, completions: list[Any], images: Sequence[Any] | None = None, **columns: Any) -> list[Any]:
        texts = texts_for(self.name, self.text_column, completions, columns)
        return per_chain_mean(images, texts, self.batch_size, self.score)

    @torch.inference_mode()
    def score(self, images: list[Any], texts: list[str]) -> list[float]:
        """PickScore of each image with the text at the same position."""
        pixels = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
        tokens = self.processor(text=list(texts), padding=True, truncation=True, max_length=77, return_tensors="pt")
        image = _features(self.model.get_image_features(pixel_values=pixels.to(self.device, self.model.dtype)))
        text = _features(self.model.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                                      attention_mask=tokens["attention_mask"].to(self.device)))
        cosine = (F.normalize(image.float(), dim=-1) * F.normalize(text.float(), dim=-1)).sum(-1)
        return (self.model.logit_scale.float().exp() * cosine).tolist()


# ------------------------------------------------------------------------------------------------ HPSv2.1
@register_reward("hpsv2")
class HPSv2Reward:
    """HPSv2 / HPSv2.1: ``cos(image, text)`` under an open_clip model loaded from an HPS checkpoint.

    Args:
        checkpoint: local HPS checkpoint file (``HPS_v2.1_compressed.pt`` or ``HPS_v2_compressed.pt``): a
            ``{"state_dict": ...}`` of the open_clip model (a bare state dict is accepted too).
        model_name: open_clip architecture of the checkpoint (HPS: ``"ViT-H-14"``).
        text_column: data column with the text the image should show (``"gt_prompt"``), or ``"answer"``.
        device, batch_size: as for :class:`PickScoreReward`.

    The image goes through open_clip's evaluation transform of ``model_name`` (resize, centre crop, normalise),
    as HPS's own ``preprocess_val``; the text through open_clip's tokenizer for ``model_name``.
    """

    name = "hpsv2"

    def __init__(self, checkpoint: str | None = None, model_name: str = "ViT-H-14", text_column: str = "gt_prompt",
                 device: str | None = None, batch_size: int = 16) -> None:
        check_batch_size(self.name, batch_size)
        path = local_path(self.name, "checkpoint", checkpoint, "an HPS checkpoint (HPS_v2.1_compressed.pt)",
                          folder=False)
        self.device = resolve_device(device)
        self.model, self.preprocess, self.tokenizer = cached(
            ("hpsv2", str(path), model_name, self.device), lambda: _load_hps(self.name, path, model_name, self.device))
        self.text_column, self.batch_size = text_column, batch_size
        self.required_columns: tuple[str, ...] = () if text_column == ANSWER else (text_column,)

    def __call__(self, completions: list[Any], images: Sequence[Any] | None = None, **columns: Any) -> list[Any]:
        texts = texts_for(self.name, self.text_column, completions, columns)
        return per_chain_mean(images, texts, self.batch_size, self.score)

    @torch.inference_mode()
    def score(self, images: list[Any], texts: list[str]) -> list[float]:
        """HPS of each image with the text at the same position."""
        pixels = torch.stack([self.preprocess(im.convert("RGB")) for im in images]).to(self.device)
        image = self.model.encode_image(pixels, normalize=True).float()
        text = self.model.encode_text(self.tokenizer(list(texts)).to(self.device), normalize=True).float()
        return (image * text).sum(-1).tolist()


def _load_hps(reward: str, path: Any, model_name: str, device: str) -> tuple[Any, Any, Any]:
    import open_clip

    if model_name not in open_clip.list_models():
        raise RewardError(f"reward {reward!r}: kwargs.model_name {model_name!r} is not an open_clip architecture")
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=None, device="cpu")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    state = {k.removeprefix("module."): v for k, v in state.items()}  # saved from DistributedDataParallel
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    reshaped = [f"{k}: {tuple(state[k].shape)} for {tuple(own[k].shape)}" for k in own
                if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or reshaped:
        raise RewardError(f"reward {reward!r}: {path} does not fit open_clip {model_name!r} (kwargs.model_name): "
                          f"{len(missing)} weights missing {missing[:3]}, {len(unexpected)} unexpected "
                          f"{unexpected[:3]}, {len(reshaped)} of another shape {reshaped[:3]}")
    model.load_state_dict(state)
    return frozen(model.to(device)), preprocess, open_clip.get_tokenizer(model_name)


# ------------------------------------------------------------------------------------------------ aesthetic
class AestheticMLP(torch.nn.Module):
    """The LAION improved-aesthetic-predictor head, in its released layout (``layers.{0,2,4,6,7}``; the dropouts
    hold no weights): CLIP image embedding (768 for ViT-L/14) -> 1024 -> 128 -> 64 -> 16 -> 1, no activations."""

    def __init__(self, input_size: int = 768) -> None:
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(input_size, 1024), torch.nn.Dropout(0.2),
            torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64), torch.nn.Dropout(0.1),
            torch.nn.Linear(64, 16),
            torch.nn.Linear(16, 1),
        )

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        """(B, D) L2-normalised image embeddings -> (B,) aesthetic scores."""
        return self.layers(embedding).squeeze(-1)


@register_reward("aesthetic")
class AestheticReward:
    """The LAION improved aesthetic predictor: its MLP on the L2-normalised CLIP image embedding. Reads no text.

    Args:
        clip_path: local folder of the transformers CLIPModel it was trained on (``openai/clip-vit-large-patch14``;
            its processor is read from the same folder unless ``processor_path`` is given).
        mlp_path: local file of the MLP's state dict (``sac+logos+ava1-l14-linearMSE.pth``).
        processor_path, device, batch_size, dtype: as for :class:`PickScoreReward`.
    """

    name = "aesthetic"
    required_columns: tuple[str, ...] = ()

    def __init__(self, clip_path: str | None = None, mlp_path: str | None = None, processor_path: str | None = None,
                 device: str | None = None, batch_size: int = 16, dtype: str = "float32") -> None:
        check_batch_size(self.name, batch_size)
        mlp_file = local_path(self.name, "mlp_path", mlp_path, "the aesthetic MLP's state dict "
                              "(sac+logos+ava1-l14-linearMSE.pth)", folder=False)
        self.device = resolve_device(device)
        self.clip, self.processor = _load_hf_clip(self.name, clip_path, processor_path, "clip_path", self.device,
                                                  torch_dtype(self.name, dtype))
        self.mlp = cached(("aesthetic_mlp", str(mlp_file), self.device),
                          lambda: _load_mlp(self.name, mlp_file, self.clip.config.projection_dim, self.device))
        self.batch_size = batch_size

    def __call__(self, completions: list[Any], images: Sequence[Any] | None = None, **kwargs: Any) -> list[Any]:
        return per_chain_mean(images, [""] * len(completions), self.batch_size, lambda ims, _: self.score(ims))

    @torch.inference_mode()
    def score(self, images: list[Any]) -> list[float]:
        """The aesthetic score of each image."""
        pixels = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
        embedding = _features(self.clip.get_image_features(pixel_values=pixels.to(self.device, self.clip.dtype)))
        return self.mlp(F.normalize(embedding.float(), dim=-1)).tolist()


def _load_mlp(reward: str, path: Any, width: int, device: str) -> AestheticMLP:
    state = torch.load(path, map_location="cpu", weights_only=True)
    first = state.get("layers.0.weight") if isinstance(state, dict) else None
    if first is None:
        raise RewardError(f"reward {reward!r}: kwargs.mlp_path {str(path)!r} is not the aesthetic MLP's state dict "
                          f"(no 'layers.0.weight'; keys: {list(state)[:6] if isinstance(state, dict) else type(state)})")
    if first.shape[1] != width:
        raise RewardError(f"reward {reward!r}: the MLP in {path} takes {first.shape[1]}-wide embeddings, but the CLIP "
                          f"of kwargs.clip_path gives {width}-wide ones; they must be the pair it was trained on")
    mlp = AestheticMLP(first.shape[1])
    try:
        mlp.load_state_dict(state)
    except RuntimeError as e:
        raise RewardError(f"reward {reward!r}: {path} is not in the aesthetic MLP's layout: {e}") from e
    return frozen(mlp.to(device))
