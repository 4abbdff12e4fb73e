"""The rewards package: format checks, resolving specs, combining with errors that name the culprit, and a
tiny CLIP trained on coloured shapes whose reward must rank the right image first for every caption."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before open_clip / transformers are imported: no model hub, ever
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import dataclasses  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import rgpo.rewards as rewards  # noqa: E402  (the repository's rewards/ folder, installed as rgpo.rewards)
from rgpo.rewards import (  # noqa: E402
    REGISTRY,
    ClipConsistencyReward,
    Reward,
    RewardError,
    check_columns,
    combine,
    format_reward,
    format_strict_reward,
    get_reward,
    register_reward,
)
from rgpo.rewards.clip import (  # noqa: E402
    TINY_CLIP_NAME,
    build_tiny_clip,
    clear_clip_cache,
    default_quick_gelu,
    train_tiny_clip,
)
from rgpo.rewards.format import extract_answer  # noqa: E402
from rgpo.rewards.shapes import shape_captions, synthetic_shapes  # noqa: E402

EXAMPLE = Path(rewards.__file__).parent / "examples" / "length_penalty.py"
REPO = Path(rewards.__file__).parent.parent


# ---------------------------------------------------------------------------------------------- format
@pytest.mark.parametrize(
    ("completion", "search", "strict"),
    [
        ("<think>the cat has nine lives</think><answer>a cat</answer>", 1.0, 1.0),
        ("<think>line one\nline two</think>\n\n<answer>a red\napple</answer>", 1.0, 1.0),  # DOTALL, \s* between
        ("  \n<think>x</think><answer>y</answer>\n ", 1.0, 1.0),  # strict strips outer whitespace first
        ("Sure! <think>x</think><answer>y</answer>", 1.0, 0.0),  # text before
        ("<think>x</think><answer>y</answer> Hope that helps.", 1.0, 0.0),  # text after
        ("<answer>a cat</answer>", 0.0, 0.0),  # missing think
        ("<answer>a cat</answer><think>x</think>", 0.0, 0.0),  # answer before think
        ("<think>x</think> so the answer is <answer>y</answer>", 0.0, 0.0),  # only whitespace may separate
        ("<think>x</think><answer>cut off by the token lim", 0.0, 0.0),  # unclosed answer
        ("<think>x<answer>y</answer>", 0.0, 0.0),  # unclosed think
        ("", 0.0, 0.0),
    ],
)
def test_format_rewards(completion, search, strict):
    call = {"prompts": ["p"], "completions": [completion], "completion_ids": None, "images": [[]]}
    assert format_reward(**call) == [search]
    assert format_strict_reward(**call) == [strict]
    # TRL's conversational form of the same completion scores the same
    messages = {**call, "completions": [[{"role": "assistant", "content": completion}]]}
    assert format_reward(**messages) == [search] and format_strict_reward(**messages) == [strict]


def test_format_rewards_batch_and_unknown_columns():
    completions = ["<think>a</think><answer>b</answer>", "nothing"]
    assert format_reward(prompts=["p", "q"], completions=completions, completion_ids=[[1], [2]], images=[[], []],
                         gt_prompt=["x", "y"], anything=[1, 2]) == [1.0, 0.0]


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("<think>x</think><answer>  a red apple \n</answer>", "a red apple"),
        ("<answer>first</answer><answer>second</answer>", "first"),
        ("<think>x</think><answer> cut off", "cut off"),  # opened, never closed
        ("<answer></answer>", ""),
        ("<think>no answer</think>", None),
    ],
)
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


# ---------------------------------------------------------------------------------------------- get_reward
def test_registered_names():
    for name in ("format", "format_strict", "clip_consistency"):
        assert name in REGISTRY
    reward = get_reward("format")
    assert isinstance(reward, Reward) and reward.name == "format" and reward.weight == 1.0
    assert reward(prompts=["p"], completions=["<think>a</think><answer>b</answer>"], images=[[]]) == [1.0]


def test_unknown_name_lists_registered_names():
    with pytest.raises(RewardError, match="unknown reward 'clip_score'") as info:
        get_reward("clip_score")
    for name in ("format", "format_strict", "clip_consistency"):
        assert repr(name) in str(info.value)


def test_path_without_function_gets_a_hint():
    with pytest.raises(RewardError, match="needs ':function'"):
        get_reward("rewards/examples/length_penalty.py")


LENGTH_COMPLETIONS = [
    "<think>one two three</think><answer>x</answer>",  # 3 words, inside [2, 4]
    "<think>one</think><answer>x</answer>",  # 1 word: 1 / 2
    "<think>a b c d e f</think>",  # 6 words: 1 - (6 - 4) / 4
    "<think>a b c d e f g h i</think>",  # 9 words: 1 - 5 / 4 < 0 -> 0
    "no reasoning at all",  # no think block: does not apply
]
LENGTH_EXPECTED = [1.0, 0.5, 0.5, 0.0, None]


def _length_call(**columns):
    return {"prompts": ["p"] * 5, "completions": LENGTH_COMPLETIONS, "completion_ids": None, "images": [[]] * 5,
            **columns}


@pytest.mark.parametrize("spec", ["rgpo.rewards.examples.length_penalty:length_reward",
                                  "rgpo.rewards.examples.length_penalty.length_reward"])  # TRL's CLI form
def test_dotted_path(spec):
    reward = get_reward(spec, min_words=2, max_words=4)
    assert reward.name == "length_reward" and reward.source == spec
    assert reward(**_length_call()) == LENGTH_EXPECTED


def test_file_path_absolute_and_relative(monkeypatch):
    reward = get_reward(f"{EXAMPLE}:length_reward", min_words=2, max_words=4)
    assert reward.name == "length_reward"
    assert reward(**_length_call(gt_prompt=["x"] * 5)) == LENGTH_EXPECTED
    monkeypatch.chdir(REPO)  # what a YAML config says: a path relative to the working directory
    relative = get_reward({"name": "rewards/examples/length_penalty.py:length_reward", "weight": 0.1,
                           "kwargs": {"min_words": 2, "max_words": 4}})
    assert relative.weight == 0.1
    assert relative(**_length_call()) == LENGTH_EXPECTED


def test_missing_attribute_names_file_and_attribute():
    with pytest.raises(RewardError, match="has no attribute 'length_rewrd'") as info:
        get_reward(f"{EXAMPLE}:length_rewrd")
    assert str(EXAMPLE) in str(info.value) and "length_reward" in str(info.value)  # lists what is there
    with pytest.raises(RewardError, match="has no attribute 'nope'"):
        get_reward("rgpo.rewards.examples.length_penalty:nope")


def test_missing_file_and_module():
    with pytest.raises(RewardError, match=r"file 'no/such/rewards\.py' not found"):
        get_reward("no/such/rewards.py:fn")
    with pytest.raises(RewardError, match="cannot import module 'no_such_package.rewards'"):
        get_reward("no_such_package.rewards:fn")


def test_register_function_and_class():
    @dataclasses.dataclass
    class Scaled:
        scale: float = 1.0
        required_columns = ("score",)

        def __call__(self, *, completions, score, **kwargs):
            return [self.scale * s for s in score]

    def constant(completions, value=1.0, **kwargs):
        return [value] * len(completions)

    try:
        register_reward("test_scaled")(Scaled)
        register_reward("test_constant")(constant)
        register_reward("test_constant")(constant)  # the same object again: a no-op
        scaled = get_reward("test_scaled", scale=2.0)
        assert isinstance(scaled.fn, Scaled) and scaled.required_columns == ("score",)
        assert scaled(prompts=["p", "q"], completions=["", ""], images=[[], []], score=[1.0, 3.0]) == [2.0, 6.0]
        constant_reward = get_reward("test_constant", value=0.25)
        assert constant_reward.name == "test_constant"
        assert constant_reward(prompts=["p"], completions=[""], images=[[]]) == [0.25]
        with pytest.raises(RewardError, match="already registered"):
            register_reward("test_constant")(Scaled)
        with pytest.raises(RewardError, match="test_scaled.*unexpected keyword argument 'scal'"):
            get_reward("test_scaled", scal=2.0)
    finally:
        REGISTRY.pop("test_scaled", None)
        REGISTRY.pop("test_constant", None)


# ---------------------------------------------------------------------------------------------- combine
def _fixed(name, values, weight=1.0):
    """A reward returning ``values`` whatever the batch."""
    return Reward(name, lambda prompts, completions, images, **columns: list(values), weight)


def _combine(*reward_list, weights=None, n=3, timeout=None, **columns):
    return combine(list(reward_list), weights, ["p"] * n, ["c"] * n, [None] * n, columns, timeout=timeout)


def test_combine_weights_by_hand():
    # total = 1.0 * a + 2.0 * b:  [1 + 2*.5, 0 + 2*(-1), 1 + 2*.25] = [2.0, -2.0, 1.5]
    total, per = _combine(_fixed("a", [1.0, 0.0, 1.0]), _fixed("b", [0.5, -1, 0.25]), weights=[1.0, 2.0])
    torch.testing.assert_close(total, torch.tensor([2.0, -2.0, 1.5]))
    torch.testing.assert_close(per, torch.tensor([[1.0, 0.5], [0.0, -1.0], [1.0, 0.25]]))
    assert total.dtype == per.dtype == torch.float32


def test_combine_none_is_missing_and_weights_from_rewards():
    # Sample 1: only a applies -> 0.5 * 4; sample 2: nothing applies -> 0.0 with an all-NaN row.
    total, per = _combine(_fixed("a", [1.0, 4.0, None], weight=0.5), _fixed("b", [2.0, None, None], weight=3.0))
    torch.testing.assert_close(total, torch.tensor([0.5 + 6.0, 2.0, 0.0]))
    assert per[1, 1].isnan() and per[2].isnan().all() and not per[0].isnan().any()


def test_combine_passes_columns():
    def echo(prompts, completions, images, gt_prompt, **columns):
        return [float(len(t)) for t in gt_prompt]

    total, _ = _combine(echo, weights=[1.0], n=2, gt_prompt=["ab", "abcd"], other=[0, 0])
    torch.testing.assert_close(total, torch.tensor([2.0, 4.0]))
    as_tensor = Reward("as_tensor", lambda *a, **k: torch.tensor([0.5, 1.5]))  # a 1-D tensor is accepted too
    torch.testing.assert_close(_combine(as_tensor, n=2)[0], torch.tensor([0.5, 1.5]))


@pytest.mark.parametrize(
    ("values", "pattern"),
    [
        ([1.0, 1.0], r"reward 'bad' returned 2 values; expected 3"),
        ([1.0, float("nan"), 0.0], r"reward 'bad' returned nan for sample 1"),
        ([1.0, 0.0, float("-inf")], r"reward 'bad' returned -inf for sample 2"),
        ([1.0, "0.5", 0.0], r"reward 'bad' returned str '0.5' for sample 1"),
        (None, r"reward 'bad' returned NoneType"),
    ],
)
def test_combine_bad_values_name_reward_and_sample(values, pattern):
    with pytest.raises(RewardError, match=pattern):
        _combine(_fixed("good", [0.0, 0.0, 0.0]), Reward("bad", lambda *a, **k: values))


def test_combine_exception_is_chained():
    def broken(prompts, completions, images, **columns):
        raise ZeroDivisionError("no images to divide by")

    with pytest.raises(RewardError, match="reward 'broken' raised ZeroDivisionError: no images to divide by") as info:
        _combine(broken, weights=[1.0])
    assert isinstance(info.value.__cause__, ZeroDivisionError)


def test_combine_timeout():
    release = threading.Event()

    def stuck(prompts, completions, images, **columns):
        release.wait(10)
        return [0.0] * len(prompts)

    start = time.monotonic()
    try:
        with pytest.raises(RewardError, match=r"reward 'stuck' took longer than the timeout of 0.2 s"):
            _combine(Reward("stuck", stuck), timeout=0.2)
    finally:
        release.set()  # let the abandoned worker thread finish
    assert time.monotonic() - start < 5
    total, _ = _combine(_fixed("quick", [1.0, 2.0, 3.0]), timeout=5)  # a reward within its time is unaffected
    torch.testing.assert_close(total, torch.tensor([1.0, 2.0, 3.0]))


def test_combine_timeout_error_raised_by_the_reward_is_not_a_timeout():
    def raises_timeout(prompts, completions, images, **columns):
        raise TimeoutError("the judge server did not answer")

    with pytest.raises(RewardError, match="raised TimeoutError: the judge server did not answer"):
        _combine(raises_timeout, weights=[1.0], timeout=5)


def _meeting(name, barrier, value, wait=10.0):
    """A reward that returns only once every reward sharing ``barrier`` is running at the same time."""
    def meet(prompts, completions, images, **columns):
        barrier.wait(timeout=wait)  # raises BrokenBarrierError when the others do not come in time
        return [value] * len(prompts)

    return Reward(name, meet)


def test_combine_parallel_runs_the_rewards_at_the_same_time():
    barrier = threading.Barrier(3)
    rewards = [_meeting("judge_a", barrier, 1.0), _meeting("judge_b", barrier, 2.0), _meeting("judge_c", barrier, 3.0)]
    total, per = combine(rewards, [1.0, 1.0, 0.5], ["p"] * 2, ["c"] * 2, [None] * 2, {}, parallel=True)
    torch.testing.assert_close(per, torch.tensor([[1.0, 2.0, 3.0]] * 2))
    torch.testing.assert_close(total, torch.tensor([4.5, 4.5]))
    # One at a time (the default), the first never meets the others: it fails, named, after the barrier's wait.
    barrier = threading.Barrier(2)
    with pytest.raises(RewardError, match="reward 'judge_a' raised BrokenBarrierError"):
        combine([_meeting("judge_a", barrier, 1.0, wait=0.2), _meeting("judge_b", barrier, 2.0, wait=0.2)], None,
                ["p"], ["c"], [None], {})


def test_combine_parallel_reports_errors_in_reward_order_and_times_each_from_the_start():
    release = threading.Event()

    def stuck(prompts, completions, images, **columns):
        release.wait(10)
        return [0.0] * len(prompts)

    def broken(prompts, completions, images, **columns):
        raise ValueError("judge answered 'maybe'")

    start = time.monotonic()
    try:
        with pytest.raises(RewardError, match=r"reward 'stuck' took longer than the timeout of 0.3 s for 3 samples"):
            _combine_parallel(Reward("stuck", stuck), Reward("broken", broken), timeout=0.3)
        with pytest.raises(RewardError, match=r"reward 'broken' raised ValueError: judge answered 'maybe'"):
            _combine_parallel(_fixed("fine", [0.0] * 3), Reward("broken", broken), Reward("stuck", stuck),
                              timeout=0.3)
    finally:
        release.set()
    assert time.monotonic() - start < 5

    # Each reward's limit counts from the common start, not from when the reward before it finished: "slow"
    # (2 s) is late for a 1.5 s limit even though it was awaited only after "steady" (1 s) came back.
    def sleeper(seconds):
        return lambda prompts, completions, images, **columns: time.sleep(seconds) or [0.0] * len(prompts)

    with pytest.raises(RewardError, match=r"reward 'slow' took longer than the timeout of 1.5 s"):
        _combine_parallel(Reward("steady", sleeper(1.0)), Reward("slow", sleeper(2.0)), timeout=1.5)


def test_trainer_scoring_follows_rewards_parallel():
    """``rewards.parallel`` reaches the trainer's scoring: two rewards that only finish together, with the columns
    of each row passed as keywords."""
    from rgpo.config import RewardsConfig
    from rgpo.data import PromptRow
    from rgpo.scoring import score_samples

    barrier = threading.Barrier(2)

    def caption_length(prompts, completions, images, gt_prompt, **columns):
        barrier.wait(timeout=10)
        return [float(len(c)) for c in gt_prompt]

    rows = [PromptRow("p0", [], {"gt_prompt": "abc"}, "x.jsonl:1"), PromptRow("p1", [], {"gt_prompt": "a"}, "x.jsonl:2")]
    per = score_samples([_meeting("judge", barrier, 0.5), Reward("caption_length", caption_length)], rows,
                        ["c0", "c1"], [None, None], RewardsConfig(timeout_s=20, parallel=True), torch.device("cpu"))
    torch.testing.assert_close(per, torch.tensor([[0.5, 3.0], [0.5, 1.0]]))


def test_combine_reports_each_rewards_seconds_in_both_modes():
    """``seconds`` gets each reward's own wall time: under ``parallel`` two waits of 0.3 s and 0.6 s overlap
    (the batch takes ~0.6 s, not 0.9 s) and each still reports its own duration; one at a time they add up."""
    def sleeper(seconds):
        return lambda prompts, completions, **kwargs: time.sleep(seconds) or [seconds] * len(prompts)

    rewards = [Reward("short", sleeper(0.3)), Reward("long", sleeper(0.6))]
    for parallel, lowest, highest in ((True, 0.6, 0.85), (False, 0.9, 1.5)):
        seconds: dict[str, float] = {}
        start = time.perf_counter()
        _, per = combine(rewards, None, ["p"] * 2, ["c"] * 2, None, {}, parallel=parallel, seconds=seconds)
        wall = time.perf_counter() - start
        torch.testing.assert_close(per, torch.tensor([[0.3, 0.6]] * 2))
        assert lowest <= wall < highest, (parallel, wall)
        assert set(seconds) == {"short", "long"}
        assert 0.3 <= seconds["short"] < 0.45 and 0.6 <= seconds["long"] < 0.75, seconds
    # Added to what is there: the image policy scores a step's images in several calls.
    combine(rewards[:1], None, ["p"], ["c"], None, {}, seconds=seconds)
    assert seconds["short"] >= 0.6


def _combine_parallel(*reward_list, timeout=None, n=3):
    return combine(list(reward_list), None, ["p"] * n, ["c"] * n, [None] * n, {}, timeout=timeout, parallel=True)


def test_combine_checks_batch_lengths():
    with pytest.raises(RewardError, match=r"batch has 3 prompts but column 'gt_prompt' has 2"):
        _combine(_fixed("a", [0.0] * 3), gt_prompt=["x", "y"])


def test_check_columns_names_reward_and_column():
    def needs_caption(prompts, completions, images, caption, **columns):
        return [0.0] * len(prompts)

    needs_caption.required_columns = ("caption",)
    check_columns(needs_caption, ["caption", "id"])  # present: fine
    with pytest.raises(RewardError, match=r"reward 'needs_caption' needs column\(s\) \['caption'\].*available columns: \['gt_prompt', 'id'\]"):
        check_columns(needs_caption, {"gt_prompt", "id"})
    with pytest.raises(RewardError, match="reward 'needs_caption' needs column"):  # combine checks before calling
        _combine(needs_caption, weights=[1.0], gt_prompt=["a", "b", "c"])
    wrapped = get_reward(f"{EXAMPLE}:length_reward")  # a function without required_columns needs nothing
    check_columns(wrapped, [])


# ---------------------------------------------------------------------------------------------- CLIP
N_CAPTIONS = len(shape_captions())


@pytest.fixture(scope="module")
def tiny_clip():
    """A tiny CLIP trained for a few seconds on procedurally drawn coloured shapes (seeded)."""
    images, captions = synthetic_shapes(per_caption=20, seed=0)
    # One thread: on a 2-core machine shared with other test runs, two OpenMP threads ran training 20x
    # slower (each barrier waits for a descheduled thread); alone, one thread is about as fast.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train_tiny_clip(images, captions, steps=100, seed=0)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def fresh_images():
    """One fresh image per caption, drawn with another seed than the training set."""
    images, captions = synthetic_shapes(per_caption=1, seed=1234)
    assert captions == shape_captions()
    return images


def _reward(bundle, **kwargs):
    return ClipConsistencyReward(model=bundle.model, preprocess=bundle.preprocess, tokenizer=bundle.tokenizer, **kwargs)


def _all_pairs(reward, images):
    """(caption, image) similarity matrix over every caption and image, through the reward call."""
    captions = shape_captions()
    n = len(captions)
    pairs = [(c, img) for c in captions for img in images]
    values = reward(["p"] * n * n, ["c"] * n * n, [img for _, img in pairs], gt_prompt=[c for c, _ in pairs])
    return torch.tensor(values).view(n, n)


def test_tiny_clip_size():
    n_params = sum(p.numel() for p in build_tiny_clip().model.parameters())
    assert 1_000_000 <= n_params <= 3_000_000


def test_clip_reward_ranks_the_matching_image_first(tiny_clip, fresh_images):
    scores = _all_pairs(_reward(tiny_clip, clamp_min=None), fresh_images)
    captions = shape_captions()
    for i, caption in enumerate(captions):
        others = torch.cat([scores[i, :i], scores[i, i + 1 :]])
        worst = captions[int(torch.argmax(scores[i]))]
        assert scores[i, i] > others.max(), f"{caption!r}: its image scores {scores[i, i]:.3f}, {worst!r}'s more"


def test_untrained_clip_does_not_rank_them(fresh_images):
    # The control for the test above: the ranking comes from training, not from the test's construction.
    scores = _all_pairs(_reward(build_tiny_clip(seed=0), clamp_min=None), fresh_images)
    off_diagonal = scores.masked_fill(torch.eye(N_CAPTIONS, dtype=torch.bool), -2.0)
    assert (scores.diag() > off_diagonal.max(dim=1).values).sum() < N_CAPTIONS // 2


def test_clip_reward_clamps_at_clamp_min(tiny_clip, fresh_images):
    raw = _all_pairs(_reward(tiny_clip, clamp_min=None), fresh_images)
    torch.testing.assert_close(_all_pairs(_reward(tiny_clip), fresh_images), raw.clamp(min=0.0))
    threshold = float(raw.median())  # half the pairs fall below it, so the clamp is exercised
    torch.testing.assert_close(_all_pairs(_reward(tiny_clip, clamp_min=threshold), fresh_images), raw.clamp(min=threshold))


def test_clip_reward_none_image_or_text_gives_none(tiny_clip, fresh_images):
    reward = _reward(tiny_clip)
    values = reward(["p"] * 3, ["c"] * 3, [fresh_images[0], None, fresh_images[1]], gt_prompt=["a red circle", "a red circle", None])
    assert isinstance(values[0], float) and values[1] is None and values[2] is None


def test_clip_reward_scores_every_image_of_a_chain(fresh_images):
    """A chain's value is the mean over its images of each image's (clamped) cosine; no image: None."""
    a, b, c = fresh_images[:3]
    untrained = build_tiny_clip(seed=0)  # the arithmetic does not need a trained CLIP
    single = _reward(untrained, clamp_min=None, batch_size=2)
    caption = "a red circle"
    one = [single(prompts=["p"], completions=["x"], images=[[im]], gt_prompt=[caption])[0] for im in (a, b, c)]
    values = single(prompts=["p"] * 4, completions=["x"] * 4, completion_ids=None, images=[[a, b], [], [c], [a, b, c]],
                    gt_prompt=[caption] * 4)
    assert values[1] is None
    assert values[0] == pytest.approx((one[0] + one[1]) / 2, abs=1e-6)
    assert values[2] == pytest.approx(one[2], abs=1e-6)
    assert values[3] == pytest.approx(sum(one) / 3, abs=1e-6)
    threshold = sorted(one)[1]  # the clamp applies to each image, then the mean is taken
    clamped = _reward(untrained, clamp_min=threshold)(prompts=["p"], completions=["x"], images=[[a, b, c]],
                                                      gt_prompt=[caption])
    assert clamped[0] == pytest.approx(sum(max(v, threshold) for v in one) / 3, abs=1e-6)


def test_clip_reward_batches_agree(tiny_clip, fresh_images):
    captions = shape_captions()
    one_batch = _reward(tiny_clip, clamp_min=None)(["p"] * N_CAPTIONS, ["c"] * N_CAPTIONS, fresh_images, gt_prompt=captions)
    small_batches = _reward(tiny_clip, clamp_min=None, batch_size=5)(["p"] * N_CAPTIONS, ["c"] * N_CAPTIONS, fresh_images, gt_prompt=captions)
    assert one_batch == pytest.approx(small_batches, abs=1e-5)


def test_clip_reward_answer_column(tiny_clip, fresh_images):
    by_column = _reward(tiny_clip, clamp_min=None)
    by_answer = _reward(tiny_clip, clamp_min=None, text_column="answer")
    assert by_column.required_columns == ("gt_prompt",) and by_answer.required_columns == ()
    images = fresh_images[:3]
    completions = [
        "<think>red and round</think><answer> a red circle </answer>",
        "<think>no closing tag</think><answer>a red square",
        "a red triangle",  # no answer tag: the whole completion is the text
    ]
    expected = by_column(["p"] * 3, ["c"] * 3, images, gt_prompt=["a red circle", "a red square", "a red triangle"])
    assert by_answer(["p"] * 3, completions, images) == pytest.approx(expected, abs=1e-6)


def test_clip_reward_missing_column(tiny_clip, fresh_images):
    reward = get_reward("clip_consistency", model=tiny_clip.model, preprocess=tiny_clip.preprocess, tokenizer=tiny_clip.tokenizer)
    assert reward.name == "clip_consistency"
    with pytest.raises(RewardError, match=r"reward 'clip_consistency' needs column\(s\) \['gt_prompt'\]"):
        check_columns(reward, ["caption"])
    with pytest.raises(KeyError, match="gt_prompt"):
        reward(["p"], ["c"], [fresh_images[0]], caption=["a red circle"])


def test_clip_loads_local_weights_once(tiny_clip, fresh_images, tmp_path):
    """The pretrained-file path (what a real ViT-L checkpoint takes) is cached and gives the same rewards."""
    weights = tmp_path / "tiny_clip.pt"
    torch.save(tiny_clip.model.state_dict(), weights)
    clear_clip_cache()
    try:
        first = ClipConsistencyReward(model_name=TINY_CLIP_NAME, pretrained=str(weights), device="cpu", clamp_min=None)
        second = get_reward("clip_consistency", model_name=TINY_CLIP_NAME, pretrained=str(weights), device="cpu",
                            text_column="answer")
        assert first.model is second.fn.model and first.model is not tiny_clip.model
        assert not any(p.requires_grad for p in first.model.parameters()) and not first.model.training
        captions = shape_captions()
        loaded = first(["p"] * N_CAPTIONS, ["c"] * N_CAPTIONS, fresh_images, gt_prompt=captions)
        injected = _reward(tiny_clip, clamp_min=None)(["p"] * N_CAPTIONS, ["c"] * N_CAPTIONS, fresh_images, gt_prompt=captions)
        assert loaded == pytest.approx(injected, abs=1e-5)
    finally:
        clear_clip_cache()


def test_clip_quick_gelu_default():
    # OpenAI's weights are the only ViT-L-14-336 release and use QuickGELU; ViT-L-14 has releases of both kinds.
    assert default_quick_gelu("ViT-L-14-336") is True
    assert default_quick_gelu("ViT-L-14") is False and default_quick_gelu(TINY_CLIP_NAME) is False


def test_clip_random_weights_warn_and_unknown_model_is_named():
    clear_clip_cache()
    try:
        with pytest.warns(UserWarning, match="random weights"):
            ClipConsistencyReward(model_name=TINY_CLIP_NAME, device="cpu")
    finally:
        clear_clip_cache()
    with pytest.raises(RewardError, match="unknown open_clip model 'ViT-Nope'"):
        get_reward("clip_consistency", model_name="ViT-Nope")


def test_clip_missing_weights_file_is_named():
    with pytest.raises(RewardError, match=r"clip_consistency.*pretrained weights '/no/such/clip\.bin' not found"):
        get_reward("clip_consistency", model_name=TINY_CLIP_NAME, pretrained="/no/such/clip.bin")


def test_clip_reward_through_combine(tiny_clip, fresh_images):
    reward_list = [get_reward("format"), get_reward({"name": "clip_consistency", "weight": 2.0, "kwargs": {
        "model": tiny_clip.model, "preprocess": tiny_clip.preprocess, "tokenizer": tiny_clip.tokenizer}})]
    completions = ["<think>x</think><answer>a red circle</answer>", "plain text"]
    total, per = combine(reward_list, None, ["p", "q"], completions, [fresh_images[0], None], {"gt_prompt": ["a red circle"] * 2})
    assert per[0, 0] == 1.0 and per[1, 0] == 0.0 and not math.isnan(per[0, 1]) and per[1, 1].isnan()
    torch.testing.assert_close(total, torch.stack([1.0 + 2.0 * per[0, 1], torch.tensor(0.0)]))


def test_tiny_clip_tokenizer_is_offline():
    import open_clip

    tokens = open_clip.get_tokenizer("ViT-B-32")(["a red circle"])
    assert tokens.shape == (1, 77) and int(tokens[0, 0]) == 49406  # start-of-text of the bundled BPE vocab


# ---------------------------------------------------------------------------------------------- TRL's call contract
def _recorder(calls):
    """A reward that accepts keywords only (as TRL's contract allows) and records what it was given."""
    def keywords_only(*, prompts, completions, completion_ids=None, images, **kwargs):
        calls.append({"prompts": prompts, "completions": completions, "completion_ids": completion_ids,
                      "images": images, **kwargs})
        return [float(len(chain)) for chain in images]

    return keywords_only


def test_combine_calls_with_keywords_only_and_images_per_chain():
    from PIL import Image

    red, green, blue = (Image.new("RGB", (4, 4), c) for c in ("red", "green", "blue"))
    calls = []
    total, per = combine([Reward("rec", _recorder(calls))], None, ["p0", "p1", "p2"], ["c0", "c1", "c2"],
                         [[red, green], [], [blue]], {"gt_prompt": ["a", "b", "c"]}, completion_ids=[[1, 2], [3], []])
    torch.testing.assert_close(per[:, 0], torch.tensor([2.0, 0.0, 1.0]))  # the number of images of each chain
    (call,) = calls
    assert call["prompts"] == ["p0", "p1", "p2"] and call["completions"] == ["c0", "c1", "c2"]
    assert call["completion_ids"] == [[1, 2], [3], []] and call["gt_prompt"] == ["a", "b", "c"]
    assert call["images"][0][0] is red and call["images"][0][1] is green and call["images"][2] == [blue]


def test_combine_normalises_one_image_or_none_per_chain():
    """What rgpo's trainer passes today (one image or None per chain) reaches a reward as [image] / []."""
    from PIL import Image

    image = Image.new("RGB", (4, 4))
    calls = []
    combine([_recorder(calls)], [1.0], ["p", "q", "r"], ["a", "b", "c"], [image, None, [image, image]], {})
    assert calls[0]["images"] == [[image], [], [image, image]] and calls[0]["completion_ids"] is None
    combine([_recorder(calls)], [1.0], ["p"], ["a"], None, {})  # no images at all
    assert calls[1]["images"] == [[]]


def test_combine_checks_completion_ids_and_reserved_columns():
    with pytest.raises(RewardError, match=r"batch has 2 prompts but completion_ids has 1"):
        combine([_fixed("a", [0.0, 0.0])], None, ["p", "q"], ["a", "b"], None, {}, completion_ids=[[1]])
    with pytest.raises(RewardError, match=r"data column\(s\) \['images'\] take the name of a reward input"):
        combine([_fixed("a", [0.0])], None, ["p"], ["a"], None, {"images": ["x.png"]})


def test_combine_explains_a_reward_without_kwargs():
    def positional_only(prompts, completions, images):  # the old rgpo contract, no **kwargs
        return [0.0] * len(prompts)

    with pytest.raises(RewardError, match=r"reward 'positional_only' cannot be called with \['completion_ids', "
                                          r"'gt_prompt'\].*add \*\*kwargs"):
        combine([positional_only], [1.0], ["p"], ["a"], None, {"gt_prompt": ["x"]})


def test_required_columns_from_the_signature():
    def needs_solution(completions, solution, log_extra=None, **kwargs):  # the shape of TRL's accuracy_reward
        return [float(c == s) for c, s in zip(completions, solution)]

    assert Reward("acc", needs_solution).required_columns == ("solution",)
    with pytest.raises(RewardError, match=r"reward 'needs_solution' needs column\(s\) \['solution'\]"):
        combine([needs_solution], [1.0], ["p"], ["a"], None, {"answer": ["a"]})
    total, _ = combine([needs_solution], [1.0], ["p", "q"], ["a", "b"], None, {"solution": ["a", "c"]})
    torch.testing.assert_close(total, torch.tensor([1.0, 0.0]))


# TRL's shipped reward functions, imported from trl, through the registry and combine unchanged.
TRL_COMPLETIONS = ["<think>\nreasoning\n</think>\nthe answer", "<think>no end", "no think at all"]


def test_trl_think_format_reward_plugs_in_unchanged():
    from trl.rewards import think_format_reward

    reward = get_reward("trl.rewards.think_format_reward")  # TRL's CLI spelling: module.function
    assert reward.fn is think_format_reward and reward.name == "think_format_reward" and reward.conversational
    assert get_reward("trl.rewards:think_format_reward").fn is think_format_reward
    # It reads completion[0]["content"] (TRL's conversational form); combine hands it our text that way.
    expected = think_format_reward([[{"content": c}] for c in TRL_COMPLETIONS])
    assert expected == [1.0, 0.0, 0.0]
    total, per = combine([reward, get_reward("format")], [2.0, 1.0], ["p"] * 3, TRL_COMPLETIONS, None,
                         {"gt_prompt": ["x"] * 3})
    torch.testing.assert_close(per[:, 0], torch.tensor(expected))
    torch.testing.assert_close(total, 2.0 * torch.tensor(expected))  # format: 0 for all three


def test_trl_token_rewards_built_by_their_factories():
    from trl.rewards import get_repetition_penalty_reward, get_soft_overlong_punishment

    overlong = get_reward({"name": "trl.rewards.get_soft_overlong_punishment", "weight": 0.5,
                           "kwargs": {"max_completion_len": 10, "soft_punish_cache": 4}})
    repetition = get_reward("trl.rewards.get_repetition_penalty_reward", ngram_size=2, max_penalty=-1.0)
    assert (overlong.name, repetition.name) == ("soft_overlong_punishment_reward", "repetition_penalty_reward")
    ids = [[1, 2, 3, 4], [5, 5, 5, 5, 5, 5, 5, 5], [7] * 12]
    # By hand: lengths 4, 8, 12 against L_max 10, cache 4 -> 0, (6 - 8) / 4 = -0.5, -1; repeated bigrams: 0,
    # (1 - 1/7) * -1 = -6/7, (1 - 1/11) * -1 = -10/11. TRL's own functions agree:
    assert get_soft_overlong_punishment(10, 4)(ids) == [0.0, -0.5, -1.0]
    assert get_repetition_penalty_reward(2, -1.0)(ids) == pytest.approx([0.0, -6 / 7, -10 / 11])
    total, per = combine([overlong, repetition], None, ["p"] * 3, ["a", "b", "c"], None, {}, completion_ids=ids)
    torch.testing.assert_close(per, torch.tensor([[0.0, 0.0], [-0.5, -6 / 7], [-1.0, -10 / 11]]))
    torch.testing.assert_close(total, torch.tensor([0.0, -0.25 - 6 / 7, -0.5 - 10 / 11]))
    with pytest.raises(RewardError, match=r"reward 'soft_overlong_punishment_reward' needs completion_ids, but "
                                          r"the caller passed none"):
        combine([overlong], None, ["p"], ["a"], None, {})


def test_trl_accuracy_reward_needs_its_solution_column():
    pytest.importorskip("math_verify")  # TRL's accuracy rewards need it; not a dependency of rgpo
    reward = get_reward("trl.rewards.accuracy_reward")
    assert reward.required_columns == ("solution",) and reward.conversational
    completions = [r"so it is \boxed{\frac{1}{3}}", r"\boxed{\frac{1}{2}}"]
    _, per = combine([reward], None, ["p", "q"], completions, None, {"solution": [r"\frac{1}{3}"] * 2})
    torch.testing.assert_close(per[:, 0], torch.tensor([1.0, 0.0]))


# ---------------------------------------------------------------------------------------------- unique names
def _score_files(root, *folders):
    for i, folder in enumerate(folders):
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / "r.py").write_text(f"def score(completions, **kwargs):\n    return [{i}.0] * len(completions)\n")


def test_rewards_sharing_a_function_name_get_distinct_readable_names(tmp_path, monkeypatch):
    _score_files(tmp_path, "a", "b", "c/a")
    monkeypatch.chdir(tmp_path)
    resolved = rewards.get_rewards(["a/r.py:score", "b/r.py:score", "format", {"name": "format", "weight": 2.0}])
    assert [r.name for r in resolved] == ["a.r:score", "b.r:score", "format", "format_2"]
    assert [r.weight for r in resolved] == [1.0, 1.0, 1.0, 2.0]
    # Deterministic: the same specs give the same names; a third file deepens the qualifier just enough.
    again = rewards.get_rewards(["a/r.py:score", "b/r.py:score", "c/a/r.py:score"])
    assert [r.name for r in again] == ["a.r:score", "b.r:score", "c.a.r:score"]
    _, per = combine(again, None, ["p"], ["x"], None, {})  # and each is its own file's function
    torch.testing.assert_close(per, torch.tensor([[0.0, 1.0, 2.0]]))
    # A reward named like a registered one is told apart by where it comes from; unique names are untouched.
    mixed = rewards.unique_names([get_reward("format"), Reward("format", format_reward, source="mine.py:format"),
                                  Reward("score", format_reward, source="x.py:score")])
    assert [r.name for r in mixed] == ["format", "mine:format", "score"]
    assert rewards.unique_names([Reward("x", format_reward), Reward("x", format_reward),
                                 Reward("x_2", format_reward)])[1].name == "x_3"  # never a taken name


# ---------------------------------------------------------------------------------------------- import path
@pytest.fixture
def clean_import_state(monkeypatch):
    """Let a test put the working directory on sys.path and import modules, and undo both afterwards."""
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".")])
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        sys.modules.pop(name, None)


def test_dotted_reward_in_the_working_directory(tmp_path, monkeypatch, clean_import_state):
    (tmp_path / "my_cwd_rewards.py").write_text("def brevity(completions, **kwargs):\n"
                                                "    return [1.0 / len(c) for c in completions]\n")
    monkeypatch.chdir(tmp_path)
    assert str(tmp_path) not in sys.path
    for spec in ("my_cwd_rewards.brevity", "my_cwd_rewards:brevity"):
        reward = get_reward(spec)
        assert reward(prompts=["p"], completions=["abcd"], completion_ids=None, images=[[]]) == [0.25]
    assert sys.path[-1] == str(tmp_path)  # appended: an installed package still wins over a same-named folder


def test_missing_dotted_module_gets_a_hint(tmp_path, monkeypatch, clean_import_state):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RewardError) as info:
        get_reward("not_here_rewards.score")
    message = str(info.value)
    assert "cannot import module 'not_here_rewards'" in message and str(tmp_path) in message
    assert "'not_here_rewards.py:score'" in message and "'format'" in message  # a file path; registered names
    (tmp_path / "broken_dep_rewards.py").write_text("import no_such_dependency_xyz\n")
    with pytest.raises(RewardError, match=r"module 'broken_dep_rewards' imports 'no_such_dependency_xyz', which is "
                                          r"not installed"):
        get_reward("broken_dep_rewards:score")


# ---------------------------------------------------------------------------------------------- package layout
def test_imports_inside_the_rewards_package_are_relative():
    """The package will be installed under another name: no module may import it by its name."""
    import ast

    offenders = []
    for path in Path(rewards.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            offenders += [f"{path.name}: {n}" for n in names if n == "rewards" or n.startswith("rewards.")]
    assert offenders == []


def test_a_reward_may_score_each_image_of_a_chain_that_drew_several():
    """``combine(..., per_image=...)`` (chains drawing several images inside them): a list per sample, one value
    per image; its mean stands for the chain. Without ``per_image`` a list is an error with a hint; a list of the
    wrong length names the sample and its image count."""
    from PIL import Image

    image = Image.new("RGB", (4, 4))
    images = [[image, image], [image], [image, image]]

    def each(completions, images, **kwargs):
        return [[0.2, 0.4], 0.5, [None, 1.0]]

    per_image: dict = {}
    total, per = combine([each], [2.0], ["p"] * 3, ["a", "b", "c"], images, {}, per_image=per_image)
    assert per[:, 0].tolist() == pytest.approx([0.3, 0.5, 1.0]) and total.tolist() == pytest.approx([0.6, 1.0, 2.0])
    assert per_image["each"][0] == pytest.approx([0.2, 0.4]) and 1 not in per_image["each"]
    assert math.isnan(per_image["each"][2][0]) and per_image["each"][2][1] == 1.0
    with pytest.raises(RewardError, match=r"reward 'each' returned list \[0.2, 0.4\] for sample 0; expected a "
                                          r"float or None; a list per sample .* chains that draw several images"):
        combine([each], None, ["p"] * 3, ["a", "b", "c"], images, {})

    def short(completions, images, **kwargs):
        return [[0.2], 0.5, [0.1, 0.2]]

    with pytest.raises(RewardError, match=r"reward 'short' returned 1 values for sample 0, whose chain drew 2 image"):
        combine([short], None, ["p"] * 3, ["a", "b", "c"], images, {}, per_image={})
