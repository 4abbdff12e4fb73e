"""Bench-only naive paths: what a model's optimised paths would be without each optimisation, for the on/off rows
of :mod:`benchmarks.ablations` (each checked there to compute the same result as the optimised path).

The image-side paths use only the :class:`rgpo.models.UnifiedModel` interface. The text-side ones (the untrimmed
decoding loop, the two-forward training forward, the per-chain prefill check) reimplement the family's own
forward and need its private pieces (the HF model, its position ids, its backbone, its sampling and packing
helpers, reached through :func:`benchmarks.switches.family_module`); they are the one family-specific part of the
benchmarks.
"""

from __future__ import annotations

from .switches import family_module


# ================================================================================================ text side
def prefill_logits(model, prompts, num_generations: int):
    """First-token logits from one prefill per prompt (repeated for its G chains) and from G prefills per prompt."""
    import torch

    with torch.no_grad():
        hf = model.hf_vlm()
        pos = model._position_ids(prompts.input_ids, prompts.attention_mask, {})
        shared = hf(input_ids=prompts.input_ids, attention_mask=prompts.attention_mask, position_ids=pos,
                    logits_to_keep=1).logits[:, -1].repeat_interleave(num_generations, 0)
        rep = prompts.repeat_interleave(num_generations)
        each = hf(input_ids=rep.input_ids, attention_mask=rep.attention_mask,
                  position_ids=model._position_ids(rep.input_ids, rep.attention_mask, {}),
                  logits_to_keep=1).logits[:, -1]
    return shared, each


def naive_generate(model, prompts, *, num_generations: int, max_new_tokens: int, generator):
    """The decoding loop before it was trimmed: every step through the whole HF forward, which rebuilds the
    attention mask from the 2-D padding mask, under ``no_grad`` instead of inference mode. Same prefill, cache
    sharing and sampling as the model's ``generate`` (temperature 1, no top-k / top-p)."""
    import torch

    from rgpo.models.lm import sample_tokens as sample
    hf = model.hf_vlm()
    rows = prompts.input_ids.shape[0] * num_generations
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    sample_gen = torch.Generator(device=model.device).manual_seed(seed)
    eos = torch.tensor(model.eos_token_ids)
    with torch.no_grad():
        positions = model._position_ids(prompts.input_ids, prompts.attention_mask, prompts.vision)
        out = hf(input_ids=prompts.input_ids, attention_mask=prompts.attention_mask, position_ids=positions,
                 use_cache=True, logits_to_keep=1, **prompts.vision)
        cache = out.past_key_values
        cache.batch_repeat_interleave(num_generations)
        logits = out.logits[:, -1].float().repeat_interleave(num_generations, 0)
        next_pos = positions.amax(dim=(0, 2)).repeat_interleave(num_generations) + 1
        mask = prompts.attention_mask.repeat_interleave(num_generations, 0)
        done = torch.zeros(rows, dtype=torch.bool)
        tokens = []
        for step in range(max_new_tokens):
            logits[:, model.banned_token_ids] = float("-inf")
            token = sample(logits, 1.0, 1.0, 0, sample_gen)
            token = torch.where(done, torch.full_like(token, model.pad_token_id), token)
            tokens.append(token)
            done |= torch.isin(token, eos)
            if step == max_new_tokens - 1 or bool(done.all()):
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            out = hf(input_ids=token[:, None], attention_mask=mask,
                     position_ids=(next_pos + step).view(1, rows, 1).expand(3, -1, -1), past_key_values=cache,
                     use_cache=True, logits_to_keep=1)
            cache, logits = out.past_key_values, out.logits[:, -1].float()
    return model._completions(torch.stack(tokens, dim=1))


def naive_forward_text(model, prompts, completions, with_condition: bool):
    """The training forward without its optimisations: the HF forward's logits for EVERY position, a
    full-vocabulary log-softmax, then a second backbone forward for the condition states, over the family's own
    condition sequence (each prompt, its answer prefix and the condition suffix), left-padded anew. Returns
    (log-probs, condition states, condition mask)."""
    import torch

    pack_left = family_module(model).pack_left
    hf = model.hf_vlm()
    p_len = prompts.input_ids.shape[1]
    comp_ids = completions.completion_ids
    ids = torch.cat([prompts.input_ids, comp_ids], dim=1)
    mask = torch.cat([prompts.attention_mask, completions.completion_mask.to(prompts.attention_mask.dtype)], dim=1)
    logits = hf(input_ids=ids, attention_mask=mask, position_ids=model._position_ids(ids, mask, prompts.vision),
                use_cache=False, **prompts.vision).logits
    logps = logits[:, p_len - 1 : -1].float().log_softmax(-1).gather(-1, comp_ids[..., None])[..., 0]
    if not with_condition:
        return logps, None, None
    rows = [prompts.input_ids[i][prompts.attention_mask[i].bool()].tolist()
            + comp_ids[i, : int(completions.condition_lengths[i])].tolist() + model.condition_suffix_ids
            for i in range(comp_ids.shape[0])]
    width = max(len(r) for r in rows)
    cond_ids = torch.tensor([[model.pad_token_id] * (width - len(r)) + r for r in rows], device=ids.device)
    cond_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=ids.device)
    states = model._backbone(cond_ids, cond_mask, prompts.vision)
    condition, cond_mask = pack_left(states, cond_mask.bool())
    return logps, condition, cond_mask


def regularizer_grid(model):
    """Every time the family's image regulariser draws from (a grid of times), as a float tensor."""
    import torch

    size = family_module(model).IMAGE_KL_GRID
    return torch.arange(size).float().div(size - 1)


# ================================================================================================ image side
def cat_conditions(a, b):
    """Two left-padded conditions (states, mask) stacked along rows, each left-padded to the longer one."""
    import torch

    length = max(a.states.shape[1], b.states.shape[1])
    states, masks = [], []
    for c in (a, b):
        pad = length - c.states.shape[1]
        states.append(torch.nn.functional.pad(c.states, (0, 0, pad, 0)))
        masks.append(torch.nn.functional.pad(c.mask, (pad, 0)))
    return type(a)(torch.cat(states), torch.cat(masks))


def guided_sampling(model, condition, negative, noise, icfg, *, cached: bool):
    """rgpo's guided sampling: the condition and the negative as ONE batched generator run per step (with the
    family's condition cache unless ``cached`` is False: ``exact`` inputs)."""
    import torch

    with torch.no_grad():
        inputs = model.image_inputs(condition, negative, guidance_scale=icfg.guidance_scale, exact=not cached)
        return model.sample_image_latents(inputs, noise, icfg).latents


def naive_guided_sampling(model, condition, negative, noise, icfg, *, cached: bool):
    """Guided sampling with the condition and the negative as TWO generator runs per step (``cached``: each with
    the family's condition cache; else the exact, uncached path), combined ``v_neg + g (v_cond - v_neg)``."""
    import torch

    with torch.no_grad():
        cond_in = model.image_inputs(condition, None, guidance_scale=1.0, exact=not cached)
        neg_in = model.image_inputs(negative, None, guidance_scale=1.0, exact=not cached)

        def velocity(x, t):
            v_cond = model.image_prediction(cond_in, x, t)
            v_neg = model.image_prediction(neg_in, x, t)
            return v_neg + icfg.guidance_scale * (v_cond - v_neg)

        return model.image_sampler(icfg).sample(velocity, noise).latents
