"""Every-step invariants: the ways an RL run trains on nothing while its logs look healthy, caught within a step.

Each check is a pure function of tensors (and plain lists) that returns a :class:`Finding` or None; it holds no
trainer, reads no config and logs nothing. :class:`StepGuards` is the small stateful part the trainer calls at
the seams of its step (rollout -> score -> advantages -> update); it keeps the streaks ("K steps in a row"), the
first probe of the reference and a fixed sample of parameters, and turns findings into:

- an ERROR (:class:`GuardError`) when the finding is a certainty: what failed, where (step, rank, sample, reward)
  and the likely cause, naming the ``guards.<key>`` that sets its threshold;
- a WARNING when it is a symptom: printed once per kind on rank 0 and returned as ``guard/<name>`` metrics every
  step it holds (so it lands in wandb and ``metrics.jsonl``).

What is compared (``N`` chains on the rank, ``T`` completion tokens, ``G`` group size, ``R`` rewards):

- on-policy ratio: on the first pass over a step's chains the weights are those that sampled them, so the
  update's log-probs must equal the rollout's: mean over a chain's tokens of ``|logp - logp_old|`` (text) and
  ``sqrt(2 approx_kl)`` (image SDE steps) must stay below ``guards.ratio_tolerance``;
- advantage alignment: ``sign(A_i) == sign(r_i - mean_group(r))`` for every chain whose reward deviates from its
  group's mean (a shuffled advantage / log-prob pairing breaks it);
- the reference: its log-probs on the first step's first chain, recomputed every ``reference_probe_every``
  steps, must not move by more than ``guards.reference_tolerance``;
- parameters: a fixed sample of trainable tensors must change after an applied optimizer step with a non-zero
  gradient norm, and a fixed sample of frozen ones never;
- the loss: its gradient with respect to the advantages must be non-zero where an advantage is.

The thresholds live in :class:`rgpo.config.GuardsConfig` (``guards:`` in the YAML; ``guards.enabled=false`` turns
every check off).
"""

from __future__ import annotations

import functools
import hashlib
import math
import zlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch

from rgpo import distributed as dist_utils


class GuardError(RuntimeError):
    """A step that would train on nothing (or on the wrong thing): the run stops with what failed and where."""


@dataclass(frozen=True)
class Finding:
    """One check's verdict: ``name`` (``guard/<name>`` in the logs), ``message`` (what, where, likely cause),
    ``error`` (stop the run) or a warning, and ``value``, the measured figure logged for a warning."""

    name: str
    message: str
    error: bool = True
    value: float = 1.0


# The fault classes StepGuards catches (tests/test_guards.py proves each with an injected fault).
FAULT_CLASSES = {
    "on_policy_ratio": "rollout and update disagree on the first pass (text tokens, image SDE steps)",
    "reward_none / reward_constant": "a reward returning only None for a step, or one value for K steps",
    "zero_spread": "every group without reward spread for K steps",
    "missing_image / constant_images": "a chain without its image; constant, black or NaN-decoded images",
    "condition": "a condition empty, non-finite, of the wrong row count, or longer than its chain",
    "reference_drift": "the reference's log-probs on a fixed probe changing",
    "parameters": "trainable tensors unchanged after an applied step; frozen ones changed",
    "zero_grad": "gradient norm exactly zero for K steps",
    "truncated / no_answer": "most chains cut at max_new_tokens; chains with no text",
    "entropy / kl": "entropy collapse, text KL blow-up",
    "tokenizer": "tokenizer or chat template differing from the checkpoint's, on resume",
    "ranks": "ranks disagreeing on the step, the prompt order or the rewards' shape",
    "table_images": "a rollout table whose image column lost the images",
    "advantage_alignment": "advantages paired with the wrong chains",
    "loss_advantages": "the update's loss not depending on the advantages",
    "reward_batch": "a reward answering for the wrong batch size (rgpo.rewards.combine)",
}


# ================================================================================================ pure checks
def on_policy_ratio(logps: torch.Tensor, old_logps: torch.Tensor, mask: torch.Tensor, tolerance: float,
                    rows: Sequence[int] | None = None) -> Finding | None:
    """(B, T) update log-probs vs the rollout's on an on-policy pass: the chain with the largest mean
    ``|logp - old|`` over its tokens, if above ``tolerance``. ``rows``: the chains' indices on the rank."""
    m = mask.to(torch.float32)
    per_row = ((logps.detach().float() - old_logps.float()).abs() * m).sum(1) / m.sum(1).clamp(min=1.0)
    worst = int(per_row.argmax()) if per_row.numel() else 0
    value = float(per_row[worst]) if per_row.numel() else 0.0
    if not value > tolerance and math.isfinite(value):
        return None
    sample = rows[worst] if rows is not None else worst
    return Finding("on_policy_ratio", f"the update's log-probs differ from the rollout's on the first, on-policy pass: "
                   f"sample {sample} has mean |log ratio| {value:.3g} > guards.ratio_tolerance={tolerance:g}. Likely "
                   f"cause: rollout and update compute different things (dtype, train/eval mode with dropout, a "
                   f"cache, another condition or padding), or the rollout's log-probs belong to other chains")


def image_on_policy_ratio(approx_kl: float, tolerance: float) -> Finding | None:
    """The image loss's ``approx_kl = mean (logp - old)^2 / 2`` over the recorded SDE steps of an on-policy pass:
    its root-mean-square log ratio ``sqrt(2 approx_kl)`` above ``tolerance``."""
    rms = math.sqrt(max(0.0, 2.0 * float(approx_kl))) if math.isfinite(float(approx_kl)) else float("inf")
    if rms <= tolerance:
        return None
    return Finding("on_policy_ratio", f"the image SDE steps' recomputed log-probs differ from the recorded ones on the "
                   f"first, on-policy pass: rms log ratio {rms:.3g} > guards.ratio_tolerance={tolerance:g}. Likely "
                   f"cause: sampling and update evaluate the generator differently (another condition, guidance "
                   f"negative, cache or padding of the rows)")


def rewards_never_applied(per_reward: torch.Tensor, names: Sequence[str]) -> list[int]:
    """(N, R) rewards (NaN where one returned None): the columns that are NaN for every chain."""
    return [j for j in range(per_reward.shape[1]) if bool(torch.isnan(per_reward[:, j]).all())]


def constant_rewards(per_reward: torch.Tensor) -> dict[int, float]:
    """(N, R): ``{column: value}`` for the rewards whose applicable values are all one number this step."""
    out = {}
    for j in range(per_reward.shape[1]):
        col = per_reward[:, j]
        valid = col[~torch.isnan(col)]
        if valid.numel() > 1 and bool((valid == valid[0]).all()):
            out[j] = float(valid[0])
    return out


def group_spread(totals: torch.Tensor, group_size: int, eps: float = 1e-6) -> float:
    """(N,) weighted totals in group order: the share of groups with a reward spread (std) above ``eps``."""
    std = totals.float().view(-1, group_size).std(dim=1)
    return float((std > eps).float().mean())


def group_deviations(totals: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N,) ``r_i - mean_group(r)`` in group order."""
    grouped = totals.float().view(-1, group_size)
    return (grouped - grouped.mean(1, keepdim=True)).view(-1)


def advantage_alignment(advantages: torch.Tensor, deviations: torch.Tensor, rows: Sequence[int],
                        eps: float = 1e-5) -> Finding | None:
    """(B,) advantages of chains ``rows`` vs (B,) their rewards' deviations from their group's mean: every
    normalisation rgpo offers keeps the sign, so a chain above its group's mean with a negative advantage (or
    below it with a positive one) was paired with another chain's advantage."""
    a, d = advantages.detach().float().cpu(), deviations.float().cpu()
    wrong = ((d.abs() > eps) & (torch.sign(a) != torch.sign(d))).nonzero().flatten().tolist()
    if not wrong:
        return None
    i = wrong[0]
    return Finding("advantage_alignment", f"{len(wrong)} of {len(rows)} chains have an advantage whose sign "
                   f"contradicts their reward: sample {rows[i]} is {float(d[i]):+.4g} from its group's mean but "
                   f"gets advantage {float(a[i]):+.4g}. Likely cause: advantages and chains out of alignment "
                   f"(indexing in global vs rank order, a shuffled or re-sorted batch)")


def image_findings(images: Sequence[Sequence[Any]], slots: Sequence[int]) -> list[Finding]:
    """Each chain's images (PIL) vs its image slots: a chain with slots and no image is an error; images that are
    one colour (all black, or NaN latents, which decode to black) an error when every image is, else a warning
    with their share."""
    missing = [i for i, (ims, s) in enumerate(zip(images, slots)) if s > 0 and not ims]
    out = []
    if missing:
        out.append(Finding("missing_image", f"{len(missing)} of {len(images)} chains drew no image although they "
                           f"hold an image slot (first: sample {missing[0]}). Likely cause: the image side was "
                           f"skipped or its output lost between sampling and scoring"))
    flat = [(i, im) for i, ims in enumerate(images) for im in ims]
    if not flat:
        return out
    constant = [(i, im) for i, im in flat if _one_colour(im)]
    if constant:
        i, im = constant[0]
        black = all(hi == 0 for _, hi in _extrema(im))
        what = "all black (NaN latents decode to black)" if black else "one colour"
        message = (f"{len(constant)} of {len(flat)} images are constant, e.g. sample {i}'s is {what}. Likely cause: "
                   f"a NaN or zero condition or latent, a broken decoder, or a dtype overflow")
        out.append(Finding("constant_images", message, error=len(constant) == len(flat),
                           value=len(constant) / len(flat)))
    return out


def _extrema(image) -> list[tuple[int, int]]:
    ext = image.getextrema()
    return list(ext) if isinstance(ext[0], tuple) else [ext]


def _one_colour(image) -> bool:
    return all(lo == hi for lo, hi in _extrema(image))


def condition_findings(condition: Any, num_chains: int, what: str = "policy") -> Finding | None:
    """An opaque condition (a :class:`~rgpo.models.base.Condition` or a family's subclass) for ``num_chains``
    chains: one row per chain in every tensor it holds, every float finite, and no row whose ``mask`` (when it
    has one) is empty."""
    tensors = {k: v for k, v in condition.items() if isinstance(v, torch.Tensor)}
    for key, t in tensors.items():
        if t.dim() == 0 or t.shape[0] != num_chains:
            return Finding("condition", f"the {what} condition's {key} has shape {tuple(t.shape)}, not one row for "
                           f"each of the {num_chains} chains. Likely cause: the forward returned the conditions of "
                           f"another batch, or the family's Condition.select / repeat_interleave lost rows")
        # one reduction (a NaN or inf anywhere makes the sum non-finite); rows are looked at only on failure
        if t.is_floating_point() and t.numel() and not math.isfinite(float(t.float().sum())):
            bad = (~torch.isfinite(t)).flatten(1).any(1).nonzero().flatten().tolist()
            return Finding("condition", f"the {what} condition's {key} is NaN/inf for {len(bad)} chain(s) (first: "
                           f"sample {bad[0]}). Likely cause: an overflow in the language model (float16), or NaN "
                           f"weights")
    mask = tensors.get("mask")
    if mask is not None and mask.dim() >= 2:
        empty = (mask.flatten(1).sum(1) == 0).nonzero().flatten().tolist()
        if empty:
            return Finding("condition", f"the {what} condition is empty (mask all 0) for {len(empty)} chain(s) "
                           f"(first: sample {empty[0]}): their images are drawn from nothing. Likely cause: the "
                           f"condition was cut before the chain's tokens (condition_lengths, padding side)")
    return None


def condition_length_findings(condition_lengths: torch.Tensor, completion_mask: torch.Tensor) -> Finding | None:
    """``condition_lengths`` (N,) must lie in ``[0, tokens of the chain]``: a condition longer than its chain
    reads padding or another chain's tokens."""
    lengths = completion_mask.sum(1).to(condition_lengths.device)
    bad = ((condition_lengths < 0) | (condition_lengths > lengths)).nonzero().flatten().tolist()
    if not bad:
        return None
    i = bad[0]
    return Finding("condition", f"{len(bad)} chain(s) claim a condition longer than the chain: sample {i} has "
                   f"condition_lengths={int(condition_lengths[i])} for {int(lengths[i])} completion tokens. Likely "
                   f"cause: the family's generate counted the image slot wrongly, or completions were re-padded")


def reference_drift(now: torch.Tensor, first: torch.Tensor, mask: torch.Tensor, tolerance: float) -> Finding | None:
    """(B, T) the reference's log-probs on the probe batch now vs at the first step: max |difference| over the
    completion tokens above ``tolerance``."""
    diff = float(((now.float() - first.float()).abs() * mask.to(torch.float32)).max()) if mask.numel() else 0.0
    if diff <= tolerance:
        return None
    return Finding("reference_drift", f"the reference's log-probs on the fixed probe chain moved by {diff:.3g} "
                   f"(> guards.reference_tolerance={tolerance:g}) since the first step. Likely cause: the reference "
                   f"is not frozen (adapters not disabled, weights shared with the policy, a trained part without "
                   f"its frozen copy), so the KL and the image regulariser pull towards a moving target")


def parameter_findings(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor],
                       trainable: set[str]) -> list[Finding]:
    """Samples of the same tensors before and after an applied optimizer step with a non-zero gradient: every
    sampled trainable one unchanged, or any frozen one changed, is an error."""
    out = []
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    sampled = [n for n in before if n in trainable]
    if sampled and not moved & set(sampled):
        out.append(Finding("parameters", f"none of the {len(sampled)} sampled trainable tensors changed after an "
                           f"applied optimizer step with a non-zero gradient (e.g. {sampled[0]}). Likely cause: the "
                           f"optimizer holds other tensors than the model (parameters replaced after "
                           f"deepspeed.initialize), a zero learning rate, or weights reloaded each step"))
    frozen_moved = sorted(moved - trainable)
    if frozen_moved:
        out.append(Finding("parameters", f"{len(frozen_moved)} frozen tensor(s) changed in a step (e.g. "
                           f"{frozen_moved[0]}). Likely cause: a part meant to stay frozen is in the optimizer or is "
                           f"written in place (a buffer-like weight, an EMA, a shared tensor)"))
    return out


def rank_agreement(per_rank: Sequence[dict[str, Any]], group_size: int) -> Finding | None:
    """Each rank's ``{"rank", "step", "rewards" (R), "indices" (global chain indices), "prompts" (a key per
    chain)}``: every rank on the same step with the same rewards, the indices a permutation of the whole batch,
    and every group's chains of one prompt."""
    steps = {r["rank"]: r["step"] for r in per_rank}
    if len(set(steps.values())) > 1:
        return Finding("ranks", f"ranks are on different steps {steps}. Likely cause: a rank skipped or repeated a "
                       f"step (a resume that restored another step, an exception swallowed on one rank)")
    shapes = {r["rank"]: r["rewards"] for r in per_rank}
    if len(set(shapes.values())) > 1:
        return Finding("ranks", f"ranks score with different numbers of rewards {shapes}: the gathered (N, R) reward "
                       f"matrix would mix columns. Likely cause: rewards resolved differently per rank")
    sizes = {r["rank"]: len(r["indices"]) for r in per_rank}
    indices = [i for r in per_rank for i in r["indices"]]
    if sorted(indices) != list(range(len(indices))):
        dup = sorted({i for i in indices if indices.count(i) > 1})[:5]
        return Finding("ranks", f"the ranks' chain indices ({sizes} chains per rank) are not one permutation of the "
                       f"step's {len(indices)} chains (repeated: {dup}). Likely cause: ranks disagree on the prompt "
                       f"order (a sampler seeded or resumed differently per rank)")
    prompts: dict[int, dict[Any, int]] = {}
    for r in per_rank:
        for i, key in zip(r["indices"], r["prompts"]):
            prompts.setdefault(i // group_size, {}).setdefault(key, r["rank"])
    mixed = {g: sorted(set(keys.values())) for g, keys in prompts.items() if len(keys) > 1}
    if mixed:
        g = min(mixed)
        return Finding("ranks", f"group {g} holds chains of {len(prompts[g])} different prompts (ranks {mixed[g]}): "
                       f"its advantages compare unrelated chains. Likely cause: ranks disagree on the step's prompt "
                       f"order")
    return None


def loss_uses_advantages(advantages: torch.Tensor, gradient: torch.Tensor | None, eps: float = 1e-12
                         ) -> Finding | None:
    """The update's loss must depend on the advantages: ``gradient`` is d(loss)/d(advantages) accumulated over the
    step's micro-batches; where a chain's advantage is non-zero it is non-zero too (the policy-gradient term is
    ``-A_i * ratio``, whose derivative in ``A_i`` is minus the chain's token weight). A loss that never saw the
    advantages (detached, replaced by a constant, read from the wrong tensor) trains toward nothing."""
    moving = advantages.detach().abs() > eps
    if not bool(moving.any()):
        return None
    if gradient is not None and not bool(torch.isfinite(gradient[moving]).all()):
        return None  # a NaN/inf backward: the step is skipped and counted as non-finite, not judged here
    if gradient is not None and bool((gradient[moving].abs() > 0).any()):
        return None
    return Finding("loss_advantages", f"the update's loss does not depend on the advantages ({int(moving.sum())} "
                   "chains with a non-zero advantage, gradient 0 for every one). Likely cause: the advantages were "
                   "detached or replaced before the policy-gradient term (a custom loss, a reward shaping hook)")


def table_images(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> Finding | None:
    """A rollout table with an ``image`` column: every row must carry an image there."""
    if "image" not in columns:
        return Finding("table_images", "the rollout table has no image column although the run draws images")
    k = list(columns).index("image")
    empty = [i for i, row in enumerate(rows) if row[k] is None or not hasattr(row[k], "size")]
    if not empty:
        return None
    return Finding("table_images", f"{len(empty)} of {len(rows)} rows of the rollout table lost their image (first: "
                   f"row {empty[0]}). Likely cause: images dropped between the rollout and the log (a gather, a "
                   f"conversion that returned None)")


def tokenizer_fingerprint(model: Any) -> str | None:
    """A hash of the model's tokenizer (vocabulary, special tokens) and chat template; None when the model
    exposes no ``tokenizer``."""
    tok = getattr(model, "tokenizer", None)
    if tok is None or not hasattr(tok, "get_vocab"):
        return None
    processor = getattr(model, "processor", None)
    template = getattr(processor, "chat_template", None) or getattr(tok, "chat_template", None)
    h = hashlib.sha256()
    h.update(repr(sorted(tok.get_vocab().items())).encode())
    h.update(repr(sorted((k, str(v)) for k, v in getattr(tok, "special_tokens_map", {}).items())).encode())
    h.update(repr(template).encode())
    return h.hexdigest()[:16]


def threshold(value: float | None, name: str, above: float | None = None, below: float | None = None,
              message: str = "") -> Finding | None:
    """A warning when ``value`` is above ``above`` or below ``below`` (None: not measured this step)."""
    if value is None or not math.isfinite(value):
        return None
    if (above is not None and value > above) or (below is not None and value < below):
        return Finding(name, message.format(value=value), error=False, value=float(value))
    return None


# ================================================================================================ the stateful part
def _on_every_rank(seam):
    """A seam whose GuardError stops every rank, not only the one that found it: the other ranks would otherwise
    wait in the next collective until its timeout (one all-reduce of a flag per seam, when there are ranks)."""

    @functools.wraps(seam)
    def agreed(self, *args, **kwargs):
        if not self.cfg.enabled:
            return seam(self, *args, **kwargs)
        error, result = None, None
        try:
            result = seam(self, *args, **kwargs)
        except GuardError as e:
            error = e
        failed = dist_utils.failed_ranks(error is not None, self.device)
        if error is not None:
            raise error
        if failed:
            raise GuardError(f"a guard failed at step {self._last_step} on rank(s) {failed} (the message is in that "
                             f"rank's output); rank {self.rank} stops with it")
        return result

    return agreed


class StepGuards:
    """The checks at the step's seams, with their streaks, the reference probe and the parameter sample.

    ``cfg``: :class:`rgpo.config.GuardsConfig`; ``group_size``, ``max_new_tokens``, ``reward_names``: the run's;
    ``model``: the policy (its tokenizer and the parameter sample are read at construction); ``resume_state``:
    the checkpoint state being resumed (its tokenizer fingerprint is compared now)."""

    def __init__(self, cfg, *, rank: int, group_size: int, reward_names: Sequence[str], model: Any = None,
                 resume_state: dict | None = None, device: torch.device | str = "cpu"):
        self.cfg, self.rank, self.G, self.names = cfg, rank, group_size, list(reward_names)
        self.device = torch.device(device)  # where the ranks' agreement on a failure is all-reduced
        self.streaks: dict[str, int] = {}
        self._warned: set[str] = set()
        self._warnings: dict[str, float] = {}
        self._seen_rows: set[int] = set()
        self._deviations: torch.Tensor | None = None
        self._probe: tuple | None = None
        self._before: dict[str, torch.Tensor] = {}
        self._last_step = -1
        self.caught: dict[str, int] = {}
        self.fingerprint = tokenizer_fingerprint(model) if model is not None else None
        self._params = self._sample_parameters(model) if model is not None and cfg.enabled else {}
        self._trainable = {n for n, p in self._params.items() if p.requires_grad}
        if cfg.enabled and resume_state is not None:
            saved = resume_state.get("tokenizer_fingerprint")
            if saved is not None and self.fingerprint is not None and saved != self.fingerprint:
                self._raise(Finding("tokenizer", f"the model's tokenizer / chat template (fingerprint "
                                    f"{self.fingerprint}) differs from the one the checkpoint was trained with "
                                    f"({saved}). Likely cause: model.path points at another tokenizer or processor "
                                    f"version; resuming would score and train on other token ids"),
                            step=int(resume_state.get("step", 0)))

    # ------------------------------------------------------------------------------------------- helpers
    def _raise(self, finding: Finding, step: int) -> None:
        self.caught[finding.name] = self.caught.get(finding.name, 0) + 1
        raise GuardError(f"guard {finding.name} failed at step {step} on rank {self.rank}: {finding.message}")

    def _handle(self, finding: Finding | None, step: int) -> None:
        if finding is None:
            return
        if finding.error:
            self._raise(finding, step)
        self.caught[finding.name] = self.caught.get(finding.name, 0) + 1
        self._warnings[finding.name] = finding.value
        if self.rank == 0 and finding.name not in self._warned:
            self._warned.add(finding.name)
            print(f"[rgpo] guard warning at step {step} ({finding.name}, shown once): {finding.message}", flush=True)

    def _streak(self, name: str, holds: bool) -> int:
        self.streaks[name] = self.streaks.get(name, 0) + 1 if holds else 0
        return self.streaks[name]

    def _sample_parameters(self, model) -> dict[str, torch.nn.Parameter]:
        """An evenly spaced, fixed sample of ``guards.parameter_sample`` trainable and as many frozen tensors."""
        k = self.cfg.parameter_sample
        if k <= 0:
            return {}
        named = sorted(model.named_parameters())
        out = {}
        trainable = [x for x in named if x[1].requires_grad]
        step = max(1, len(trainable) // k)
        # Each pick with its neighbour: a LoRA's lora_A gets no gradient while its lora_B is still zero (the first
        # step), so a sample of A's alone would look unchanged; sorted names put each B right after its A.
        for i in range(0, len(trainable), step)[:k]:
            out.update(dict(trainable[i : i + 2]))
        frozen = [x for x in named if not x[1].requires_grad]
        out.update(dict(frozen[:: max(1, len(frozen) // k)][:k]))
        return out

    def _snapshot(self) -> dict[str, torch.Tensor]:
        """The first 4096 elements of each sampled tensor (the local shard under ZeRO-3)."""
        out = {}
        for name, p in self._params.items():
            data = getattr(p, "ds_tensor", None)
            data = p.data if data is None else data
            out[name] = data.detach().reshape(-1)[:4096].clone()
        return out

    # ------------------------------------------------------------------------------------------- the seams
    @_on_every_rank
    def after_rewards(self, step: int, rollout, per_reward: torch.Tensor, weights: Sequence[float],
                      reference: Callable[[], AbstractContextManager[Any]] | None = None,
                      images_on: bool = False) -> None:
        """After scoring, before the advantages and the update (``step``: the step being run, as logged): ranks,
        images, conditions, rewards, the reference probe; takes the parameter sample the update is checked
        against. ``reference()``: a context giving the model as the reference. Raises GuardError."""
        if not self.cfg.enabled:
            return
        cfg = self.cfg
        self._warnings, self._seen_rows, self._last_step = {}, set(), step
        n = len(rollout.rows)
        # 12 / 15: ranks agree, and the reward matrix has one row per chain and one column per reward. Every
        # collective of this seam (this gather, the reference probe) runs before any check that only this rank can
        # fail, so a failure here never leaves another rank waiting in one (see _on_every_rank).
        mine = {"rank": self.rank, "step": step, "rewards": int(per_reward.shape[1]),
                "indices": list(rollout.global_indices),
                "prompts": [zlib.crc32(f"{r.source}\n{r.prompt}".encode()) for r in rollout.rows],
                "per_reward": per_reward.float().cpu(), "empty": sum(not t.strip() for t in rollout.completions.texts)}
        per_rank = dist_utils.all_gather_objects(mine)
        if per_reward.shape != (n, len(self.names)):
            self._raise(Finding("reward_batch", f"the rewards came back as {tuple(per_reward.shape)} for {n} chains "
                                f"and {len(self.names)} rewards. Likely cause: scoring skipped chains or rewards"),
                        step)
        self._handle(rank_agreement(per_rank, self.G), step)
        order = torch.tensor([i for r in per_rank for i in r["indices"]])
        everything = torch.cat([r["per_reward"] for r in per_rank])
        ordered = torch.empty_like(everything)
        ordered[order] = everything
        totals = torch.nansum(ordered * torch.tensor(list(weights), dtype=torch.float32), 1)
        self._deviations = group_deviations(totals, self.G)[torch.tensor(rollout.global_indices)]
        # 2: rewards that never applied, or one value for K steps
        never = rewards_never_applied(ordered, self.names)
        for j, name in enumerate(self.names):
            if self._streak(f"none/{name}", j in never) >= cfg.reward_none_steps > 0:
                self._raise(Finding("reward_none", f"reward {name!r} returned None for every one of the "
                                    f"{ordered.shape[0]} chains ({self.streaks[f'none/{name}']} step(s) in a row): it "
                                    f"contributes nothing. Likely cause: a column it needs is empty, an image it "
                                    f"scores is missing, or a shaping rule that never applies"), step)
        constant = constant_rewards(ordered)
        for j, name in enumerate(self.names):
            if self._streak(f"constant/{name}", j in constant) >= cfg.symptom_steps > 0:
                self._handle(Finding(f"reward_constant/{name}", f"reward {name!r} gave the same value {constant[j]:g} "
                                     f"to every chain for {self.streaks[f'constant/{name}']} steps: it ranks nothing. "
                                     f"Likely cause: a shaping rule or threshold that zeroes it, inputs it cannot "
                                     f"see (images, a column)", error=False, value=constant[j]), step)
        # 3: no group with spread for K steps
        spread = group_spread(totals, self.G)
        if self._streak("zero_spread", spread == 0.0) >= cfg.zero_spread_steps > 0:
            self._raise(Finding("zero_spread", f"every group had zero reward spread for {self.streaks['zero_spread']} "
                                f"steps in a row: every advantage is 0, nothing is learnt (guards.zero_spread_steps="
                                f"{cfg.zero_spread_steps}). Likely cause: rewards that ignore the chains, prompts all "
                                f"too hard or too easy, a weight of 0"), step)
        # 9: chains with no text at all
        empty = sum(r["empty"] for r in per_rank) / max(1, ordered.shape[0])
        if self._streak("no_answer", empty > cfg.no_answer_share) >= cfg.symptom_steps > 0:
            self._handle(Finding("no_answer", f"{empty:.0%} of the chains are empty for {self.streaks['no_answer']} "
                                 f"steps (guards.no_answer_share={cfg.no_answer_share})", error=False, value=empty),
                         step)
        # 6: the reference on a fixed probe chain
        completions = rollout.completions
        if reference is not None and cfg.reference_probe_every > 0:
            def reference_logps(prompts, comps) -> torch.Tensor:
                with torch.no_grad(), reference() as ref_model:
                    return ref_model.forward_text(prompts, comps, with_condition=False).logps

            if self._probe is None:
                prompts, comps = rollout.prompts.select([0]), completions.select([0])
                self._probe = (prompts, comps, reference_logps(prompts, comps).detach().clone())
            elif step % cfg.reference_probe_every == 0:
                prompts, comps, first = self._probe
                self._handle(reference_drift(reference_logps(prompts, comps), first, comps.completion_mask,
                                             cfg.reference_tolerance), step)
        # 4 / 5: images and conditions
        if images_on:  # the cause (the condition) before its symptoms (the images)
            img = rollout.image_rollout
            drawn = getattr(img, "drawn", None)  # an interleaved record: one condition per drawn image
            checks = [(d.condition, 1) for d in drawn.values()] if drawn is not None else \
                [(img.condition, n)] if img is not None else []
            for condition, rows in checks:
                self._handle(condition_findings(condition, rows, "policy"), step)
            if rollout.ref_condition is not None:
                self._handle(condition_findings(rollout.ref_condition, n, "reference"), step)
            self._handle(condition_length_findings(completions.condition_lengths, completions.completion_mask), step)
            for finding in image_findings(rollout.images, completions.slots()):
                self._handle(finding, step)
        # 7: the parameter sample the update is compared with
        self._before = self._snapshot()

    @_on_every_rank
    def on_policy(self, rows: Sequence[int], logps: torch.Tensor, old_logps: torch.Tensor | None,
                  mask: torch.Tensor, advantages: torch.Tensor, metrics: dict[str, Any]) -> None:
        """In a micro-batch of chains ``rows``: on the step's first pass (rows not yet seen since
        :meth:`after_rewards`) the update's text log-probs vs the rollout's recorded ones (when recorded) and the
        image ratio; on every pass the advantages' alignment with the chains' rewards."""
        if not self.cfg.enabled:
            return
        step = self._last_step
        if self._deviations is not None:
            index = torch.as_tensor(list(rows), device=self._deviations.device)
            self._handle(advantage_alignment(advantages, self._deviations[index], rows), step)
        if rows and rows[0] in self._seen_rows:
            return
        self._seen_rows.update(rows)
        if old_logps is not None:
            index = torch.as_tensor(list(rows), device=old_logps.device)
            self._handle(on_policy_ratio(logps, old_logps[index], mask, self.cfg.ratio_tolerance, rows), step)
        if "image/approx_kl" in metrics:
            self._handle(image_on_policy_ratio(float(metrics["image/approx_kl"]), self.cfg.ratio_tolerance), step)

    def watch_advantages(self, advantages: torch.Tensor) -> torch.Tensor:
        """The advantages as the update should read them: a leaf whose gradient :meth:`check_advantages_used`
        inspects after the backward passes (no extra compute: the gradient of an (N,) tensor)."""
        if not self.cfg.enabled:
            return advantages
        return advantages.detach().requires_grad_(True)

    @_on_every_rank
    def check_advantages_used(self, advantages: torch.Tensor) -> None:
        """After the update's backward passes over ``advantages`` from :meth:`watch_advantages`."""
        if self.cfg.enabled and advantages.requires_grad:
            self._handle(loss_uses_advantages(advantages, advantages.grad), self._last_step)

    @_on_every_rank
    def after_update(self, step: int, metrics: dict[str, float], grad_norm: float | None,
                     applied: bool, scheduled_lr: float = 1.0) -> dict[str, float]:
        """After the update and the step's metrics: parameters, gradient norm, truncation, entropy, KL. Returns
        the ``guard/<name>`` metrics of every warning that holds this step."""
        if not self.cfg.enabled:
            return {}
        cfg = self.cfg
        self._deviations = None  # this step's: an update called outside a step has none to be checked against
        # 7 / 8: what the optimizer step did
        zero = grad_norm is not None and grad_norm == 0.0
        if self._streak("zero_grad", zero) >= cfg.zero_grad_steps > 0:
            self._raise(Finding("zero_grad", f"the gradient norm was exactly 0 for {self.streaks['zero_grad']} "
                                f"steps in a row (guards.zero_grad_steps={cfg.zero_grad_steps}): nothing trains. "
                                f"Likely cause: every advantage 0 and the policy still equal to the reference, the "
                                f"loss detached from the trainable parameters, or every trainable part frozen"), step)
        # A zero scheduled learning rate (an lr-0 control run, a schedule's end) moves nothing by design.
        if (applied and self._before and grad_norm is not None and grad_norm > 0 and math.isfinite(grad_norm)
                and scheduled_lr > 0):
            for finding in parameter_findings(self._before, self._snapshot(), self._trainable):
                self._handle(finding, step)
        # 9 / 10: symptoms past their thresholds
        clipped = metrics.get("completion/clipped_ratio")
        cut = clipped is not None and clipped > cfg.truncated_share
        if self._streak("truncated", cut) >= cfg.symptom_steps > 0:
            self._handle(Finding("truncated", f"{clipped:.0%} of the chains hit rollout.max_new_tokens for "
                                 f"{self.streaks['truncated']} steps (guards.truncated_share={cfg.truncated_share}): "
                                 f"their images are drawn from cut reasoning. Raise max_new_tokens or reward brevity",
                                 error=False, value=clipped), step)
        self._handle(threshold(metrics.get("entropy"), "entropy", below=cfg.min_entropy,
                               message="mean token entropy {value:.3g} nats is below guards.min_entropy="
                                       f"{cfg.min_entropy}: the policy has collapsed to near-deterministic chains"),
                     step)
        self._handle(threshold(metrics.get("kl/text"), "kl", above=cfg.max_kl,
                               message="text KL to the reference {value:.3g} is above guards.max_kl="
                                       f"{cfg.max_kl}: the policy is running away (lower optim.lr, raise loss.beta)"),
                     step)
        out, self._warnings = {f"guard/{k}": v for k, v in self._warnings.items()}, {}
        return out

    def check_table(self, step: int, columns: Sequence[str], rows: Sequence[Sequence[Any]], images_on: bool) -> None:
        """Before a rollout table of a run that draws images is logged: every row holds its image."""
        if self.cfg.enabled and images_on:
            self._handle(table_images(columns, rows), step)
