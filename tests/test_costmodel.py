"""The floor benchmark's work model (``benchmarks/costmodel.py``): FLOP and byte counts of small shapes worked out
by hand, and the counts of the real tiny MindOmni checked against torch's own FLOP counter."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import costmodel
from benchmarks.costmodel import ImageShape, TransformerShape, Work

# hidden 8, 2 layers, 2 query heads / 1 key-value head of 4, MLP 16, head of 10 rows
SMALL = TransformerShape(hidden=8, layers=2, heads=2, kv_heads=1, head_dim=4, intermediate=16, vocab=10)


def test_transformer_weights_and_forward_flops_by_hand():
    # q 8*2*4 = 64, k + v 2*8*1*4 = 64, o 2*4*8 = 64, gated MLP 3*8*16 = 384
    assert SMALL.layer_weights == 576
    assert SMALL.body_weights == 1152 and SMALL.head_weights == 80
    # keys and values of one token: 2 (k, v) x 2 layers x 1 head x 4 x 2 bytes
    assert SMALL.kv_bytes_per_token(2) == 32
    # 4 x 2 layers x 5 queries x 5 keys x 2 heads x 4
    assert SMALL.attention_flops(5, 5) == 1600
    # 3 sequences of 5: linears 2*15*1152 = 34560, attention 3*1600 = 4800, head on 2 tokens 2*2*80 = 320
    assert SMALL.forward_flops(3, 5, head_tokens=2) == 39680


def test_decode_prefill_and_update_work_by_hand():
    # 3 chains, prompt of 5, 4 new tokens: 3 decode steps attending over 6, 7, 8 keys (21 in all)
    w = costmodel.decode_work(SMALL, rows=3, prompt_len=5, new_tokens=4, dtype_bytes=2)
    # 2 x 3 rows x 3 steps x (1152 + 80) = 22176, attention 3 rows x 21 keys x 4*2*2*4 = 4032
    assert w.flops == 26208
    # weights read once a step 3 x 1232 x 2 = 7392, keys/values 3 rows x 21 x 32 = 2016
    assert w.bytes == 9408
    assert costmodel.decode_work(SMALL, rows=3, prompt_len=5, new_tokens=1, dtype_bytes=2) == Work(0, 0)

    p = costmodel.prefill_work(SMALL, prompts=1, prompt_len=5, dtype_bytes=4)
    # one prompt of 5: linears 2*5*1152 = 11520, attention 1600, the head on its last token 2*80
    assert p.flops == 11520 + 1600 + 160 and p.bytes == 1232 * 4

    # LoRA (frozen weights): forward + input gradients = 2 forwards; full: 3; checkpointing: one more
    assert costmodel.backward_factor(full=False, checkpointing=False) == 2.0
    assert costmodel.backward_factor(full=True, checkpointing=True) == 4.0
    fwd = costmodel.text_forward_work(SMALL, chains=2, prompt_len=3, completion_len=2, dtype_bytes=4)
    assert fwd.flops == SMALL.forward_flops(2, 5, head_tokens=4)
    u = costmodel.update_work(SMALL, 2, 3, 2, 4, full=False, checkpointing=False, micro_batches=2)
    assert u == Work(2 * fwd.flops, 2 * 2 * fwd.bytes)


def test_roofline_floor_takes_the_slower_of_compute_and_memory():
    w = Work(flops=26208, bytes=9408)
    assert w.floor_s(1e4, 1e3) == pytest.approx(9.408) and w.bound(1e4, 1e3) == "memory"
    assert w.floor_s(1e3, 1e6) == pytest.approx(26.208) and w.bound(1e3, 1e6) == "compute"


def test_image_sampling_work_by_hand():
    # one-layer decoder and connector: hidden 4, one head of 4, MLP 4 -> 16 + 32 + 16 + 48 = 112 weights
    block = TransformerShape(hidden=4, layers=1, heads=1, kv_heads=1, head_dim=4, intermediate=4)
    assert block.layer_weights == 112
    img = ImageShape(decoder=block, connector=block, proj_in=6, patch_weights=10, vae_flops_per_image=100,
                     vae_weights=7)
    # 2 images, guided (4 rows), condition 3 tokens, 2 image tokens (+ time = 3), 2 steps, with the KV cache:
    # connector 2*12*112 + 4*(4*3*3*4) + 2*4*3*6 = 3408; cache of the condition 3264; per step
    # 2*4*3*112 + 4*(4*3*6*4) = 3840; patches 2 steps x 2*4*2*10 = 320; VAE 2 x 100
    cached = costmodel.sampling_work(img, images=2, cond_len=3, image_tokens=2, steps=2, guided=True,
                                     kv_cache=True, dtype_bytes=4)
    assert cached.flops == 3408 + 3264 + 2 * 3840 + 320 + 200
    # connector + proj once, decoder + patch weights every step, VAE once: (118 + 2*122 + 7) x 4
    assert cached.bytes == 1476
    # without the cache every step runs all 6 tokens: 2 x (2*24*112 + 4*(4*6*6*4)) = 15360
    uncached = costmodel.sampling_work(img, 2, 3, 2, 2, guided=True, kv_cache=False, dtype_bytes=4)
    assert uncached.flops == 3408 + 15360 + 320 + 200
    # unguided halves the rows of the connector and decoder
    unguided = costmodel.sampling_work(img, 2, 3, 2, 2, guided=False, kv_cache=False, dtype_bytes=4)
    assert unguided.flops == (3408 + 15360 + 320) // 2 + 200


@pytest.fixture(scope="module")
def tiny():
    from rgpo.models.mindomni.tiny import build_tiny_mindomni

    return build_tiny_mindomni(seed=0).eval()


def test_counts_match_torch_flop_counter_on_the_tiny_model(tiny):
    """The analytic count of the tiny MindOmni's language model equals what torch counts when it runs: a 2 x 7
    forward with the head on every token, and one decode step of 2 rows against a cache of 7. Attention runs as
    the math kernel (two batched matmuls), which the counter sees; it does not count the CPU flash kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from benchmarks.floor import model_shapes

    lm, _ = model_shapes(tiny)
    hf = tiny.hf_vlm()
    assert (lm.hidden, lm.layers, lm.heads, lm.kv_heads, lm.head_dim) == (64, 2, 4, 2, 16)
    ids = torch.randint(0, 300, (2, 7))
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = hf.model.language_model(input_ids=ids, use_cache=True)
        hf.lm_head(out.last_hidden_state)
    assert counter.get_total_flops() == lm.forward_flops(2, 7, head_tokens=14)

    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        step = hf.model.language_model(input_ids=ids[:, :1], past_key_values=out.past_key_values, use_cache=True)
        hf.lm_head(step.last_hidden_state)
    # one step of 2 rows over 8 keys = decode_work's step 1 after a prompt of 7
    assert counter.get_total_flops() == costmodel.decode_work(lm, 2, 7, 2, 4).flops
