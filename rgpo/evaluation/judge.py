"""WISE's judge: its two rubrics, the prompt it sends with each image, how it reads the answer, and a local
vision-language model (a Qwen2.5-VL, or any ``AutoModelForImageTextToText`` folder) that answers it.

Followed exactly from the WISE repository (PKU-YuanGroup/WISE):

* ``legacy`` -- ``WISE_legacy/gpt_eval.py``: the paper's protocol (the one MindOmni's 0.71 is measured with, by
  GPT-4o-2024-05-13). Consistency, Realism and Aesthetic Quality each 0-2, read by ``extract_scores``: the last
  ``<Metric>: <digit>`` of each metric (markdown bold allowed, case-insensitive), else the first three lines that
  hold a bare 0, 1 or 2. The judge generated up to 2000 tokens at temperature 0.
* ``verified`` -- ``vllm_eval.py``: WISE_Verified, the repository's current default, written for an open judge
  (Qwen3.5-35B-A3B served by vLLM). One binary ``Score: 0|1``, read by the first ``Score: <0|1>`` match, else
  the one line that is a bare 0 or 1; ``<think>`` blocks are removed first; up to 500 tokens, temperature 0, the
  chat template's thinking switched off (``enable_thinking=False``).

WISE sends the image after the rubric text in the user turn, with a system turn of its own; so does this
module, with the image handed to the local model's processor instead of a base64 URL. WISE retries a judge call
up to 3 times when the answer cannot be read; a local judge decodes greedily, so a retry would repeat the same
answer: one call is made, and an answer that cannot be read is kept (with its raw text) and counted as
unparseable by :mod:`rgpo.evaluation.wise`, never dropped.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

LEGACY_SYSTEM = ("You are a professional Vincennes image quality audit expert, please evaluate the image quality "
                 "strictly according to the protocol.")

LEGACY_USER = """Please evaluate strictly and return ONLY the three scores as requested.

# Text-to-Image Quality Evaluation Protocol

## System Instruction
You are an AI quality auditor for text-to-image generation. Apply these rules with ABSOLUTE RUTHLESSNESS. Only images meeting the HIGHEST standards should receive top scores.

**Input Parameters**  
- PROMPT: [User's original prompt to]  
- EXPLANATION: [Further explanation of the original prompt] 
---

## Scoring Criteria

**Consistency (0-2):**  How accurately and completely the image reflects the PROMPT.
* **0 (Rejected):**  Fails to capture key elements of the prompt, or contradicts the prompt.
* **1 (Conditional):** Partially captures the prompt. Some elements are present, but not all, or not accurately.  Noticeable deviations from the prompt's intent.
* **2 (Exemplary):**  Perfectly and completely aligns with the PROMPT.  Every single element and nuance of the prompt is flawlessly represented in the image. The image is an ideal, unambiguous visual realization of the given prompt.

**Realism (0-2):**  How realistically the image is rendered.
* **0 (Rejected):**  Physically implausible and clearly artificial. Breaks fundamental laws of physics or visual realism.
* **1 (Conditional):** Contains minor inconsistencies or unrealistic elements.  While somewhat believable, noticeable flaws detract from realism.
* **2 (Exemplary):**  Achieves photorealistic quality, indistinguishable from a real photograph.  Flawless adherence to physical laws, accurate material representation, and coherent spatial relationships. No visual cues betraying AI generation.

**Aesthetic Quality (0-2):**  The overall artistic appeal and visual quality of the image.
* **0 (Rejected):**  Poor aesthetic composition, visually unappealing, and lacks artistic merit.
* **1 (Conditional):**  Demonstrates basic visual appeal, acceptable composition, and color harmony, but lacks distinction or artistic flair.
* **2 (Exemplary):**  Possesses exceptional aesthetic quality, comparable to a masterpiece.  Strikingly beautiful, with perfect composition, a harmonious color palette, and a captivating artistic style. Demonstrates a high degree of artistic vision and execution.

---

## Output Format

**Do not include any other text, explanations, or labels.** You must return only three lines of text, each containing a metric and the corresponding score, for example:

**Example Output:**
Consistency: 2
Realism: 1
Aesthetic Quality: 0

---

**IMPORTANT Enforcement:**

Be EXTREMELY strict in your evaluation. A score of '2' should be exceedingly rare and reserved only for images that truly excel and meet the highest possible standards in each metric. If there is any doubt, downgrade the score.

For **Consistency**, a score of '2' requires complete and flawless adherence to every aspect of the prompt, leaving no room for misinterpretation or omission.

For **Realism**, a score of '2' means the image is virtually indistinguishable from a real photograph in terms of detail, lighting, physics, and material properties.

For **Aesthetic Quality**, a score of '2' demands exceptional artistic merit, not just pleasant visuals.

--- 
Here are the Prompt and EXPLANATION for this evaluation:
PROMPT: "{prompt}"
EXPLANATION: "{explanation}"
Please strictly adhere to the scoring criteria and follow the template format when providing your results."""

VERIFIED_SYSTEM = ("You are a professional text-to-image quality auditor. Evaluate the image strictly according "
                   "to the protocol.")

VERIFIED_USER = """Please evaluate this generated image for the WISE benchmark and return ONLY one binary score.

# WISE Text-to-Image Evaluation Protocol

## What WISE Is Evaluating
WISE is a knowledge-intensive text-to-image benchmark. Many prompts do not directly state the final visual answer. Instead, the model must use commonsense, cultural, scientific, spatial, or temporal knowledge to infer what should appear in the image.

Your job is not to judge whether the image is beautiful. Your job is to judge whether the generated image correctly realizes the knowledge-based meaning of the prompt and is visually usable.

## Input Fields

**PROMPT**
The original text-to-image prompt given to the image generation model. It may contain an implicit clue rather than the explicit final answer.

**EXPLANATION**
The reference interpretation used for judging. It explains the intended answer, the required knowledge reasoning chain, and the visual evidence that should appear in a correct image. Treat EXPLANATION as the ground-truth judging guide.

For example:
- If PROMPT says "the round pastry commonly shared during Mid-Autumn Festival family gatherings", EXPLANATION may specify mooncakes. A correct image should show mooncakes, not just any festival food.
- If PROMPT says "a plant kept for many days beside a bright one-sided window", EXPLANATION may specify phototropism. A correct image should show the plant bending toward the light source.
- If PROMPT says "a street in New York when it is midnight in Beijing", EXPLANATION may specify the corresponding local time and expected lighting/activity. A correct image should reflect that inferred local time, not simply show Beijing or generic night.

## How To Judge

Evaluate the image using these checks:
1. Does the image contain the main objects or scene required by the PROMPT?
2. Does it satisfy the intended knowledge-based answer described in the EXPLANATION?
3. Are important relations correct, such as spatial layout, temporal state, physical effect, biological behavior, cultural object, or scientific phenomenon?
4. Is the image visually usable for judging, without obvious collapse, severe deformation, unreadable main objects, or major artifacts?

## Binary Score

**Score: 1**
Give 1 only when both conditions are met:
- The image is semantically correct according to both PROMPT and EXPLANATION.
- The image has no obvious generation failure that prevents reliable judging.

Minor aesthetic weakness, ordinary composition, non-photorealistic style, or lack of artistic beauty should not by itself cause rejection if the semantic target is correct and the image is clear.

**Score: 0**
Give 0 if any of the following applies:
- The image misses the intended answer in EXPLANATION.
- The image only follows surface words in PROMPT but fails the required knowledge inference.
- Key objects, attributes, states, behaviors, or relations are missing or wrong.
- The image contradicts the prompt or explanation.
- The main visual evidence is ambiguous enough that a human judge could not confidently verify correctness.
- The image has obvious visual collapse, severe deformation, garbled main objects, impossible structure, or artifacts that interfere with evaluation.

If there is serious doubt, return 0.

## Output Format

Return exactly one line and nothing else:

Score: 0

or

Score: 1

---

PROMPT: "{prompt}"
EXPLANATION: "{explanation}"

Return only `Score: 0` or `Score: 1`."""


def parse_legacy(text: str) -> dict[str, float] | None:
    """``WISE_legacy/gpt_eval.py:extract_scores``, then its check that all three keys were found: the scores, or
    None when the answer cannot be read."""
    matches = re.findall(r"\*{0,2}(Consistency|Realism|Aesthetic Quality)\*{0,2}\s*[::]?\s*(\d)", text, re.IGNORECASE)
    out = {key.lower().replace(" ", "_"): float(value) for key, value in matches}
    if not out:
        numbers = re.findall(r"(?m)^\s*([0-2])\s*$", text)
        if len(numbers) >= 3:
            out = {"consistency": float(numbers[0]), "realism": float(numbers[1]),
                   "aesthetic_quality": float(numbers[2])}
    return out if {"consistency", "realism", "aesthetic_quality"} <= out.keys() else None


def parse_verified(text: str) -> dict[str, float] | None:
    """``vllm_eval.py``: the think-block cleanup of ``_chat_completion_via_vllm``, then ``extract_scores``."""
    text = re.sub(r"<think>.*?</think>\s*", "", text, flags=re.DOTALL)
    text = re.sub(r"</think>\s*", "", text).strip()
    match = re.search(r"\*{0,2}Score\*{0,2}\s*[::]?\s*([01])\b", text, re.IGNORECASE)
    if match:
        return {"score": float(match.group(1))}
    numbers = re.findall(r"(?m)^\s*([01])\s*$", text)
    return {"score": float(numbers[0])} if len(numbers) == 1 else None


def legacy_wiscore(scores: dict[str, float]) -> float:
    """``WISE_legacy/Calculate.py:calculate_wiscore``: (0.7 C + 0.2 R + 0.1 A) / 2, in [0, 1] for scores in 0-2."""
    return (0.7 * scores["consistency"] + 0.2 * scores["realism"] + 0.1 * scores["aesthetic_quality"]) / 2


@dataclass(frozen=True)
class Protocol:
    """One WISE rubric: what the judge is asked, how its answer is read and weighed."""

    name: str
    system: str
    user: str  # with {prompt} and {explanation}
    parse: Callable[[str], dict[str, float] | None]
    wiscore: Callable[[dict[str, float]], float]
    category_weights: dict[str, float]  # the overall score's weight of each category
    max_new_tokens: int  # the judge's answer budget in WISE's script

    def question(self, prompt: str, explanation: str) -> str:
        return self.user.format(prompt=prompt, explanation=explanation)


PROTOCOLS: dict[str, Protocol] = {
    # WISE_legacy/Calculate.py: the overall weights of the paper.
    "legacy": Protocol("legacy", LEGACY_SYSTEM, LEGACY_USER, parse_legacy, legacy_wiscore,
                       {"cultural": 0.4, "time": 0.167, "space": 0.133, "biology": 0.1, "physics": 0.1,
                        "chemistry": 0.1}, 2000),
    # calculate_verified.py: every category but culture weighs 0.12.
    "verified": Protocol("verified", VERIFIED_SYSTEM, VERIFIED_USER, parse_verified, lambda s: float(s["score"]),
                         {"cultural": 0.4, "time": 0.12, "space": 0.12, "biology": 0.12, "physics": 0.12,
                          "chemistry": 0.12}, 500),
}


def get_protocol(name: str) -> Protocol:
    try:
        return PROTOCOLS[name]
    except KeyError:
        raise ValueError(f"unknown WISE protocol {name!r}; choose one of {sorted(PROTOCOLS)}") from None


class JudgeError(ValueError):
    """The judge folder cannot be used: the message names the folder and what it lacks."""


DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def check_judge_folder(path: str | Path) -> Path:
    """The judge folder, checked before anything heavy loads: it must hold a model config and a processor."""
    folder = Path(path)
    if not folder.is_dir():
        raise JudgeError(f"judge folder {str(folder)!r} does not exist (a local Qwen2.5-VL-style model folder: "
                         "config.json, the weights, the tokenizer and processor files)")
    lacking = [name for name in ("config.json",) if not (folder / name).is_file()]
    if not any((folder / name).is_file() for name in ("preprocessor_config.json", "processor_config.json")):
        lacking.append("preprocessor_config.json or processor_config.json")
    if lacking:
        raise JudgeError(f"judge folder {str(folder)!r} lacks {lacking}: it must be a vision-language model saved "
                         "with save_pretrained (model and processor)")
    return folder


class VLMJudge:
    """A local vision-language model that answers WISE's question about one image, greedily, loaded once.

    ``device``: where the judge runs (``cpu``, ``cuda:1``, ...), so it can stay off the policy's GPU."""

    def __init__(self, path: str | Path, *, device: str | torch.device = "cpu", dtype: str = "bfloat16",
                 batch_size: int = 4, max_new_tokens: int | None = None):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        folder = check_judge_folder(path)
        if dtype not in DTYPES:
            raise JudgeError(f"judge dtype {dtype!r} is not one of {sorted(DTYPES)}")
        self.path = str(folder)
        self.device = torch.device(device)
        self.batch_size = max(1, batch_size)
        self.max_new_tokens = max_new_tokens
        self.model = AutoModelForImageTextToText.from_pretrained(self.path, dtype=DTYPES[dtype]).to(self.device)
        self.model.eval().requires_grad_(False)
        self.processor = AutoProcessor.from_pretrained(self.path)
        self.processor.tokenizer.padding_side = "left"  # generation appends to the right end of every row
        # WISE_Verified switches a thinking judge's reasoning off; a template without the switch is left as is
        # (an unknown template variable would be handed on to the processor).
        self.template_kwargs = {"enable_thinking": False} if "enable_thinking" in str(
            self.processor.chat_template or "") else {}

    def conversation(self, protocol: Protocol, prompt: str, explanation: str) -> str:
        """The judge's input text for one image: WISE's system turn, then its question followed by the image."""
        messages = [{"role": "system", "content": [{"type": "text", "text": protocol.system}]},
                    {"role": "user", "content": [{"type": "text", "text": protocol.question(prompt, explanation)},
                                                 {"type": "image"}]}]
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                  **self.template_kwargs)

    @torch.no_grad()
    def answer(self, protocol: Protocol, items: Sequence[tuple[str, str, Image.Image]]) -> list[str]:
        """The judge's raw answer for each ``(prompt, explanation, image)``, in batches of ``batch_size``."""
        answers: list[str] = []
        budget = self.max_new_tokens or protocol.max_new_tokens
        for start in range(0, len(items), self.batch_size):
            batch = items[start : start + self.batch_size]
            texts = [self.conversation(protocol, prompt, explanation) for prompt, explanation, _ in batch]
            enc = self.processor(text=texts, images=[image.convert("RGB") for _, _, image in batch], padding=True,
                                 return_tensors="pt").to(self.device)
            out = self.model.generate(**enc, max_new_tokens=budget, do_sample=False)
            new = out[:, enc["input_ids"].shape[1]:]
            answers += [a.strip() for a in self.processor.batch_decode(new, skip_special_tokens=True)]
        return answers
