"""The MindOmni adapter on a tiny random model: every number is checked against the plain HF / diffusers path."""

from __future__ import annotations

import json
import math
import os
import shutil

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.omnigen.processor_omnigen import OmniGenCollator
from peft import LoraConfig, get_peft_model
from PIL import Image
from safetensors.torch import load_file

from rgpo.models import (
    MODEL_FAMILIES,
    Completions,
    ImageSamplingConfig,
    get_model_class,
    load_model,
)
from rgpo.models.lm import sample_tokens as _sample
from rgpo.models.mindomni import MindOmni
from rgpo.models.mindomni import modeling as mindomni_module
from rgpo.models.mindomni import omnigen as og
from rgpo.models.mindomni.modeling import (
    ANSWER_CLOSE,
    answer_condition_length,
    euler_grid,
    pack_left,
)
from rgpo.models.mindomni.tiny import build_tiny_mindomni, write_tiny_checkpoint

CFG = ImageSamplingConfig(height=64, width=64, steps=4, guidance_scale=3.0, seed=7)
TEXT_ROWS = [{"prompt": "a red apple"}, {"prompt": "a small cat sitting on a wooden table under the sky"}]


def image_rows() -> list[dict]:
    return [
        {"prompt": "make it blue", "images": [Image.new("RGB", (40, 30), (200, 10, 10))]},
        {
            "prompt": "add a hat to the cat in the picture",
            "images": [Image.new("RGB", (30, 30), (10, 10, 200))],
        },
    ]


@pytest.fixture(scope="module")
def model() -> MindOmni:
    return build_tiny_mindomni(seed=0).eval()


def plain_hf_forward(model: MindOmni, prompts, completions: Completions, **kwargs):
    """The reference: HF's own forward (its own positions) over prompt + completion."""
    ids = torch.cat([prompts.input_ids, completions.completion_ids], 1)
    mask = torch.cat([prompts.attention_mask, completions.completion_mask], 1)
    vision = dict(prompts.vision)
    if "image_grid_thw" in vision:
        vision["mm_token_type_ids"] = (ids == model.hf_vlm().config.image_token_id).int()
    return model.hf_vlm()(input_ids=ids, attention_mask=mask, **vision, **kwargs)


def random_condition(model: MindOmni, lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded random VLM states (N, L, H_vlm) and mask."""
    gen = torch.Generator().manual_seed(seed)
    length = max(lengths)
    hidden = model.hf_vlm().config.text_config.hidden_size
    states = torch.randn(len(lengths), length, hidden, generator=gen)
    mask = torch.tensor([[0] * (length - n) + [1] * n for n in lengths])
    return states * mask[..., None], mask


# -- registry ----------------------------------------------------------------------------------------------------


def test_registry_lists_known_families():
    assert get_model_class("mindomni") is MindOmni
    assert MODEL_FAMILIES["mindomni"].family == "mindomni"
    with pytest.raises(ValueError, match=r"unknown model family 'bagel'; known families: .*mindomni"):
        get_model_class("bagel")


# -- prompts and generation --------------------------------------------------------------------------------------


def test_build_prompts_chat_template_left_padded(model):
    batch = model.build_prompts(TEXT_ROWS)
    assert batch.vision == {}
    short, long_ = (
        model.tokenizer.decode(row[m.bool()]) for row, m in zip(batch.input_ids, batch.attention_mask)
    )
    assert short.startswith("<|im_start|>system\n" + model.system_prompt + "<|im_end|>")
    assert short.endswith(
        "<|im_start|>user\nGenerate an image according to the following instructions\na red apple"
        "<|im_end|>\n<|im_start|>assistant\n"
    )
    assert TEXT_ROWS[1]["prompt"] in long_
    # the shorter prompt is padded on the LEFT
    assert batch.attention_mask[0, 0] == 0 and batch.attention_mask[0, -1] == 1
    assert batch.attention_mask[1].all()


def test_build_prompts_with_images_carries_vision_inputs(model):
    batch = model.build_prompts(image_rows())
    assert set(batch.vision) == {"pixel_values", "image_grid_thw"}
    image_id = model.hf_vlm().config.image_token_id
    tokens_per_row = (batch.input_ids == image_id).sum(1)
    merge = model.hf_vlm().config.vision_config.spatial_merge_size
    assert tokens_per_row.tolist() == (batch.vision["image_grid_thw"].prod(-1) // merge**2).tolist()


@pytest.mark.parametrize("with_images", [False, True])
def test_greedy_generate_matches_hf_generate(model, with_images):
    """Shared-prefill grouped decoding with our own positions reproduces HF's generate token for token."""
    rows = image_rows() if with_images else TEXT_ROWS
    batch = model.build_prompts(rows)
    ours = model.generate(batch, num_generations=2, max_new_tokens=10, temperature=0)
    vision = dict(batch.vision)
    if with_images:
        vision["mm_token_type_ids"] = (batch.input_ids == model.hf_vlm().config.image_token_id).int()
    ref = model.hf_vlm().generate(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        **vision,
        do_sample=False,
        max_new_tokens=10,
        eos_token_id=model.eos_token_ids,
        pad_token_id=model.pad_token_id,
        bad_words_ids=[[i] for i in model.banned_token_ids],
    )[:, batch.input_ids.shape[1] :]
    width = ref.shape[1]
    assert torch.equal(ours.completion_ids[0::2, :width], ref)
    assert torch.equal(ours.completion_ids[1::2, :width], ref)


def test_sampling_is_seeded_grouped_and_masked(model):
    batch = model.build_prompts(TEXT_ROWS)
    kwargs = dict(num_generations=3, max_new_tokens=24, temperature=1.5)
    a = model.generate(batch, generator=torch.Generator().manual_seed(1), **kwargs)
    b = model.generate(batch, generator=torch.Generator().manual_seed(1), **kwargs)
    c = model.generate(batch, generator=torch.Generator().manual_seed(2), **kwargs)
    assert torch.equal(a.completion_ids, b.completion_ids) and a.texts == b.texts
    assert not torch.equal(a.completion_ids, c.completion_ids)
    assert a.completion_ids.shape[0] == 6 and len(a.texts) == 6
    assert len(set(a.texts[:3])) > 1, "chains of one group must be sampled independently"
    eos = torch.tensor(model.eos_token_ids)
    for ids, mask, text in zip(a.completion_ids, a.completion_mask, a.texts):
        is_eos = torch.isin(ids, eos)
        end = int(is_eos.nonzero()[0]) + 1 if is_eos.any() else len(ids)
        assert mask[:end].all() and not mask[end:].any()
        assert (ids[end:] == model.pad_token_id).all()
        assert text == model.tokenizer.decode(ids[:end], skip_special_tokens=True)
        assert not torch.isin(ids, torch.tensor(model.banned_token_ids)).any()


def test_sampling_respects_top_k_one_as_greedy(model):
    batch = model.build_prompts(TEXT_ROWS[:1])
    greedy = model.generate(batch, num_generations=1, max_new_tokens=8, temperature=0)
    top1 = model.generate(
        batch, num_generations=2, max_new_tokens=8, top_k=1, generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(top1.completion_ids[0], greedy.completion_ids[0])
    assert torch.equal(top1.completion_ids[1], greedy.completion_ids[0])


def test_sampler_top_k_and_top_p_restrict_the_support():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(2000, -1)
    gen = torch.Generator().manual_seed(0)
    nucleus = _sample(logits, 1.0, 0.7, 0, gen)  # 0.5 + 0.3 covers 0.7
    assert set(nucleus.tolist()) == {0, 1}
    top3 = _sample(logits, 1.0, 1.0, 3, gen)
    assert set(top3.tolist()) == {0, 1, 2}
    freq = torch.bincount(_sample(logits, 1.0, 1.0, 0, gen), minlength=4).float() / 2000
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.04, rtol=0)
    assert (_sample(logits, 0.0, 1.0, 0, gen) == 0).all()


# -- condition lengths -------------------------------------------------------------------------------------------


def test_answer_condition_length_on_character_tokens():
    """With one character per token the answer is exactly the character offset of the first tag."""

    def decode(ids):
        return "".join(ids)

    text = list("<think> hm </think><answer> a cat </answer> trailing </answer>")
    assert answer_condition_length(decode, text) == "".join(text).index(ANSWER_CLOSE)
    assert answer_condition_length(decode, list("no closing tag")) == len("no closing tag")
    assert answer_condition_length(decode, list("</answer>")) == 0


@pytest.mark.parametrize(
    "text",
    [
        "<think> plan </think><answer> a red apple </answer>",
        "<think> é and ü </think><answer> café </answer> after",
        "<answer>x</answer></answer>",
        "</answer>",
    ],
)
def test_condition_lengths_stop_right_before_answer_close(model, text):
    comp = model.completions_from_texts([text])
    k = int(comp.condition_lengths[0])
    ids = comp.completion_ids[0].tolist()
    before = text[: text.index(ANSWER_CLOSE)]
    decoded_k = model.tokenizer.decode(ids[:k])
    assert before.startswith(decoded_k)  # nothing of the tag is included ...
    assert ANSWER_CLOSE[0] in model.tokenizer.decode(ids[k : k + 1])  # ... and the next token starts it
    assert before.rstrip() == decoded_k.rstrip()


def test_condition_length_without_answer_is_everything_before_eos(model):
    comp = model.completions_from_texts(["<think> never closes", "x"], eos=True)
    for i, text in enumerate(["<think> never closes", "x"]):
        n = len(model.tokenizer(text, add_special_tokens=False)["input_ids"])
        assert int(comp.condition_lengths[i]) == n
        assert int(comp.completion_mask[i].sum()) == n + 1  # the EOS itself counts


# -- training forward --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_images", [False, True])
def test_forward_text_logps_equal_plain_log_softmax(model, with_images):
    batch = model.build_prompts(image_rows() if with_images else TEXT_ROWS)
    comp = model.generate(
        batch, num_generations=2, max_new_tokens=12, generator=torch.Generator().manual_seed(3)
    )
    prompts = batch.repeat_interleave(2)
    model.logprob_chunk_size = 5  # several chunks, one crossing a row boundary
    try:
        ours = model.forward_text(prompts, comp, with_condition=False)
        with torch.enable_grad():  # the checkpointed chunks of the update give the same values
            grad_path = model.forward_text(prompts, comp, with_condition=False)
    finally:
        model.logprob_chunk_size = 512
    logits = plain_hf_forward(model, prompts, comp).logits
    p = prompts.input_ids.shape[1]
    log_probs = logits[:, p - 1 : -1].float().log_softmax(-1)
    ref = log_probs.gather(-1, comp.completion_ids[..., None])[..., 0]
    ref_entropy = -(log_probs.exp() * log_probs).sum(-1)  # H = -sum p log p, from the full distribution
    assert ours.logps.dtype == torch.float32 and ours.condition is None
    mask = comp.completion_mask.bool()
    for out in (ours, grad_path):
        torch.testing.assert_close(out.logps[mask], ref[mask], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.entropy[mask], ref_entropy[mask], atol=1e-5, rtol=1e-5)
    assert not grad_path.entropy.requires_grad and grad_path.logps.requires_grad == any(
        p.requires_grad for p in model.parameters())
    vocab = logits.shape[-1]
    assert bool((ours.entropy[mask] > 0).all()) and bool((ours.entropy[mask] <= math.log(vocab)).all())


@pytest.mark.parametrize(("with_images", "other_rank_has_images"), [(True, True), (False, True), (False, False)])
def test_zero3_step_forward_equals_the_plain_one(model, monkeypatch, with_images, other_rank_has_images):
    """Under ZeRO-3 on several ranks the VLM runs module by module, the same on every rank (a rank without input
    images runs the vision tower on a blank image when another rank has some): the log-probs, the condition and
    the sampled chains are those of the plain path."""
    batch = model.build_prompts(image_rows() if with_images else TEXT_ROWS)
    comp = model.generate(batch, num_generations=2, max_new_tokens=10, generator=torch.Generator().manual_seed(5))
    prompts = batch.repeat_interleave(2)
    plain = model.forward_text(prompts, comp)
    blank_runs = []
    blank = model._blank_image
    monkeypatch.setattr(model, "_synced", lambda: True)
    monkeypatch.setattr(mindomni_module, "any_rank", lambda mine, device: mine or other_rank_has_images)
    monkeypatch.setattr(model, "_blank_image", lambda: blank_runs.append(1) or blank())
    stepped = model.forward_text(prompts, comp)
    torch.testing.assert_close(stepped.logps, plain.logps, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(stepped.condition.states, plain.condition.states, atol=1e-6, rtol=1e-6)
    assert len(blank_runs) == (1 if other_rank_has_images and not with_images else 0)
    # generation's prefill takes the same path: the same chains from the same seed
    monkeypatch.setattr(model, "_all_done", lambda done, synced=None: bool(done.all()))
    again = model.generate(batch, num_generations=2, max_new_tokens=10, generator=torch.Generator().manual_seed(5))
    assert again.texts == comp.texts and torch.equal(again.completion_ids, comp.completion_ids)
    assert len(blank_runs) == (2 if other_rank_has_images and not with_images else 0)


@pytest.mark.parametrize("with_images", [False, True])
def test_condition_is_prenorm_prompt_plus_answer_prefix(model, with_images):
    batch = model.build_prompts(image_rows() if with_images else TEXT_ROWS)
    comp = model.generate(
        batch, num_generations=2, max_new_tokens=10, generator=torch.Generator().manual_seed(4)
    )
    comp.condition_lengths = torch.tensor([0, 3, 10, 1])  # hand-picked to exercise the packing
    prompts = batch.repeat_interleave(2)
    out = model.forward_text(prompts, comp)
    ref = plain_hf_forward(model, prompts, comp, output_hidden_states=True)
    post = ref.hidden_states[-1]  # transformers 5: POST-norm
    norm = model.hf_vlm().model.language_model.norm
    p = prompts.input_ids.shape[1]
    suffix = model.condition_suffix_ids
    assert model.tokenizer.decode(suffix) == "\n"
    for i in range(4):
        real = out.condition.mask[i].bool()
        # left-padded: all pads first
        assert not real[: int((~real).sum())].any()
        keep = torch.cat(
            [
                prompts.attention_mask[i].bool(),
                torch.arange(comp.completion_ids.shape[1]) < comp.condition_lengths[i],
            ]
        )
        assert (
            int(real.sum()) - len(suffix)
            == int(keep.sum())
            == int(prompts.attention_mask[i].sum()) + int(comp.condition_lengths[i])
        )
        cond = out.condition.states[i, real]
        torch.testing.assert_close(norm(cond[: -len(suffix)]), post[i, keep], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(cond[: -len(suffix)], post[i, keep], atol=1e-3)  # really the pre-norm state
        assert (out.condition.states[i, ~real] == 0).all()
        assert keep[:p].sum() == prompts.attention_mask[i].sum()
        # MindOmni's sequence, run on its own: the prompt, the answer prefix, then the newline.
        prefix = comp.completion_ids[i, : int(comp.condition_lengths[i])].tolist() + suffix
        alone = Completions(torch.tensor([prefix]), torch.ones(1, len(prefix), dtype=torch.long), [""],
                            torch.tensor([len(prefix)]))
        mindomni = plain_hf_forward(model, prompts.select([i]), alone, output_hidden_states=True).hidden_states[-1]
        mindomni_keep = torch.cat([prompts.attention_mask[i].bool(), torch.ones(len(prefix), dtype=torch.bool)])
        torch.testing.assert_close(norm(cond), mindomni[0, mindomni_keep], atol=1e-5, rtol=1e-5)
    # the completion's log-probs do not see the newline
    torch.testing.assert_close(out.logps, model.forward_text(prompts, comp, with_condition=False).logps,
                               atol=1e-6, rtol=1e-6)


def test_condition_is_the_same_under_eager_attention(model):
    """The condition's own attention mask (a boolean one for SDPA) is turned into eager attention's additive one."""
    batch = model.build_prompts(TEXT_ROWS)
    comp = model.generate(batch, num_generations=2, max_new_tokens=8, generator=torch.Generator().manual_seed(6))
    prompts = batch.repeat_interleave(2)
    sdpa = model.forward_text(prompts, comp)
    config = model.hf_vlm().model.language_model.config
    config._attn_implementation = "eager"
    try:
        eager = model.forward_text(prompts, comp)
    finally:
        config._attn_implementation = "sdpa"
    assert torch.equal(sdpa.condition.mask, eager.condition.mask)
    torch.testing.assert_close(eager.condition.states, sdpa.condition.states, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(eager.logps, sdpa.logps, atol=1e-5, rtol=1e-5)


def test_pack_left_orders_and_pads():
    states = torch.arange(2 * 5, dtype=torch.float32).view(2, 5, 1)
    selected = torch.tensor([[0, 1, 1, 0, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    packed, mask = pack_left(states, selected)
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert packed[..., 0].tolist() == [[1, 2, 4], [0, 0, 5]]


def test_negative_condition_is_cached_and_shaped(model):
    neg, mask = model.negative_states(3)
    assert neg.shape[0] == 3 and mask.shape == neg.shape[:2] and mask.all()
    again, _ = model.negative_states(1)
    assert torch.equal(again[0], neg[0])
    batch = model.build_prompts([{"prompt": model.negative_prompt}])
    assert neg.shape[1] == int(batch.attention_mask.sum())
    ref = model.hf_vlm()(input_ids=batch.input_ids, output_hidden_states=True)  # one row: no padding
    norm = model.hf_vlm().model.language_model.norm
    torch.testing.assert_close(norm(neg[0]), ref.hidden_states[-1][0], atol=1e-5, rtol=1e-5)


# -- decoder -----------------------------------------------------------------------------------------------------


def _collator_inputs(model: MindOmni, lengths: list[int], n_img: int):
    gen = torch.Generator().manual_seed(0)
    ids = [
        torch.randint(0, model.decoder.config.vocab_size - 1, (n,), generator=gen).tolist() for n in lengths
    ]
    collator = OmniGenCollator(
        pad_token_id=model.decoder.config.pad_token_id, hidden_size=model.decoder.config.hidden_size
    )
    padded, mask = collator.pad_input_ids(ids, {})[:2]
    return ids, padded, mask, collator


@torch.no_grad()
def test_own_decoder_forward_equals_diffusers_forward(model):
    dec = model.decoder
    lengths, n_img = [7, 4, 1], 16
    ids, padded, mask, collator = _collator_inputs(model, lengths, n_img)
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.0, 0.35, 0.9])
    # masks and positions are the collator's
    assert torch.equal(og.omnigen_position_ids(mask, n_img), collator.create_position(mask, [n_img] * 3))
    assert torch.equal(og.omnigen_attention_mask(mask, n_img), collator.create_mask(mask, [n_img] * 3)[0])
    # per-layer inputs and the final norm output, recorded inside diffusers' own forward
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        layer.register_forward_pre_hook(lambda m, a, k=i: seen.__setitem__(f"in{k}", a[0]))
        for i, layer in enumerate(dec.layers)
    ]
    hooks.append(dec.norm.register_forward_hook(lambda m, a, out: seen.__setitem__("norm", out)))
    try:
        ref = dec(
            latents,
            t,
            padded,
            [],
            {},
            collator.create_mask(mask, [n_img] * 3)[0],
            collator.create_position(mask, [n_img] * 3),
        ).sample
    finally:
        for hook in hooks:
            hook.remove()
    out = model.decode_step(dec.embed_tokens(padded), mask, latents, t, return_features=True)
    torch.testing.assert_close(out.prediction, ref, atol=1e-5, rtol=1e-5)
    layers = dec.config.num_layers
    assert out.features.shape == (3, layers + 1, n_img, dec.config.hidden_size)
    for k in range(layers):
        torch.testing.assert_close(out.features[:, k], seen[f"in{k}"][:, -n_img:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.features[:, -1], seen["norm"][:, -n_img:], atol=1e-5, rtol=1e-5)
    # each padded row alone (diffusers builds its rotary table from row 0 only, so compare rows one by one)
    for i, row in enumerate(ids):
        one = torch.ones(1, len(row), dtype=torch.long)
        alone = dec(
            latents[i : i + 1], t[i : i + 1], torch.tensor([row]), [], {},
            collator.create_mask(one, [n_img])[0], collator.create_position(one, [n_img]),
        ).sample  # fmt: skip
        torch.testing.assert_close(out.prediction[i : i + 1], alone, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_condition_kv_cache_equals_full_forward(model):
    states, mask = random_condition(model, [9, 3, 6])
    embeds = model.connect(states, mask)
    latents = torch.randn(3, 4, 8, 8)
    t = torch.tensor([0.1, 0.5, 0.8])
    cache = og.build_condition_cache(model.decoder, embeds, mask, 16)
    full = model.decode_step(embeds, mask, latents, t).prediction
    torch.testing.assert_close(
        og.decoder_forward_cached(model.decoder, cache, latents, t), full, atol=1e-5, rtol=1e-5
    )


def test_cached_sampling_equals_uncached(model):
    states, mask = random_condition(model, [9, 5])
    neg, neg_mask = model.negative_states(2)
    embeds, neg_embeds = model.connect(states, mask), model.connect(neg, neg_mask)
    noise = model.initial_noise(2, 1, CFG, "cpu")
    cached = model.sample_latents(embeds, mask, neg_embeds, neg_mask, noise, CFG)
    model.decoder_kv_cache = False
    try:
        uncached = model.sample_latents(embeds, mask, neg_embeds, neg_mask, noise, CFG)
    finally:
        model.decoder_kv_cache = True
    torch.testing.assert_close(cached, uncached, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_euler_equals_diffusers_scheduler_with_guidance(model):
    states, mask = random_condition(model, [6, 6])
    neg, neg_mask = model.negative_states(2)
    embeds, neg_embeds = model.connect(states, mask), model.connect(neg, neg_mask)
    noise = model.initial_noise(2, 2, CFG, "cpu")
    ours = model.sample_latents(embeds, mask, neg_embeds, neg_mask, noise, CFG)

    scheduler = FlowMatchEulerDiscreteScheduler(invert_sigmas=True, num_train_timesteps=1)
    scheduler.set_timesteps(sigmas=np.linspace(1, 0, CFG.steps + 1)[: CFG.steps])
    assert torch.allclose(scheduler.timesteps, euler_grid(CFG.steps)[:-1])
    x = noise.clone()
    for t in scheduler.timesteps:
        v_cond = model.decode_step(embeds, mask, x, t.expand(2)).prediction
        v_neg = model.decode_step(neg_embeds, neg_mask, x, t.expand(2)).prediction
        x = scheduler.step(v_neg + CFG.guidance_scale * (v_cond - v_neg), t, x).prev_sample
    torch.testing.assert_close(ours, x, atol=1e-5, rtol=1e-5)


def test_guidance_one_equals_unguided_and_seed_reproduces(model):
    states, mask = random_condition(model, [5, 8])
    neg, neg_mask = model.negative_states(2)
    embeds, neg_embeds = model.connect(states, mask), model.connect(neg, neg_mask)
    noise = model.initial_noise(2, 1, CFG, "cpu")
    one = ImageSamplingConfig(height=64, width=64, steps=3, guidance_scale=1.0)
    torch.testing.assert_close(
        model.sample_latents(embeds, mask, neg_embeds, neg_mask, noise, one),
        model.sample_latents(embeds, mask, None, None, noise, one),
    )
    first = model.decode_latents(
        model.sample_latents(embeds, mask, neg_embeds, neg_mask, model.initial_noise(2, 1, CFG, "cpu"), CFG)
    )
    second = model.decode_latents(
        model.sample_latents(embeds, mask, neg_embeds, neg_mask, model.initial_noise(2, 1, CFG, "cpu"), CFG)
    )
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(first, second))
    assert first[0].size == (64, 64) and first[0].mode == "RGB"


def test_initial_noise_shared_within_groups(model):
    shared = model.initial_noise(6, 3, CFG, "cpu")
    assert shared.shape == (6, 4, 8, 8)
    assert torch.equal(shared[0], shared[1]) and torch.equal(shared[0], shared[2])
    assert not torch.equal(shared[0], shared[3])
    assert torch.equal(shared, model.initial_noise(6, 3, CFG, "cpu"))
    per_sample = model.initial_noise(
        6, 3, ImageSamplingConfig(height=64, width=64, shared_noise=False), "cpu"
    )
    assert not torch.equal(per_sample[0], per_sample[1])
    with pytest.raises(ValueError, match="multiple of 16"):
        model.initial_noise(2, 1, ImageSamplingConfig(height=72, width=64), "cpu")


# -- checkpoints -------------------------------------------------------------------------------------------------


def test_checkpoint_released_layout_and_load_reproduces_outputs(tmp_path):
    written = write_tiny_checkpoint(str(tmp_path), seed=3).eval()
    v1 = load_file(str(tmp_path / "image_decoder" / "model.safetensors"))
    for key in ("llm.layers.0.self_attn.qkv_proj.weight", "x_embedder.proj.weight", "final_layer.linear.weight",
                "llm.layers.1.self_attn.o_proj.weight", "t_embedder.mlp.0.weight", "pos_embed", "llm.norm.weight"):  # fmt: skip
        assert key in v1, key
    assert not any("to_q" in k or "patch_embedding" in k for k in v1)
    connector = load_file(str(tmp_path / "connector.safetensors"))
    assert {
        "0.weight",
        "0.bias",
        "1.self_attn.qkv_proj.weight",
        "2.mlp.gate_up_proj.weight",
        "2.post_attention_layernorm.weight",
    } <= set(connector)
    with open(tmp_path / "image_decoder" / "config.json") as f:
        assert json.load(f)["model_type"] == "phi3"

    loaded = load_model("mindomni", str(tmp_path)).eval()
    ref_state, new_state = written.state_dict(), loaded.state_dict()
    assert ref_state.keys() == new_state.keys()
    assert all(torch.equal(ref_state[k], new_state[k]) for k in ref_state)

    batch = written.build_prompts(TEXT_ROWS)
    assert torch.equal(batch.input_ids, loaded.build_prompts(TEXT_ROWS).input_ids)
    with torch.no_grad():
        comp = written.generate(batch, num_generations=1, max_new_tokens=6, temperature=0)
        images, velocities = [], []
        for m in (written, loaded):
            out = m.forward_text(batch, comp)
            embeds = m.connect(out.condition.states, out.condition.mask)
            noise = m.initial_noise(2, 1, CFG, "cpu")
            velocities.append(
                m.decode_step(embeds, out.condition.mask, noise, torch.full((2,), 0.4)).prediction
            )
            images.append(
                m.decode_latents(m.sample_latents(embeds, out.condition.mask, None, None, noise, CFG))
            )
    torch.testing.assert_close(velocities[0], velocities[1], atol=0, rtol=0)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(*images))


def test_checkpoint_round_trip_is_exact_and_reads_omnigen_v1_configs(tmp_path):
    first = tmp_path / "a"
    write_tiny_checkpoint(str(first), seed=5)
    # a real OmniGen-v1 config.json: "su" rope scaling with the original length outside it
    config_path = first / "image_decoder" / "config.json"
    with open(config_path) as f:
        config = json.load(f)
    rope = config.pop("rope_parameters")
    config["rope_scaling"] = {
        "type": "su",
        "short_factor": rope["short_factor"],
        "long_factor": rope["long_factor"],
    }
    config["rope_theta"], config["original_max_position_embeddings"] = 10000.0, 4096
    with open(config_path, "w") as f:
        json.dump(config, f)
    loaded = MindOmni.from_pretrained(str(first))
    loaded.save_pretrained(str(tmp_path / "b"))
    again = MindOmni.from_pretrained(str(tmp_path / "b"))
    a, b = loaded.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert again.decoder.config.pos_embed_max_size == 32 and again.decoder.config.time_step_dim == 32


def test_checkpoint_loads_in_bfloat16(tmp_path):
    write_tiny_checkpoint(str(tmp_path), seed=1)
    model = MindOmni.from_pretrained(str(tmp_path), dtype=torch.bfloat16)
    assert model.decoder.dtype == torch.bfloat16 and model.connector.proj.weight.dtype == torch.bfloat16
    assert model.hf_vlm().dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.vae.parameters())
    assert model.hf_vlm().model.language_model.rotary_emb.inv_freq.dtype == torch.float32


def test_checkpoint_errors_name_the_problem(tmp_path):
    write_tiny_checkpoint(str(tmp_path), seed=0)
    os.remove(tmp_path / "connector.safetensors")
    shutil.rmtree(tmp_path / "vae")
    with pytest.raises(FileNotFoundError, match=r"vae/config\.json.*connector\.safetensors"):
        MindOmni.from_pretrained(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        MindOmni.from_pretrained(str(tmp_path / "nowhere"))

    other = tmp_path / "other"
    write_tiny_checkpoint(str(other), seed=0)
    with open(other / "image_decoder" / "config.json") as f:
        config = json.load(f)
    config["model_type"] = "llama"
    with open(other / "image_decoder" / "config.json", "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError, match="model_type 'llama'.*needs 'phi3'"):
        MindOmni.from_pretrained(str(other))


# -- LoRA --------------------------------------------------------------------------------------------------------


def lora_model(seed: int = 0) -> MindOmni:
    model = build_tiny_mindomni(seed=seed)
    targets = model.lora_targets("language_model")
    assert "lm_head" in targets and not any("visual" in t for t in targets)
    assert any(t.endswith("self_attn.q_proj") for t in targets) and any(
        t.endswith("mlp.down_proj") for t in targets
    )
    model.vlm = get_peft_model(
        model.vlm, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=True)
    )
    for module in (model.connector, model.decoder, model.vae):
        module.requires_grad_(False)
    return model


def test_lora_targets_are_stable_after_wrapping():
    model = build_tiny_mindomni()
    before = model.lora_targets("language_model")
    model.vlm = get_peft_model(model.vlm, LoraConfig(r=4, lora_alpha=8, target_modules=before))
    assert model.lora_targets("language_model") == before


def image_kl_features(model: MindOmni, batch, comp, latents, t) -> torch.Tensor:
    out = model.forward_text(batch, comp)
    embeds = model.connect(out.condition.states, out.condition.mask)
    return model.decode_step(embeds, out.condition.mask, latents, t, return_features=True).features


def test_lora_starts_as_reference_and_trains_through_frozen_decoder():
    model = lora_model()
    batch = model.build_prompts(TEXT_ROWS)
    comp = model.generate(
        batch, num_generations=1, max_new_tokens=8, generator=torch.Generator().manual_seed(0)
    )
    latents = model.initial_noise(2, 1, CFG, "cpu")
    t = torch.full((2,), 0.6)
    with torch.no_grad(), model.adapter_disabled():
        reference = image_kl_features(model, batch, comp, latents, t)
    policy = image_kl_features(model, batch, comp, latents, t)
    assert torch.equal(policy, reference)  # B = 0 at init: the policy IS the reference

    # make the adapter non-trivial, then a loss on decoder features must reach every LoRA matrix
    with torch.no_grad():
        for name, param in model.vlm.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    features = image_kl_features(model, batch, comp, latents, t)
    (features - reference).pow(2).mean().backward()
    lora = {n: p for n, p in model.vlm.named_parameters() if "lora_" in n}
    body = {n: p for n, p in lora.items() if "lm_head" not in n}
    assert body and all(p.grad is not None and p.grad.abs().sum() > 0 for p in body.values())
    # the condition is taken before the head, so lm_head's LoRA only learns from the text loss
    assert all(p.grad is None for n, p in lora.items() if "lm_head" in n)
    frozen = [p for n, p in model.named_parameters() if "lora_" not in n]
    assert all(p.grad is None for p in frozen)


def test_negative_condition_ignores_the_adapter():
    model = lora_model()
    base, _ = model.negative_states(1)
    with torch.no_grad():
        for name, param in model.vlm.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    model.clear_negative_cache()
    after, _ = model.negative_states(1)
    assert torch.equal(base, after)


def test_gradient_checkpointing_gives_same_values_and_grads():
    results = []
    for enabled in (False, True):
        model = lora_model()
        model.set_gradient_checkpointing(enabled)
        model.train()
        batch = model.build_prompts(TEXT_ROWS)
        comp = model.generate(
            batch, num_generations=1, max_new_tokens=8, generator=torch.Generator().manual_seed(0)
        )
        feats = image_kl_features(
            model, batch, comp, model.initial_noise(2, 1, CFG, "cpu"), torch.full((2,), 0.3)
        )
        logps = model.forward_text(batch, comp, with_condition=False).logps
        (feats.square().mean() + (logps * comp.completion_mask).sum()).backward()
        grads = [p.grad.clone() for n, p in model.vlm.named_parameters() if "lora_A" in n]
        results.append((comp.completion_ids, feats.detach(), grads))
    assert torch.equal(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])
    for a, b in zip(results[0][2], results[1][2]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


# -- dtypes and the whole pipeline -------------------------------------------------------------------------------


def guided_latents(model: MindOmni, out, noise: torch.Tensor) -> torch.Tensor:
    """The pipeline's sampling from a forward's condition: connector, then guided Euler steps against the
    negative prompt, from ``noise``."""
    embeds = model.connect(out.condition.states, out.condition.mask)
    neg, neg_mask = model.negative_states(noise.shape[0])
    return model.sample_latents(embeds, out.condition.mask, model.connect(neg, neg_mask), neg_mask, noise, CFG)


def test_bfloat16_model_keeps_vae_and_rotary_tables_fp32():
    model = build_tiny_mindomni(dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.vae.parameters())
    assert all(p.dtype == torch.bfloat16 for p in model.vlm.parameters())
    assert model.hf_vlm().model.language_model.rotary_emb.inv_freq.dtype == torch.float32
    batch = model.build_prompts(TEXT_ROWS[:1])
    comp = model.generate(
        batch, num_generations=2, max_new_tokens=6, generator=torch.Generator().manual_seed(0)
    )
    out = model.forward_text(batch.repeat_interleave(2), comp)
    assert out.logps.dtype == torch.float32 and out.condition.states.dtype == torch.bfloat16
    latents = guided_latents(model, out, model.initial_noise(2, 2, CFG, "cpu"))
    assert latents.dtype == torch.float32 and torch.isfinite(latents).all()


def test_image_and_text_prompt_end_to_end(model):
    batch = model.build_prompts(image_rows())
    comp = model.generate(
        batch, num_generations=2, max_new_tokens=16, generator=torch.Generator().manual_seed(9)
    )
    prompts = batch.repeat_interleave(2)
    with torch.no_grad():
        out = model.forward_text(prompts, comp)
        latents = guided_latents(model, out, model.initial_noise(4, 2, CFG, "cpu"))
    images = model.decode_latents(latents)
    assert len(images) == 4 and all(im.size == (64, 64) for im in images)
    assert out.condition.states.shape[0] == 4 and torch.isfinite(out.logps).all()
    image_id = model.hf_vlm().config.image_token_id
    # the condition carries the image tokens' states (the edit source reaches the decoder)
    assert int(out.condition.mask.sum(1).min()) >= int((prompts.input_ids == image_id).sum(1).min())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pipeline_on_cuda_in_bfloat16():
    model = build_tiny_mindomni(dtype=torch.bfloat16).to("cuda")
    batch = model.build_prompts(image_rows())
    comp = model.generate(
        batch, num_generations=2, max_new_tokens=8, generator=torch.Generator().manual_seed(0)
    )
    again = model.generate(
        batch, num_generations=2, max_new_tokens=8, generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(comp.completion_ids, again.completion_ids)
    out = model.forward_text(batch.repeat_interleave(2), comp)
    noise = model.initial_noise(4, 2, CFG)
    assert noise.device.type == "cuda"
    torch.testing.assert_close(noise.cpu(), model.initial_noise(4, 2, CFG, "cpu"))
    latents = guided_latents(model, out, noise)
    assert len(model.decode_latents(latents)) == 4


def _synced_generation_worker(rank: int, init_file: str, results: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    model = build_tiny_mindomni(seed=0).eval()
    model.synced_generation = True
    calls = []
    model.hf_vlm().model.language_model.register_forward_hook(lambda *a: calls.append(1))  # every forward
    if rank == 0:  # rank 0's chains end at their first token; rank 1 runs all 6 steps
        eos = model.eos_token_ids[0]
        model.hf_vlm().lm_head.register_forward_hook(
            lambda m, a, out: out.index_fill(-1, torch.tensor([eos]), 1e4)
        )
    comp = model.generate(model.build_prompts(TEXT_ROWS), num_generations=2, max_new_tokens=6, temperature=0)
    torch.save({"calls": len(calls), "mask": comp.completion_mask}, f"{results}.{rank}")
    dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.slow
def test_synced_generation_keeps_ranks_in_lockstep(tmp_path):
    """Under ZeRO-3 every forward is collective: a rank whose chains all ended keeps stepping (with pads)."""
    import torch.multiprocessing as mp

    results = str(tmp_path / "result")
    mp.spawn(_synced_generation_worker, args=(str(tmp_path / "init"), results), nprocs=2, join=True)
    early, late = torch.load(f"{results}.0"), torch.load(f"{results}.1")
    assert early["calls"] == late["calls"] == 6  # prefill + 5 decoding steps on BOTH ranks
    assert early["mask"].tolist() == [[1]] * 4  # trimmed back to the one real token (the EOS)
    assert late["mask"].shape == (4, 6)


def test_prompt_batch_select_and_repeat_with_mixed_image_counts():
    """Rows with 0, 2 and 1 input images: selecting and repeating rows keeps each row's own images."""
    from PIL import Image as PILImage

    from rgpo.models.mindomni.tiny import build_tiny_mindomni

    model = build_tiny_mindomni(seed=0)
    colours = ["red", "green", "blue"]
    images = [PILImage.new("RGB", (56, 56), c) for c in colours]
    rows = [{"prompt": "a cat"}, {"prompt": "two", "images": images[:2]}, {"prompt": "one", "images": images[2:]}]
    batch = model.build_prompts(rows)
    assert batch.images_per_row == [0, 2, 1]
    singles = [model.build_prompts([r]) for r in rows]
    picked = batch.select([2, 1])
    assert picked.images_per_row == [1, 2]
    torch.testing.assert_close(picked.vision["pixel_values"],
                               torch.cat([singles[2].vision["pixel_values"], singles[1].vision["pixel_values"]]))
    repeated = batch.repeat_interleave(2)
    assert repeated.images_per_row == [0, 0, 2, 2, 1, 1]
    assert repeated.vision["image_grid_thw"].shape[0] == 6
    torch.testing.assert_close(repeated.select([4]).vision["pixel_values"], singles[2].vision["pixel_values"])
    torch.testing.assert_close(repeated.select([3]).vision["pixel_values"], singles[1].vision["pixel_values"])


def test_checkpoint_keeps_its_own_prompts(tmp_path):
    """A model trained with its own system prompt is saved with it (prompts.json) and loads with it; a model
    with MindOmni's prompts writes no such file, and an unknown key is refused by name."""
    model = build_tiny_mindomni(0)
    model.save_pretrained(str(tmp_path / "stock"))
    assert not (tmp_path / "stock" / "prompts.json").exists()
    model.system_prompt = "Reason, then answer."
    model.save_pretrained(str(tmp_path / "own"))
    assert json.loads((tmp_path / "own" / "prompts.json").read_text()) == {"system_prompt": "Reason, then answer."}
    loaded = MindOmni.from_pretrained(str(tmp_path / "own"))
    assert loaded.system_prompt == "Reason, then answer."
    assert loaded.negative_prompt == build_tiny_mindomni(0).negative_prompt
    ids = loaded.build_prompts([{"prompt": "a cat"}]).input_ids[0]
    assert "Reason, then answer." in loaded.tokenizer.decode(ids)
    (tmp_path / "own" / "prompts.json").write_text(json.dumps({"sytem_prompt": "typo"}))
    with pytest.raises(ValueError, match="unknown keys \\['sytem_prompt'\\]"):
        MindOmni.from_pretrained(str(tmp_path / "own"))


def test_random_mindomni_7b_shape_matches_the_released_sizes():
    """model.path=random:mindomni-7b (benchmarks at the real size): built on the meta device (nothing allocated),
    its parts have the released parameter counts: Qwen2.5-VL-7B 8.29 B with a 676.55 M vision tower, OmniGen-v1
    about 3.8 B, SDXL's VAE 83.65 M; the VAE stays float32 in a bf16 model."""
    from rgpo.models.mindomni.tiny import build_random_mindomni

    model = build_random_mindomni("mindomni-7b", dtype=torch.bfloat16, device="meta")

    def count(module):
        return sum(p.numel() for p in module.parameters())

    assert count(model.vlm) == 8_292_166_656
    assert count(model.vlm.model.visual) == 676_550_144
    assert 3.7e9 < count(model.decoder) < 3.9e9
    assert count(model.vae) == 83_653_863
    assert model.latent_shape(512, 512) == (4, 64, 64)
    assert {p.dtype for p in model.vlm.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.vae.parameters()} == {torch.float32}
    assert torch.get_default_dtype() == torch.float32  # the build's dtype does not leak out
    with pytest.raises(ValueError, match="unknown random model shape 'mindomni-70b'"):
        build_random_mindomni("mindomni-70b", device="meta")


def test_decode_latents_builds_no_autograd_graph(model):
    """Decoding is for rewards and logs only: the VAE runs without autograd even where grads are enabled."""
    grad_modes = []
    handle = model.vae.decoder.register_forward_pre_hook(lambda m, args: grad_modes.append(torch.is_grad_enabled()))
    try:
        latents = torch.randn(2, *model.latent_shape(32, 32), requires_grad=True)
        images = model.decode_latents(latents)
    finally:
        handle.remove()
    assert [im.size for im in images] == [(32, 32)] * 2
    assert grad_modes and not any(grad_modes)
