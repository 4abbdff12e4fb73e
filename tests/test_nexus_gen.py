"""Nexus-Gen: key mappings, the released layout, the release's sampling math and the prefill condition, checked
against from-scratch transcriptions of the release's code (DiffSynth's release-era ``FluxDiT`` / ``lets_dance_flux``
/ ``FlowMatchScheduler`` and Nexus-Gen's generate loop) on tiny models. The contract suite covers the rest."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler

from rgpo.models import ImageSamplingConfig
from rgpo.models.nexus_gen import NexusGen, pack_latents, release_sigmas, unpack_latents
from rgpo.models.nexus_gen.checkpoint import (
    bfl_to_diffusers_vae,
    diffsynth_to_diffusers_dit,
    diffusers_to_bfl_vae,
    diffusers_to_diffsynth_dit,
)
from rgpo.models.nexus_gen.tiny import build_tiny_ae, build_tiny_flux, write_tiny_checkpoint


@pytest.fixture(scope="module")
def model():
    return NexusGen.build_tiny(seed=0).eval()


# ------------------------------------------------------------------ DiffSynth's release-era FluxDiT, transcribed
def _rms(x, w):
    dtype = x.dtype
    x = x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + 1e-6)
    return x.to(dtype) * w


def _rope(pos, dim, theta=10000):
    omega = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    out = torch.einsum("...n,d->...nd", pos.double(), omega)
    stacked = torch.stack([out.cos(), -out.sin(), out.sin(), out.cos()], dim=-1)
    return stacked.view(pos.shape[0], -1, dim // 2, 2, 2).float()


def _apply_rope(x, freqs):
    x_ = x.float().reshape(*x.shape[:-1], -1, 1, 2)
    return (freqs[..., 0] * x_[..., 0] + freqs[..., 1] * x_[..., 1]).reshape(*x.shape).type_as(x)


def _temb(t, sd, prefix):
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    emb = t[:, None].float() * freqs[None]
    emb = torch.cat([emb.cos(), emb.sin()], dim=-1)  # sin, cos then flipped
    h = F.silu(F.linear(emb, sd[f"{prefix}.0.weight"], sd[f"{prefix}.0.bias"]))
    return F.linear(h, sd[f"{prefix}.2.weight"], sd[f"{prefix}.2.bias"])


def _lin(x, sd, name):
    return F.linear(x, sd[f"{name}.weight"], sd[f"{name}.bias"])


def _ln(x):
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def _heads(x, heads):
    b = x.shape[0]
    return x.view(b, -1, 3 * heads, x.shape[-1] // (3 * heads)).transpose(1, 2).chunk(3, dim=1)


def diffsynth_flux(sd, latents, timestep, prompt_emb, pooled, guidance, heads, axes):
    """``lets_dance_flux`` with DiffSynth's ``FluxDiT`` (release era): unpacked latents (B, 16, H, W), ``timestep``
    = sigma x 1000, text ids all zero; returns the prediction (B, 16, H, W)."""
    b, c, h, w = latents.shape
    cond = _temb(timestep, sd, "time_embedder.timestep_embedder")
    cond = cond + _lin(F.silu(_lin(pooled, sd, "pooled_text_embedder.0")), sd, "pooled_text_embedder.2")
    cond = cond + _temb(guidance * 1000, sd, "guidance_embedder.timestep_embedder")
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)
    x = _lin(x, sd, "x_embedder")
    txt = _lin(prompt_emb, sd, "context_embedder")
    image_ids = torch.zeros(h // 2, w // 2, 3)
    image_ids[..., 1] += torch.arange(h // 2)[:, None]
    image_ids[..., 2] += torch.arange(w // 2)[None, :]
    ids = torch.cat([torch.zeros(b, txt.shape[1], 3), image_ids.reshape(1, -1, 3).repeat(b, 1, 1)], dim=1)
    freqs = torch.cat([_rope(ids[..., i], axes[i]) for i in range(3)], dim=-3).unsqueeze(1)
    dim = x.shape[-1]
    blocks = sorted({int(k.split(".")[1]) for k in sd if k.startswith("blocks.")})
    for i in blocks:
        p = f"blocks.{i}."
        ea = _lin(F.silu(cond), sd, p + "norm1_a.linear").unsqueeze(1).chunk(6, dim=2)
        eb = _lin(F.silu(cond), sd, p + "norm1_b.linear").unsqueeze(1).chunk(6, dim=2)
        na, nb = _ln(x) * (1 + ea[1]) + ea[0], _ln(txt) * (1 + eb[1]) + eb[0]
        qa, ka, va = _heads(_lin(na, sd, p + "attn.a_to_qkv"), heads)
        qb, kb, vb = _heads(_lin(nb, sd, p + "attn.b_to_qkv"), heads)
        qa, ka = _rms(qa, sd[p + "attn.norm_q_a.weight"]), _rms(ka, sd[p + "attn.norm_k_a.weight"])
        qb, kb = _rms(qb, sd[p + "attn.norm_q_b.weight"]), _rms(kb, sd[p + "attn.norm_k_b.weight"])
        q, k = _apply_rope(torch.cat([qb, qa], 2), freqs), _apply_rope(torch.cat([kb, ka], 2), freqs)
        o = F.scaled_dot_product_attention(q, k, torch.cat([vb, va], 2)).transpose(1, 2).reshape(b, -1, dim)
        ob, oa = _lin(o[:, : txt.shape[1]], sd, p + "attn.b_to_out"), _lin(o[:, txt.shape[1] :], sd, p + "attn.a_to_out")
        x = x + ea[2] * oa
        x = x + ea[5] * _lin(F.gelu(_lin(_ln(x) * (1 + ea[4]) + ea[3], sd, p + "ff_a.0"), approximate="tanh"), sd,
                             p + "ff_a.2")
        txt = txt + eb[2] * ob
        txt = txt + eb[5] * _lin(F.gelu(_lin(_ln(txt) * (1 + eb[4]) + eb[3], sd, p + "ff_b.0"), approximate="tanh"),
                                 sd, p + "ff_b.2")
    hs = torch.cat([txt, x], dim=1)
    singles = sorted({int(k.split(".")[1]) for k in sd if k.startswith("single_blocks.")})
    for i in singles:
        p = f"single_blocks.{i}."
        shift, scale, gate = _lin(F.silu(cond), sd, p + "norm.linear").chunk(3, dim=1)
        y = _lin(_ln(hs) * (1 + scale[:, None]) + shift[:, None], sd, p + "to_qkv_mlp")
        q, k, v = _heads(y[..., : 3 * dim], heads)
        q, k = _rms(q, sd[p + "norm_q_a.weight"]), _rms(k, sd[p + "norm_k_a.weight"])
        q, k = _apply_rope(q, freqs), _apply_rope(k, freqs)
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, dim)
        hs = hs + gate.unsqueeze(1) * _lin(torch.cat([o, F.gelu(y[..., 3 * dim :], approximate="tanh")], 2), sd,
                                           p + "proj_out")
    x = hs[:, txt.shape[1] :]
    scale, shift = _lin(F.silu(cond), sd, "final_norm_out.linear").chunk(2, dim=1)  # release era: (scale, shift)
    x = _lin(_ln(x) * (1 + scale)[:, None] + shift[:, None], sd, "final_proj_out")
    return x.reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def diffsynth_sigmas(steps):
    """DiffSynth's FlowMatchScheduler(shift=3, sigma_min=0.003/1.002).set_timesteps(steps), then the final 0."""
    sigmas = torch.linspace(1.0, 0.003 / 1.002, steps)
    sigmas = 3.0 * sigmas / (1 + 2.0 * sigmas)
    return torch.cat([sigmas, torch.zeros(1)])


def _dit_state(transformer):
    return diffusers_to_diffsynth_dit({k: v.detach().clone() for k, v in transformer.state_dict().items()})


# ------------------------------------------------------------------ key mappings
def test_diffsynth_keys_round_trip_and_reproduce_diffusers_flux_exactly():
    torch.manual_seed(0)
    flux = build_tiny_flux().eval()
    sd = _dit_state(flux)
    assert "blocks.0.attn.a_to_qkv.weight" in sd and "single_blocks.0.to_qkv_mlp.weight" in sd
    assert not any("to_q." in k for k in sd)
    back = diffsynth_to_diffusers_dit(sd)
    assert set(back) == set(flux.state_dict())
    assert all(torch.equal(back[k], v) for k, v in flux.state_dict().items())
    latents, emb = torch.randn(2, 16, 8, 8), torch.randn(2, 5, 32)
    pooled, sigma = torch.randn(2, 16), torch.tensor([0.75, 0.3])
    ours = flux(hidden_states=pack_latents(latents).reshape(2, 16, 64), encoder_hidden_states=emb,
                pooled_projections=pooled, timestep=sigma, img_ids=_img_ids(4, 4), txt_ids=torch.zeros(5, 3),
                guidance=torch.full((2,), 3.5), return_dict=False)[0]
    theirs = diffsynth_flux(sd, latents, sigma * 1000, emb, pooled, torch.full((2,), 3.5), 2, (4, 14, 14))
    torch.testing.assert_close(unpack_latents(ours.view(2, 4, 4, 64)), theirs, atol=2e-5, rtol=1e-5)


def _img_ids(h, w):
    ids = torch.zeros(h, w, 3)
    ids[..., 1] += torch.arange(h)[:, None]
    ids[..., 2] += torch.arange(w)[None, :]
    return ids.reshape(-1, 3)


def test_bfl_ae_keys_round_trip_and_decode_the_same():
    torch.manual_seed(0)
    vae = build_tiny_ae().eval()
    bfl = diffusers_to_bfl_vae(vae.state_dict())
    # BFL names: up.i is the decoder's (n-1-i)-th stage; the mid attention is 1x1 convolutions; no quant convs
    assert torch.equal(bfl["decoder.up.0.block.0.conv1.weight"], vae.state_dict()["decoder.up_blocks.3.resnets.0.conv1.weight"])
    assert bfl["decoder.mid.attn_1.q.weight"].shape[-2:] == (1, 1) and "encoder.down.0.downsample.conv.weight" in bfl
    assert not any("quant" in k for k in bfl)
    back = bfl_to_diffusers_vae(bfl)
    assert set(back) == set(vae.state_dict()) and all(torch.equal(back[k], v) for k, v in vae.state_dict().items())
    from diffusers import AutoencoderKL

    from rgpo.models.nexus_gen.checkpoint import vae_kwargs_from_bfl

    again = AutoencoderKL(**vae_kwargs_from_bfl(bfl)).eval()
    again.load_state_dict(back)
    z = torch.randn(1, 16, 4, 4)
    with torch.no_grad():
        assert torch.equal(again.decode(z).sample, vae.decode(z).sample)


# ------------------------------------------------------------------ the released layout
def test_release_layout_loads_and_reproduces_the_writer(tmp_path):
    written = write_tiny_checkpoint(str(tmp_path)).eval()
    path = tmp_path / "Nexus-GenV2"
    config = json.loads((path / "config.json").read_text())
    assert "text_config" not in config and config["hidden_size"] == 64 and config["rope_scaling"]["type"] == "mrope"
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    assert {"image_prefill_embeds.weight", "vision_head.weight", "model.embed_tokens.weight"} <= set(index)
    assert len(set(index.values())) > 2
    state = torch.load(path / "generation_decoder.bin", weights_only=True)
    assert {k.split(".")[0] for k in state} == {"pipe", "adapter"}
    assert {k.split(".")[1] for k in state if k.startswith("adapter.")} == {"0", "1", "3", "4"}
    assert "pipe.dit.blocks.0.attn.a_to_qkv.weight" in state
    flux = tmp_path / "FLUX" / "FLUX.1-dev"
    assert (flux / "ae.safetensors").is_file() and (flux / "text_encoder" / "config.json").is_file()
    loaded = NexusGen.from_pretrained(str(path)).eval()  # finds ../FLUX/FLUX.1-dev as the release's models/ does
    assert torch.equal(loaded.pooled, written.pooled) and torch.allclose(loaded.negative, written.negative, atol=1e-6)
    cfg = ImageSamplingConfig(height=32, width=32, steps=2, guidance_scale=3.0, seed=1)
    with torch.no_grad():
        prompts = written.build_prompts([{"prompt": "a red apple"}])
        chains = written.completions_from_texts(["<think> red </think><answer> apple </answer>"])
        a, b = written.forward_text(prompts, chains), loaded.forward_text(prompts, chains)
        torch.testing.assert_close(b.logps, a.logps, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(b.condition.states, a.condition.states, atol=1e-6, rtol=1e-6)
        noise = written.initial_noise(1, 1, cfg)
        assert np.array_equal(np.asarray(loaded.draw(b.condition, noise, cfg)[0]),
                              np.asarray(written.draw(a.condition, noise, cfg)[0]))
    # an export of the loaded model (rgpo's layout: the FLUX folder inside, with the constants) loads on its own
    loaded.save_pretrained(str(tmp_path / "export"))
    again = NexusGen.from_pretrained(str(tmp_path / "export")).eval()
    assert torch.equal(again.negative, loaded.negative)
    with torch.no_grad():
        torch.testing.assert_close(again.forward_text(prompts, chains).condition.states, b.condition.states)


def test_random_shape_has_the_released_parameter_counts():
    meta = NexusGen.build_random("nexus-gen", device="meta")
    counts = {name: sum(p.numel() for p in meta.part(name).parameters()) for name in meta.parts}
    assert counts["prefill"] == 81 * 3584 + 3584 * 3584
    assert counts["adapter"] == 3584 * 4096 + 4096 + 2 * 4096 + 4096 * 4096 + 4096 + 2 * 4096
    assert 11_850_000_000 < counts["generator"] < 11_950_000_000  # FLUX.1-dev: 11.9 B
    assert 8_250_000_000 < counts["language_model"] < 8_350_000_000  # Qwen2.5-VL-7B: 8.29 B
    assert 83_000_000 < counts["vae"] < 84_000_000  # FLUX AE: 83.8 M
    assert meta.negative.shape == (1, 512, 4096) and meta.pooled.shape == (1, 768)


# ------------------------------------------------------------------ sampling = the release's math
def test_time_grid_is_one_minus_the_releases_fixed_shift_sigmas(model):
    hand = torch.tensor([1.0, 0.7511211, 0.0089286, 0.0])  # 3 sigma_k / (1 + 2 sigma_k), linspace(1, .003/1.002, 3)
    torch.testing.assert_close(release_sigmas(3), hand, atol=1e-6, rtol=0)
    for steps in (3, 50):
        assert torch.equal(release_sigmas(steps), diffsynth_sigmas(steps))
        # diffusers' scheduler with the same (unshifted) sigmas walks them too, to an ulp (it shifts in float64)
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
        scheduler.set_timesteps(sigmas=[float(s) for s in np.linspace(1, 0.003 / 1.002, steps)])
        torch.testing.assert_close(scheduler.sigmas.float(), release_sigmas(steps), atol=2.4e-7, rtol=0)
        torch.testing.assert_close(model.image_sampler(ImageSamplingConfig(steps=steps)).grid, 1 - release_sigmas(steps))


def _release_image(model, embeds, noise_unpacked, steps, cfg_scale, guidance=3.5):
    """DiffSynth's FLUX loop as the release runs it (sigma x 1000 to the DiT, CFG against T5("") + CLIP(""),
    x += pred (sigma_next - sigma)), then its AE decode and uint8 conversion."""
    sd = _dit_state(model.transformer)
    adapter = model.adapter
    prompt, negative, pooled = adapter(embeds), model.negative, model.pooled
    sigmas = diffsynth_sigmas(steps)
    latents = noise_unpacked
    g = torch.full((1,), guidance)
    for i in range(steps):
        t = (sigmas[i] * 1000)[None]
        posi = diffsynth_flux(sd, latents, t, prompt, pooled, g, 2, (4, 14, 14))
        nega = diffsynth_flux(sd, latents, t, negative, pooled, g, 2, (4, 14, 14))
        pred = nega + cfg_scale * (posi - nega)
        if i == 0:
            first = pred
        latents = latents + pred * (sigmas[i + 1] - sigmas[i])
    image = model.vae.decode(latents / 0.3611 + 0.1159).sample[0].permute(1, 2, 0).numpy()
    return first, ((image / 2 + 0.5).clip(0, 1) * 255).astype("uint8")


def test_one_step_and_whole_image_equal_the_release_transcription(model):
    cfg = ImageSamplingConfig(height=32, width=32, steps=4, guidance_scale=3.0, seed=7)
    with torch.no_grad():
        prompts = model.build_prompts([{"prompt": "a red apple"}])
        condition = model.forward_text(prompts, model.completions_from_texts(["<think> red </think>"])).condition
        noise = model.initial_noise(1, 1, cfg)
        # the release's noise: randn((1, 16, h/8, w/8)) from a generator seeded with the seed, float32 on CPU
        release_noise = torch.randn((1, 16, 4, 4), generator=torch.Generator().manual_seed(7))
        assert torch.equal(unpack_latents(noise), release_noise)
        first, release = _release_image(model, condition.states, release_noise, cfg.steps, cfg.guidance_scale)
        inputs = model.image_inputs(condition, None, guidance_scale=cfg.guidance_scale)
        sampler = model.image_sampler(cfg)
        v = model.image_prediction(inputs, noise, sampler.grid[0])
        torch.testing.assert_close(v, -pack_latents(first), atol=1e-5, rtol=1e-5)
        ours = np.asarray(model.draw(condition, noise, cfg)[0]).astype(int)
    assert np.abs(ours - release.astype(int)).max() <= 1  # uint8 truncation at a boundary at most


# ------------------------------------------------------------------ the condition = the release's AR loop
def _release_embeddings(model, prompt_ids, chain_ids):
    """Nexus-Gen's generate loop, batch 1, without a cache: [prompt, chain, BOI, 81 image pads] whose pads carry the
    prefill embeddings, positions from Qwen2.5-VL's get_rope_index with the (1, 18, 18) grid, a plain causal
    forward; image embedding k = vision_head(post-norm state at BOI + k)."""
    hf = model.hf_vlm()
    pad = hf.config.image_token_id
    ids = torch.cat([prompt_ids, chain_ids, torch.tensor([[model.boi_id] + [pad] * 81])], dim=1)
    embeds = hf.model.get_input_embeddings()(ids)
    embeds[0, -81:] = model.prefill.embeds.weight
    types = (ids == pad).int()
    positions, _ = hf.model.get_rope_index(ids, mm_token_type_ids=types, image_grid_thw=torch.tensor([[1, 18, 18]]),
                                           attention_mask=torch.ones_like(ids))
    states = hf.model.language_model(inputs_embeds=embeds, position_ids=positions).last_hidden_state
    boi = ids.shape[1] - 82
    return model.prefill.vision_head(states[:, boi : boi + 81])


def test_condition_is_the_releases_81_image_embeddings_and_padded_rows_equal_rows_alone(model):
    rows = [{"prompt": "a red apple"}, {"prompt": "a small cat sitting on a wooden table under a bright sky"}]
    texts = ["<think> red and round </think><answer> an apple </answer>", "<think> cat </think>"]
    with torch.no_grad():
        prompts = model.build_prompts(rows)
        with_boi = model.completions_from_texts(texts)
        batch = model.forward_text(prompts, with_boi)
        assert batch.condition.states.shape == (2, 81, 64) and bool(batch.condition.mask.all())
        for i in range(2):
            real = prompts.attention_mask[i].bool()
            chain = with_boi.completion_ids[i : i + 1, : int(with_boi.condition_lengths[i])]
            release = _release_embeddings(model, prompts.input_ids[i : i + 1, real], chain)
            torch.testing.assert_close(batch.condition.states[i : i + 1], release, atol=1e-5, rtol=1e-5)
            alone = model.forward_text(prompts.select([i]), with_boi.select([i]))
            torch.testing.assert_close(batch.condition.select([i]).states, alone.condition.states, atol=1e-5, rtol=1e-5)
        # a chain that ends without BOI (end of turn, or out of tokens) gets BOI appended: the same condition
        no_boi = model.completions_from_texts(texts, boi=False)
        torch.testing.assert_close(model.forward_text(prompts, no_boi).condition.states, batch.condition.states)


def test_sampled_chains_stop_at_boi_and_count_the_tokens_before_it(model):
    ids = torch.tensor([[5, 6, model.boi_id, 7], [8, model.eos_token_ids[0], 9, 9], [1, 2, 3, 4]])
    comp = model._completions(ids)
    assert comp.condition_lengths.tolist() == [2, 1, 4]
    assert comp.completion_mask.tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]


def test_regularizer_and_stochastic_steps_use_the_release_sigmas(model):
    t = model.regularizer_times(6, torch.Generator().manual_seed(0))
    train = 1 - release_sigmas(1000)[:-1]
    assert all(bool((train == v).any()) for v in t)
    assert torch.equal(model._sigma(t), release_sigmas(1000)[:-1][[int((train == v).nonzero()[0]) for v in t]])
    cfg = dataclasses.replace(ImageSamplingConfig(height=32, width=32, steps=3), noise_level=0.7)
    grid = model.image_sampler(cfg).grid
    assert torch.equal(model._sigma(grid), release_sigmas(3))


def test_lora_targets_are_flux_attention_projections(model):
    names = {n for n, m in model.transformer.named_modules() if n.split(".")[-1] in ("to_q", "add_q_proj")}
    assert names and all(n.endswith(tuple(model.lora_targets("generator"))) for n in names)


def test_prompts_with_an_input_image_keep_the_release_positions_and_rows_equal_rows_alone(model):
    from PIL import Image

    image = Image.new("RGB", (40, 40), (200, 30, 30))
    rows = [{"prompt": "draw this again", "images": [image]}, {"prompt": "a small cat sitting on a wooden table"}]
    with torch.no_grad():
        prompts = model.build_prompts(rows)
        chains = model.completions_from_texts(["<think> red </think>", "<think> a cat </think>"])
        batch = model.forward_text(prompts, chains)
        hf = model.hf_vlm()
        pad = hf.config.image_token_id
        for i in range(2):
            alone_prompt = prompts.select([i])
            alone = model.forward_text(alone_prompt, chains.select([i]))
            torch.testing.assert_close(batch.condition.select([i]).states, alone.condition.states, atol=1e-5, rtol=1e-5)
            # the release: get_rope_index over the input image's grid, then the generated (1, 18, 18) grid
            chain = chains.completion_ids[i : i + 1, : int(chains.condition_lengths[i])]
            prompt_ids = alone_prompt.input_ids[:, alone_prompt.attention_mask[0].bool()]  # the release: no padding
            ids = torch.cat([prompt_ids, chain, torch.tensor([[model.boi_id] + [pad] * 81])], dim=1)
            embeds = torch.cat([model._embed(prompt_ids, alone_prompt.vision),
                                hf.model.get_input_embeddings()(ids[:, prompt_ids.shape[1] : -81]),
                                model.prefill.embeds.weight[None]], dim=1)
            grids = [alone_prompt.vision["image_grid_thw"]] if "image_grid_thw" in alone_prompt.vision else []
            positions, _ = hf.model.get_rope_index(ids, mm_token_type_ids=(ids == pad).int(),
                                                   image_grid_thw=torch.cat([*grids, torch.tensor([[1, 18, 18]])]),
                                                   attention_mask=torch.ones_like(ids))
            states = hf.model.language_model(inputs_embeds=embeds, position_ids=positions).last_hidden_state
            release = model.prefill.vision_head(states[:, -82:-1])
            torch.testing.assert_close(alone.condition.states, release, atol=1e-5, rtol=1e-5)


def test_feature_kl_features_are_every_flux_blocks_image_tokens(model):
    cfg = ImageSamplingConfig(height=32, width=32)
    condition = torch.randn(2, 81, 64)
    from rgpo.models import Condition

    with torch.no_grad():
        inputs = model.image_inputs(Condition(condition, torch.ones(2, 81, dtype=torch.long)), None)
        x = model.initial_noise(2, 1, cfg)
        out = model.generator_output(inputs, x, torch.tensor([0.3, 0.7]), return_features=True)
    assert out.prediction.shape == x.shape and out.prediction.dtype == torch.float32
    assert out.features.shape == (2, 2, 4, 64)  # (N, 1 + 1 blocks, 2 x 2 packed tokens, FLUX width)
    with pytest.raises(ValueError, match="unguided"):
        model.generator_output(model.image_inputs(Condition(condition, torch.ones(2, 81)), None, guidance_scale=3.0),
                               x, torch.tensor(0.5))
