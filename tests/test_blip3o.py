"""BLIP3-o's own facts on the tiny model: the released layout, the DiT's widths, the sampler's grid and model
timesteps, and one DiT step, the sampled CLIP features and the rendered image against a from-scratch transcription
of the release's sampling math (``blip3o_qwen_inference.generate_image`` / ``sample_images`` and the diffusion
decoder's pipeline). The interface-level contract is ``tests/test_family_contract.py``."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina
from safetensors import safe_open

from rgpo.models import ImageSamplingConfig, detect_family
from rgpo.models.blip3o import ADDED_TOKENS, RELEASE_DIT, Blip3o, Blip3oDiT, Blip3oOptions
from rgpo.models.blip3o.tiny import RANDOM_SHAPES, build_random_blip3o, write_tiny_checkpoint

CFG = ImageSamplingConfig(height=32, width=32, steps=3, guidance_scale=3.0, seed=5)


@pytest.fixture(scope="module")
def model() -> Blip3o:
    return Blip3o.build_tiny(seed=0).eval()


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.int16) for im in images])


# ------------------------------------------------------------------------------------------------ the layout
def test_released_layout_is_written_and_read_back_to_the_same_outputs(model, tmp_path):
    path = tmp_path / "BLIP3o-Model-tiny"
    written = write_tiny_checkpoint(str(path), seed=0)
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "blip3o_qwen" and config["n_query"] == 64
    assert "hidden_size" in config and "text_config" not in config  # transformers 4.5x's flat format
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all(s.startswith("model-") for s in shards)
    keys = set(index["weight_map"])
    assert "model.latent_queries" in keys and "model.embed_tokens.weight" in keys and "lm_head.weight" in keys
    assert any(k.startswith("visual.blocks.0.") for k in keys)
    assert "model.dit.model.caption_projection.linear_1.weight" in keys
    assert "model.dit.model.layers.0.feed_forward.linear_1.weight" in keys and "model.dit.model.pad_token" not in keys
    with safe_open(str(path / index["weight_map"]["model.latent_queries"]), framework="pt") as f:
        assert tuple(f.get_tensor("model.latent_queries").shape) == (1, 64, 64)
    tokenizer_file = json.loads((path / "tokenizer.json").read_text())
    added = {t["content"]: t["id"] for t in tokenizer_file["added_tokens"]}
    ids = [added[t] for t in ADDED_TOKENS]
    assert ids == [added["<|video_pad|>"] + 1 + i for i in range(3)]  # appended after Qwen's specials, in order
    for sub in ("unet/config.json", "vae/config.json", "scheduler/scheduler_config.json", "model_index.json"):
        assert (path / "diffusion-decoder" / sub).is_file()
    assert json.loads((path / "diffusion-decoder/scheduler/scheduler_config.json").read_text())["_class_name"] == \
        "EulerDiscreteScheduler"
    assert detect_family(str(path)) == "blip3o"

    loaded = Blip3o.from_pretrained(str(path)).eval()
    written.eval()
    texts = ["a red apple", "a small cat sitting on a wooden table"]
    with torch.no_grad():
        torch.testing.assert_close(loaded.query_states(texts), written.query_states(texts), rtol=0, atol=0)
        a, b = _draw(written, texts), _draw(loaded, texts)
    assert np.array_equal(a, b)
    # exported again, the files hold the very same tensors
    loaded.save_pretrained(str(tmp_path / "again"), max_shard_size="256KB")
    again = json.loads((tmp_path / "again" / "model.safetensors.index.json").read_text())
    assert set(again["weight_map"]) == keys


def _draw(model: Blip3o, texts) -> np.ndarray:
    states = model.query_states(texts)
    from rgpo.models import Condition

    condition = Condition(states, torch.ones(states.shape[:2], dtype=torch.long))
    return pixels(model.draw(condition, model.initial_noise(len(texts), 1, CFG), CFG))


# ------------------------------------------------------------------------------------------------ the DiT
def test_dit_from_the_release_class_defaults_has_the_ffn_at_four_times_dim():
    with torch.device("meta"):
        dit = Blip3oDiT(3584)
    assert dit.sizes == RELEASE_DIT
    assert dit.ffn_hidden_size == 4 * 1792 == 7168  # diffusers' own formula would give 4864
    block = dit.model.layers[0]
    assert block.attn1.heads == 28 and block.attn2.to_k.in_features == 1792  # cross-attends to projected queries
    assert dit.caption_projection.linear_1.in_features == 3584 and not hasattr(dit.model, "pad_token")
    total = sum(p.numel() for p in dit.parameters())
    assert 1.65e9 < total < 1.67e9, total  # at 4 x dim; diffusers' 8 dim / 3 width would give the paper's ~1.4 B


def test_random_8b_shape_builds_on_meta_at_the_released_sizes():
    model = build_random_blip3o("blip3o-8b", device="meta")
    counts = {name: sum(p.numel() for p in model.part(name).parameters()) for name in model.parts}
    assert counts["queries"] == 64 * 3584
    assert 8.2e9 < counts["language_model"] < 8.35e9  # Qwen2.5-VL-7B (8.29 B with its vision tower)
    assert 1.65e9 < counts["generator"] < 1.67e9
    assert 2.5e9 < counts["renderer"] < 2.7e9  # SDXL's UNet at 1792-wide cross-attention
    assert 8.3e7 < counts["vae"] < 8.4e7
    assert model.renderer.config.cross_attention_dim == 1792 and set(RANDOM_SHAPES) >= {"blip3o-8b", "blip3o-4b"}


# ------------------------------------------------------------------------------------------------ the sampler
def test_sampler_grid_and_model_timesteps_equal_hand_values(model):
    sampler = model.image_sampler(dataclasses.replace(CFG, steps=3))
    # sigmas linspace(1, 1/3, 3) = 1, 2/3, 1/3 (shift 1) then 0; t = 1 - sigma
    torch.testing.assert_close(sampler.grid, torch.tensor([0.0, 1 / 3, 2 / 3, 1.0]), rtol=0, atol=1e-7)
    fed = model.model_timesteps(sampler.grid[:-1], 3)
    assert fed.tolist() == [1000, 666, 333]  # long(sigma * 1000): the release's cast floors
    assert model.model_timesteps(torch.tensor(0.75), 2).tolist() == [250, 250]  # off the grid: (1 - t) * 1000
    default = model.image_sampler(ImageSamplingConfig())
    assert default.num_steps == 50  # rgpo's ImageSamplingConfig default; the release's DiT runs 30 (configs)
    thirty = model.image_sampler(dataclasses.replace(CFG, steps=30))
    assert model.model_timesteps(thirty.grid[:3], 3).tolist() == [1000, 966, 933]
    shifted = Blip3o.build_tiny(options=Blip3oOptions(dit_shift=3.0))
    grid = shifted.image_sampler(dataclasses.replace(CFG, steps=3)).grid
    # shift 3: sigma' = 3 s / (1 + 2 s): 1, 6/7, 3/5
    torch.testing.assert_close(grid[:3], torch.tensor([0.0, 1 / 7, 0.4]), rtol=0, atol=1e-6)


def _release_query_states(model: Blip3o, text: str) -> torch.Tensor:
    """``generate_image``: tokenizer(text) + [IMG] id, embeddings, the 64 queries, the text model with default
    positions, ``hidden_states[-1][:, -64:]`` (post-norm)."""
    hf = model.hf_vlm()
    ids = model.tokenizer([text], return_tensors="pt", add_special_tokens=False).input_ids
    ids = torch.cat([ids, torch.tensor([[model.tokenizer.convert_tokens_to_ids("[IMG]")]])], 1)
    embeds = torch.cat([hf.model.get_input_embeddings()(ids), model.queries.latent_queries], 1)
    out = hf.model.language_model(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2]),
                                  output_hidden_states=True)
    return out.hidden_states[-1][:, -64:] if len(out.hidden_states) else out.last_hidden_state[:, -64:]


def _release_dit(model: Blip3o, x, t, z):
    """``NextDiTCrossAttn.forward``: caption projection then the Lumina-Next forward (diffusers' own)."""
    dit = model.dit
    rope = get_2d_rotary_pos_embed_lumina(dit.sizes["dim"] // dit.sizes["n_heads"], 384, 384)
    return dit.model(hidden_states=x, timestep=t, encoder_hidden_states=dit.caption_projection(z),
                     encoder_mask=torch.ones(z.shape[:2]), image_rotary_emb=rope, cross_attention_kwargs={}).sample


def _release_sample_images(model: Blip3o, states, noise, steps: int, guidance: float = 3.0):
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    z = torch.cat([torch.zeros_like(states), states], 0)
    latents = noise.clone()
    scheduler.set_timesteps(steps, sigmas=np.linspace(1.0, 1 / steps, steps))
    for t in scheduler.timesteps:
        x = latents.repeat(2, 1, 1, 1)
        pred = _release_dit(model, x, t.unsqueeze(0).expand(x.shape[0]).to(torch.long), z)
        uncond, cond = pred.chunk(2)
        latents = scheduler.step(uncond + guidance * (cond - uncond), t, latents).prev_sample
    return latents


@torch.no_grad()
def test_dit_step_features_and_image_equal_a_transcription_of_the_release(model):
    text = "Please generate image based on the following caption: a red apple"
    states = _release_query_states(model, text)
    torch.testing.assert_close(model.query_states([text]), states, rtol=1e-5, atol=1e-5)

    # one DiT step: rgpo's guided velocity is minus the release's guided prediction
    from rgpo.models import Condition

    condition = Condition(states, torch.ones(1, 64, dtype=torch.long))
    inputs = model.image_inputs(condition, model.negative_condition(1), guidance_scale=3.0)
    sampler = model.image_sampler(CFG)
    noise = model.initial_noise(1, 1, CFG)
    x1 = torch.cat([noise, noise])
    pred = _release_dit(model, x1, torch.full((2,), 666, dtype=torch.long), torch.cat([torch.zeros_like(states),
                                                                                          states]))
    expected = -(pred[:1] + 3.0 * (pred[1:] - pred[:1]))
    torch.testing.assert_close(model.image_prediction(inputs, noise, sampler.grid[1]), expected, rtol=1e-5,
                               atol=1e-5)

    # the sampled CLIP features
    latents = model.sample_image_latents(inputs, noise, CFG).latents
    release = _release_sample_images(model, states, noise, CFG.steps)
    torch.testing.assert_close(latents, release, rtol=1e-4, atol=1e-5)

    # the rendered image: the diffusion decoder's pipeline at batch 1, its negative the DiT's features for " "
    neg_states = _release_query_states(model, " ")
    neg_noise = torch.randn((1, 16, 8, 8), generator=torch.Generator().manual_seed(model.options.negative_seed))
    negative = _release_sample_images(model, neg_states, neg_noise, model.checkpoint_steps["negative_dit"])
    to_tokens = lambda z: z.view(1, z.shape[1], -1).permute(0, 2, 1).contiguous()  # noqa: E731
    prompt_embeds = torch.cat([to_tokens(release), to_tokens(negative)])
    scheduler = EulerDiscreteScheduler.from_config(model.renderer_scheduler.config)
    height, width = CFG.height, CFG.width
    time_ids = torch.LongTensor([1024, 1024, 0, 0, height, width])
    added = {"time_ids": torch.cat([time_ids, time_ids]), "text_embeds": prompt_embeds.mean(1)}
    scheduler.set_timesteps(model.checkpoint_steps["renderer"])
    shape = (1, 4, height // 8, width // 8)
    lat = torch.randn(shape[1:], generator=torch.Generator().manual_seed(model.options.renderer_seed))[None]
    lat = lat * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.scale_model_input(torch.cat([lat] * 2), t)
        eps = model.renderer(x, t, encoder_hidden_states=prompt_embeds, added_cond_kwargs=added).sample
        cond, uncond = eps.chunk(2)
        lat = scheduler.step(uncond + 3.0 * (cond - uncond), t, lat).prev_sample
    image = model.vae.decode(lat / model.vae.config.scaling_factor).sample
    image = (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    expected_pixels = (image * 255).round().astype("uint8").astype(np.int16)
    ours = pixels(model.draw(condition, noise, CFG))
    assert np.abs(ours - expected_pixels).max() <= 1, np.abs(ours - expected_pixels).max()


@torch.no_grad()
def test_left_padded_rows_equal_rows_alone_down_to_the_pixels(model):
    texts = ["a cat", "a small red house under a bright blue sky by the sea"]
    batch = model.query_states(texts)
    for i, text in enumerate(texts):
        torch.testing.assert_close(batch[i : i + 1], model.query_states([text]), rtol=1e-5, atol=1e-5)
    from rgpo.models import Condition

    def features(rows):
        states = model.query_states(rows)
        inputs = model.image_inputs(Condition(states, torch.ones(states.shape[:2], dtype=torch.long)),
                                    model.negative_condition(len(rows)), guidance_scale=CFG.guidance_scale)
        noise = model.initial_noise(1, 1, CFG).expand(len(rows), -1, -1, -1)
        return model.sample_image_latents(inputs, noise, CFG).latents

    together = features(texts)
    torch.testing.assert_close(together[1:], features(texts[1:]), rtol=1e-4, atol=1e-4)
    # pixels: the random tiny renderer amplifies float32 rounding of batch-dependent kernels by a few levels
    a, b = pixels(model.decode_latents(together))[1], pixels(model.decode_latents(together[1:]))[0]
    assert np.abs(a - b).max() <= 8 and np.abs(a - b).mean() < 1.0


def test_rollout_renderer_steps_apply_only_inside_rollout_rendering():
    model = Blip3o.build_tiny(options=Blip3oOptions(rollout_renderer_steps=2))
    assert model.renderer_steps() == model.checkpoint_steps["renderer"] == 4
    with model.rollout_rendering():
        assert model.renderer_steps() == 2
    assert model.renderer_steps() == 4
    released = Blip3o.build_tiny(options=Blip3oOptions(renderer_steps=50))
    assert released.renderer_steps() == 50
    with pytest.raises(ValueError, match="rollout_renderer_steps"):
        Blip3oOptions(rollout_renderer_steps=0)


@pytest.mark.slow
def test_train_sample_export_on_the_released_layout_reloads_to_the_same_outputs(tmp_path):
    """``rgpo train`` (LoRA on the backbone + LoRA on the DiT, image PG on its flow), ``rgpo sample`` and ``rgpo
    export`` on a tiny BLIP3-o in its released layout; the export reloads to the trained model's outputs."""
    import subprocess
    import sys
    from pathlib import Path

    from rgpo.building import load_trained

    repo = Path(__file__).resolve().parents[1]
    write_tiny_checkpoint(str(tmp_path / "ckpt"))
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(f'{{"prompt": "draw thing number {i}"}}\n' for i in range(4)))
    run = tmp_path / "run"
    overrides = [f"model.path={tmp_path / 'ckpt'}", "model.family=blip3o", f"data.train_file={data}",
                 f"logging.output_dir={run}", "logging.mode=disabled", "logging.progress_bar=false",
                 "logging.table_every=0", "optim.max_steps=2", "checkpoint.every=2", "rollout.batch_size=4",
                 "rollout.num_generations=2", "rollout.max_new_tokens=6", "rollout.image.height=32",
                 "rollout.image.width=32", "rollout.image.steps=2", "rollout.image.images_per_chain=2",
                 "rollout.image.noise_level=0.7", "loss.image_pg_coef=1.0", "trainable.generator_lora_r=4",
                 "optim.micro_batch_size=2"]
    cli = [sys.executable, "-m", "rgpo"]
    env_run = dict(cwd=repo, capture_output=True, text=True, timeout=900)
    proc = subprocess.run([*cli, "train", "--config", str(repo / "configs/tiny.yaml"), *overrides], **env_run)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    checkpoint = sorted((run / "checkpoints").glob("step-*"))[-1]
    proc = subprocess.run([*cli, "sample", "--checkpoint", str(checkpoint), "--prompts", str(data), "--out",
                           str(tmp_path / "samples"), "--limit", "2", "--no-score", "--steps", "2"], **env_run)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (tmp_path / "samples" / "0000.png").is_file()
    proc = subprocess.run([*cli, "export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "export")],
                          **env_run)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    trained, _ = load_trained(str(checkpoint))
    exported = Blip3o.from_pretrained(str(tmp_path / "export")).eval()
    texts = ["draw thing number 1"]
    with torch.no_grad():
        torch.testing.assert_close(exported.query_states(texts), trained.query_states(texts), rtol=1e-5, atol=1e-5)
        assert np.abs(_draw(exported, texts) - _draw(trained, texts)).max() <= 1


def test_tied_embeddings_of_the_4b_backbone_round_trip(tmp_path):
    """BLIP3o-Model-4B's Qwen2.5-VL-3B ties lm_head to the embeddings: no lm_head key is written, and the loaded
    model ties them again."""
    written = write_tiny_checkpoint(str(tmp_path / "ckpt"), tie_embeddings=True).eval()
    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
    assert "lm_head.weight" not in index["weight_map"]
    loaded = Blip3o.from_pretrained(str(tmp_path / "ckpt")).eval()
    hf = loaded.hf_vlm()
    assert hf.lm_head.weight.data_ptr() == hf.model.get_input_embeddings().weight.data_ptr()
    texts = ["a red apple"]
    prompts = loaded.build_prompts([{"prompt": t} for t in texts])
    completions = loaded.completions_from_texts(["<think> red </think><answer> apple </answer>"])
    with torch.no_grad():
        ours, theirs = written.forward_text(prompts, completions), loaded.forward_text(prompts, completions)
    torch.testing.assert_close(theirs.logps, ours.logps, rtol=0, atol=0)
    torch.testing.assert_close(theirs.condition.states, ours.condition.states, rtol=0, atol=0)
