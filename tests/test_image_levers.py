"""The image-cost levers as options: evaluation's own decoder steps and guidance (``rollout.image.eval_steps`` /
``eval_guidance_scale``, so rollouts can take fewer steps or no guidance), and the condition KV cache kept when
drawing images an image loss replays (``rollout.image.pg_condition_cache``)."""

from pathlib import Path

import pytest
import torch

from rgpo.config import ConfigError, load_config
from rgpo.image_policy import ImagePolicy

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
TESTS = REPO / "tests"


def test_evaluation_sampling_defaults_to_the_rollouts_and_takes_its_own():
    same = ImagePolicy(load_config(TINY, []), torch.device("cpu"))
    assert same.evaluation == same.base
    cfg = load_config(TINY, ["rollout.image.steps=2", "rollout.image.eval_steps=6", "rollout.image.guidance_scale=1",
                             "rollout.image.eval_guidance_scale=3.0"])
    policy = ImagePolicy(cfg, torch.device("cpu"))
    assert (policy.base.steps, policy.base.guidance_scale) == (2, 1.0)
    assert (policy.evaluation.steps, policy.evaluation.guidance_scale) == (6, 3.0)
    with pytest.raises(ConfigError, match="rollout.image.eval_steps"):
        load_config(TINY, ["rollout.image.eval_steps=0"]).validate()


def test_evaluation_images_use_the_evaluation_steps_and_guidance():
    """draw_deterministic(evaluation=True) of a policy whose rollouts take 2 unguided steps gives exactly the
    images of a policy whose rollouts take the evaluation's 6 guided steps."""
    from rgpo.models.mindomni.tiny import build_tiny_mindomni

    model = build_tiny_mindomni(seed=0).eval()
    prompts = model.build_prompts([{"prompt": "a red square"}, {"prompt": "a blue circle"}])
    completions = model.completions_from_texts(["<think>red</think><answer>a red square</answer>",
                                                "<think>blue</think><answer>a blue circle</answer>"])
    condition = model.forward_text(prompts, completions, with_condition=True).condition
    cheap = ImagePolicy(load_config(TINY, ["rollout.image.steps=2", "rollout.image.guidance_scale=1",
                                           "rollout.image.eval_steps=6", "rollout.image.eval_guidance_scale=3.0"]),
                        torch.device("cpu"))
    full = ImagePolicy(load_config(TINY, ["rollout.image.steps=6", "rollout.image.guidance_scale=3.0"]),
                       torch.device("cpu"))
    args = (model, condition, [0, 1], [0, 1], 0, model)
    evaluated = cheap.draw_deterministic(*args, evaluation=True)
    reference = full.draw_deterministic(*args)
    rollout = cheap.draw_deterministic(*args)
    assert [im[0].tobytes() for im in evaluated] == [im[0].tobytes() for im in reference]
    assert [im[0].tobytes() for im in rollout] != [im[0].tobytes() for im in reference]


SIGNAL = (f"rewards.functions=[format, {{name: '{TESTS / 'signal_reward.py'}:letter_fraction', weight: 1.0}}, "
          f"{{name: '{TESTS / 'image_reward.py'}:brightness', weight: 1.0}}]")
IMAGE_PG = ("rollout.image.images_per_chain=2", "rollout.image.noise_level=0.7", "rollout.image.sde_window=2",
            "loss.image_pg_coef=1.0", "trainable.generator_lora_r=4")


@pytest.mark.slow
@pytest.mark.parametrize("cache", [False, True])
def test_condition_cache_in_the_image_pg_rollout(tmp_path, cache):
    """Without the option the recorded SDE steps are sampled on the replay's exact path (first ratio exactly 1);
    with it the rollout samples with the condition KV cache and the first on-policy ratio is 1 within the
    cached path's ~1e-5 (the image clip range is 1e-4: nothing is clipped)."""
    from rgpo.trainer import RGPOTrainer

    cfg = load_config(TINY, [f"logging.output_dir={tmp_path / 'run'}", "logging.mode=disabled", SIGNAL, *IMAGE_PG,
                             f"rollout.image.pg_condition_cache={str(cache).lower()}", "optim.max_steps=1",
                             "checkpoint.every=0", "rollout.max_new_tokens=8", "rollout.image.height=32",
                             "rollout.image.width=32"])
    trainer = RGPOTrainer(cfg)
    model, policy = trainer.model, trainer.image_policy
    exact_flags, drawing = [], []
    image_inputs, draw = model.image_inputs, policy.draw

    def spy_inputs(*args, **kwargs):
        if drawing:  # the rollout's sampling, not the update's replay or regulariser
            exact_flags.append(kwargs.get("exact"))
        return image_inputs(*args, **kwargs)

    def spy_draw(*args, **kwargs):
        drawing.append(True)
        try:
            return draw(*args, **kwargs)
        finally:
            drawing.clear()

    model.image_inputs, policy.draw = spy_inputs, spy_draw
    metrics = trainer.train_step()
    trainer.close()
    assert exact_flags and set(exact_flags) == {not cache}
    if cache:
        assert metrics["image/ratio"] == pytest.approx(1.0, abs=1e-4) and metrics["image/clip_frac"] == 0.0
    else:
        assert metrics["image/ratio"] == 1.0 and metrics["image/clip_frac"] == 0.0
