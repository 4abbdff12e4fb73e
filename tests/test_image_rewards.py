"""Image rewards from local weights: PickScore, HPSv2, the aesthetic predictor, OCR and the VLM judge.

The model rewards load tiny random checkpoints written by the fixtures in the released layouts (a transformers
CLIPModel folder for PickScore, ``{"state_dict": ...}`` of an open_clip ViT for HPS, the MLP's ``layers.{0,2,4,6,7}``
state dict for the aesthetic predictor, a Qwen2.5-VL folder for the judge), and are checked against the
reference formula computed through another path of the same model. OCR runs the real PP-OCR models that ship
inside rapidocr-onnxruntime.
"""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from rgpo.rewards import RewardError, combine, get_reward
from rgpo.rewards.pairs import clear_cache


@pytest.fixture(autouse=True)
def _fresh_models():
    yield
    clear_cache()


def _image(rgb, size=40, seed=0):
    """A coloured image with a few random pixels, so that no two test images embed alike."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.tensor(rgb, dtype=torch.uint8).view(1, 1, 3).expand(size, size, 3).clone()
    pixels[torch.randint(0, size, (20,), generator=g), torch.randint(0, size, (20,), generator=g)] = 255
    return Image.fromarray(pixels.numpy())


# ------------------------------------------------------------------------------------------------ tiny CLIP folder
def _write_clip_tokenizer(folder):
    """CLIP's real BPE vocabulary (shipped inside open_clip) as transformers' vocab.json + merges.txt."""
    import open_clip
    from transformers import CLIPTokenizer

    bpe = open_clip.SimpleTokenizer()
    vocab = dict(bpe.encoder)
    for theirs, ours in (("<start_of_text>", "<|startoftext|>"), ("<end_of_text>", "<|endoftext|>")):
        vocab[ours] = vocab.pop(theirs)
    merges = sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.get)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    """A tiny transformers CLIPModel and its processor saved as PickScore_v1 / clip-vit-large-patch14 are."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    folder = tmp_path_factory.mktemp("clip")
    tokenizer = _write_clip_tokenizer(folder)
    config = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2),
        projection_dim=16,
    )
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(50.0))  # not the initial value: the score must use the checkpoint's
    model.save_pretrained(folder)
    processor = CLIPProcessor(CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                              tokenizer)
    processor.save_pretrained(folder)
    return folder


def _clip_reference(folder):
    from transformers import CLIPModel, CLIPProcessor

    return CLIPModel.from_pretrained(folder).eval(), CLIPProcessor.from_pretrained(folder)


IMAGES = [_image((220, 30, 30), seed=1), _image((30, 60, 220), seed=2), _image((30, 170, 40), seed=3)]
TEXTS = ["a red square", "a blue square", "a green square"]


def test_pickscore_is_the_clip_logit_of_the_pickscore_model_in_batches(clip_folder):
    model, processor = _clip_reference(clip_folder)
    with torch.no_grad():  # CLIPModel's own forward: logit_scale.exp() * cos, every image against every text
        logits = model(**processor(text=TEXTS, images=IMAGES, padding=True, return_tensors="pt")).logits_per_image
    reward = get_reward({"name": "pickscore", "kwargs": {"model_path": str(clip_folder), "batch_size": 2}})
    # chain 0: two images (red with "a red square", blue with "a red square"); chain 1: the green one; chain 2:
    # no text, so None. Three pairs in batches of 2: the batching must not change a pair's score.
    out = reward(prompts=["p"] * 3, completions=["c"] * 3, completion_ids=None,
                 images=[[IMAGES[0], IMAGES[1]], [IMAGES[2]], [IMAGES[0]]], gt_prompt=[TEXTS[0], TEXTS[2], None])
    expected = [(logits[0, 0] + logits[1, 0]).item() / 2, logits[2, 2].item(), None]
    assert out[2] is None
    assert out[:2] == pytest.approx(expected[:2], abs=1e-4)
    assert 0 < abs(out[0]) <= 50.0 + 1e-4  # |logit_scale.exp() * cos| <= 50
    assert reward.required_columns == ("gt_prompt",)


def test_pickscore_reads_the_processor_from_its_own_folder(clip_folder, tmp_path):
    from transformers import CLIPModel

    CLIPModel.from_pretrained(clip_folder).save_pretrained(tmp_path / "model")  # weights only, as PickScore_v1
    reward = get_reward({"name": "pickscore", "kwargs": {"model_path": str(tmp_path / "model"),
                                                         "processor_path": str(clip_folder)}})
    reference = get_reward({"name": "pickscore", "kwargs": {"model_path": str(clip_folder)}})
    call = dict(prompts=["p"], completions=["c"], completion_ids=None, images=[[IMAGES[0]]], gt_prompt=[TEXTS[0]])
    assert reward(**call) == pytest.approx(reference(**call), abs=1e-5)


def test_aesthetic_is_the_released_mlp_on_the_normalised_clip_embedding(clip_folder, tmp_path):
    g = torch.Generator().manual_seed(0)
    widths = [16, 1024, 128, 64, 16, 1]  # the released head, on the tiny CLIP's 16-wide embeddings
    state = {}
    for index, (fan_in, fan_out) in zip((0, 2, 4, 6, 7), zip(widths, widths[1:])):
        state[f"layers.{index}.weight"] = torch.randn(fan_out, fan_in, generator=g) / fan_in ** 0.5
        state[f"layers.{index}.bias"] = torch.randn(fan_out, generator=g) * 0.1
    torch.save(state, tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    model, processor = _clip_reference(clip_folder)
    with torch.no_grad():
        z = model(**processor(text=TEXTS, images=IMAGES, padding=True, return_tensors="pt")).image_embeds  # unit norm
        for index in (0, 2, 4, 6, 7):  # no activations between the layers in the released predictor
            z = z @ state[f"layers.{index}.weight"].T + state[f"layers.{index}.bias"]
    reward = get_reward({"name": "aesthetic", "kwargs": {"clip_path": str(clip_folder), "batch_size": 2,
                                                         "mlp_path": str(tmp_path / "sac+logos+ava1-l14-linearMSE.pth")}})
    out = reward(prompts=["p"] * 3, completions=["c"] * 3, completion_ids=None, images=[[IMAGES[0]], IMAGES[1:], []])
    assert out[:2] == pytest.approx([z[0, 0].item(), (z[1, 0] + z[2, 0]).item() / 2], abs=1e-4)
    assert out[2] is None  # no image: does not apply
    # An MLP for another CLIP width is refused, naming both sides.
    torch.save({**state, "layers.0.weight": torch.zeros(1024, 768)}, tmp_path / "l14.pth")
    with pytest.raises(RewardError, match=r"takes 768-wide embeddings, but the CLIP of kwargs.clip_path gives 16"):
        get_reward({"name": "aesthetic", "kwargs": {"clip_path": str(clip_folder), "mlp_path": str(tmp_path / "l14.pth")}})


# ------------------------------------------------------------------------------------------------ HPS
TINY_HPS = "rgpo-tiny-vit-h-layout"


@pytest.fixture(scope="module")
def hps_checkpoint(tmp_path_factory):
    """A tiny open_clip ViT in ViT-H-14's layout (same module tree, small widths), saved as HPS_v2.1_compressed.pt
    is: ``{"state_dict": model.state_dict()}``."""
    import open_clip

    folder = tmp_path_factory.mktemp("hps")
    if TINY_HPS not in open_clip.list_models():
        config = {"embed_dim": 16,
                  "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
                  "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
        (folder / f"{TINY_HPS}.json").write_text(json.dumps(config))
        open_clip.add_model_config(folder / f"{TINY_HPS}.json")
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_HPS, pretrained=None)
    torch.save({"epoch": 1, "state_dict": model.state_dict()}, folder / "HPS_v2.1_compressed.pt")
    return folder / "HPS_v2.1_compressed.pt"


def test_hpsv2_is_the_cosine_of_the_hps_clip_in_batches(hps_checkpoint):
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(TINY_HPS, pretrained=None)
    model.load_state_dict(torch.load(hps_checkpoint, weights_only=True)["state_dict"])
    model.eval()
    with torch.no_grad():  # HPS's own formula: image_features @ text_features.T from the model's forward
        image_features, text_features, _ = model(torch.stack([preprocess(im) for im in IMAGES]),
                                                 open_clip.get_tokenizer(TINY_HPS)(TEXTS))
        logits = image_features @ text_features.T
    reward = get_reward({"name": "hpsv2", "kwargs": {"checkpoint": str(hps_checkpoint), "model_name": TINY_HPS,
                                                     "batch_size": 2}})
    out = reward(prompts=["p"] * 2, completions=["c"] * 2, completion_ids=None, images=[IMAGES[:2], [IMAGES[2]]],
                 gt_prompt=[TEXTS[1], TEXTS[2]])
    assert out == pytest.approx([(logits[0, 1] + logits[1, 1]).item() / 2, logits[2, 2].item()], abs=1e-5)
    assert all(-1 <= v <= 1 for v in out)


def test_hpsv2_refuses_a_checkpoint_of_another_architecture(hps_checkpoint, tmp_path):
    torch.save({"state_dict": {"visual.proj": torch.zeros(3, 3)}}, tmp_path / "other.pt")
    with pytest.raises(RewardError, match=r"reward 'hpsv2': .*other.pt does not fit open_clip .*weights missing.*1 of another shape "
                                          r"\['visual.proj: \(3, 3\) for \(32, 16\)'\]"):
        get_reward({"name": "hpsv2", "kwargs": {"checkpoint": str(tmp_path / "other.pt"), "model_name": TINY_HPS}})


@pytest.mark.slow
def test_hpsv2_ranks_the_matching_image_first_with_trained_weights(tmp_path):
    """Meaning, not only arithmetic: a tiny CLIP trained on coloured shapes, saved as an HPS checkpoint, ranks
    each fresh image's own caption above every other caption through the hpsv2 reward."""
    import open_clip

    from rgpo.rewards.clip import TINY_CLIP_NAME, tiny_clip_config, train_tiny_clip
    from rgpo.rewards.shapes import shape_captions, synthetic_shapes

    if TINY_CLIP_NAME not in open_clip.list_models():  # open_clip reads architectures from JSON files
        (tmp_path / f"{TINY_CLIP_NAME}.json").write_text(json.dumps(tiny_clip_config()))
        open_clip.add_model_config(tmp_path / f"{TINY_CLIP_NAME}.json")
    images, captions = synthetic_shapes(per_caption=20, seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a shared 2-core machine one thread trains fastest
    try:
        bundle = train_tiny_clip(images, captions, steps=100, seed=0)
    finally:
        torch.set_num_threads(threads)
    torch.save({"state_dict": bundle.model.state_dict()}, tmp_path / "HPS_v2.1_compressed.pt")
    reward = get_reward({"name": "hpsv2", "kwargs": {"checkpoint": str(tmp_path / "HPS_v2.1_compressed.pt"),
                                                     "model_name": TINY_CLIP_NAME}})
    fresh, names = synthetic_shapes(per_caption=1, seed=1234)
    n = len(names)
    assert names == shape_captions()
    values = reward(prompts=["p"] * n * n, completions=["c"] * n * n, completion_ids=None,
                    images=[[image] for _ in names for image in fresh], gt_prompt=[c for c in names for _ in fresh])
    scores = torch.tensor(values).view(n, n)  # [caption, image]
    assert (scores.argmax(dim=1) == torch.arange(n)).all(), scores


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("name, key", [("pickscore", "model_path"), ("hpsv2", "checkpoint"), ("aesthetic", "mlp_path"),
                                       ("vlm_judge", "model_path")])
def test_a_missing_weights_path_names_the_reward_and_its_config_key(name, key, tmp_path):
    with pytest.raises(RewardError, match=rf"reward {name!r} needs kwargs.{key}: a local (file|folder) with"):
        get_reward({"name": name})
    with pytest.raises(RewardError, match=rf"reward {name!r}: kwargs.{key} = '.*nowhere' should be a local .* "
                                          rf"but nothing is there"):
        get_reward({"name": name, "kwargs": {key: str(tmp_path / "nowhere")}})


def test_a_missing_text_column_is_named_before_scoring(clip_folder):
    reward = get_reward({"name": "pickscore", "kwargs": {"model_path": str(clip_folder), "text_column": "caption"}})
    with pytest.raises(RewardError, match=r"reward 'pickscore' needs column\(s\) \['caption'\] that the data does not"):
        combine([reward], None, ["p"], ["c"], [IMAGES[0]], {"gt_prompt": ["x"]})


# ------------------------------------------------------------------------------------------------ OCR
def _render(text, size=(256, 64)):
    image = Image.new("RGB", size, "white")
    ImageDraw.Draw(image).text((10, 15), text, fill="black", font=ImageFont.load_default(size=28))
    return image


def test_levenshtein_and_similarity_by_hand():
    from rgpo.rewards.ocr import levenshtein, text_similarity

    assert levenshtein("kitten", "sitting") == 3 and levenshtein("", "abc") == 3 and levenshtein("abc", "abc") == 0
    assert text_similarity("HELLOWORLD", "hello world") == 1.0  # case and spaces do not count
    assert text_similarity("helo world", "hello world") == pytest.approx(1 - 1 / 10)
    assert text_similarity("", "hello") == 0.0 and text_similarity("something much longer", "ab") == 0.0
    assert text_similarity("anything", "  ") is None


def test_ocr_ranks_an_image_of_the_target_text_above_an_image_of_other_text():
    """The real PP-OCR models: the rendered target text is read exactly, other text is far from it."""
    if importlib.util.find_spec("rapidocr") is None and importlib.util.find_spec("rapidocr_onnxruntime") is None:
        pytest.skip("needs the ocr extra: pip install 'rgpo[ocr]'")
    reward = get_reward({"name": "ocr", "kwargs": {"text_column": "text", "max_side": 256}})
    target, other = _render("rgpo reward"), _render("Open Sesame")
    out = reward(prompts=["p"] * 4, completions=["c"] * 4, completion_ids=None,
                 images=[[target], [other], [target, other], [target]], text=["rgpo reward"] * 3 + [None])
    assert out[0] == 1.0  # read exactly (spaces and case aside)
    assert out[1] < 0.5 < out[0]
    assert out[2] == pytest.approx((out[0] + out[1]) / 2)
    assert out[3] is None
    assert reward.fn.read(target).replace(" ", "").lower() == "rgporeward"


# ------------------------------------------------------------------------------------------------ VLM judge
@pytest.fixture(scope="module")
def judge_folder(tmp_path_factory):
    """A tiny random Qwen2.5-VL and its processor, saved as a released checkpoint folder."""
    from rgpo.models.qwen_tiny import build_tiny_processor, build_tiny_tokenizer, build_tiny_vlm

    folder = tmp_path_factory.mktemp("judge")
    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(0)
    model = build_tiny_vlm(tokenizer).eval()
    model.save_pretrained(folder)
    build_tiny_processor(tokenizer).save_pretrained(folder)
    return folder


def _judge_logits_by_hand(folder, image, question, answer_ids):
    """The judge's logits for one sample alone (no padding), the answer's tokens teacher-forced: the logits that
    predict each answer token, (len(answer_ids), V)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                                                                          "text": question}]}],
                                         tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    k = len(answer_ids)
    inputs["input_ids"] = torch.cat([inputs["input_ids"], torch.tensor([answer_ids[:-1]], dtype=torch.long)], 1)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    if "mm_token_type_ids" in inputs:
        inputs["mm_token_type_ids"] = F.pad(inputs["mm_token_type_ids"], (0, k - 1))
    with torch.no_grad():
        return model(**inputs).logits[0, -k:]


@pytest.mark.parametrize("normalize", ["vocab", "yes_no"])
def test_judge_yes_probability_equals_the_hand_computation_from_its_logits(judge_folder, normalize):
    """vocab (VQAScore): P(yes) = prod_k softmax(logits_k)[yes_k]; yes_no: P(yes) / (P(yes) + P(no)). The tiny
    tokenizer splits "Yes" into several tokens, so the teacher-forced product is exercised; the reward scores the
    three samples together (left-padded, questions of different lengths), the hand computation each alone."""
    from transformers import AutoProcessor

    tokenizer = AutoProcessor.from_pretrained(judge_folder).tokenizer
    yes, no = (tokenizer("Yes", add_special_tokens=False)["input_ids"],
               tokenizer("No", add_special_tokens=False)["input_ids"])
    assert len(yes) > 1
    reward = get_reward({"name": "vlm_judge", "kwargs": {"model_path": str(judge_folder), "normalize": normalize,
                                                         "question": "Does this image show {gt_prompt}?"}})
    captions = ["a red square", "a blue square on a very long and winding road", "a green square"]
    out = reward(prompts=["p"] * 4, completions=["c"] * 4, completion_ids=None,
                 images=[[IMAGES[0]], [IMAGES[1]], [IMAGES[2]], [IMAGES[0]]], gt_prompt=captions + [None])
    assert out[3] is None
    for i, caption in enumerate(captions):
        question = f"Does this image show {caption}?"

        def prob(ids, image=IMAGES[i], question=question):
            logits = _judge_logits_by_hand(judge_folder, image, question, ids)
            return math.exp(sum(logits[k].log_softmax(-1)[t].item() for k, t in enumerate(ids)))

        p_yes = prob(yes)
        expected = p_yes if normalize == "vocab" else p_yes / (p_yes + prob(no))
        assert out[i] == pytest.approx(expected, rel=1e-4, abs=1e-7), (i, out[i], expected)


def test_judge_single_token_answers_read_one_softmax(judge_folder):
    """One-token answers: ``yes_no`` is the softmax over the two logits at the answer position."""
    from transformers import AutoProcessor

    tokenizer = AutoProcessor.from_pretrained(judge_folder).tokenizer
    yes, no = tokenizer("y", add_special_tokens=False)["input_ids"], tokenizer("n", add_special_tokens=False)["input_ids"]
    assert len(yes) == len(no) == 1
    reward = get_reward({"name": "vlm_judge", "kwargs": {"model_path": str(judge_folder), "yes": "y", "no": "n",
                                                         "normalize": "yes_no", "question": "Is it {gt_prompt}?"}})
    out = reward(prompts=["p"], completions=["c"], completion_ids=None, images=[[IMAGES[1]]], gt_prompt=["blue"])
    logits = _judge_logits_by_hand(judge_folder, IMAGES[1], "Is it blue?", yes)[0]
    l_yes, l_no = logits[yes[0]].item(), logits[no[0]].item()
    assert out[0] == pytest.approx(1 / (1 + math.exp(l_no - l_yes)), rel=1e-4)
    assert reward.required_columns == ("gt_prompt",)
    with pytest.raises(RewardError, match=r"kwargs.normalize must be one of \['vocab', 'yes_no'\]"):
        get_reward({"name": "vlm_judge", "kwargs": {"model_path": str(judge_folder), "normalize": "softmax"}})


def _answer_logprob(vlm, processor, image, question, ids) -> float:
    """log P(answer tokens ``ids`` | image, question) of ``vlm`` for one sample alone, teacher-forced."""
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                                                                          "text": question}]}],
                                         tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    k = len(ids)
    inputs["input_ids"] = torch.cat([inputs["input_ids"], torch.tensor([ids[:-1]], dtype=torch.long)], 1)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    if "mm_token_type_ids" in inputs:
        inputs["mm_token_type_ids"] = F.pad(inputs["mm_token_type_ids"], (0, k - 1))
    with torch.no_grad():
        logits = vlm(**inputs).logits[0, -k:].float()
    return sum(logits[j].log_softmax(-1)[t].item() for j, t in enumerate(ids))


def test_judge_with_the_policys_own_vlm_reads_the_reference(tmp_path):
    """``model_path: policy``: the trainer binds its reference, so the judge's P(yes) is the hand computation on
    the policy's VLM with every adapter disabled, not on the policy (whose LoRA is moved here), and nothing else is
    loaded; a training step runs with it as a reward."""
    from pathlib import Path

    from rgpo.config import load_config
    from rgpo.trainer import RGPOTrainer

    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    judge_spec = ("{name: vlm_judge, kwargs: {model_path: policy, normalize: yes_no, "
                  "question: 'Does this image show {prompt}?'}}")
    cfg = load_config(tiny, [f"logging.output_dir={tmp_path}", "logging.mode=disabled", "logging.progress_bar=false",
                             "rollout.max_new_tokens=8", "rollout.image.steps=2", "rollout.image.height=32",
                             "rollout.image.width=32", "checkpoint.every=0", "optim.max_steps=1",
                             f"rewards.functions=[format, {judge_spec}]"])
    trainer = RGPOTrainer(cfg)
    try:
        metrics = trainer.train_step()
        assert 0.0 < metrics["rewards/vlm_judge/mean"] < 1.0
        with torch.no_grad():  # the policy moves off the reference
            for name, p in trainer.model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(0))
        (judge,) = [r for r in trainer.rewards if r.name == "vlm_judge"]
        out = judge(prompts=["a red square"], completions=["c"], completion_ids=None, images=[[IMAGES[0]]])
        vlm, processor = trainer.model.understanding_model()
        yes, no = (processor.tokenizer(a, add_special_tokens=False)["input_ids"] for a in ("Yes", "No"))
        question = "Does this image show a red square?"

        def p_yes() -> float:
            log_yes, log_no = (_answer_logprob(vlm, processor, IMAGES[0], question, ids) for ids in (yes, no))
            return 1.0 / (1.0 + math.exp(log_no - log_yes))

        with trainer.model.adapter_disabled():
            reference = p_yes()
        policy = p_yes()
        assert out[0] == pytest.approx(reference, rel=1e-4)
        assert abs(policy - reference) > 1e-3  # the judge did not read the moved policy
        assert processor.tokenizer.padding_side == "left"  # the family's own prompts are left-padded, as before
    finally:
        trainer.close()
