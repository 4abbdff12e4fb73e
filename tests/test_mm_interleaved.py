"""MM-Interleaved: its custom pieces against computations written out from scratch, its released layout in and
out, the random shape at the released sizes, interleaved chains (images drawn inside the chain and replayed by
the training forward)."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rgpo.models import ImageSamplingConfig, detect_family
from rgpo.models.mm_interleaved import MMFS, MMInterleaved, MSDeformAttn, ms_deform_attn
from rgpo.models.mm_interleaved.checkpoint import INDEX, WEIGHTS_DIR
from rgpo.models.mm_interleaved.unet import MMFSNet, unet_with_mmfs
from rgpo.models.mm_interleaved.vision import QKNormQFormerAttention, ViTAdapter, sincos_1d

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def tiny():
    return MMInterleaved.build_tiny(seed=0).eval()


# ------------------------------------------------------------------------------------ deformable attention
def bilinear(value: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """value (H, W, D) sampled at normalised (x, y): pixel (x W - 0.5, y H - 0.5), zeros outside the map."""
    h, w, _ = value.shape
    px, py = x * w - 0.5, y * h - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    out = torch.zeros(value.shape[-1], dtype=torch.float64)
    for yy, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
        for xx, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
            if 0 <= yy < h and 0 <= xx < w:
                out += wy * wx * value[yy, xx].double()
    return out


def test_grid_sample_deformable_attention_equals_a_loop_over_points_with_hand_written_bilinear_sampling():
    gen = torch.Generator().manual_seed(0)
    shapes = [(4, 5), (2, 3)]
    n, lq, heads, dim, points = 2, 3, 2, 4, 3
    value = torch.randn(n, sum(h * w for h, w in shapes), heads, dim, generator=gen)
    # locations partly outside [0, 1] so the zero padding is exercised
    loc = torch.rand(n, lq, heads, len(shapes), points, 2, generator=gen) * 1.4 - 0.2
    weights = torch.rand(n, lq, heads, len(shapes), points, generator=gen)
    ours = ms_deform_attn(value, shapes, loc, weights)
    expected = torch.zeros(n, lq, heads * dim, dtype=torch.float64)
    starts = np.cumsum([0] + [h * w for h, w in shapes])
    for b in range(n):
        for q in range(lq):
            for m in range(heads):
                acc = torch.zeros(dim, dtype=torch.float64)
                for lvl, (h, w) in enumerate(shapes):
                    level = value[b, starts[lvl] : starts[lvl + 1], m].reshape(h, w, dim)
                    for p in range(points):
                        x, y = loc[b, q, m, lvl, p].tolist()
                        acc += float(weights[b, q, m, lvl, p]) * bilinear(level, x, y)
                expected[b, q, m * dim : (m + 1) * dim] = acc
    torch.testing.assert_close(ours.double(), expected, atol=1e-5, rtol=1e-5)


def naive_mmfs(mod: MMFS, query, reference, features, shapes, mask) -> torch.Tensor:
    """The release's MMFS written out per (row, query, head, image, level, point)."""
    n, lq, _ = query.shape
    n_images = features.shape[1]
    heads, points, levels = mod.n_heads, mod.n_points, mod.n_levels
    d = mod.value_dim // heads
    out = torch.zeros(n, lq, mod.value_dim, dtype=torch.float64)
    sizes = [h * w for h, w in shapes]
    starts = np.cumsum([0] + sizes)
    for b in range(n):
        m = mask[b].long().tolist()
        relpos = [(sum(m) + 1 - sum(m[: i + 1])) * m[i] for i in range(n_images)]
        values = mod.value_proj(features[b]).double()  # (n_images, S, value_dim)
        for q in range(lq):
            logits, samples = [], []
            for i in range(n_images):
                qi = mod.dynamic_offset_mask(query[b, q]) + mod.query_relpos.weight[relpos[i]]
                offsets = mod.sampling_offsets(qi).view(heads, points, 2).double()
                attn = mod.attention_weights(qi).view(heads, levels, points + 1).double()
                bias = 0.0 if m[i] else -10000.0
                for lvl, (h, w) in enumerate(shapes):
                    scale = mod.scale_values[lvl]
                    level = values[i, starts[lvl] : starts[lvl + 1]].reshape(h, w, heads, d)
                    for hd in range(heads):
                        for p in range(points):
                            x = float(reference[0, q, 0, 0]) + float(offsets[hd, p, 0]) * scale / w
                            y = float(reference[0, q, 0, 1]) + float(offsets[hd, p, 1]) * scale / h
                            logits.append((hd, float(attn[hd, lvl, p]) + bias))
                            samples.append(bilinear(level[:, :, hd], x, y))
                        logits.append((hd, -math.log(n_images * levels)))  # the ignore slot
                        samples.append(mod.ignore_token.view(heads, d)[hd].double())
            for hd in range(heads):
                idx = [k for k, (h_, _) in enumerate(logits) if h_ == hd]
                weights = torch.softmax(torch.tensor([logits[k][1] for k in idx], dtype=torch.float64), 0)
                out[b, q, hd * d : (hd + 1) * d] = sum(w * samples[k] for w, k in zip(weights, idx))
    return mod.output_proj(out.float())


def test_mmfs_equals_the_release_formula_written_out_with_masked_images_and_recency():
    torch.manual_seed(0)
    mod = MMFS(d_model=8, d_query=6, d_value=5, d_out=7, n_levels=2, n_heads=2, n_points=2, ratio=1.0,
               spatial_shapes=[4, 2], base_spatial_shape=2, max_num_image_per_seq=5)
    with torch.no_grad():
        mod.ignore_token.normal_()  # zero in the release's init: random here so its path is checked
        mod.attention_weights.weight.normal_()
        mod.sampling_offsets.weight.normal_(std=0.5)
    shapes = [(4, 4), (2, 2)]
    query = torch.randn(2, 3, 6)
    features = torch.randn(2, 3, 20, 5)
    mask = torch.tensor([[1, 0, 1], [0, 0, 0]])  # row 1 sees no image: only the ignore slots
    reference = torch.rand(1, 3, 1, 2)
    with torch.no_grad():
        ours = mod(query, reference, features, shapes, mask)
        expected = naive_mmfs(mod, query, reference, features, shapes, mask)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    # a row that sees no image gets exactly output_proj(ignore_token), whatever its features
    torch.testing.assert_close(ours[1], mod.output_proj(mod.ignore_token.view(-1)).expand(3, -1).detach(),
                               atol=1e-6, rtol=1e-6)


def test_ms_deform_attn_module_runs_the_softmax_over_levels_and_points():
    torch.manual_seed(1)
    mod = MSDeformAttn(d_model=8, n_levels=2, n_heads=2, n_points=2, ratio=0.5)
    with torch.no_grad():
        mod.attention_weights.weight.normal_()
    shapes = [(4, 4), (2, 2)]
    query, feats = torch.randn(1, 3, 8), torch.randn(1, 20, 8)
    reference = torch.rand(1, 3, 1, 2)
    with torch.no_grad():
        ours = mod(query, reference, feats, shapes)
        value = mod.value_proj(feats).view(1, 20, 2, 2)
        offsets = mod.sampling_offsets(query).view(1, 3, 2, 2, 2, 2)
        w = torch.softmax(mod.attention_weights(query).view(1, 3, 2, 4), -1).view(1, 3, 2, 2, 2)
        norm = torch.tensor([[4.0, 4.0], [2.0, 2.0]])
        loc = reference[:, :, None, :, None, :] + offsets / norm[None, None, None, :, None, :]
        expected = mod.output_proj(ms_deform_attn(value, shapes, loc, w))
    torch.testing.assert_close(ours, expected)


# ------------------------------------------------------------------------------------ vision
def test_vit_adapter_with_closed_injectors_gives_clip_s_own_tokens_and_maps_at_four_scales():
    from transformers import CLIPVisionConfig
    from transformers.models.clip.modeling_clip import CLIPEncoder

    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                           image_size=16, patch_size=4, layer_norm_eps=1e-5)
    torch.manual_seed(0)
    adapter = ViTAdapter(cfg, conv_inplane=8).eval()
    for block in adapter.adapter_interactions:
        block.injector.gamma.data.zero_()  # the release's init: the injectors add nothing yet
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        last, maps = adapter(pixels)
        encoder = CLIPEncoder(cfg)
        encoder.layers = adapter.encoder.layers
        plain = encoder(adapter.pre_layrnorm(adapter.embeddings(pixels))).last_hidden_state
    torch.testing.assert_close(last, plain, atol=1e-5, rtol=1e-5)
    assert [tuple(m.shape) for m in maps] == [(2, 32, 16, 16), (2, 32, 8, 8), (2, 32, 4, 4), (2, 32, 2, 2)]
    # opening an injector changes the ViT tokens
    adapter.adapter_interactions[0].injector.gamma.data.fill_(1.0)
    with torch.no_grad():
        moved, _ = adapter(pixels)
    assert not torch.allclose(moved, last, atol=1e-4)


def test_qformer_qk_norm_attention_equals_the_release_formula():
    from transformers import Blip2QFormerConfig

    cfg = Blip2QFormerConfig(hidden_size=8, encoder_hidden_size=6, num_attention_heads=2, intermediate_size=16)
    torch.manual_seed(0)
    attn = QKNormQFormerAttention(cfg, is_cross_attention=True).eval()
    for ln in (attn.q_norm, attn.k_norm):
        ln.weight.data.normal_()
        ln.bias.data.normal_()
    x, enc = torch.randn(1, 3, 8), torch.randn(1, 5, 6)
    keep = torch.tensor([[1, 1, 1, 0, 0]]).bool()[:, None, None]
    with torch.no_grad():
        ours, _ = attn(x, encoder_hidden_states=enc, encoder_attention_mask=keep)
        q = F.layer_norm(attn.query(x).view(1, 3, 2, 4).transpose(1, 2), (4,), attn.q_norm.weight, attn.q_norm.bias,
                         1e-12)
        k = F.layer_norm(attn.key(enc).view(1, 5, 2, 4).transpose(1, 2), (4,), attn.k_norm.weight, attn.k_norm.bias,
                         1e-12)
        v = attn.value(enc).view(1, 5, 2, 4).transpose(1, 2)
        scores = q @ k.transpose(-1, -2) / 2.0 + (~keep).float() * -1e9
        expected = (scores.softmax(-1) @ v).transpose(1, 2).reshape(1, 3, 8)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------ the UNet with synchronizers
def test_unet_synchronizer_equals_diffusers_unet_with_the_blocks_residuals_added_to_its_skips(tiny):
    """The release patches the UNet forward to add MMFS residuals to every skip and the mid block after the mid
    block: diffusers' own forward with those residuals as ControlNet residuals is the same function."""
    gen = tiny.image_decoder
    unet, mmfs = gen.decoder.unet, gen.decoder.mmfs_module
    torch.manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([500, 20])
    text = torch.randn(2, 8, 32)
    maps = [torch.randn(2, 1, 32, s, s) for s in (16, 8, 4, 2)]
    mask = torch.tensor([[1], [0]])
    skips = []
    hooks = [unet.conv_in.register_forward_hook(lambda m, i, o: skips.append(o))]
    hooks += [b.register_forward_hook(lambda m, i, o: skips.extend(o[1])) for b in unet.down_blocks]
    mids = []
    hooks.append(unet.mid_block.register_forward_hook(lambda m, i, o: mids.append(o)))
    with torch.no_grad():
        plain = unet(x, t, text).sample
        for h in hooks:
            h.remove()
        flat = torch.cat([f.flatten(3).transpose(2, 3) for f in maps], dim=2)
        shapes = [(s, s) for s in (16, 8, 4, 2)]
        residuals = [blk(s, flat, mask, shapes) for s, blk in zip(skips, mmfs.mmfs_down_blocks)]
        mid = mmfs.mmfs_mid_block(mids[0], flat, mask, shapes)
        expected = unet(x, t, text, down_block_additional_residuals=residuals,
                        mid_block_additional_residual=mid).sample
        ours, _ = unet_with_mmfs(unet, mmfs, x, t, text, maps, mask)
        without, _ = unet_with_mmfs(unet, None, x, t, text, None, None)
    torch.testing.assert_close(without, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    assert (ours - plain).abs().max() > 1e-4  # the synchronizer changes the prediction


def test_unet_synchronizer_levels_follow_the_release_construction_rule():
    net = MMFSNet(1024, (320, 640, 1280, 1280), 2, [64, 32, 16, 8], 64)
    bases = [round(64 / float(b.mmfs.scale_ratios[0])) for b in net.mmfs_down_blocks]
    assert bases == [64, 64, 64, 32, 32, 32, 16, 16, 16, 8, 8, 8]
    assert round(64 / float(net.mmfs_mid_block.mmfs.scale_ratios[0])) == 8
    assert [b.query_norm.normalized_shape[0] for b in net.mmfs_down_blocks] == \
        [320, 320, 320, 320, 640, 640, 640, 1280, 1280, 1280, 1280, 1280]


# ------------------------------------------------------------------------------------ the decoder condition
def test_decoder_condition_is_the_reversed_post_norm_context_projected_with_1d_sincos(tiny):
    prompts = tiny.build_prompts([{"prompt": "a red apple"}, {"prompt": "a cat"}])
    completions = tiny.completions_from_texts(["<think> red </think><answer> apple </answer>", "cat"])
    with torch.no_grad():
        out = tiny.forward_text(prompts, completions)
        for i in range(2):
            real = prompts.attention_mask[i].bool()
            ids = torch.cat([prompts.input_ids[i][real], completions.completion_ids[i][:int(
                completions.completion_mask[i].sum())]])
            assert int(ids[0]) == tiny.bos_id and int(ids[-1]) == tiny.soi_id
            states = tiny.mm_decoder(inputs_embeds=tiny._embed(ids[None], None),
                                     position_ids=torch.arange(len(ids))[None]).last_hidden_state[0]
            h = states.shape[-1]
            table = torch.tensor([[math.sin(p / 10000 ** (2 * j / h)) for j in range(h // 2)]
                                  + [math.cos(p / 10000 ** (2 * j / h)) for j in range(h // 2)]
                                  for p in range(len(ids))])
            expected = tiny.context_feat_proj(states.flip(0)) + table
            got = out.condition.states[i, : len(ids)]
            assert int(out.condition.mask[i].sum()) == len(ids)
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert np.allclose(sincos_1d(4, np.array([0.0, 1.0])), [[0, 0, 1, 1], [math.sin(1), math.sin(0.01),
                                                                          math.cos(1), math.cos(0.01)]])


def test_guided_prediction_gives_both_halves_the_synchronizer_features_and_the_learned_negative(tiny):
    prompts = tiny.build_prompts([{"prompt": "a red apple", "images": [_picture(0)]}])
    completions = tiny.completions_from_texts(["apple"])
    with torch.no_grad():
        cond = tiny.forward_text(prompts, completions).condition
        assert int(cond.feature_mask[0, 0]) == 1  # the prompt's image is the previous image of the slot
        guided = tiny.image_inputs(cond, None, guidance_scale=7.5)
        plain = tiny.image_inputs(cond, None, guidance_scale=1.0)
        x, t = torch.randn(1, 4, 8, 8), torch.tensor(301)
        eps = tiny.image_prediction(guided, x, t)
        gen = tiny.image_decoder
        neg = dataclasses_replace(plain, embeds=gen.neg_prompt_embeds)
        cond_eps = tiny.image_prediction(plain, x, t)
        uncond_eps = tiny.image_prediction(neg, x, t)
        torch.testing.assert_close(eps, uncond_eps + 7.5 * (cond_eps - uncond_eps), atol=1e-4, rtol=1e-4)
        # the unconditional half saw the features: without them its prediction differs
        blind = dataclasses_replace(neg, feature_mask=torch.zeros_like(neg.feature_mask))
        assert (tiny.image_prediction(blind, x, t) - uncond_eps).abs().max() > 1e-5


def dataclasses_replace(inputs, **changes):
    from rgpo.models.mm_interleaved import UNetInputs

    values = {k: getattr(inputs, k) for k in ("embeds", "features", "feature_mask", "guidance")}
    values.update(changes)
    return UNetInputs(**values)


def _picture(seed: int):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))


# ------------------------------------------------------------------------------------ the released layout
def test_layout_holds_two_pickled_shards_of_one_flat_state_dict_and_reads_back_exactly(tiny, tmp_path):
    tiny.save_pretrained(str(tmp_path))
    assert detect_family(str(tmp_path)) == "mm_interleaved"
    files = sorted(os.listdir(tmp_path / WEIGHTS_DIR))
    assert files == ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin",
                     "pytorch_model.bin.index.json"]
    index = json.loads((tmp_path / INDEX).read_text())["weight_map"]
    assert {"soi_token", "context_feat_proj.weight", "image_decoder.neg_prompt_embeds",
            "text_decoder.head.bias", "text_decoder.head_new.weight",
            "mm_decoder.layers.0.llama_cross_attn.gate", "mm_decoder.layers.0.llama_cross_attn.attn.query_relpos.weight",
            "image_decoder.decoder.mmfs_module.mmfs_mid_block.conv.weight",
            "visual_tokenizer.encoder.vision_model.adapter_spm.stem.1.weight",
            "visual_tokenizer.perceiver_resampler.blip2qformer.encoder.layer.0.attention.attention.q_norm.weight",
            } <= set(index)
    assert "mm_decoder.layers.1.llama_cross_attn.gate" not in index  # synchronizer in layers 0, 4, ... only
    shard = torch.load(tmp_path / WEIGHTS_DIR / files[0], weights_only=True)
    assert isinstance(shard, dict) and all(isinstance(v, torch.Tensor) for v in shard.values())
    assert not any(k.startswith("mm_decoder.text_decoder") for k in index)  # the release's key names on disk
    loaded = MMInterleaved.from_pretrained(str(tmp_path)).eval()
    ours, theirs = tiny.state_dict(), loaded.state_dict()
    assert set(ours) == set(theirs)
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


def test_a_checkpoint_missing_a_weight_is_refused_naming_it(tiny, tmp_path):
    tiny.save_pretrained(str(tmp_path))
    shard = tmp_path / WEIGHTS_DIR / "pytorch_model-00001-of-00002.bin"
    state = torch.load(shard, weights_only=True)
    state.pop("soi_token")
    torch.save(state, shard)
    with pytest.raises(ValueError, match="soi_token"):
        MMInterleaved.from_pretrained(str(tmp_path))


def test_random_13b_shape_has_the_released_part_sizes_on_the_meta_device():
    model = MMInterleaved.build_random("mm-interleaved-13b", device="meta")

    def count(module, skip: str | None = None) -> int:
        return sum(p.numel() for n, p in module.named_parameters() if skip is None or skip not in n)

    # Vicuna-13B without its lm_head (32000 rows) plus the 2 new rows
    llama = sum(p.numel() for n, p in model.mm_decoder.named_parameters()
                if "llama_cross_attn" not in n and "text_decoder" not in n)
    assert llama == 13_015_864_320 - 32000 * 5120 + 2 * 5120
    assert sum(1 for layer in model.mm_decoder.layers if getattr(layer, "llama_cross_attn", None)) == 10
    vit = model.visual_tokenizer.encoder.vision_model
    # CLIP ViT-L/14's vision tower without its post-LayerNorm (the release drops it)
    assert count(vit.embeddings) + count(vit.pre_layrnorm) + count(vit.encoder) == 303_177_728
    assert count(model.image_decoder.decoder.unet) == 865_910_724  # SD-2.1's UNet
    assert count(model.image_decoder.decoder.vae) == 83_653_863
    assert tuple(model.image_decoder.neg_prompt_embeds.shape) == (1, 77, 1024)
    assert model.text_decoder.head.bias is not None and model.text_decoder.head_new.out_features == 2
    assert len(model.image_decoder.decoder.mmfs_module.mmfs_down_blocks) == 12


# ------------------------------------------------------------------------------------ interleaved chains
def _force_soi(model: MMInterleaved, strength: float = 10.0) -> None:
    with torch.no_grad():
        model.text_decoder.head_new.bias[0] += strength  # soi is the first new token (tiny: logit -5 + this)


def test_interleaved_chain_draws_each_image_inside_the_chain_and_the_forward_replays_it():
    model = MMInterleaved.build_tiny(seed=1).eval()
    model.options.max_images = 2
    _force_soi(model)
    prompts = model.build_prompts([{"prompt": "a red apple"}])
    calls = []

    def draw(condition, chains, slots):
        calls.append((list(chains), list(slots), condition.states.clone()))
        return [torch.full((3, 16, 16), 0.2 + 0.6 * s) for s in slots]

    with torch.no_grad():
        comp = model.generate(prompts, num_generations=2, max_new_tokens=16, temperature=0.0, draw=draw)
        assert comp.image_slots == [2, 2] and [len(i) for i in comp.images] == [2, 2]
        assert [c[1] for c in calls] == [[0, 0], [1, 1]]
        ids = comp.completion_ids[0]
        sois = (ids == model.soi_id).nonzero()[:, 0].tolist()
        assert len(sois) == 2 and all((ids[s + 1 : s + 5] == model.image_id).all() for s in sois)
        assert comp.completion_mask[0, sois[0] + 1 : sois[0] + 5].sum() == 0  # image slots are not sampled
        out = model.forward_text(prompts.repeat_interleave(2), comp)
        assert out.condition.num_rows == 4
        # the forward's condition of each slot is the one the image was drawn from
        for slot in range(2):
            recorded = calls[slot][2][0]
            length = int(out.condition.mask[slot].sum())
            torch.testing.assert_close(out.condition.states[slot, :length], recorded[:length], atol=1e-4,
                                       rtol=1e-4)
        # greedy chains: every sampled token is the forward's argmax with the images in place
        assert torch.isfinite(out.logps).all()
        # later text depends on the drawn image: replaying another image changes the log-probs after it
        other = comp.select([0, 1])
        other.images = [[im, torch.ones_like(im)] for im, _ in comp.images]
        moved = model.forward_text(prompts.repeat_interleave(2), other)
        after = torch.zeros_like(comp.completion_mask, dtype=torch.bool)
        after[0, sois[1] + 5 :] = True
        after &= comp.completion_mask.bool()
        before = comp.completion_mask.bool() & ~after
        before[1] = False
        assert (moved.logps[after] - out.logps[after]).abs().max() > 1e-6
        torch.testing.assert_close(moved.logps[before], out.logps[before], atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_generation_matches_the_training_forward_token_by_token_across_images():
    """The cached decode (with masked holes where other rows took images) and the one training forward give the
    same distribution: greedy tokens are the forward's argmax everywhere a token was sampled."""
    model = MMInterleaved.build_tiny(seed=2).eval()
    model.options.max_images = 2
    _force_soi(model, 7.5)
    prompts = model.build_prompts([{"prompt": "a red apple"}, {"prompt": "a small cat"}])

    def draw(condition, chains, slots):
        return [torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(c * 10 + s))
                for c, s in zip(chains, slots)]

    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        comp = model.generate(prompts, num_generations=1, max_new_tokens=14, temperature=0.0, draw=draw)
        assert max(comp.image_slots) >= 1
        greedy = model.forward_text(prompts, comp, with_condition=False).logps
        checked = 0
        for i in range(2):
            ids = comp.completion_ids[i]
            sois = (ids == model.soi_id).nonzero()[:, 0].tolist()
            if not sois:
                continue
            after = [j for j in range(sois[0] + 1, ids.shape[0]) if comp.completion_mask[i, j] and j not in sois]
            for j in after:  # the tokens sampled after an image, with the image in place
                swapped = comp.select([i] * 4)
                alt = swapped.completion_ids.clone()
                alt[:, j] = torch.randint(0, model.soi_id, (4,), generator=gen)
                swapped.completion_ids = alt
                other = model.forward_text(prompts.select([i] * 4), swapped, with_condition=False).logps
                assert (other[:, j] <= greedy[i, j] + 1e-5).all(), (i, j)
                checked += 1
        assert checked > 0


def test_a_chain_ending_at_eos_still_gets_its_image_slot(tiny):
    prompts = tiny.build_prompts([{"prompt": "a red apple"}])
    completions = tiny.completions_from_texts(["no image here"], end="</s>")
    with_soi = tiny.completions_from_texts(["no image here"])
    with torch.no_grad():
        a = tiny.forward_text(prompts, completions).condition
        b = tiny.forward_text(prompts, with_soi).condition
    torch.testing.assert_close(a.states, b.states, atol=1e-5, rtol=1e-5)


def test_draw_is_the_seeded_ancestral_ddpm_sampler_and_repeats_exactly(tiny):
    prompts = tiny.build_prompts([{"prompt": "a red apple"}])
    with torch.no_grad():
        cond = tiny.forward_text(prompts, tiny.completions_from_texts(["apple"])).condition
        cfg = ImageSamplingConfig(height=32, width=32, steps=3, guidance_scale=7.5, seed=5)
        noise = tiny.initial_noise(1, 1, cfg)
        one = np.asarray(tiny.draw(cond, noise, cfg)[0])
        two = np.asarray(tiny.draw(cond, noise, cfg)[0])
        other = np.asarray(tiny.draw(cond, noise, ImageSamplingConfig(height=32, width=32, steps=3,
                                                                      guidance_scale=7.5, seed=6))[0])
    assert (one == two).all() and not (one == other).all()


# ------------------------------------------------------------------------------------ credit on interleaved chains
def test_interleaved_credit_matches_the_worked_example():
    from rgpo.interleaved import interleaved_credit

    values = [[1.0, [0.5, 0.1]], [0.0, [0.9]], [1.0, [0.3, 0.7]]]
    text, images, chain_totals, image_totals = interleaved_credit(values, [2, 1, 2], [1.0, 2.0], 3, eps=0.0)
    assert chain_totals == pytest.approx([1.6, 1.8, 2.0])
    assert image_totals[0] == pytest.approx([2.0, 1.2]) and image_totals[1] == pytest.approx([1.8])
    assert image_totals[2] == pytest.approx([1.6, 2.4])
    assert text == pytest.approx([-1.0, 0.0, 1.0])
    assert [a[0] for a in images] == pytest.approx([1.0, 0.0, -1.0])
    assert images[0][1] == pytest.approx(-1 / math.sqrt(2)) and images[2][1] == pytest.approx(1 / math.sqrt(2))
    # equal rewards: every advantage 0; a reward that does not apply (None) adds nothing
    flat = interleaved_credit([[1.0, None], [1.0, [None]]], [1, 1], [1.0, 1.0], 2)
    assert flat[0] == [0.0, 0.0] and flat[1] == [[0.0], [0.0]]
    with pytest.raises(ValueError, match="reward 1 returned 1 values for chain 0, which holds 2 images"):
        interleaved_credit([[1.0, [0.5]]], [2], [1.0, 1.0], 1)


def test_rewards_scoring_each_image_reach_each_slots_advantage():
    """The worked example through the trainer's scoring: ``fmt`` returns one number per chain, ``clip`` a list of
    one value per image (``combine`` reads it because the chains drew several images); the chain rewards are the
    list means, and each image's advantage is its slot's group-normalised value."""
    import types

    from PIL import Image

    from rgpo.data import PromptRow
    from rgpo.interleaved import DrawnImage, InterleavedRecord, score_interleaved
    from rgpo.rewards import Reward

    counts = [2, 1, 2]
    record = InterleavedRecord({(c, s): DrawnImage(c, s, None, None, Image.new("RGB", (8, 8), (10 * c, 20 * s, 0)))
                                for c in range(3) for s in range(counts[c])})
    fmt = Reward("fmt", lambda completions, **kw: [1.0, 0.0, 1.0], weight=1.0)
    seen = []

    def clip(completions, images, **kw):
        seen.append([len(chain) for chain in images])
        return [[0.5, 0.1], [0.9], [0.3, 0.7]]

    rows = [PromptRow("p", [], {}, "f.jsonl:1") for _ in range(3)]
    cfg = types.SimpleNamespace(rewards=types.SimpleNamespace(timeout_s=None, parallel=False),
                                rollout=types.SimpleNamespace(num_generations=3),
                                loss=types.SimpleNamespace(advantage_scale="group", advantage_eps=0.0))
    per_reward = score_interleaved([fmt, Reward("clip", clip, weight=2.0)], rows, ["a", "b", "c"], record, cfg,
                                   torch.device("cpu"))
    assert seen == [counts]  # every image of a chain, in one call
    assert per_reward[:, 1].tolist() == pytest.approx([0.3, 0.9, 0.5])  # the per-image values' means
    advantages = record.advantages
    assert [advantages[(c, 0)] for c in range(3)] == pytest.approx([1.0, 0.0, -1.0])
    assert advantages[(0, 1)] == pytest.approx(-1 / math.sqrt(2)) and advantages[(2, 1)] == pytest.approx(1 / math.sqrt(2))


def _two_image_rollout(model, noise_level: float):
    from rgpo.interleaved import InterleavedDrawer

    model.options.max_images = 2
    _force_soi(model, 11.0)  # soi at logit 6: about 40 % per sampled token
    prompts = model.build_prompts([{"prompt": "a red apple"}])
    cfg = ImageSamplingConfig(height=32, width=32, steps=3, guidance_scale=2.0, seed=7, noise_level=noise_level)
    drawer = InterleavedDrawer(model, cfg, keys=[0, 0], step=0, record_steps=noise_level > 0)
    with torch.no_grad():
        comp = model.generate(prompts, num_generations=2, max_new_tokens=16, temperature=1.0,
                              generator=torch.Generator().manual_seed(3), draw=drawer)
    return prompts.repeat_interleave(2), comp, drawer, cfg


@pytest.mark.slow
def test_interleaved_drawer_records_every_slot_and_replays_it_with_ratio_one():
    from rgpo.interleaved import image_step_logps

    model = MMInterleaved.build_tiny(seed=3).eval()
    prompts, comp, drawer, cfg = _two_image_rollout(model, 1.0)
    record = drawer.record
    assert sorted(record.drawn) == [(c, s) for c in range(2) for s in range(comp.image_slots[c])]
    assert comp.image_slots == [2, 2]
    for key, drawn in record.drawn.items():
        with torch.no_grad():
            replay = image_step_logps(model, drawn, cfg)
        assert torch.equal(replay, drawn.trajectory.log_probs), key
    # shared noise: slot s of both chains of the group starts from the same latents, slots differ
    assert torch.equal(drawer.noise(0, 0), drawer.noise(1, 0)) and not torch.equal(drawer.noise(0, 0),
                                                                                    drawer.noise(0, 1))


def test_a_two_image_chain_s_rewards_reach_both_images_log_probs_and_the_text_between_them():
    from rgpo.interleaved import image_step_logps, interleaved_credit, interleaved_loss

    model = MMInterleaved.build_tiny(seed=4).eval()
    prompts, comp, drawer, cfg = _two_image_rollout(model, 1.0)
    ids = comp.completion_ids[0]
    sois = (ids == model.soi_id).nonzero()[:, 0].tolist()
    between = [j for j in range(sois[0] + 1, sois[1]) if comp.completion_mask[0, j]]
    assert len(sois) == 2 and between, "the chain must hold text between its two images"
    # a chain reward and an image reward: chain 0 wins on the whole (0.95 vs 0.75) and on its first image (1.0
    # vs 0.5) but loses on its second (0.9 vs 1.0): the two images of one chain get opposite advantages
    values = [[0.0, [1.0, 0.9]], [1.0, [-0.5, 0.0]]]
    text_adv, image_adv, _, _ = interleaved_credit(values, comp.image_slots, [1.0, 1.0], 2)
    assert text_adv[0] > 0 and image_adv[0][0] > 0 > image_adv[0][1]
    keys = drawer.record.keys([0, 1])
    out = model.forward_text(prompts, comp, with_condition=False)
    logps = out.logps.detach().requires_grad_(True)
    image_logps = [image_step_logps(model, drawer.record.drawn[k], cfg).detach().requires_grad_(True) for k in keys]
    loss, _ = interleaved_loss(logps, comp.completion_mask, torch.tensor(text_adv), image_logps,
                               [drawer.record.drawn[k].trajectory.log_probs for k in keys],
                               [image_adv[c][s] for c, s in keys], image_pg_coef=1.0)
    loss.backward()
    # the chain's reward reaches the text between its images (and pushes it along the chain's advantage)
    assert (logps.grad[0, between] != 0).all() and (torch.sign(-logps.grad[0, between]) == np.sign(text_adv[0])).all()
    # each image's own advantage reaches its own recorded steps
    for k, lp in zip(keys, image_logps):
        c, s = k
        assert (lp.grad != 0).all(), k
        assert (torch.sign(-lp.grad) == np.sign(image_adv[c][s])).all(), k
    # and the generator's weights get the image terms' gradient through the replayed steps
    model.zero_grad()
    replay = image_step_logps(model, drawer.record.drawn[keys[1]], cfg)
    (-(replay.mean())).backward()
    unet = model.image_decoder.decoder.unet
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in unet.parameters())


# ------------------------------------------------------------------------------------ the CLI end to end
@pytest.mark.slow
def test_train_sample_export_on_the_released_layout_reloads_to_the_same_outputs(tmp_path):
    """``rgpo train`` (LoRA on the LLM and the UNet, image policy gradient on the DDPM steps, ZeRO-2), ``rgpo
    sample`` and ``rgpo export`` on a tiny MM-Interleaved in its released layout; the export reloads to the
    trained model's outputs."""
    import subprocess
    import sys
    from pathlib import Path

    from rgpo.building import load_trained
    from rgpo.models.mm_interleaved.tiny import write_tiny_checkpoint

    repo = Path(__file__).resolve().parents[1]
    write_tiny_checkpoint(str(tmp_path / "ckpt"))
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(f'{{"prompt": "draw thing number {i}"}}\n' for i in range(4)))
    run = tmp_path / "run"
    overrides = [f"model.path={tmp_path / 'ckpt'}", "model.family=mm_interleaved", f"data.train_file={data}",
                 f"logging.output_dir={run}", "logging.mode=disabled", "logging.progress_bar=false",
                 "logging.table_every=0", "optim.max_steps=2", "checkpoint.every=2", "rollout.batch_size=4",
                 "rollout.num_generations=2", "rollout.max_new_tokens=6", "rollout.image.height=32",
                 "rollout.image.width=32", "rollout.image.steps=3", "rollout.image.images_per_chain=2",
                 "rollout.image.noise_level=1.0", "rollout.image.guidance_scale=7.5", "loss.image_pg_coef=1.0",
                 "loss.image_kl_coef=0.0", "trainable.generator_lora_r=4", "optim.micro_batch_size=2"]
    cli = [sys.executable, "-m", "rgpo"]
    env_run = dict(cwd=repo, capture_output=True, text=True, timeout=1500)
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
    exported = MMInterleaved.from_pretrained(str(tmp_path / "export")).eval()
    prompts = trained.build_prompts([{"prompt": "draw thing number 1"}])
    comp = trained.completions_from_texts(["a thing"])
    with torch.no_grad():
        a, b = trained.forward_text(prompts, comp), exported.forward_text(prompts, comp)
        torch.testing.assert_close(b.logps, a.logps, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b.condition.states, a.condition.states, rtol=1e-5, atol=1e-5)
        cfg = ImageSamplingConfig(height=32, width=32, steps=2, guidance_scale=7.5, seed=1)
        noise = trained.initial_noise(1, 1, cfg)
        pa = np.asarray(trained.draw(a.condition, noise, cfg)[0]).astype(int)
        pb = np.asarray(exported.draw(b.condition, noise, cfg)[0]).astype(int)
        assert np.abs(pa - pb).max() <= 1


@pytest.mark.slow
def test_trainer_step_on_interleaved_chains_trains_the_llm_and_the_unet_from_every_image(tmp_path):
    """One RGPO step with chains of up to 2 images drawn inside them (soi made likely): the rollout records
    every image's steps, the rewards see every image of a chain, and the update moves the LLM's and the UNet's
    LoRA weights."""
    from pathlib import Path

    from rgpo.config import load_config
    from rgpo.interleaved import InterleavedRecord
    from rgpo.trainer import RGPOTrainer

    repo = Path(__file__).resolve().parents[1]
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(f'{{"prompt": "draw thing number {i}"}}\n' for i in range(2)))
    seen = []

    def brightness_of_each_chain(completions, images, **kwargs):
        seen.append([len(chain) for chain in images])
        return [float(np.mean([np.asarray(im, dtype=np.float32).mean() / 255 for im in chain])) if chain else 0.0
                for chain in images]

    cfg = load_config(repo / "configs" / "tiny.yaml", [
        "model.family=mm_interleaved", "model.options={max_images: 2}", f"data.train_file={data}",
        f"logging.output_dir={tmp_path / 'run'}", "logging.mode=disabled", "logging.progress_bar=false",
        "logging.table_every=0", "checkpoint.every=0", "checkpoint.resume=null", "optim.max_steps=1",
        "rollout.batch_size=4", "rollout.num_generations=2", "rollout.max_new_tokens=10", "rollout.image.height=32",
        "rollout.image.width=32", "rollout.image.steps=3", "rollout.image.noise_level=1.0",
        "rollout.image.images_per_chain=2", "rollout.image.guidance_scale=7.5", "loss.image_pg_coef=1.0", "loss.image_kl_coef=0.0", "loss.beta=0.0",
        "trainable.generator_lora_r=4", "optim.micro_batch_size=2", "optim.lr=1e-2"])
    from rgpo.rewards import Reward

    trainer = RGPOTrainer(cfg, reward_fns=[Reward('brightness', brightness_of_each_chain)])
    try:
        _force_soi(trainer.model, 11.0)
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        rollout_record = []
        original = trainer.rollout

        def rollout(slots, timer):
            out = original(slots, timer)
            rollout_record.append(out)
            return out

        trainer.rollout = rollout
        trainer.train()
    finally:
        trainer.close()
    record = rollout_record[0].image_rollout
    assert isinstance(record, InterleavedRecord) and max(record.count(c) for c in range(4)) == 2
    assert seen and seen[0] == [record.count(c) for c in range(4)]
    assert all(d.trajectory is not None for d in record.drawn.values())
    moved = {n for n, p in trainer.model.named_parameters() if n in before and not torch.equal(p, before[n])}
    assert any("mm_decoder" in n and "lora_" in n for n in moved)
    assert any("decoder.unet" in n and "lora_" in n for n in moved)


def test_release_images_follow_diffusers_ddpm_loop_with_one_generator(tiny):
    """The release's pipeline: one generator draws the initial latents, then every ``scheduler.step``'s noise."""
    from diffusers import DDPMScheduler

    prompts = tiny.build_prompts([{"prompt": "a red apple"}, {"prompt": "a cat"}])
    with torch.no_grad():
        cond = tiny.forward_text(prompts, tiny.completions_from_texts(["apple", "cat"])).condition
        ours = np.stack([np.asarray(im) for im in tiny.release_images(cond, seed=11, size=32, steps=3)])
        scheduler = DDPMScheduler.from_config(tiny.scheduler.config)
        scheduler.set_timesteps(3)
        gen = torch.Generator().manual_seed(11)
        latents = torch.randn((2, 4, 8, 8), generator=gen)
        inputs = tiny.image_inputs(cond, None, guidance_scale=7.5)
        for t in scheduler.timesteps:
            eps = tiny.image_prediction(inputs, latents, t)
            latents = scheduler.step(eps, t, latents, generator=gen).prev_sample
        theirs = np.stack([np.asarray(im) for im in tiny.decode_latents(latents)])
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1
