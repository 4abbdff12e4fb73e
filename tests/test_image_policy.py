"""Image-side policy gradient and N chains x M images (rgpo.image_policy) on the tiny model: the advantages by
hand, the exact on-policy ratio, what the image loss trains (decoder LoRA, not the VLM unless asked), the config
checks, and DeepSpeed 2-rank ZeRO-2 / ZeRO-3 runs of the mode."""

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from two_ranks import launch_two_ranks

from rgpo.config import ConfigError, load_config
from rgpo.image_policy import ImagePolicy, ImageRollout, chain_rewards, image_policy_loss
from rgpo.losses import group_advantages
from rgpo.models import Condition

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
TESTS = REPO / "tests"

# Text rewards rank the chains (a random tiny model never writes the format); the brightness reward differs
# between the images of one chain, which is what the image advantages need.
SIGNAL = (f"rewards.functions=[format, {{name: '{TESTS / 'signal_reward.py'}:letter_fraction', weight: 1.0}}, "
          f"{{name: '{TESTS / 'image_reward.py'}:brightness', weight: 1.0}}]")
# Text + image mode: 2 images per chain, SDE on a window of 2 of the 4 steps, decoder LoRA, Flow-GRPO's KL.
TEXT_AND_IMAGE = ("rollout.image.images_per_chain=2", "rollout.image.noise_level=0.7", "rollout.image.sde_window=2",
                  "loss.image_pg_coef=1.0", "loss.image_regularizer=gaussian_kl", "trainable.generator_lora_r=4")


def tiny_cfg(tmp_path, *overrides):
    return load_config(TINY, [f"logging.output_dir={tmp_path / 'run'}", "logging.mode=disabled", SIGNAL, *overrides])


# ------------------------------------------------------------------------------------ advantages by hand
def test_hand_computed_chain_and_image_advantages():
    """N = 2 chains x M = 3 images, an image reward and a per-chain (text) reward, weights 1:

    image reward   chain 0: 1, 2, 3   chain 1: 4, 4, 7      text reward  chain 0: 1   chain 1: 0
    chain rewards (means)             chain 0: 2 + 1 = 3    chain 1: 5 + 0 = 5
    text advantages over the chains   (3 - 4) / (sqrt(2) + eps) = -0.70707, +0.70707
    image advantages within chains    chain 0 totals 2, 3, 4: (-1, 0, 1) / (1 + eps)
                                      chain 1 totals 4, 4, 7: (-1, -1, 2) / (sqrt(3) + eps)
    The text reward is the same on every image of a chain: it moves the chain, never the image advantages."""
    from rgpo.advantages import global_advantages

    image_values = {"a0": 1.0, "a1": 2.0, "a2": 3.0, "b0": 4.0, "b1": 4.0, "b2": 7.0}

    def image_reward(prompts, completions, images, **columns):
        return [image_values[chain[0]] for chain in images]  # each image is scored as a chain of one

    def text_reward(prompts, completions, images, **columns):
        return [1.0 if c == "good" else 0.0 for c in completions]

    image_reward.weight = text_reward.weight = 1.0
    cfg = load_config(None, ["rollout.image.images_per_chain=3", "rollout.num_generations=2"])
    policy = ImagePolicy(cfg, torch.device("cpu"))
    record = ImageRollout(3, ["a0", "a1", "a2", "b0", "b1", "b2"], Condition(torch.zeros(2, 1, 1), torch.ones(2, 1)),
                          None)
    assert record.per_chain() == [["a0", "a1", "a2"], ["b0", "b1", "b2"]]
    row = SimpleNamespace(prompt="p", columns={})

    per_chain = policy.score([image_reward, text_reward], [row, row], ["good", "bad"], record, [0, 1])
    torch.testing.assert_close(per_chain, torch.tensor([[2.0, 1.0], [5.0, 0.0]]))
    text_adv, _, totals = global_advantages(per_chain, [1.0, 1.0], [0, 1], 2)
    torch.testing.assert_close(totals, torch.tensor([3.0, 5.0]))
    torch.testing.assert_close(text_adv, torch.tensor([-1.0, 1.0]) / (math.sqrt(2) + 1e-4))
    expected_image = torch.cat([torch.tensor([-1.0, 0.0, 1.0]) / (1 + 1e-4),
                                torch.tensor([-1.0, -1.0, 2.0]) / (math.sqrt(3) + 1e-4)])
    torch.testing.assert_close(record.advantages, expected_image)
    torch.testing.assert_close(record.per_image_rewards[:, 0], torch.tensor([1.0, 2, 3, 4, 4, 7]))
    assert record.metrics["reward/image_std"] == pytest.approx((1.0 + math.sqrt(3)) / 2)
    assert record.metrics["reward/image_frac_zero_std"] == 0.0
    # the pieces on their own
    torch.testing.assert_close(chain_rewards(torch.tensor([[1.0], [float("nan")], [3.0], [4.0], [4.0], [7.0]]), 3),
                               torch.tensor([[2.0], [5.0]]))
    torch.testing.assert_close(group_advantages(torch.tensor([2.0, 3, 4]), 3), torch.tensor([-1.0, 0, 1]) / (1 + 1e-4))


def test_image_policy_loss_clips_and_counts():
    old = torch.zeros(2, 2)
    # ratios e^0 = 1 (inside), e^0.5 (above 1 + eps), e^-0.5 (below 1 - eps), 1
    logp = torch.tensor([[0.0, 0.5], [-0.5, 0.0]], requires_grad=True)
    adv = torch.tensor([1.0, -1.0])
    loss, metrics = image_policy_loss(logp, old, adv, clip_range=0.1)
    r = torch.exp(logp.detach())
    # image 0 (A = 1): max(-r, -clip(r)) -> -1 and -1.1;  image 1 (A = -1): max(r, clip(r)) -> 0.9 and 1
    assert loss.item() == pytest.approx((-1.0 - 1.1 + 0.9 + 1.0) / 4)
    assert metrics["clip_frac"].item() == 0.5 and metrics["ratio"].item() == pytest.approx(r.mean().item())
    loss.backward()
    # clipped entries give no gradient; the others -A * r / 4
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.25, 0.0], [0.0, 0.25]]))
    exact, m = image_policy_loss(old.clone(), old, adv, clip_range=1e-4)
    assert m["ratio"].item() == 1.0 and m["clip_frac"].item() == 0.0 and m["approx_kl"].item() == 0.0


# ------------------------------------------------------------------------------------ config checks
def test_config_checks_name_the_keys():
    base = ["data.train_file=x.jsonl", "loss.image_pg_coef=1.0", "trainable.generator_lora_r=4",
            "rollout.image.images_per_chain=2", "rollout.image.noise_level=0.7"]
    load_config(None, base).validate()  # the complete mode is valid
    with pytest.raises(ConfigError, match=r"rollout\.image\.noise_level=0\.0 .*image_pg_coef=1\.0.*SDE"):
        load_config(None, [*base, "rollout.image.noise_level=0"]).validate()
    with pytest.raises(ConfigError, match=r"rollout\.image\.images_per_chain=1 .*>= 2.*within each chain"):
        load_config(None, [*base, "rollout.image.images_per_chain=1"]).validate()
    no_path = r"generator_lora_r / trainable\.full_parts / loss\.image_condition_grad=\(0, \[\], False\) .*"
    with pytest.raises(ConfigError, match=no_path + "image_pg_coef=1.0"):
        load_config(None, [*base, "trainable.generator_lora_r=0"]).validate()
    load_config(None, [*base, "trainable.generator_lora_r=0", "trainable.full_parts=[connector]"]).validate()
    load_config(None, [*base, "trainable.generator_lora_r=0", "loss.image_condition_grad=true"]).validate()
    with pytest.raises(ConfigError, match=r"rollout\.image\.noise_level=0\.0 .*gaussian_kl"):
        load_config(None, ["data.train_file=x.jsonl", "loss.image_regularizer=gaussian_kl"]).validate()
    # the MindOmni default (a VLM LoRA only) has no gradient path for a KL on the recorded steps either
    with pytest.raises(ConfigError, match=no_path + "gaussian_kl"):
        load_config(None, ["data.train_file=x.jsonl", "loss.image_regularizer=gaussian_kl",
                           "rollout.image.noise_level=0.7"]).validate()
    with pytest.raises(ConfigError, match=r"rollout\.image\.sde_window=60 .*1\.\.rollout\.image\.steps=50"):
        load_config(None, [*base, "rollout.image.sde_window=60"]).validate()
    with pytest.raises(ConfigError, match=r"rollout\.image\.sde_window_range=\(0, 4\) .*sde_window=9"):
        load_config(None, [*base, "rollout.image.sde_window=9", "rollout.image.sde_window_range=[0, 4]"]).validate()
    load_config(None, [*base, "rollout.image.sde_window=2", "rollout.image.sde_window_range=[0, 25]"]).validate()
    with pytest.raises(ConfigError, match=r"loss\.image_clip_range=0\.0"):
        load_config(None, [*base, "loss.image_clip_range=0"]).validate()
    with pytest.raises(ConfigError, match=r"rollout\.image\.images_per_chain=2 .*enabled is false"):
        load_config(None, ["data.train_file=x.jsonl", "rollout.image.enabled=false",
                           "rollout.image.images_per_chain=2"]).validate()
    # defaults: MindOmni's RGPO, without this module
    default = load_config(None, ["data.train_file=x.jsonl"]).validate()
    assert (default.rollout.image.images_per_chain, default.rollout.image.noise_level) == (1, 0.0)
    assert (default.loss.image_pg_coef, default.loss.image_clip_range, default.loss.image_condition_grad) == (0.0, 1e-4, False)
    assert not ImagePolicy(default, torch.device("cpu")).per_image  # one deterministic image, scored as the chain
    assert ImagePolicy(load_config(None, ["rollout.image.images_per_chain=2"]), torch.device("cpu")).per_image


# ------------------------------------------------------------------------------------ text + image, one process
@pytest.fixture(scope="module")
def text_image_run(tmp_path_factory):
    """Two steps of text + image mode on the tiny model (one process)."""
    from rgpo.trainer import RGPOTrainer

    tmp = tmp_path_factory.mktemp("text_image")
    trainer = RGPOTrainer(tiny_cfg(tmp, *TEXT_AND_IMAGE, "optim.max_steps=2", "checkpoint.every=0"))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    after = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    return trainer, before, after


def test_first_on_policy_image_ratio_is_exactly_one(text_image_run):
    trainer, _, _ = text_image_run
    first = trainer.history[0]
    assert first["image/ratio"] == 1.0 and first["image/clip_frac"] == 0.0 and first["image/approx_kl"] == 0.0
    assert first["kl/image"] == 0.0  # gaussian_kl: every adapter starts at zero, policy == reference exactly
    assert first["ratio/mean"] == 1.0 and first["kl/text"] == 0.0
    for row in trainer.history:  # one update per rollout: every step samples and trains the same policy
        assert row["image/ratio"] == 1.0 and row["image/clip_frac"] == 0.0
        assert row["reward/image_std"] > 0  # the images of a chain were ranked: a real image gradient
        assert all(math.isfinite(v) for k, v in row.items() if k.startswith(("loss/", "kl/", "image/")))
    assert trainer.history[-1]["kl/image"] > 0  # the decoder LoRA has moved off the reference
    record = trainer._last_rollout.image_rollout
    assert len(record.images) == 2 * len(trainer._last_rollout.rows)
    assert record.sde.log_probs.shape == (16, 2)  # 8 chains x 2 images, window of 2 steps
    chains_1_and_2 = record.trajectory([1, 2])  # chain-major rows 2..5
    torch.testing.assert_close(chains_1_and_2.x, record.sde.x[2:6], rtol=0, atol=0)


def test_text_and_image_step_trains_decoder_lora_and_vlm_lora(text_image_run):
    trainer, before, after = text_image_run
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    decoder = {n for n in trainable if n.startswith("decoder.")}
    assert decoder and all("lora_" in n for n in decoder)
    assert {n.split(".")[-2] for n in decoder} == {"default"}
    unchanged = sorted(n for n in trainable if torch.equal(before[n], after[n]))
    assert not unchanged, unchanged[:5]  # decoder LoRA (image loss) and VLM LoRA (text loss) both moved
    changed_frozen = [n for n in before if n not in trainable and not torch.equal(before[n], after[n])]
    assert not changed_frozen, changed_frozen[:5]


def test_image_loss_reaches_the_vlm_only_when_asked(text_image_run):
    """Default (Flow-GRPO): the condition is detached, the image loss has no gradient for the VLM LoRA and one
    for the decoder LoRA. ``loss.image_condition_grad=true``: it reaches the VLM LoRA too."""
    trainer, _, _ = text_image_run
    rollout, idx = trainer._last_rollout, [0, 1, 2, 3]
    model = trainer.model
    vlm = {n: p for n, p in model.named_parameters() if p.requires_grad and n.startswith("vlm.")}
    dec = {n: p for n, p in model.named_parameters() if p.requires_grad and n.startswith("decoder.")}
    trainer.engine.train()
    loss, metrics = trainer.image_policy.loss(rollout, idx, None, model, trainer.reference_context, model,
                                              trainer.negative_source)
    assert "loss/image_pg" in metrics and loss.requires_grad
    grads = torch.autograd.grad(loss, [*vlm.values(), *dec.values()], allow_unused=True)
    assert all(g is None for g in grads[: len(vlm)])
    assert any(g is not None and g.abs().sum() > 0 for g in grads[len(vlm):])

    trainer.cfg.loss.image_condition_grad = True
    try:
        assert trainer.image_policy.needs_condition
        out = model.forward_text(rollout.prompts.select(idx), rollout.completions.select(idx), with_condition=True)
        loss, _ = trainer.image_policy.loss(rollout, idx, out, model, trainer.reference_context, model,
                                            trainer.negative_source)
        grads = torch.autograd.grad(loss, list(vlm.values()), allow_unused=True)
        assert any(g is not None and g.abs().sum() > 0 for g in grads)
    finally:
        trainer.cfg.loss.image_condition_grad = False


def test_reference_disables_the_decoder_lora(text_image_run):
    trainer, _, _ = text_image_run
    model = trainer.model
    lora = [m for m in model.decoder.modules() if hasattr(m, "_disable_adapters") and hasattr(m, "lora_A")]
    assert lora and not any(m._disable_adapters for m in lora)
    with model.adapter_disabled():
        assert all(m._disable_adapters for m in lora)
    assert not any(m._disable_adapters for m in lora)
    assert all(p.requires_grad for m in lora for p in m.lora_B.parameters())


def test_several_euler_images_per_chain_average_the_chain_reward(tmp_path):
    """M = 2 without SDE: two images per chain (different noises), the chain's reward is their mean; nothing is
    recorded for an image loss."""
    from rgpo.tracking import PhaseTimer
    from rgpo.trainer import RGPOTrainer

    trainer = RGPOTrainer(tiny_cfg(tmp_path, "rollout.image.images_per_chain=2", "optim.max_steps=1",
                                   "checkpoint.every=0"))
    assert trainer.image_policy is not None and not trainer.image_policy.recompute
    rollout = trainer.rollout(trainer.sampler.next_step(), PhaseTimer())
    record = rollout.image_rollout
    assert len(record.images) == 16 and record.sde is None
    assert rollout.images == record.per_chain() and [chain[0] for chain in rollout.images] == record.images[::2]
    assert record.images[0].tobytes() != record.images[1].tobytes()  # image 1 has a noise of its own
    per_chain = trainer.score(rollout)
    torch.testing.assert_close(per_chain, record.per_image_rewards.view(8, 2, -1).mean(1))
    loss, metrics = trainer.image_policy.loss(rollout, [0, 1, 2, 3], None, trainer.engine, trainer.reference_context,
                                              trainer.model, trainer.negative_source)
    assert loss.item() == 0.0 and metrics == {}


# ------------------------------------------------------------------------------------ DeepSpeed, 2 ranks
def _launch(tmp_path, *overrides):
    return launch_two_ranks(tmp_path, SIGNAL, *overrides)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_two_ranks_deepspeed_zero_text_and_image(tmp_path, stage):
    config = "zero2.json" if stage == 2 else "zero3.json"
    res = _launch(tmp_path, f"deepspeed.config={REPO / 'configs' / config}", *TEXT_AND_IMAGE, "optim.max_steps=2",
                  "checkpoint.every=0")
    assert res["world"] == 2 and res["zero3"] == (stage == 3)
    assert len(res["history"]) == 2
    for row in res["history"]:
        assert row["image/ratio"] == 1.0 and row["image/clip_frac"] == 0.0
        assert math.isfinite(row["loss/total"]) and math.isfinite(row["loss/image_pg"])
    assert res["history"][0]["kl/image"] == 0.0
    trainable, changed = set(res["trainable"]), set(res["changed"])
    assert any(n.startswith("decoder.") for n in trainable)
    assert trainable and trainable <= changed, sorted(trainable - changed)[:5]
    assert changed <= trainable, sorted(changed - trainable)[:5]
