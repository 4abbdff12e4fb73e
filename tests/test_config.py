"""The config tree: defaults as released, strict loading, errors that name key, value, place and reason."""

import json
from pathlib import Path

import pytest

from rgpo.config import ConfigError, RGPOConfig, all_config_classes, field_docs, load_config, save_config

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path, text, name="run.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_every_field_has_a_docstring():
    for cls in all_config_classes():
        import dataclasses

        missing = {f.name for f in dataclasses.fields(cls)} - set(field_docs(cls))
        assert not missing, f"{cls.__name__} fields without a docstring: {sorted(missing)}"


def test_defaults_are_mindomni_released_rgpo():
    cfg = RGPOConfig()
    assert (cfg.trainable.mode, cfg.trainable.lora_r, cfg.trainable.lora_alpha, cfg.trainable.lora_dropout) == ("lora", 64, 128, 0.05)
    assert (cfg.rollout.num_generations, cfg.rollout.batch_size, cfg.rollout.temperature) == (4, 32, 1.0)
    img = cfg.rollout.image
    assert (img.height, img.width, img.steps, img.guidance_scale, img.seed, img.shared_noise) == (512, 512, 50, 3.0, 42, True)
    assert [(r.name, r.weight) for r in cfg.rewards.functions] == [("format", 1.0), ("clip_consistency", 1.0)]
    loss = cfg.loss
    assert (loss.beta, loss.kl_estimator, loss.epsilon_low, loss.aggregation, loss.advantage_eps) == (0.01, "k3", 0.2, "grpo", 1e-4)
    assert (loss.image_kl_coef, loss.image_kl_tau, loss.image_regularizer) == (0.01, 3.0, "feature_kl")
    assert (cfg.optim.lr, cfg.optim.schedule, cfg.optim.warmup_steps, cfg.optim.max_grad_norm) == (1e-5, "linear", 0, 1.0)


def test_yaml_and_overrides(tmp_path):
    path = write(tmp_path, "optim:\n  lr: 2.0e-5\nrollout:\n  num_generations: 8\n  batch_size: 64\n")
    cfg = load_config(path, ["optim.lr=3e-6", "rollout.image.steps=10", "logging.tags=[a, b]"])
    assert cfg.optim.lr == 3e-6 and cfg.rollout.num_generations == 8 and cfg.rollout.image.steps == 10
    assert cfg.logging.tags == ["a", "b"] and cfg.rollout.batch_size == 64
    # An int where a float is expected is fine.
    assert load_config(None, ["optim.lr=1"]).optim.lr == 1.0


def test_reward_list_forms(tmp_path):
    path = write(tmp_path, "rewards:\n  functions:\n    - format\n    - {name: clip_consistency, weight: 0.5, kwargs: {pretrained: /w.pt}}\n")
    cfg = load_config(path)
    assert [(r.name, r.weight) for r in cfg.rewards.functions] == [("format", 1.0), ("clip_consistency", 0.5)]
    assert cfg.rewards.functions[1].kwargs == {"pretrained": "/w.pt"}


def test_unknown_key_names_key_file_and_line(tmp_path):
    path = write(tmp_path, "optim:\n  lr: 1.0e-5\n  learning_rate: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert "optim.learning_rate" in msg and f"{path}:3" in msg and "'lr'" in msg


def test_wrong_type_names_key_value_and_expected(tmp_path):
    path = write(tmp_path, "rollout:\n  num_generations: four\n")
    with pytest.raises(ConfigError, match=r"rollout\.num_generations='four'.*run\.yaml:2.*expected int"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"model\.gradient_checkpointing=1 \(from the command-line override"):
        load_config(None, ["model.gradient_checkpointing=1"])


def test_impossible_combinations_explain_why():
    base = ["data.train_file=x.jsonl"]
    with pytest.raises(ConfigError, match=r"rollout\.batch_size=30 .*multiple of rollout\.num_generations=4"):
        load_config(None, base + ["rollout.batch_size=30"]).validate()
    with pytest.raises(ConfigError, match=r"multiple of the number of ranks \(3\)"):
        load_config(None, base).validate(world_size=3)
    with pytest.raises(ConfigError, match=r"optim\.micro_batch_size=3 .*32 / 1 ranks = 32"):
        load_config(None, base + ["optim.micro_batch_size=3"]).validate()
    from rgpo.building import check_family_config
    from rgpo.models.mindomni import MindOmni

    with pytest.raises(ConfigError, match=r"rollout\.image\.height=500 .*family 'mindomni'.*multiple of 16"):
        check_family_config(load_config(None, base + ["rollout.image.height=500"]).validate(), MindOmni)
    with pytest.raises(ConfigError, match=r"trainable\.full_parts names 'adapter'.*its parts: \['connector'"):
        check_family_config(load_config(None, base + ["trainable.full_parts=[adapter]"]).validate(), MindOmni)
    with pytest.raises(ConfigError, match=r"model\.options\.kv_cache.*valid keys here"):
        check_family_config(load_config(None, base + ["model.options.kv_cache=false"]).validate(), MindOmni)
    with pytest.raises(ConfigError, match=r"trainable\.decoder_lora_r .*was renamed: use trainable\.generator_lora_r"):
        load_config(None, base + ["trainable.decoder_lora_r=4"])
    with pytest.raises(ConfigError, match=r"loss\.aggregation='mean' is not valid; choose one of"):
        load_config(None, base + ["loss.aggregation=mean"]).validate()
    with pytest.raises(ConfigError, match=r"num_generations=1 .*nothing to compare"):
        load_config(None, base + ["rollout.num_generations=1", "rollout.batch_size=8"]).validate()
    with pytest.raises(ConfigError, match=r"data\.train_file"):
        load_config(None).validate()


def test_base_files_and_save_round_trip(tmp_path):
    write(tmp_path, "optim:\n  lr: 5.0e-6\n  max_steps: 7\n", "base.yaml")
    path = write(tmp_path, "base: base.yaml\noptim:\n  max_steps: 9\n")
    cfg = load_config(path)
    assert cfg.optim.lr == 5e-6 and cfg.optim.max_steps == 9
    save_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(tmp_path / "resolved.yaml")
    assert again == cfg


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_shipped_configs_load_and_validate(name):
    cfg = load_config(REPO / "configs" / name)
    world = {"mindomni_rgpo.yaml": 8, "mindomni_rgpo_zero3.yaml": 8}.get(name, 1)
    cfg.validate(world_size=world)


@pytest.mark.parametrize("name", ["zero2.json", "zero3.json", "zero3_offload.json"])
def test_deepspeed_auto_values_come_from_the_run_config(name):
    import torch

    from rgpo.deepspeed_config import build_deepspeed_config, fused_adam_available, zero_stage

    cfg = load_config(REPO / "configs" / "tiny.yaml", [
        f"deepspeed.config={REPO / 'configs' / name}", "rollout.batch_size=16", "optim.micro_batch_size=2",
        "optim.lr=3e-4", "optim.max_grad_norm=0.5", "model.dtype=bfloat16"])
    ds = build_deepspeed_config(cfg, world_size=2, zero_hidden_size=64)
    # 16 chains over 2 ranks = 8 per rank = 4 micro-batches of 2, accumulated into one optimizer step.
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (2, 4, 16)
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"] is True
    assert ds["optimizer"]["params"]["lr"] == 3e-4
    zero = ds["zero_optimization"]
    if name != "zero2.json":  # ZeRO-3's buckets follow the model's hidden size (zero2.json sets its own)
        assert zero["reduce_bucket_size"] == 64 * 64 and zero["stage3_param_persistence_threshold"] == 640
    # Overlap and contiguous gradient buffers only help with GPU streams; on a CPU they are switched off.
    assert zero["overlap_comm"] is zero["contiguous_gradients"] is torch.cuda.is_available()
    assert "auto" not in json.dumps(ds)
    # torch's AdamW wherever DeepSpeed's FusedAdam could not load (every CPU): never a failed JIT build at launch
    assert ds["optimizer"]["params"]["torch_adam"] is not fused_adam_available()
    assert torch.cuda.is_available() or not fused_adam_available()
    assert zero_stage(ds) == (2 if name == "zero2.json" else 3)


def test_zero_buckets_are_sized_from_the_vlm_without_loading_it(tmp_path):
    """ZeRO-3's 'auto' bucket sizes follow the VLM's hidden size (12.8 M elements at MindOmni-7B's 3584, not the
    1024^2 fallback), read from the checkpoint folder's config or the random preset."""
    from rgpo.deepspeed_config import build_deepspeed_config
    from rgpo.models.mindomni import MindOmni

    vlm_hidden_size = MindOmni.language_hidden_size

    assert vlm_hidden_size("random:mindomni-7b") == 3584
    assert vlm_hidden_size(str(REPO / "rgpo" / "assets" / "toyworld" / "model")) == 96
    assert vlm_hidden_size(str(tmp_path)) is None  # a folder that does not say: the fallback
    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"deepspeed.config={REPO / 'configs' / 'zero3.json'}"])
    zero = build_deepspeed_config(cfg, 1, zero_hidden_size=vlm_hidden_size("random:mindomni-7b"))["zero_optimization"]
    assert zero["reduce_bucket_size"] == 3584**2 and zero["stage3_param_persistence_threshold"] == 35840


def test_explicit_deepspeed_value_must_agree_with_the_run_config(tmp_path):
    """A JSON value rgpo's config also sets (clipping, learning rate, precision...) must agree with it: otherwise
    the run would silently use a value its saved config and wandb do not show."""
    from rgpo.deepspeed_config import build_deepspeed_config

    cfg = load_config(REPO / "configs" / "tiny.yaml", ["optim.max_grad_norm=1.0", "optim.lr=3e-4"])
    agreeing = write(tmp_path, json.dumps({"gradient_clipping": 1.0, "optimizer": {"type": "AdamW", "params": {
        "lr": 3e-4}}, "zero_optimization": {"stage": 2}}), "agree.json")
    cfg.deepspeed.config = str(agreeing)
    assert build_deepspeed_config(cfg, 1)["gradient_clipping"] == 1.0
    clashing = write(tmp_path, json.dumps({"gradient_clipping": 2.0, "zero_optimization": {"stage": 2}}), "clash.json")
    cfg.deepspeed.config = str(clashing)
    with pytest.raises(ConfigError, match=r"clash.json.*gradient_clipping is 2.0 but the run config gives 1.0 "
                                          r"\(optim.max_grad_norm\)"):
        build_deepspeed_config(cfg, 1)


def test_deepspeed_unknown_auto_key_is_named(tmp_path):
    from rgpo.deepspeed_config import build_deepspeed_config

    path = write(tmp_path, json.dumps({"zero_optimization": {"stage": 2, "round_robin_gradients": "auto"}}), "ds.json")
    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"deepspeed.config={path}"])
    with pytest.raises(ConfigError, match="zero_optimization.round_robin_gradients"):
        build_deepspeed_config(cfg, world_size=1)


def test_impossible_combinations_name_where_each_key_was_set(tmp_path):
    path = write(tmp_path, "data: {train_file: x.jsonl}\nrollout:\n  batch_size: 30\n")
    with pytest.raises(ConfigError, match=rf"rollout\.batch_size=30 .*set rollout\.batch_size \(at {path}:3\)"):
        load_config(path).validate()
    with pytest.raises(ConfigError, match=r"set optim\.micro_batch_size \(from the command-line override "):
        load_config(path, ["rollout.batch_size=32", "optim.micro_batch_size=7"]).validate()
