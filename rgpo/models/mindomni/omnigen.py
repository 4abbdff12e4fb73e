"""OmniGen decoder: our own forward over diffusers' ``OmniGenTransformer2DModel`` blocks.

diffusers' ``forward`` only takes token ids, runs the whole ``[condition | time | image]`` sequence at every
denoising step and returns nothing but the velocity. RGPO needs float condition embeddings (the connector's
output), every layer's hidden states at the image tokens (the image-KL features) and, for sampling speed, the
condition tokens' keys/values computed once per image instead of once per step. The functions here reuse the
module's weights and sub-modules unchanged (same state dict), and reproduce diffusers' numerics: the same
masks and positions as ``OmniGenCollator.create_mask/create_position``, the same "su" rotary scaling, the same
rotary application and attention.

One deliberate difference: diffusers computes the rotary table from the FIRST row's position ids only
(``OmniGenSuScaledRotaryEmbedding`` takes ``[0]``), which shifts the positions of the other rows when rows are
padded differently. Here every row uses its own positions, as OmniGen-v1 and MindOmni do.

Shapes: ``N`` rows, ``L`` condition tokens (left-padded), ``n`` image tokens, ``D`` hidden size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import OmniGenTransformer2DModel
from torch.utils.checkpoint import checkpoint

# -- masks and positions -----------------------------------------------------------------------------------------


def omnigen_attention_mask(cond_mask: torch.Tensor, num_image_tokens: int) -> torch.Tensor:
    """The 0/1 attention mask of ``[condition | time | image]`` exactly as ``OmniGenCollator.create_mask``.

    Condition and time tokens attend causally among themselves and never to image tokens; image tokens attend to
    every real token; no real query attends to a pad key; pad queries attend to everything (so softmax never sees
    an all-masked row). ``cond_mask`` (N, L) left-padded -> (N, S, S) float with S = L + 1 + n.
    """
    n, length = cond_mask.shape
    seq = length + 1 + num_image_tokens
    device = cond_mask.device
    real_key = torch.cat(
        [cond_mask.bool(), torch.ones(n, 1 + num_image_tokens, dtype=torch.bool, device=device)], dim=1
    )  # (N, S)
    idx = torch.arange(seq, device=device)
    causal = idx[None, :] <= idx[:, None]  # (S, S)
    is_image_query = idx >= length + 1  # (S,)
    is_image_key = idx >= length + 1
    allowed = torch.where(is_image_query[:, None], torch.ones_like(causal), causal & ~is_image_key[None, :])
    allowed = allowed[None] & real_key[:, None, :]  # (N, S, S)
    pad_query = ~real_key  # (N, S)
    allowed = allowed | pad_query[:, :, None]
    return allowed.float()


def omnigen_position_ids(cond_mask: torch.Tensor, num_image_tokens: int) -> torch.Tensor:
    """Position ids as ``OmniGenCollator.create_position``: pads 0, real tokens 0.. through time and image tokens.

    ``cond_mask`` (N, L) left-padded -> (N, L + 1 + n) long.
    """
    n = cond_mask.shape[0]
    real = torch.cat(
        [cond_mask.long(), torch.ones(n, 1 + num_image_tokens, dtype=torch.long, device=cond_mask.device)],
        dim=1,
    )
    return (real.cumsum(1) - 1).clamp(min=0) * real


def _additive_mask(mask01: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0/1 (N, Q, K) -> additive (N, 1, Q, K) in ``dtype``, the convention of diffusers' OmniGen forward."""
    return ((1 - mask01) * torch.finfo(dtype).min).unsqueeze(1).to(dtype)


# -- rotary embedding --------------------------------------------------------------------------------------------


def rope_cos_sin(
    decoder: OmniGenTransformer2DModel, position_ids: torch.Tensor, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row "su"-scaled rotary tables, float32, (N, S, head_dim) each.

    ``seq_len`` picks the long or short factors exactly as diffusers does (max position + 1 of the WHOLE
    sequence), so the cached path (which never sees the whole sequence at once) matches the uncached one.
    """
    rope = decoder.rope
    device = position_ids.device
    factors = rope.long_factor if seq_len > rope.original_max_position_embeddings else rope.short_factor
    ext = torch.tensor(factors, dtype=torch.float32, device=device)
    exponent = torch.arange(0, rope.dim, 2, dtype=torch.int64, device=device).float() / rope.dim
    inv_freq = 1.0 / (ext * rope.base**exponent)  # (hd/2,)
    freqs = position_ids.float()[..., None] * inv_freq  # (N, S, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)
    scale = rope.max_position_embeddings / rope.original_max_position_embeddings
    factor = (
        1.0
        if scale <= 1.0
        else math.sqrt(1 + math.log(scale) / math.log(rope.original_max_position_embeddings))
    )
    return emb.cos() * factor, emb.sin() * factor


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """diffusers' ``apply_rotary_emb(use_real_unbind_dim=-2)`` with per-row tables: x (N, h, S, hd), cos (N, S, hd)."""
    x_real, x_imag = x.reshape(*x.shape[:-1], 2, -1).unbind(-2)
    rotated = torch.cat([-x_imag, x_real], dim=-1)
    return (x.float() * cos[:, None] + rotated.float() * sin[:, None]).to(x.dtype)


# -- one block ---------------------------------------------------------------------------------------------------


def _qkv(block, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Normed input -> rotated (q, k) and v, each (N, heads, S, hd); k/v keep their own head count."""
    attn = block.self_attn
    normed = block.input_layernorm(hidden)
    q, k, v = attn.to_q(normed), attn.to_k(normed), attn.to_v(normed)
    n, s, _ = hidden.shape
    head_dim = q.shape[-1] // attn.heads
    q = q.view(n, s, attn.heads, head_dim).transpose(1, 2)
    k = k.view(n, s, -1, head_dim).transpose(1, 2)
    v = v.view(n, s, -1, head_dim).transpose(1, 2)
    return _apply_rope(q, cos, sin), _apply_rope(k, cos, sin), v


def _attend_and_mlp(block, hidden, q, k, v, bias) -> torch.Tensor:
    """Attention of q over (k, v) with the additive ``bias``, output projection, residuals and MLP."""
    attn = block.self_attn
    if k.shape[1] != q.shape[1]:  # grouped-query attention
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    out = out.transpose(1, 2).type_as(q).reshape(hidden.shape[0], hidden.shape[1], -1)
    hidden = hidden + attn.to_out[0](out)
    return hidden + block.mlp(block.post_attention_layernorm(hidden))


def _block(block, hidden, bias, cos, sin, past_k=None, past_v=None) -> torch.Tensor:
    """One OmniGenBlock; ``past_k/past_v`` (N, kv_heads, L, hd) are prepended condition keys/values."""
    q, k, v = _qkv(block, hidden, cos, sin)
    if past_k is not None:
        k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
    return _attend_and_mlp(block, hidden, q, k, v, bias)


def _run_block(decoder, block, hidden, bias, cos, sin, past_k=None, past_v=None) -> torch.Tensor:
    """Run a block, under non-reentrant activation checkpointing when the decoder asks for it and grads flow."""
    if decoder.gradient_checkpointing and torch.is_grad_enabled():
        return checkpoint(_block, block, hidden, bias, cos, sin, past_k, past_v, use_reentrant=False)
    return _block(block, hidden, bias, cos, sin, past_k, past_v)


# -- embeddings and output ---------------------------------------------------------------------------------------


def _time_embeddings(decoder, t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """t (N,) in [0, 1] (0 = noise) -> (time token (N, 1, D), adaLN embedding (N, D))."""
    proj = decoder.time_proj(t).to(dtype)
    return decoder.time_token(proj).unsqueeze(1), decoder.t_embedder(proj)


def _unpatchify(decoder, hidden: torch.Tensor, temb: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Normed image tokens (N, n, D) -> velocity (N, C, H, W) through adaLN + projection."""
    p = decoder.config.patch_size
    out = decoder.proj_out(decoder.norm_out(hidden, temb=temb))
    out = out.reshape(hidden.shape[0], height // p, width // p, p, p, -1)
    return out.permute(0, 5, 1, 3, 2, 4).flatten(4, 5).flatten(2, 3)


def num_image_tokens(decoder: OmniGenTransformer2DModel, height: int, width: int) -> int:
    """Image tokens for a latent of (height, width)."""
    p = decoder.config.patch_size
    return (height // p) * (width // p)


# -- full (uncached) forward -------------------------------------------------------------------------------------


def decoder_forward(
    decoder: OmniGenTransformer2DModel,
    cond_embeds: torch.Tensor,
    cond_mask: torch.Tensor,
    latents: torch.Tensor,
    t: torch.Tensor,
    *,
    return_features: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One decoder evaluation over ``[condition | time | image]``.

    cond_embeds (N, L, D) left-padded with cond_mask (N, L); latents (N, C, H, W); t (N,) with 0 = noise.
    Returns the velocity (N, C, H, W) and, when asked, features (N, layers + 1, n, D): each layer's INPUT at the
    image tokens plus the final normed output there.
    """
    dtype = decoder.dtype
    height, width = latents.shape[-2:]
    image = decoder.patch_embedding(latents.to(dtype), is_input_image=False)  # (N, n, D)
    n_img = image.shape[1]
    time_token, temb = _time_embeddings(decoder, t, dtype)
    hidden = torch.cat([cond_embeds.to(dtype), time_token, image], dim=1)
    positions = omnigen_position_ids(cond_mask, n_img)
    cos, sin = rope_cos_sin(decoder, positions, int(positions.max()) + 1)
    bias = _additive_mask(omnigen_attention_mask(cond_mask, n_img), dtype)
    features = []
    for block in decoder.layers:
        if return_features:
            features.append(hidden[:, -n_img:])
        hidden = _run_block(decoder, block, hidden, bias, cos, sin)
    normed = decoder.norm(hidden)[:, -n_img:]
    if return_features:
        features.append(normed)
    velocity = _unpatchify(decoder, normed, temb, height, width)
    return velocity, (torch.stack(features, dim=1) if return_features else None)


# -- condition KV cache ------------------------------------------------------------------------------------------


@dataclass
class ConditionCache:
    """Per-layer rotated keys/values of the condition tokens, valid for every t and every latent.

    Condition tokens never attend to the time or image tokens, so their states (hence keys/values) do not
    depend on the step; only ``[time | image]`` has to run at each step.
    """

    keys: list[torch.Tensor]  # layers x (N, kv_heads, L, hd)
    values: list[torch.Tensor]
    cond_mask: torch.Tensor  # (N, L)
    num_image_tokens: int


@torch.no_grad()
def build_condition_cache(
    decoder: OmniGenTransformer2DModel,
    cond_embeds: torch.Tensor,
    cond_mask: torch.Tensor,
    num_image_tokens: int,
) -> ConditionCache:
    """Run the condition tokens alone through every layer and keep their keys/values.

    The rotary factors are chosen for the full sequence length (L_real + 1 + n) so the cached keys equal the
    ones the full forward would compute.
    """
    dtype = decoder.dtype
    hidden = cond_embeds.to(dtype)
    length = cond_mask.shape[1]
    positions = omnigen_position_ids(cond_mask, num_image_tokens)
    seq_len = int(positions.max()) + 1
    cos, sin = rope_cos_sin(decoder, positions[:, :length], seq_len)
    mask01 = omnigen_attention_mask(cond_mask, num_image_tokens)[:, :length, :length]
    bias = _additive_mask(mask01, dtype)
    keys, values = [], []
    for block in decoder.layers:
        q, k, v = _qkv(block, hidden, cos, sin)
        keys.append(k)
        values.append(v)
        hidden = _attend_and_mlp(block, hidden, q, k, v, bias)
    return ConditionCache(keys, values, cond_mask, num_image_tokens)


def decoder_forward_cached(
    decoder: OmniGenTransformer2DModel, cache: ConditionCache, latents: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    """Velocity (N, C, H, W) at (latents, t) running only ``[time | image]`` against the cached condition."""
    dtype = decoder.dtype
    height, width = latents.shape[-2:]
    image = decoder.patch_embedding(latents.to(dtype), is_input_image=False)
    n_img = image.shape[1]
    if n_img != cache.num_image_tokens:
        raise ValueError(
            f"latents give {n_img} image tokens but the cache was built for {cache.num_image_tokens}"
        )
    time_token, temb = _time_embeddings(decoder, t, dtype)
    hidden = torch.cat([time_token, image], dim=1)
    length = cache.cond_mask.shape[1]
    positions = omnigen_position_ids(cache.cond_mask, n_img)
    cos, sin = rope_cos_sin(decoder, positions[:, length:], int(positions.max()) + 1)
    bias = _additive_mask(omnigen_attention_mask(cache.cond_mask, n_img)[:, length:], dtype)
    for block, past_k, past_v in zip(decoder.layers, cache.keys, cache.values):
        hidden = _block(block, hidden, bias, cos, sin, past_k, past_v)
    normed = decoder.norm(hidden)[:, -n_img:]
    return _unpatchify(decoder, normed, temb, height, width)


# -- checkpoint key conversion (OmniGen-v1 <-> diffusers) --------------------------------------------------------

_V1_TO_DIFFUSERS = {
    "pos_embed": "patch_embedding.pos_embed",
    "x_embedder.proj.weight": "patch_embedding.output_image_proj.weight",
    "x_embedder.proj.bias": "patch_embedding.output_image_proj.bias",
    "input_x_embedder.proj.weight": "patch_embedding.input_image_proj.weight",
    "input_x_embedder.proj.bias": "patch_embedding.input_image_proj.bias",
    "final_layer.adaLN_modulation.1.weight": "norm_out.linear.weight",
    "final_layer.adaLN_modulation.1.bias": "norm_out.linear.bias",
    "final_layer.linear.weight": "proj_out.weight",
    "final_layer.linear.bias": "proj_out.bias",
    "time_token.mlp.0.weight": "time_token.linear_1.weight",
    "time_token.mlp.0.bias": "time_token.linear_1.bias",
    "time_token.mlp.2.weight": "time_token.linear_2.weight",
    "time_token.mlp.2.bias": "time_token.linear_2.bias",
    "t_embedder.mlp.0.weight": "t_embedder.linear_1.weight",
    "t_embedder.mlp.0.bias": "t_embedder.linear_1.bias",
    "t_embedder.mlp.2.weight": "t_embedder.linear_2.weight",
    "t_embedder.mlp.2.bias": "t_embedder.linear_2.bias",
}
_DIFFUSERS_TO_V1 = {v: k for k, v in _V1_TO_DIFFUSERS.items()}


def omnigen_v1_to_diffusers(
    state: dict[str, torch.Tensor], num_heads: int, num_kv_heads: int
) -> dict[str, torch.Tensor]:
    """OmniGen-v1 keys (``llm.layers.K.self_attn.qkv_proj`` ...) -> ``OmniGenTransformer2DModel`` keys.

    The fused qkv projection is split into q (heads x hd rows), k and v (kv_heads x hd rows each).
    """
    out = {}
    for key, value in state.items():
        if key in _V1_TO_DIFFUSERS:
            out[_V1_TO_DIFFUSERS[key]] = value
        elif key.startswith("llm.") and key.endswith("self_attn.qkv_proj.weight"):
            prefix = key[len("llm.") : -len("qkv_proj.weight")]
            head_dim = value.shape[0] // (num_heads + 2 * num_kv_heads)
            q, k, v = torch.split(
                value, [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim]
            )
            out[prefix + "to_q.weight"], out[prefix + "to_k.weight"], out[prefix + "to_v.weight"] = q, k, v
        elif key.startswith("llm.") and key.endswith("self_attn.o_proj.weight"):
            out[key[len("llm.") : -len("o_proj.weight")] + "to_out.0.weight"] = value
        elif key.startswith("llm."):
            out[key[len("llm.") :]] = value
        else:
            raise KeyError(f"unexpected OmniGen-v1 key {key!r} (known: llm.*, {', '.join(_V1_TO_DIFFUSERS)})")
    return out


def diffusers_to_omnigen_v1(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`omnigen_v1_to_diffusers` (q/k/v re-fused into ``qkv_proj``)."""
    out = {}
    for key, value in state.items():
        if key in _DIFFUSERS_TO_V1:
            out[_DIFFUSERS_TO_V1[key]] = value
        elif key.endswith("self_attn.to_q.weight"):
            prefix = key[: -len("to_q.weight")]
            fused = torch.cat([value, state[prefix + "to_k.weight"], state[prefix + "to_v.weight"]])
            out["llm." + prefix + "qkv_proj.weight"] = fused
        elif key.endswith(("self_attn.to_k.weight", "self_attn.to_v.weight")):
            continue
        elif key.endswith("self_attn.to_out.0.weight"):
            out["llm." + key[: -len("to_out.0.weight")] + "o_proj.weight"] = value
        else:
            out["llm." + key] = value
    return out


def decoder_kwargs_from_v1(phi3: dict, state: dict[str, torch.Tensor]) -> dict:
    """``OmniGenTransformer2DModel`` constructor arguments from an OmniGen-v1 Phi-3 config dict and its weights.

    Patch size, latent channels, the timestep frequency size and the position-table size are not in the Phi-3
    config; they are read off the weight shapes (x_embedder (D, C, p, p), t_embedder.mlp.0 (D, f),
    pos_embed (1, M*M, D)).
    """
    proj = state["x_embedder.proj.weight"]
    rows = state["pos_embed"].shape[-2]
    side = math.isqrt(rows)
    if side * side != rows:
        raise ValueError(f"pos_embed has {rows} rows, not a square number: not an OmniGen position table")
    rope = phi3.get("rope_scaling") or phi3.get("rope_parameters") or {}
    if "short_factor" not in rope or "long_factor" not in rope:
        raise ValueError(
            "the decoder's Phi-3 config needs 'su' rope scaling with short_factor and long_factor lists"
        )
    return dict(
        in_channels=proj.shape[1],
        patch_size=proj.shape[-1],
        hidden_size=phi3["hidden_size"],
        rms_norm_eps=phi3.get("rms_norm_eps", 1e-5),
        num_attention_heads=phi3["num_attention_heads"],
        num_key_value_heads=phi3.get("num_key_value_heads") or phi3["num_attention_heads"],
        intermediate_size=phi3["intermediate_size"],
        num_layers=phi3["num_hidden_layers"],
        pad_token_id=phi3.get("pad_token_id", 32000),
        vocab_size=phi3["vocab_size"],
        max_position_embeddings=phi3.get("max_position_embeddings", 131072),
        original_max_position_embeddings=phi3.get("original_max_position_embeddings", 4096),
        rope_base=phi3.get("rope_theta", rope.get("rope_theta", 10000)),
        rope_scaling={"short_factor": list(rope["short_factor"]), "long_factor": list(rope["long_factor"])},
        pos_embed_max_size=side,
        time_step_dim=state["t_embedder.mlp.0.weight"].shape[1],
    )
