"""A VLM judge: the probability that a local Qwen2.5-VL answers "Yes" to a question about the image.

The question is built per sample from a template over the row's columns; ``{answer}`` is the completion's
``<answer>`` text and ``{prompt}`` the prompt::

    rewards:
      functions:
        - name: vlm_judge
          kwargs: {model_path: /weights/Qwen2.5-VL-7B-Instruct,
                   question: "Does this image show {gt_prompt}? Please answer yes or no."}

Each image is put before the question in one user turn of the model's chat template, with the generation prompt
after it (``<|im_start|>assistant\\n``), and the answers are scored by teacher forcing, as VQAScore does (Lin et
al. 2024, "Evaluating Text-to-Visual Generation with Image-to-Text Generation"):

* ``normalize: vocab`` (default, VQAScore): ``P(yes) = prod_k softmax(logits_k)[yes_k]``, the probability of
  the answer's tokens under the full vocabulary (one token, "Yes", for Qwen's tokenizer);
* ``normalize: yes_no``: ``P(yes) / (P(yes) + P(no))`` with both computed as above, i.e. for one-token
  answers the softmax over the two logits [yes, no] only.

The model loads once per process (per path, device and dtype) and scores the images of a batch in batches of
``batch_size``, left-padded. It loads through ``transformers.AutoModelForImageTextToText`` and the processor's
chat template; it is tested with Qwen2.5-VL.

``model_path: policy`` judges with the policy's own understanding VLM as the reference (every adapter disabled,
or the frozen copy of a full fine-tune), so no second model is held in memory: the trainer hands the reward its
reference (:meth:`VLMJudgeReward.use_policy`) once the model is built. Families whose understanding model is a
transformers VLM with a processor offer it (``UnifiedModel.understanding_model``). Under ZeRO-3 every rank
scores the same number of batches (equal chains per rank), as the gathered weights need.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch

from .format import completion_text, extract_answer
from .pairs import cached, check_batch_size, frozen, local_path, per_chain_mean, resolve_device, torch_dtype
from .registry import RewardError, register_reward

__all__ = ["POLICY", "VLMJudgeReward"]

POLICY = "policy"
"""``kwargs.model_path`` that judges with the policy's own understanding VLM (as the reference)."""

_NORMALIZATIONS = ("vocab", "yes_no")
_SPECIAL_FIELDS = ("answer", "prompt")


@register_reward("vlm_judge")
class VLMJudgeReward:
    """P("Yes") of a local VLM to a templated question about each image (see the module docstring).

    Args:
        model_path: local folder of the judge (a Qwen2.5-VL checkpoint with its processor files), or
            ``policy``: the policy's own understanding VLM as the reference (bound by the trainer).
        question: ``str.format`` template over the row's columns, plus ``{answer}`` and ``{prompt}``.
        yes, no: the answers, as the model would write them right after the generation prompt.
        normalize: ``vocab`` (VQAScore: over the whole vocabulary) or ``yes_no`` (over the two answers).
        device, batch_size, dtype: as for :class:`rgpo.rewards.preference.PickScoreReward`.
    """

    name = "vlm_judge"

    def __init__(self, model_path: str | None = None, question: str = "Does this image show {gt_prompt}?",
                 yes: str = "Yes", no: str = "No", normalize: str = "vocab", device: str | None = None,
                 batch_size: int = 8, dtype: str = "float32") -> None:
        check_batch_size(self.name, batch_size)
        if normalize not in _NORMALIZATIONS:
            raise RewardError(f"reward {self.name!r}: kwargs.normalize must be one of {list(_NORMALIZATIONS)}, "
                              f"got {normalize!r}")
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(question) if f is not None]
        except ValueError as e:
            raise RewardError(f"reward {self.name!r}: kwargs.question {question!r} is not a format template: {e}") from e
        if any(not f.isidentifier() for f in fields):
            raise RewardError(f"reward {self.name!r}: kwargs.question may only use plain {{column}} fields, got "
                              f"{fields}")
        self.answers = {"yes": yes, "no": no}
        self.question, self.normalize, self.batch_size = question, normalize, batch_size
        self.required_columns = tuple(dict.fromkeys(f for f in fields if f not in _SPECIAL_FIELDS))
        self._reference = None  # model_path: policy -> the trainer's reference context, once bound
        self.model = self.processor = None
        if model_path == POLICY:
            return
        path = local_path(self.name, "model_path", model_path, "a Qwen2.5-VL checkpoint and its processor "
                          f"(or {POLICY!r}: the policy's own VLM)", folder=True)
        self.device = resolve_device(device)
        weights_dtype = torch_dtype(self.name, dtype)
        model, processor = cached(("vlm_judge", str(path), self.device, weights_dtype),
                                  lambda: _load(self.name, path, self.device, weights_dtype))
        self._bind(model, processor)

    def _bind(self, model: Any, processor: Any) -> None:
        self.model, self.processor = model, processor
        self.answer_ids = {}
        for key, text in self.answers.items():
            ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
            if not ids:
                raise RewardError(f"reward {self.name!r}: kwargs.{key} {text!r} is no token at all")
            self.answer_ids[key] = list(ids)

    def use_policy(self, reference: Callable[[], AbstractContextManager[Any]]) -> None:
        """Judge with the policy's understanding VLM as the reference: ``reference()`` is a context giving the
        model with every adapter disabled (the trainer's). Called by the trainer for ``model_path: policy``."""
        if self._reference is None and self.model is not None:
            return  # a judge with its own weights
        with reference() as model:
            understanding = model.understanding_model()
            if understanding is None:
                raise RewardError(f"reward {self.name!r}: kwargs.model_path={POLICY!r} needs a family with an "
                                  f"understanding VLM; family {model.family!r} has none (give a model_path)")
            vlm, processor = understanding
            self.device = str(next(vlm.parameters()).device)
            self._bind(None, processor)
        self._reference = reference

    def __call__(self, prompts: list[Any], completions: list[Any], images: Sequence[Any] | None = None,
                 **columns: Any) -> list[Any]:
        if self.processor is None:
            raise RewardError(f"reward {self.name!r}: kwargs.model_path={POLICY!r} judges with a training run's "
                              f"policy, which binds it; outside a run (rgpo sample, a reward server) give a "
                              f"model_path")
        questions = [self.question_for(i, prompts, completions, columns) for i in range(len(completions))]
        return per_chain_mean(images, questions, self.batch_size, self.score)

    def question_for(self, i: int, prompts: list[Any], completions: list[Any], columns: dict[str, Any]) -> str | None:
        """Sample ``i``'s question; None when a column it needs is None there (the reward does not apply)."""
        missing = [c for c in self.required_columns if c not in columns]
        if missing:
            raise RewardError(f"reward {self.name!r}: kwargs.question needs column(s) {missing}; the batch has "
                              f"{sorted(columns)}")
        values = {c: columns[c][i] for c in self.required_columns}
        if any(v is None for v in values.values()):
            return None
        text = completion_text(completions[i])
        answer = extract_answer(text)
        values.update(answer=text if answer is None else answer, prompt=completion_text(prompts[i]))
        return self.question.format(**values)

    # no_grad, not inference_mode: under ZeRO-3 the policy's weights are gathered into its own parameters here,
    # and tensors made in inference mode could not be updated by the training step afterwards.
    @torch.no_grad()
    def score(self, images: list[Any], questions: list[str]) -> list[float]:
        """P("Yes") for each image with the question at the same position."""
        if self._reference is None:
            return self._score(images, questions)
        tokenizer = self.processor.tokenizer
        side, tokenizer.padding_side = tokenizer.padding_side, "left"  # the policy's own processor: restored
        try:
            with self._reference() as model:
                self.model = model.understanding_model()[0]
                return self._score(images, questions)
        finally:
            self.model, tokenizer.padding_side = None, side

    def _score(self, images: list[Any], questions: list[str]) -> list[float]:
        texts = [self.processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
            tokenize=False, add_generation_prompt=True) for q in questions]
        inputs = self.processor(text=texts, images=[im.convert("RGB") for im in images], padding=True,
                                return_tensors="pt").to(self.device)
        logp = {key: self._log_prob(inputs, ids) for key, ids in self.answer_ids.items()
                if key == "yes" or self.normalize == "yes_no"}
        if self.normalize == "vocab":
            return logp["yes"].exp().tolist()
        return torch.stack([logp["yes"], logp["no"]], dim=-1).softmax(-1)[:, 0].tolist()

    def _log_prob(self, inputs: Any, answer: list[int]) -> torch.Tensor:
        """(B,) log-probability of the ``answer`` tokens after each (left-padded) prompt, by teacher forcing."""
        batch = dict(inputs)
        k = len(answer)
        if k > 1:  # the answer's first k-1 tokens go in; the k logits before each answer token come out
            tail = torch.tensor(answer[:-1], device=self.device).expand(batch["input_ids"].shape[0], -1)
            batch["input_ids"] = torch.cat([batch["input_ids"], tail], dim=1)
            batch["attention_mask"] = torch.cat([batch["attention_mask"], torch.ones_like(tail)], dim=1)
            if "mm_token_type_ids" in batch:  # text tokens: type 0
                batch["mm_token_type_ids"] = torch.cat([batch["mm_token_type_ids"], torch.zeros_like(tail)], dim=1)
        logits = self.model(**batch, logits_to_keep=k).logits[:, -k:].float()
        targets = torch.tensor(answer, device=self.device).expand(logits.shape[0], -1)
        return logits.log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1).sum(-1).cpu()


def _load(reward: str, path: Any, device: str, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(path, local_files_only=True)
        model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True, dtype=dtype)
    except Exception as e:
        raise RewardError(f"reward {reward!r}: cannot load a VLM and its processor from kwargs.model_path {str(path)!r} "
                          f"({type(e).__name__}: {e})") from e
    processor.tokenizer.padding_side = "left"  # the answers are read at the end of every row
    return frozen(model.to(device)), processor
