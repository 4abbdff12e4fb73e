"""The trainer end to end on tiny models: what trains changes and nothing else does, the first on-policy step
has ratio 1 and KL 0, resume equals an uninterrupted run, groups spanning ranks, wandb tables, DeepSpeed 2-rank
ZeRO-2 and ZeRO-3."""

import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from two_ranks import launch_two_ranks

from rgpo.config import load_config
from rgpo.distributed import free_port
from rgpo.losses import group_advantages

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"


# Random tiny models never write the format, so every format reward is 0; this reward ranks their chains and gives
# the update a real gradient (otherwise only numerical noise would move the weights).
SIGNAL = f"rewards.functions=[format, {{name: '{REPO / 'tests' / 'signal_reward.py'}:letter_fraction', weight: 1.0}}]"


def tiny_cfg(tmp_path, *overrides):
    return load_config(TINY, [f"logging.output_dir={tmp_path / 'run'}", SIGNAL, *overrides])


# ------------------------------------------------------------------------------------ groups across ranks
def _advantage_worker(rank, world, port, rewards, group_size, out):
    import torch.distributed as dist

    from rgpo.advantages import global_advantages

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    per_rank = rewards.shape[0] // world
    idx = list(range(rank * per_rank, (rank + 1) * per_rank))
    local, _, _ = global_advantages(rewards[idx], [1.0, 0.5], idx, group_size)
    out[rank] = local
    dist.destroy_process_group()


def test_group_spanning_two_ranks_gets_single_rank_advantages():
    # 2 prompts x G=4 on 2 ranks with 3 chains... no: 8 chains, 4 per rank, G = 8 would span; use G=4 with
    # per-rank 2 chains (batch 4): the single group is split in half across the ranks.
    rewards = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, float("nan")]])
    expected = group_advantages(torch.tensor([1.0, 0.5, 1.5, 0.0]), 4)
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_advantage_worker, args=(2, free_port(), rewards, 4, out), nprocs=2, join=True)
    torch.testing.assert_close(torch.cat([out[0], out[1]]), expected)


def _dapo_worker(rank, world, port, masks, out):
    import torch.distributed as dist

    from rgpo.advantages import dapo_token_normalizer

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    out[rank] = dapo_token_normalizer(masks[rank], micro_batches=2).item()
    dist.destroy_process_group()


def test_dapo_normalizer_counts_every_ranks_tokens():
    """Rank 0 holds 5 completion tokens, rank 1 holds 9: both divide by (5 + 9) / (2 ranks x 2 micro-batches)."""
    masks = [torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]), torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])]
    out = mp.Manager().dict()
    mp.spawn(_dapo_worker, args=(2, free_port(), masks, out), nprocs=2, join=True)
    assert dict(out) == {0: 14 / 4, 1: 14 / 4}


def test_mpi_launch_variables_become_torch_ranks(monkeypatch):
    """mpirun names ranks in its own variables: they become RANK / WORLD_SIZE / LOCAL_RANK (each process used to
    start alone as rank 0 of 1); without MASTER_ADDR the error says what to export."""
    from rgpo.distributed import _ranks_from_mpi

    env = {"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "16", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}
    monkeypatch.setattr(os, "environ", env)  # a private environment: nothing leaks into later tests
    with pytest.raises(RuntimeError, match=r"rank 5 of 16 \(OMPI_COMM_WORLD_RANK\).*MASTER_ADDR is not set"):
        _ranks_from_mpi()
    assert "RANK" not in env
    env["MASTER_ADDR"] = "node-0"
    _ranks_from_mpi()
    assert [env[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")] == ["5", "16", "1", "29500"]
    env["RANK"] = "3"  # a torch launcher's own variables win
    _ranks_from_mpi()
    assert os.environ["RANK"] == "3"


def _stop_flag_worker(rank, world, port, flags, out):
    import torch.distributed as dist

    from rgpo.distributed import any_rank

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    out[rank] = [any_rank(flag, torch.device("cpu")) for flag in flags[rank]]
    dist.destroy_process_group()


def test_a_stop_signal_on_any_rank_stops_every_rank():
    """The stop request (SIGTERM/SIGINT) may reach one node only: rank 1 alone, rank 0 alone, both, neither."""
    flags = [[False, True, True, False], [True, False, True, False]]
    out = mp.Manager().dict()
    mp.spawn(_stop_flag_worker, args=(2, free_port(), flags, out), nprocs=2, join=True)
    assert dict(out) == {0: [True, True, True, False], 1: [True, True, True, False]}


# ------------------------------------------------------------------------------------ single process
@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """Four steps of the tiny config (one process), kept for several assertions."""
    from rgpo.trainer import RGPOTrainer

    tmp = tmp_path_factory.mktemp("short")
    cfg = tiny_cfg(tmp, "optim.max_steps=4", "checkpoint.every=2", "logging.table_every=2")
    trainer = RGPOTrainer(cfg)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    after = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.close()
    return trainer, before, after, tmp / "run"


def test_trainable_changed_and_frozen_did_not(short_run):
    trainer, before, after, _ = short_run
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    unchanged_trainable = [n for n in trainable if torch.equal(before[n], after[n])]
    assert not unchanged_trainable, unchanged_trainable[:5]
    changed_frozen = [n for n in before if n not in trainable and not torch.equal(before[n], after[n])]
    assert not changed_frozen, changed_frozen[:5]


def test_first_on_policy_step_has_ratio_one_and_zero_kl(short_run):
    trainer, *_ = short_run
    first = trainer.history[0]
    assert first["ratio/mean"] == 1.0
    assert first["kl/text"] == 0.0  # LoRA B starts at zero: policy == reference exactly
    assert first["kl/image"] == 0.0
    for row in trainer.history:
        assert all(math.isfinite(v) for k, v in row.items() if not k.startswith("reward/") or "std" not in k)
    assert trainer.history[-1]["kl/text"] > 0  # the policy has moved off the reference
    assert any(row["reward/std"] > 0 for row in trainer.history)  # the groups were ranked: a real gradient
    vocab = trainer.model.hf_vlm().lm_head.out_features
    assert all(0 < row["entropy"] <= math.log(vocab) for row in trainer.history)  # nats, as TRL logs it


def test_checkpoints_are_complete_and_pruned(short_run):
    from rgpo import checkpointing as ckpt

    _, _, _, out = short_run
    done = ckpt.complete_checkpoints(out)
    assert [p.name for p in done] == ["step-0000002", "step-0000004"]
    state = ckpt.read_state(done[-1])
    assert state["step"] == 4 and state["sampler"]["position"] > 0
    assert (done[-1] / "trainable.safetensors").is_file()
    assert not list((out / "checkpoints").glob(".tmp-*"))


def test_wandb_offline_run_holds_table_with_images_and_reasoning(short_run):
    trainer, _, _, out = short_run
    (run_folder,) = [p.parent for p in out.glob("wandb/offline-run-*/run-*.wandb")]  # what `wandb sync` uploads
    # wandb stages the table (and its image files) for the run's artifact; rgpo keeps them inside that folder.
    staged = [p for p in (run_folder / "staging").rglob("*") if p.is_file()]
    assert not (out / "wandb-data").exists()
    tables = [json.loads(p.read_text()) for p in staged if p.read_bytes()[:20].startswith(b'{"_type": "table"')]
    assert tables, staged[:10]
    table = tables[0]
    columns = table["columns"]
    assert columns[:4] == ["step", "prompt", "reasoning", "image"] and "advantage" in columns
    assert len(table["data"]) == trainer.cfg.rollout.batch_size  # every chain of the step
    row = table["data"][0]
    prompts = {r.prompt for r in trainer.train_rows}
    assert row[1] in prompts and isinstance(row[2], str) and len(row[2]) > 0
    assert row[3]["_type"] == "image-file" and row[3]["width"] == trainer.cfg.rollout.image.width
    pngs = [p for p in staged if p.read_bytes()[:4] == b"\x89PNG"]
    assert len(pngs) >= len(table["data"])


def test_resume_equals_uninterrupted_run(tmp_path):
    """4 steps straight == 2 steps, a new process state from the checkpoint, 2 more steps."""
    from rgpo.trainer import RGPOTrainer

    common = ("optim.max_steps=4", "checkpoint.every=2", "logging.mode=disabled", SIGNAL)
    straight = RGPOTrainer(load_config(TINY, [f"logging.output_dir={tmp_path / 'a'}", *common]))
    straight.train()
    params_a = {n: p.detach().clone() for n, p in straight.model.named_parameters() if p.requires_grad}
    history_a = straight.history

    first = RGPOTrainer(load_config(TINY, [f"logging.output_dir={tmp_path / 'b'}", *common]))
    first.cfg.optim.max_steps = 2  # stop early, as if killed after the step-2 checkpoint
    first.train()
    del first
    resumed = RGPOTrainer(load_config(TINY, [f"logging.output_dir={tmp_path / 'b'}", *common]))
    assert resumed.step == 2
    resumed.train()
    params_b = {n: p.detach().clone() for n, p in resumed.model.named_parameters() if p.requires_grad}
    for name in params_a:
        torch.testing.assert_close(params_b[name], params_a[name], rtol=0, atol=0, msg=name)
    for key in ("loss/total", "kl/text", "reward/total"):
        assert [h[key] for h in resumed.history] == [h[key] for h in history_a[2:]], key


# ------------------------------------------------------------------------------------ DeepSpeed, 2 ranks
def _launch(tmp_path, *overrides, launcher="deepspeed"):
    return launch_two_ranks(tmp_path, SIGNAL, *overrides, launcher=launcher)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_two_ranks_deepspeed_zero(tmp_path, stage):
    config = "zero2.json" if stage == 2 else "zero3.json"
    res = _launch(tmp_path, f"deepspeed.config={REPO / 'configs' / config}", "optim.max_steps=3",
                  "checkpoint.every=0")
    assert res["world"] == 2 and res["zero3"] == (stage == 3)
    assert len(res["history"]) == 3
    for row in res["history"]:
        assert math.isfinite(row["loss/total"]) and math.isfinite(row["kl/text"])
    trainable, changed = set(res["trainable"]), set(res["changed"])
    assert trainable and trainable <= changed, sorted(trainable - changed)[:5]
    assert changed <= trainable, sorted(changed - trainable)[:5]


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("gather", [True, False], ids=["gathered-rollout", "partitioned-rollout"])
def test_two_ranks_zero3_mixed_image_and_text_prompts_and_a_one_prompt_eval(tmp_path, gather):
    """ZeRO-3 on 2 ranks where rank 0's prompt has an input image and rank 1's has none: both must make the same
    collective gathers (rank 1 runs the vision tower on a blank image), or the step fails / hangs; with the rollout
    on gathered weights, and on partitioned ones (deepspeed.zero3_gather_for_rollout=false: every generation step
    fetches layers collectively). Evaluation with fewer prompts than ranks: the rank without a prompt still takes
    part (it hung before)."""
    from PIL import Image

    Image.new("RGB", (56, 56), (200, 30, 30)).save(tmp_path / "red.png")
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(json.dumps({"prompt": "Draw this object again, but blue", "images": ["red.png"]}) + "\n"
                     + json.dumps({"prompt": "A cat sitting calmly"}) + "\n")
    res = _launch(tmp_path, f"deepspeed.config={REPO / 'configs' / 'zero3.json'}", f"data.train_file={mixed}",
                  "data.shuffle=false", "rollout.batch_size=8", "optim.max_steps=2", "checkpoint.every=0",
                  f"data.eval_file={REPO / 'configs' / 'prompts' / 'sample.jsonl'}", "eval.every=1",
                  "eval.num_prompts=1", f"deepspeed.zero3_gather_for_rollout={str(gather).lower()}",
                  launcher="torchrun")
    assert res["world"] == 2 and res["zero3"] and len(res["history"]) == 2
    assert all(math.isfinite(row["loss/total"]) for row in res["history"])
    assert set(res["trainable"]) <= set(res["changed"])


@pytest.mark.distributed
@pytest.mark.slow
def test_two_ranks_torchrun_group_spans_ranks(tmp_path):
    # batch 4 with G=4 on 2 ranks: the one group is split across the ranks.
    res = _launch(tmp_path, "rollout.batch_size=4", "optim.micro_batch_size=2", "optim.max_steps=2",
                  "checkpoint.every=0", launcher="torchrun")
    assert res["world"] == 2 and len(res["history"]) == 2
    assert set(res["trainable"]) <= set(res["changed"])


def test_full_fine_tuning_with_frozen_reference(tmp_path):
    """trainable.mode=full: every language-model weight trains, the vision tower and decoder do not, and the
    reference (a separate frozen copy) stays exactly as built, so the text KL grows from 0."""
    from rgpo.tracking import PhaseTimer
    from rgpo.trainer import RGPOTrainer

    cfg = tiny_cfg(tmp_path, "trainable.mode=full", "optim.lr=1e-4", "optim.max_steps=2", "checkpoint.every=0",
                   "logging.mode=disabled", "trainable.full_parts=[connector]")
    trainer = RGPOTrainer(cfg)
    ref_before = {n: p.detach().clone() for n, p in trainer.reference.named_parameters()}
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert any(n.startswith("connector.") for n in trainable)
    assert all("visual" not in n and not n.startswith(("decoder.", "vae.")) for n in trainable)
    assert trainer.history[0]["kl/text"] == 0.0 and trainer.history[-1]["kl/text"] > 0
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed <= trainable
    assert any("language_model.layers.0.self_attn.q_proj" in n for n in changed)
    assert all(torch.equal(p, ref_before[n]) for n, p in trainer.reference.named_parameters())

    # The guidance negative is the reference's, also in a process that starts without it cached (a resume):
    # the trained VLM would encode it differently.
    trainer.model.clear_negative_cache()
    trained, _ = trainer.model.negative_states(1)
    reference, _ = trainer.reference.negative_states(1)
    assert not torch.equal(trained, reference)
    asked = []
    ask_reference = trainer.reference.negative_condition
    trainer.reference.negative_condition = lambda n: asked.append(n) or ask_reference(n)
    trainer.model.negative_condition = lambda n: pytest.fail("the rollout asked the trained model for its negative")
    trainer.rollout(trainer.sampler.next_step(), PhaseTimer())
    assert asked == [8]


@pytest.mark.parametrize("zero3", [False, True], ids=["no-zero3", "zero3"])
def test_lora_run_training_the_connector_keeps_it_as_built_for_the_reference(tmp_path, zero3):
    """trainable.train_connector=true beside the VLM LoRA: the connector trains in full and has no adapter to
    switch off, so the reference (the image KL's frozen branch) runs a copy of the connector as it was built."""
    from rgpo.trainer import RGPOTrainer

    extra = [f"deepspeed.config={REPO / 'configs' / 'zero3.json'}"] if zero3 else []
    trainer = RGPOTrainer(tiny_cfg(tmp_path, "trainable.full_parts=[connector]", "optim.max_steps=3",
                                   "checkpoint.every=0", "logging.mode=disabled", *extra))
    assert trainer.zero3 == zero3
    states = torch.randn(2, 5, trainer.model.connector.proj.in_features, generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    with torch.no_grad(), trainer.gathered():  # ZeRO-3: whole weights for a call outside the engine
        as_built = trainer.model.connect(states, mask)
    trainer.train()
    assert all(math.isfinite(row["kl/image"]) for row in trainer.history)
    with torch.no_grad(), trainer.gathered():
        trained = trainer.model.connect(states, mask)
        with trainer.reference_context() as reference:
            frozen = reference.connect(states, mask)
    assert (trained - as_built).abs().max() > 1e-4  # the connector did train
    torch.testing.assert_close(frozen, as_built, rtol=0, atol=0)
    # the copy is no parameter of the model: nothing trains it, ZeRO-3 does not partition it, checkpoints skip it
    assert not any("reference_connector" in name for name, _ in trainer.model.named_parameters())


def test_full_fine_tuning_of_a_given_model_copies_it_as_the_reference(tmp_path):
    from rgpo.models.mindomni.tiny import build_tiny_mindomni
    from rgpo.trainer import RGPOTrainer

    given = build_tiny_mindomni(seed=123)  # not the model config's seed
    weights = {n: p.detach().clone() for n, p in given.named_parameters()}
    trainer = RGPOTrainer(tiny_cfg(tmp_path, "trainable.mode=full", "optim.max_steps=1", "checkpoint.every=0",
                                   "logging.mode=disabled"), model=given)
    assert trainer.model is given and trainer.reference is not given
    assert all(torch.equal(p, weights[n]) for n, p in trainer.reference.named_parameters())


def test_dapo_divides_by_the_batch_tokens_over_the_micro_batches(tmp_path):
    """One rank, 8 chains in micro-batches of 4: each micro-batch's summed token loss is divided by the batch's
    token count / 2, so the two averaged are the batch's token mean."""
    from rgpo.trainer import RGPOTrainer

    trainer = RGPOTrainer(tiny_cfg(tmp_path, "loss.aggregation=dapo", "optim.max_steps=1", "checkpoint.every=0",
                                   "logging.mode=disabled", "rollout.image.enabled=false"))
    trainer.train()
    rollout = trainer._last_rollout
    tokens = rollout.completions.completion_mask.sum().item()
    assert trainer.dapo_token_normalizer(rollout).item() == tokens / 2
    assert math.isfinite(trainer.history[0]["loss/total"])


def test_text_only_mode_is_plain_vlm_grpo(tmp_path):
    """rollout.image.enabled=false: no images, no image KL, and the LoRA still learns from the text loss."""
    from rgpo.trainer import RGPOTrainer

    trainer = RGPOTrainer(tiny_cfg(tmp_path, "rollout.image.enabled=false", "optim.max_steps=2",
                                   "checkpoint.every=0", "logging.mode=disabled"))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    assert "kl/image" not in trainer.history[-1] and "timing/rollout/images" not in trainer.history[-1]
    assert trainer._last_rollout.images == [[]] * 8 and trainer._last_rollout.old_logps is None
    after = dict(trainer.model.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)


def test_text_only_under_zero3_in_one_process(tmp_path):
    """Text only under ZeRO-3 (partitioned norm / lm_head): the chunked, checkpointed log-probs recompute with
    weights ZeRO-3 has released again, and the update still applies (the text KL moves off 0)."""
    from rgpo.trainer import RGPOTrainer

    trainer = RGPOTrainer(tiny_cfg(tmp_path, "rollout.image.enabled=false", "optim.max_steps=2",
                                   "checkpoint.every=0", "logging.mode=disabled",
                                   f"deepspeed.config={REPO / 'configs' / 'zero3.json'}"))
    assert trainer.zero3
    trainer.train()
    assert trainer.history[0]["kl/text"] == 0.0 and trainer.history[-1]["kl/text"] > 0
    assert all(math.isfinite(row["loss/total"]) for row in trainer.history)


def test_full_fine_tuning_under_zero3_with_the_image_kl(tmp_path):
    """Full fine-tuning under ZeRO-3, image KL on: the gradient of the image KL reaches the VLM through the model's
    connect / decode_step engine calls, whose outputs ZeRO-3 must see to keep its backward bookkeeping (it
    asserted at the first backward while those outputs were plain dataclasses)."""
    from rgpo.trainer import RGPOTrainer

    trainer = RGPOTrainer(tiny_cfg(tmp_path, "trainable.mode=full", "optim.lr=1e-4", "optim.max_steps=2",
                                   "checkpoint.every=0", "logging.mode=disabled", "loss.image_kl_coef=0.01",
                                   f"deepspeed.config={REPO / 'configs' / 'zero3.json'}"))
    assert trainer.zero3 and trainer.reference is not None
    trainer.train()
    first, last = trainer.history
    assert first["kl/text"] == 0.0 and first["kl/image"] == 0.0  # policy == reference at the start
    assert last["kl/text"] > 0 and last["kl/image"] != 0.0 and math.isfinite(last["kl/image"])


def test_checkpoint_folder_loads_under_zero3_with_its_weights(tmp_path):
    """A released-layout folder (the embedded toy world) under ZeRO-3: every weight ends partitioned and, gathered,
    equals the folder's (the decoder and connector used to be partitioned empty inside zero.Init before their
    weights were read, a size-mismatch error); then a step runs."""
    import deepspeed

    from rgpo.building import build_model
    from rgpo.trainer import RGPOTrainer

    cfg = load_config(REPO / "configs" / "toy_world.yaml", [
        f"logging.output_dir={tmp_path / 'run'}", f"deepspeed.config={REPO / 'configs' / 'zero3.json'}",
        "optim.max_steps=1", "checkpoint.every=0", "logging.mode=disabled"])
    plain = dict(build_model(cfg).named_parameters())
    trainer = RGPOTrainer(cfg)
    params = {n: p for n, p in trainer.model.named_parameters() if "lora_" not in n}
    assert all(hasattr(p, "ds_id") for p in params.values())
    with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
        for name, param in params.items():
            key = name.replace("base_model.model.", "").replace(".base_layer", "")
            assert torch.equal(param.detach(), plain[key].detach()), name
    assert len(params) == len(plain)
    trainer.train()
    assert math.isfinite(trainer.history[-1]["loss/total"])


def test_bfloat16_run_keeps_the_vae_float32_and_learns(tmp_path):
    """model.dtype=bfloat16 (the released recipe): DeepSpeed casts every parameter to bf16, the trainer puts the
    VAE's exact float32 weights back, images are drawn, and the bf16 LoRA moves."""
    from rgpo.building import build_model
    from rgpo.trainer import RGPOTrainer

    cfg = tiny_cfg(tmp_path, "model.dtype=bfloat16", "optim.max_steps=2", "checkpoint.every=0",
                   "logging.mode=disabled")
    fresh = build_model(cfg)
    trainer = RGPOTrainer(cfg)
    assert {p.dtype for p in trainer.model.vlm.parameters()} == {torch.bfloat16}
    for (name, a), b in zip(fresh.vae.named_parameters(), trainer.model.vae.parameters()):
        assert b.dtype == torch.float32 and torch.equal(a, b.cpu()), name
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    assert all([im.size for im in chain] == [(64, 64)] for chain in trainer._last_rollout.images)
    assert all(math.isfinite(row["loss/total"]) for row in trainer.history)
    after = dict(trainer.model.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)


def test_random_model_paths(tmp_path):
    """model.path=random:<shape>: random:tiny is the tiny model itself; an unknown shape is named with the key."""
    from rgpo.building import build_model

    tiny = build_model(tiny_cfg(tmp_path))
    same = build_model(tiny_cfg(tmp_path, "model.path=random:tiny"))
    assert all(torch.equal(a, b) for a, b in zip(tiny.state_dict().values(), same.state_dict().values()))
    with pytest.raises(ValueError, match=r"model.path='random:mindomni-70b'.*known: \['mid', 'mindomni-7b', 'tiny'\]"):
        build_model(tiny_cfg(tmp_path, "model.path=random:mindomni-70b"))
