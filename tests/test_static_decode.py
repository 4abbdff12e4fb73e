"""The compiled static-cache decode (``rollout.compiled_decode``, ``rgpo.models.static_decode``): the same tokens
as the eager loop under greedy decoding and seeded sampling, the G chains sharing one prefill, the fallback to
the eager loop with its reason logged once, and compile time kept apart from step time."""

import logging

import pytest
import torch

from rgpo.models import static_decode
from rgpo.models.base import UnifiedModel


@pytest.fixture(autouse=True)
def fresh_log():
    static_decode._LOGGED.clear()
    yield
    static_decode._LOGGED.clear()


@pytest.fixture(scope="module")
def tiny():
    from rgpo.models.mindomni.tiny import build_tiny_mindomni

    return build_tiny_mindomni(seed=0).eval()


def prompts_of(model):
    # different lengths: the shorter prompt is left-padded
    return model.build_prompts([{"prompt": "a red square"},
                                {"prompt": "draw a long blue triangle on a very plain white background"}])


def sample(model, prompts, compiled: bool, backend=None, **kwargs):
    model.set_compiled_decode(compiled, backend=backend)
    seed = kwargs.pop("seed", None)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    try:
        return model.generate(prompts, generator=gen, **kwargs)
    finally:
        model.set_compiled_decode(False)


SETTINGS = [
    dict(temperature=0.0),  # greedy
    dict(temperature=1.0, seed=3),  # seeded sampling
    dict(temperature=0.8, top_k=40, top_p=0.9, seed=11),
]


@pytest.mark.parametrize("settings", SETTINGS, ids=["greedy", "seeded", "top_k_top_p"])
def test_static_cache_step_gives_the_eager_loops_tokens(tiny, settings):
    """The static cache (prefill repeated for the G chains, key mask, in-place writes), its step uncompiled: the
    exact tokens, masks and texts of the eager loop, padded prompts and chains that stop at EOS included."""
    prompts = prompts_of(tiny)
    eager = sample(tiny, prompts, False, num_generations=3, max_new_tokens=20, **dict(settings))
    static = sample(tiny, prompts, True, num_generations=3, max_new_tokens=20, **dict(settings))
    assert torch.equal(eager.completion_ids, static.completion_ids)
    assert torch.equal(eager.completion_mask, static.completion_mask)
    assert eager.texts == static.texts
    assert eager.completion_ids.shape[0] == 6


def test_cache_reused_across_calls_and_lengths(tiny):
    """A second call of the same shape reuses the static cache (stale keys beyond the prompt are masked); another
    length gets a cache of its own bucket. Both give the eager tokens."""
    prompts = prompts_of(tiny)
    tiny._compiled_decoder = None  # counted from here
    tiny.set_compiled_decode(True, backend=None)
    try:
        for tokens in (12, 12, 70):
            gen = torch.Generator().manual_seed(tokens)
            static = tiny.generate(prompts, num_generations=2, max_new_tokens=tokens, generator=gen)
            tiny.set_compiled_decode(False)
            gen = torch.Generator().manual_seed(tokens)
            eager = tiny.generate(prompts, num_generations=2, max_new_tokens=tokens, generator=gen)
            tiny.set_compiled_decode(True, backend=None)
            assert torch.equal(eager.completion_ids, static.completion_ids), tokens
        decoder = tiny._compiled_decoder
        rows = 2 * 2
        assert {key[:2] for key in decoder._caches} == set(decoder.stats.shapes)
        assert all(r == rows and length % decoder.bucket == 0 for r, length in decoder.stats.shapes)
        assert len(decoder._caches) == 2  # 12 tokens twice share one bucket, 70 tokens need a longer one
        assert decoder.stats.compiles == 2 and decoder.stats.steps > 0
    finally:
        tiny.set_compiled_decode(False)


def test_compiler_failure_falls_back_to_the_eager_loop_once(tiny, caplog):
    """A backend that fails: this call still returns the eager tokens (finished uncompiled), the reason is logged
    once, and later calls decode with the eager loop."""
    calls = []

    def broken_backend(gm, example_inputs):
        calls.append(1)
        raise RuntimeError("no code generation here")

    prompts = prompts_of(tiny)
    eager = sample(tiny, prompts, False, num_generations=2, max_new_tokens=10, temperature=1.0, seed=5)
    tiny.set_compiled_decode(True, backend=broken_backend)
    try:
        with caplog.at_level(logging.WARNING, logger="rgpo.decode"):
            for _ in range(2):
                got = tiny.generate(prompts, num_generations=2, max_new_tokens=10, temperature=1.0,
                                    generator=torch.Generator().manual_seed(5))
                assert torch.equal(eager.completion_ids, got.completion_ids)
        decoder = tiny._compiled_decoder
        assert decoder.failed and "no code generation here" in decoder.failed
        assert len(calls) >= 1
        messages = [r.getMessage() for r in caplog.records if r.name == "rgpo.decode"]
        assert len(messages) == 1 and "eager loop instead" in messages[0]
        assert decoder.stats.steps == 0  # the second call never entered the compiled path
    finally:
        tiny.set_compiled_decode(False)


def test_a_family_without_a_compiled_step_says_so_and_stays_eager(caplog):
    class NoStep(UnifiedModel):
        family = "no-step"

    model = NoStep()
    with caplog.at_level(logging.WARNING, logger="rgpo.decode"):
        model.set_compiled_decode(True)
        model.set_compiled_decode(True)
    assert model.decode_compile is None
    messages = [r.getMessage() for r in caplog.records if r.name == "rgpo.decode"]
    assert messages == ["compiled decode off, eager loop instead: family 'no-step' has no compiled decode step"]


def test_compiled_decode_is_off_by_default():
    from rgpo.config import RGPOConfig

    assert RGPOConfig().rollout.compiled_decode is False
    assert UnifiedModel.decode_compile is None


@pytest.mark.slow
@pytest.mark.parametrize("settings", SETTINGS[:2], ids=["greedy", "seeded"])
def test_inductor_compiled_step_gives_the_eager_loops_tokens(tiny, settings):
    """The real thing: inductor-generated code for the step (CUDA graphs on CUDA). About a minute to compile on 2
    CPU cores; the compile is timed apart from the steps."""
    if static_decode.compile_unavailable(torch.device("cpu"), "inductor"):
        pytest.skip("inductor cannot compile here")
    prompts = prompts_of(tiny)
    eager = sample(tiny, prompts, False, num_generations=3, max_new_tokens=16, **dict(settings))
    tiny.set_compiled_decode(True)
    try:
        gen = torch.Generator().manual_seed(settings.get("seed", 0))
        compiled = tiny.generate(prompts, num_generations=3, max_new_tokens=16,
                                 temperature=settings["temperature"], generator=gen if "seed" in settings else None)
        stats = tiny._compiled_decoder.stats
        assert tiny._compiled_decoder.failed is None
        assert stats.compiles >= 1 and stats.compile_s > 0 and stats.steps >= 14
    finally:
        tiny.set_compiled_decode(False)
    assert torch.equal(eager.completion_ids, compiled.completion_ids)
