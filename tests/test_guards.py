"""The every-step guards (``rgpo.guards``): each fault class injected, detected within one step with its named
message; none fires on a healthy run. Most classes are tested on the pure checks with hand-made tensors; the
end-to-end ones inject the fault into a tiny ``RGPOTrainer`` step. At the end of the module one line sums up:

    guards: N fault classes caught of N
"""

from __future__ import annotations

import os
import types
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from PIL import Image

from rgpo import guards as g
from rgpo.config import GuardsConfig, load_config
from rgpo.guards import GuardError, StepGuards

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
FAST = ("logging.mode=disabled", "logging.progress_bar=false", "rollout.max_new_tokens=8", "rollout.image.steps=2",
        "rollout.image.height=32", "rollout.image.width=32", "checkpoint.every=0", "logging.table_every=0",
        "optim.max_steps=1000")
MODE = "RGPO_GUARDS_REWARD_MODE"

# The fault classes (1-15); a test adds its class once the fault was caught with the named message.
CLASSES = 15
CAUGHT: set[int] = set()


@pytest.fixture(scope="module", autouse=True)
def guards_summary(request):
    yield
    line = f"guards: {len(CAUGHT)} fault classes caught of {CLASSES} (classes {sorted(CAUGHT)})"
    capman = request.config.pluginmanager.getplugin("capturemanager")
    if capman is None:
        print(line)
        return
    with capman.global_and_fixture_disabled():
        print("\n" + line, flush=True)


@contextmanager
def caught(fault_class: int, name: str, *fragments: str):
    """Expect a GuardError from guard ``name`` whose message holds every fragment; count the class."""
    with pytest.raises(GuardError) as info:
        yield info
    text = str(info.value)
    assert f"guard {name} failed" in text, text
    missing = [f for f in fragments if f not in text]
    assert not missing, f"{text!r} does not name {missing}"
    CAUGHT.add(fault_class)


def found(finding, fault_class: int, name: str, *fragments: str, error: bool = True):
    assert finding is not None and finding.name == name and finding.error == error, finding
    missing = [f for f in fragments if f not in finding.message]
    assert not missing, f"{finding.message!r} does not name {missing}"
    CAUGHT.add(fault_class)


def guards(**overrides) -> StepGuards:
    return StepGuards(GuardsConfig(**overrides), rank=0, group_size=2, reward_names=["a", "b"])


# ============================================================================================ pure checks
def test_1_on_policy_ratio_names_the_chain():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    old = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]])
    assert g.on_policy_ratio(old.clone(), old, mask, 0.02) is None
    padded = old.clone()
    padded[0, 2] = 5.0  # a masked position: ignored
    assert g.on_policy_ratio(padded, old, mask, 0.02) is None
    off = old.clone()
    off[1] += torch.tensor([0.0, 0.3, 0.0])  # mean |log ratio| of chain 1: 0.1
    found(g.on_policy_ratio(off, old, mask, 0.02, rows=[4, 5]), 1, "on_policy_ratio", "sample 5", "0.1", "dropout")
    # images: approx_kl = mean(d^2)/2 = 0.005 -> rms log ratio 0.1
    assert g.image_on_policy_ratio(0.0, 0.02) is None
    found(g.image_on_policy_ratio(0.005, 0.02), 1, "on_policy_ratio", "image SDE steps", "0.1")


def test_14_swapped_log_probs_and_advantages_are_caught():
    mask = torch.ones(2, 3)
    old = torch.tensor([[-1.0, -2.0, -3.0], [-3.0, -2.0, -1.0]])
    found(g.on_policy_ratio(old.flip(0), old, mask, 0.02), 14, "on_policy_ratio", "sample 0")
    # two groups of 2: deviations +1,-1 | +0.5,-0.5; advantages of chains 2 and 3 swapped
    dev = torch.tensor([1.0, -1.0, 0.5, -0.5])
    assert g.advantage_alignment(torch.tensor([0.7, -0.7, 0.7, -0.7]), dev, [0, 1, 2, 3]) is None
    assert g.advantage_alignment(torch.zeros(2), torch.tensor([1e-7, -1e-7]), [0, 1]) is None  # no spread
    found(g.advantage_alignment(torch.tensor([0.7, -0.7, -0.7, 0.7]), dev, [0, 1, 2, 3]), 14,
          "advantage_alignment", "2 of 4 chains", "sample 2", "+0.5")


def test_2_reward_all_none_and_constant():
    nan = float("nan")
    per = torch.tensor([[nan, 1.0], [nan, 1.0], [nan, 1.0], [nan, 1.0]])
    assert g.rewards_never_applied(per, ["a", "b"]) == [0]
    assert g.constant_rewards(per) == {1: 1.0}
    assert g.constant_rewards(torch.tensor([[0.0], [1.0]])) == {}
    assert g.constant_rewards(torch.tensor([[nan], [2.0], [2.0]])) == {0: 2.0}  # None rows left out
    rollout = fake_rollout(4)
    guard = StepGuards(GuardsConfig(reward_none_steps=1), rank=0, group_size=2, reward_names=["a", "b"])
    with caught(2, "reward_none", "'a'", "every one of the 4 chains", "step 7"):
        guard.after_rewards(7, rollout, per, [1.0, 1.0])
    # one constant value for K steps: a warning from the K-th step on
    guard = StepGuards(GuardsConfig(symptom_steps=2), rank=0, group_size=2, reward_names=["a", "b"])
    spread = torch.tensor([[0.0, 1.0], [1.0, 1.0], [0.0, 1.0], [1.0, 1.0]])
    guard.after_rewards(1, rollout, spread, [1.0, 1.0])
    assert guard.after_update(1, {}, 1.0, True) == {}
    guard.after_rewards(2, rollout, spread, [1.0, 1.0])
    assert guard.after_update(2, {}, 1.0, True) == {"guard/reward_constant/b": 1.0}
    CAUGHT.add(2)


def test_3_zero_spread_for_k_steps():
    assert g.group_spread(torch.tensor([1.0, 1.0, 2.0, 2.0]), 2) == 0.0
    assert g.group_spread(torch.tensor([1.0, 2.0, 2.0, 2.0]), 2) == 0.5
    guard = StepGuards(GuardsConfig(zero_spread_steps=2), rank=0, group_size=2, reward_names=["a", "b"])
    flat = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    guard.after_rewards(1, fake_rollout(4), flat, [1.0, 1.0])
    with caught(3, "zero_spread", "2 steps in a row", "guards.zero_spread_steps=2"):
        guard.after_rewards(2, fake_rollout(4), flat, [1.0, 1.0])


def test_4_missing_constant_and_black_images():
    noise = Image.effect_noise((8, 8), 50).convert("RGB")
    assert g.image_findings([[noise], [noise]], [1, 1]) == []
    assert g.image_findings([[], []], [0, 0]) == []  # no slot, no image: fine
    (missing,) = g.image_findings([[noise], []], [1, 1])
    found(missing, 4, "missing_image", "1 of 2 chains", "sample 1")
    black = Image.new("RGB", (8, 8))
    grey = Image.new("RGB", (8, 8), (90, 90, 90))
    (all_black,) = g.image_findings([[black], [black]], [1, 1])
    found(all_black, 4, "constant_images", "2 of 2 images", "all black")
    (some,) = g.image_findings([[noise], [grey]], [1, 1])
    found(some, 4, "constant_images", "1 of 2", "sample 1", "one colour", error=False)
    assert some.value == 0.5


def test_5_condition_empty_non_finite_or_of_the_wrong_rows():
    from rgpo.models.base import Condition

    good = Condition(torch.randn(3, 4, 2), torch.ones(3, 4, dtype=torch.long))
    assert g.condition_findings(good, 3) is None
    found(g.condition_findings(good, 4), 5, "condition", "shape (3, 4, 2)", "4 chains")
    nan = Condition(good.states.clone(), good.mask)
    nan.states[2, 1, 0] = float("nan")
    found(g.condition_findings(nan, 3), 5, "condition", "NaN/inf", "sample 2")
    empty = Condition(good.states, good.mask.clone())
    empty.mask[1] = 0
    found(g.condition_findings(empty, 3, "reference"), 5, "condition", "reference condition is empty", "sample 1")
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert g.condition_length_findings(torch.tensor([3, 2]), mask) is None
    found(g.condition_length_findings(torch.tensor([3, 3]), mask), 5, "condition", "sample 1",
          "condition_lengths=3 for 2")


def test_6_reference_drift():
    mask = torch.tensor([[1, 1, 0]])
    first = torch.tensor([[-1.0, -2.0, -3.0]])
    assert g.reference_drift(first.clone(), first, mask, 1e-3) is None
    assert g.reference_drift(first + torch.tensor([[0.0, 0.0, 9.0]]), first, mask, 1e-3) is None  # padding
    found(g.reference_drift(first + 0.01, first, mask, 1e-3), 6, "reference_drift", "0.01", "not frozen")


def test_7_parameters_unchanged_or_frozen_changed():
    before = {"lora": torch.zeros(3), "base": torch.ones(3)}
    assert g.parameter_findings(before, {"lora": torch.ones(3), "base": torch.ones(3)}, {"lora"}) == []
    (still,) = g.parameter_findings(before, dict(before), {"lora"})
    found(still, 7, "parameters", "none of the 1 sampled trainable", "lora")
    (moved,) = g.parameter_findings(before, {"lora": torch.ones(3), "base": torch.zeros(3)}, {"lora"})
    found(moved, 7, "parameters", "frozen tensor(s) changed", "base")


def test_8_gradient_norm_exactly_zero_for_k_steps():
    guard = guards(zero_grad_steps=3)
    for step in (1, 2):
        guard.after_update(step, {}, 0.0, True)
    guard.after_update(3, {}, 1e-9, True)  # a tiny gradient is a gradient: the streak restarts
    guard.after_update(4, {}, 0.0, True)
    guard.after_update(5, {}, 0.0, True)
    with caught(8, "zero_grad", "exactly 0 for 3 steps", "step 6"):
        guard.after_update(6, {}, 0.0, True)


def test_8_loss_not_depending_on_the_advantages():
    advantages = torch.tensor([0.5, -0.5, 0.0, 0.0])
    # -A_i * ratio_i summed: d/dA_i = -1 where the chain has tokens
    assert g.loss_uses_advantages(advantages, torch.tensor([-1.0, -1.0, -1.0, -1.0])) is None
    assert g.loss_uses_advantages(torch.zeros(4), None) is None  # no advantage, nothing to depend on
    found(g.loss_uses_advantages(advantages, torch.zeros(4)), 8, "loss_advantages", "2 chains with a non-zero "
          "advantage, gradient 0 for every one")
    found(g.loss_uses_advantages(advantages, None), 8, "loss_advantages", "does not depend on the advantages")


def test_9_truncation_and_empty_chains(capsys):
    guard = guards(symptom_steps=2, truncated_share=0.5)
    assert guard.after_update(1, {"completion/clipped_ratio": 0.9}, 1.0, True) == {}
    assert guard.after_update(2, {"completion/clipped_ratio": 0.9}, 1.0, True) == {"guard/truncated": 0.9}
    assert guard.after_update(3, {"completion/clipped_ratio": 0.9}, 1.0, True) == {"guard/truncated": 0.9}
    assert capsys.readouterr().out.count("guard warning") == 1  # printed once per kind
    assert guard.after_update(4, {"completion/clipped_ratio": 0.2}, 1.0, True) == {}
    guard = guards(symptom_steps=1)
    rollout = fake_rollout(4, texts=["", " ", "x", ""])
    guard.after_rewards(1, rollout, torch.tensor([[0.0, 1.0], [1.0, 0.0]] * 2), [1.0, 1.0])
    assert guard.after_update(1, {}, 1.0, True) == {"guard/no_answer": 0.75}
    CAUGHT.add(9)


def test_10_entropy_collapse_and_kl_blow_up(capsys):
    guard = guards(min_entropy=0.01, max_kl=1.0)
    assert guard.after_update(1, {"entropy": 2.0, "kl/text": 0.01}, 1.0, True) == {}
    assert guard.after_update(2, {"entropy": 0.001, "kl/text": 3.0}, 1.0, True) == {"guard/entropy": 0.001,
                                                                                     "guard/kl": 3.0}
    out = capsys.readouterr().out
    assert "collapsed" in out and "running away" in out
    CAUGHT.add(10)


class FakeTokenizer:
    def __init__(self, vocab):
        self.vocab, self.special_tokens_map, self.chat_template = vocab, {"eos_token": "</s>"}, "{{ messages }}"

    def get_vocab(self):
        return dict(self.vocab)


def test_11_tokenizer_or_template_changed_on_resume():
    model = types.SimpleNamespace(tokenizer=FakeTokenizer({"a": 0, "b": 1}), processor=None,
                                  named_parameters=lambda: iter(()))
    saved = g.tokenizer_fingerprint(model)
    StepGuards(GuardsConfig(), rank=0, group_size=2, reward_names=[], model=model,
               resume_state={"step": 4, "tokenizer_fingerprint": saved})  # the same: fine
    model.tokenizer.chat_template = "{{ other }}"
    with caught(11, "tokenizer", "differs from the one the checkpoint was trained with", "step 4"):
        StepGuards(GuardsConfig(), rank=0, group_size=2, reward_names=[], model=model,
                   resume_state={"step": 4, "tokenizer_fingerprint": saved})
    model.tokenizer.chat_template = "{{ messages }}"
    model.tokenizer.vocab["c"] = 2
    assert g.tokenizer_fingerprint(model) != saved


def test_12_ranks_disagree():
    def rank(r, step=3, rewards=2, indices=(0, 1), prompts=(7, 7)):
        return {"rank": r, "step": step, "rewards": rewards, "indices": list(indices), "prompts": list(prompts)}

    healthy = [rank(0), rank(1, indices=(2, 3), prompts=(8, 8))]
    assert g.rank_agreement(healthy, 2) is None
    found(g.rank_agreement([rank(0), rank(1, step=4, indices=(2, 3))], 2), 12, "ranks", "different steps")
    found(g.rank_agreement([rank(0), rank(1, rewards=3, indices=(2, 3))], 2), 12, "ranks", "numbers of rewards")
    found(g.rank_agreement([rank(0), rank(1)], 2), 12, "ranks", "not one permutation", "repeated: [0, 1]")
    # a group of 4 spread over both ranks, rank 1 holding another prompt for it
    found(g.rank_agreement([rank(0), rank(1, indices=(2, 3), prompts=(9, 9))], 4), 12, "ranks",
          "group 0 holds chains of 2 different prompts")


def test_13_table_that_lost_its_images():
    im = Image.new("RGB", (4, 4), (1, 2, 3))
    columns = ["step", "prompt", "reasoning", "image", "advantage"]
    assert g.table_images(columns, [[1, "p", "r", im, 0.0]]) is None
    found(g.table_images(columns, [[1, "p", "r", im, 0.0], [1, "p", "r", None, 0.0]]), 13, "table_images",
          "1 of 2 rows", "row 1")


def test_15_reward_for_the_wrong_batch_size_is_refused_by_combine():
    """A reward (or reward server) answering for another batch size: ``rgpo.rewards.combine`` refuses it by name
    (reused, not repeated here); the guards re-check the reward matrix's shape before the advantages."""
    from rgpo.rewards import RewardError, combine

    def short(prompts, completions, **kwargs):
        return [1.0] * (len(completions) - 1)

    with pytest.raises(RewardError, match=r"reward 'short' returned 3 values; expected 4"):
        combine([short], None, ["p"] * 4, ["c"] * 4, None, {})
    with caught(15, "reward_batch", "(3, 2) for 4 chains"):
        guards().after_rewards(1, fake_rollout(4), torch.zeros(3, 2), [1.0, 1.0])


def test_disabled_guards_check_nothing():
    guard = guards(enabled=False, zero_grad_steps=1)
    guard.after_rewards(1, fake_rollout(4), torch.full((4, 2), float("nan")), [1.0, 1.0])
    assert guard.after_update(1, {"entropy": 0.0}, 0.0, True) == {}


def fake_rollout(n: int, texts=None):
    """The few Rollout fields the guards read, for n chains in groups of 2 on one rank (no images)."""
    from rgpo.data import PromptRow
    from rgpo.models.base import Completions

    rows = [PromptRow(f"prompt {i // 2}", [], {}, f"f.jsonl:{i // 2 + 1}") for i in range(n)]
    texts = texts if texts is not None else ["text"] * n
    completions = Completions(torch.ones(n, 3, dtype=torch.long), torch.ones(n, 3, dtype=torch.long), texts,
                              torch.full((n,), 2))
    return types.SimpleNamespace(rows=rows, completions=completions, global_indices=list(range(n)),
                                 images=[[] for _ in range(n)], image_rollout=None, ref_condition=None, prompts=None)


# ============================================================================================ end to end
def controlled(prompts, completions, **kwargs):
    """The chains' letter fraction (a real spread), or the fault that $RGPO_GUARDS_REWARD_MODE names."""
    mode = os.environ.get(MODE, "signal")
    if mode == "none":
        return [None] * len(completions)
    if mode == "constant":
        return [0.5] * len(completions)
    return [sum(c.isascii() and c.isalpha() for c in t) / max(1, len(t)) for t in completions]


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """A tiny trainer (images on, LoRA) whose second reward is ``controlled``; its first step is healthy."""
    from rgpo.rewards import Reward
    from rgpo.trainer import RGPOTrainer

    out = tmp_path_factory.mktemp("guards") / "run"
    cfg = load_config(TINY, [f"logging.output_dir={out}", *FAST])
    trainer = RGPOTrainer(cfg, reward_fns=["format", Reward("controlled", controlled)])
    yield trainer
    trainer.close()


@pytest.fixture
def guard_cfg(live, monkeypatch):
    """The live trainer's guard thresholds, restored after the test."""
    for key, value in vars(GuardsConfig()).items():
        monkeypatch.setattr(live.guards.cfg, key, value)
    monkeypatch.setenv(MODE, "signal")
    live.guards.streaks.clear()
    return live.guards.cfg


def test_healthy_steps_raise_nothing_and_warn_nothing(live, guard_cfg):
    guard_cfg.reference_probe_every = 1  # the probe is taken at step 1 and compared at step 2
    for _ in range(2):
        metrics = live.train_step()
        assert not [k for k in metrics if k.startswith("guard/")], metrics
        assert metrics["timing/guards"] >= 0
        # Every reward's own time, nested inside the scoring phase (rewards run one at a time here).
        per_reward = {k: v for k, v in metrics.items() if k.startswith("timing/reward/")}
        assert set(per_reward) == {"timing/reward/format", "timing/reward/controlled"}
        assert 0 < sum(per_reward.values()) <= metrics["timing/rewards"]
    assert live.guards._probe is not None


def test_e2e_2_reward_none_for_a_whole_step(live, guard_cfg, monkeypatch):
    monkeypatch.setenv(MODE, "none")
    step = live.step
    with caught(2, "reward_none", "reward 'controlled' returned None for every one of the 8 chains"):
        live.train_step()
    assert live.step == step  # stopped before the update


def test_e2e_3_every_group_flat(live, guard_cfg, monkeypatch):
    """format is 0 on a random model and ``controlled`` constant: no group has a spread; a warning for each
    constant reward first (symptom_steps=1), then the error."""
    monkeypatch.setenv(MODE, "constant")
    guard_cfg.symptom_steps, guard_cfg.zero_spread_steps = 1, 0
    metrics = live.train_step()
    assert metrics["guard/reward_constant/controlled"] == 0.5 and metrics["guard/reward_constant/format"] == 0.0
    CAUGHT.add(2)
    guard_cfg.zero_spread_steps = 1
    with caught(3, "zero_spread", "every group had zero reward spread"):
        live.train_step()


def test_e2e_1_rollout_and_update_disagree(live, guard_cfg, monkeypatch):
    """The rollout's no-grad forward computes something else than the update's (here: log-probs off by 0.1)."""
    guard_cfg.reference_probe_every = 0
    original = live.model.forward_text

    def skewed(prompts, completions, **kwargs):
        out = original(prompts, completions, **kwargs)
        if not torch.is_grad_enabled():
            out.logps = out.logps + 0.1
        return out

    monkeypatch.setattr(live.model, "forward_text", skewed)
    with caught(1, "on_policy_ratio", "first, on-policy pass", "sample 0", "0.1"):
        live.train_step()


def test_e2e_5_nan_condition(live, guard_cfg, monkeypatch):
    original = live.model.forward_text

    def nan_condition(prompts, completions, **kwargs):
        out = original(prompts, completions, **kwargs)
        if out.condition is not None and not torch.is_grad_enabled():
            out.condition.states[3] = float("nan")
        return out

    monkeypatch.setattr(live.model, "forward_text", nan_condition)
    with caught(5, "condition", "policy condition's states is NaN/inf for 1 chain", "sample 3"):
        live.train_step()


def test_e2e_14_advantages_of_other_chains(live, guard_cfg, monkeypatch):
    """The best chain of the first group gets the worst chain's advantage."""
    original = live.update

    def swapped(rollout, advantages):
        adv = advantages.clone()
        i, j = int(advantages[:4].argmax()), int(advantages[:4].argmin())
        adv[i], adv[j] = advantages[j], advantages[i]
        return original(rollout, adv)

    monkeypatch.setattr(live, "update", swapped)
    with caught(14, "advantage_alignment", "contradicts their reward"):
        live.train_step()


def test_e2e_7_applied_step_that_moves_nothing(live, guard_cfg, monkeypatch):
    """A zero learning rate: DeepSpeed applies the step, the gradient is non-zero, no weight moves."""
    original = live.update

    def frozen_lr(rollout, advantages):
        for group in live.optimizer.param_groups:
            group["lr"] = 0.0
        return original(rollout, advantages)

    monkeypatch.setattr(live, "update", frozen_lr)
    with caught(7, "parameters", "none of the", "sampled trainable tensors changed"):
        live.train_step()


def test_e2e_8_loss_detached_from_the_advantages(live, guard_cfg, monkeypatch):
    """A loss that reads detached advantages (as a custom loss or a shaping hook could): caught after the step's
    backward passes."""
    import rgpo.trainer

    original = rgpo.trainer.policy_loss

    def detached(logps, old, ref_logps, advantages, *args, **kwargs):
        return original(logps, old, ref_logps, advantages.detach(), *args, **kwargs)

    monkeypatch.setattr(rgpo.trainer, "policy_loss", detached)
    with caught(8, "loss_advantages", "does not depend on the advantages"):
        live.train_step()


def test_e2e_6_reference_drift(live, guard_cfg):
    """A base weight the reference uses changes in place (as a reference sharing the policy's tensors would):
    the probe taken at the first step moves."""
    guard_cfg.reference_probe_every = 1
    assert live.guards._probe is not None
    _, weight = next((n, p) for n, p in live.model.named_parameters()
                        if not p.requires_grad and "lm_head" in n and n not in live.guards._params)
    kept = weight.detach().clone()
    with torch.no_grad():
        weight.add_(0.05 * torch.randn_like(weight))
    try:
        with caught(6, "reference_drift", "fixed probe chain moved", "not frozen"):
            live.train_step()
    finally:
        with torch.no_grad():
            weight.copy_(kept)


def test_e2e_13_table_that_lost_its_images(live, guard_cfg):
    rollout = live._last_rollout
    per_reward = torch.zeros(len(rollout.rows), len(live.rewards))
    live._log_table(rollout, per_reward, torch.zeros(len(rollout.rows)))  # healthy: every row has its image
    rollout.images[2] = []
    with caught(13, "table_images", "row 2"):
        live._log_table(rollout, per_reward, torch.zeros(len(rollout.rows)))


def test_tokenizer_fingerprint_of_a_real_family_follows_its_chat_template(live):
    """The checkpoint state carries the fingerprint; a changed chat template changes it."""
    fingerprint = g.tokenizer_fingerprint(live.model)
    assert fingerprint is not None and fingerprint == live.guards.fingerprint
    processor = live.model.processor
    before = processor.chat_template
    try:
        processor.chat_template = (before or "") + "{# another #}"
        assert g.tokenizer_fingerprint(live.model) != fingerprint
    finally:
        processor.chat_template = before


def test_e2e_11_resume_with_another_tokenizer(live, guard_cfg, tmp_path):
    """The checkpoint records the tokenizer / chat template fingerprint; resuming it with another one stops
    before the engine state is loaded."""
    import json

    from rgpo import checkpointing as ckpt
    from rgpo.rewards import Reward
    from rgpo.trainer import RGPOTrainer

    path = live.save_checkpoint()
    state = ckpt.read_state(path)
    assert state["tokenizer_fingerprint"] == live.guards.fingerprint is not None
    state["tokenizer_fingerprint"] = "another-tokenizer"
    (path / ckpt.STATE_FILE).write_text(json.dumps(state))
    cfg = load_config(TINY, [f"logging.output_dir={live.out}", *FAST, f"checkpoint.resume={path}"])
    with caught(11, "tokenizer", "differs from the one the checkpoint was trained with", "another-tokenizer"):
        RGPOTrainer(cfg, reward_fns=["format", Reward("controlled", controlled)])


@pytest.mark.distributed
def test_a_guard_failing_on_one_rank_stops_every_rank(tmp_path):
    """Rank 1's rollout condition turns NaN (a check only rank 1 can fail): both ranks stop at step 1 with the
    guard's message, rank 0 with "rank(s) [1]", instead of rank 0 waiting in the next collective until the
    distributed timeout."""
    import shutil
    import subprocess

    from rgpo.distributed import free_port

    (tmp_path / "nan_on_rank_1.py").write_text(
        "import os\nimport torch\nfrom rgpo.models.registry import get_model_class\n"
        "from rgpo.cli import main\n"
        "family = get_model_class('mindomni')\n"
        "original = family.forward_text\n"
        "def forward_text(self, *args, **kwargs):\n"
        "    out = original(self, *args, **kwargs)\n"
        "    if os.environ.get('RANK') == '1' and out.condition is not None and not torch.is_grad_enabled():\n"
        "        out.condition.states[0] = float('nan')\n"
        "    return out\n"
        "family.forward_text = forward_text\n"
        "raise SystemExit(main())\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [shutil.which("deepspeed") or "deepspeed", "--num_gpus", "2", "--master_port", str(free_port()),
           str(tmp_path / "nan_on_rank_1.py"), "train", "--config", str(TINY), *FAST, "optim.max_steps=2",
           f"logging.output_dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert "guard condition failed at step 1 on rank 1" in out, out[-3000:]
    assert "a guard failed at step 1 on rank(s) [1]" in out and "rank 0 stops with it" in out, out[-3000:]
