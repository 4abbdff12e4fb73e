"""WISE evaluation (rgpo.evaluation): the judge's prompt and parsing as WISE's scripts, the aggregation against
hand computations (unparseable answers counted), the subset, resuming a killed evaluation, ``rgpo eval wise``
end to end with a tiny MindOmni and a tiny Qwen2.5-VL judge, the understanding probe, and the in-loop evaluation
of a tiny training run."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from rgpo.config import ConfigError, load_config
from rgpo.data import DataError
from rgpo.evaluation.judge import (
    PROTOCOLS,
    JudgeError,
    VLMJudge,
    check_judge_folder,
    parse_legacy,
    parse_verified,
)
from rgpo.evaluation.understanding import Question, load_questions, parse_choice, score_answers
from rgpo.evaluation.wise import (
    RECORDS,
    WisePrompt,
    aggregate,
    evaluate_wise,
    judged_record,
    load_wise_prompts,
    metrics,
    select_subset,
)
from rgpo.tracking import NullLogger

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
WISE_DATA = REPO.parent / "shared" / "data" / "wise"
needs_wise = pytest.mark.skipif(not (WISE_DATA / "merge.json").is_file(),
                                reason=f"WISE's prompt file is not at {WISE_DATA}/merge.json (users bring their copy)")
LEGACY, VERIFIED = PROTOCOLS["legacy"], PROTOCOLS["verified"]


@pytest.fixture(scope="module")
def tiny_judge(tmp_path_factory):
    """A tiny random Qwen2.5-VL saved as a judge folder (model, tokenizer and processor)."""
    from rgpo.models.qwen_tiny import build_tiny_processor, build_tiny_tokenizer, build_tiny_vlm

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("judge")
    tokenizer = build_tiny_tokenizer()
    build_tiny_vlm(tokenizer).save_pretrained(folder)
    build_tiny_processor(tokenizer).save_pretrained(folder)
    return folder


# ------------------------------------------------------------------------------------------- the judge's answer
def test_legacy_parsing_follows_wise_extract_scores():
    assert parse_legacy("Consistency: 2\nRealism: 1\nAesthetic Quality: 0") == \
        {"consistency": 2.0, "realism": 1.0, "aesthetic_quality": 0.0}
    assert parse_legacy("**Consistency**: 1\n**Realism**: 2\n**Aesthetic Quality** 1") == \
        {"consistency": 1.0, "realism": 2.0, "aesthetic_quality": 1.0}
    # WISE's pattern allows bold around the name only, not around the colon: kept as WISE reads it
    assert parse_legacy("**Consistency:** 1\n**Realism:** 2\n**Aesthetic Quality:** 1") is None
    assert parse_legacy("2\n1\n0\n") == {"consistency": 2.0, "realism": 1.0, "aesthetic_quality": 0.0}
    # a later mention of a metric wins, as WISE's dict assignment does
    assert parse_legacy("Consistency: 0\nRealism: 0\nAesthetic Quality: 0\nConsistency: 2")["consistency"] == 2.0
    assert parse_legacy("Consistency: 2\nRealism: 1") is None  # a metric missing: WISE's extract failure
    assert parse_legacy("The image shows a cake.") is None
    assert parse_legacy("2\n1") is None


def test_verified_parsing_follows_wise_extract_scores():
    assert parse_verified("Score: 1") == {"score": 1.0}
    assert parse_verified("**Score**: 0") == {"score": 0.0}
    assert parse_verified("<think>Score: 0 at first</think>\nScore: 1") == {"score": 1.0}
    assert parse_verified("1") == {"score": 1.0}
    assert parse_verified("0\n1") is None  # two bare lines: ambiguous for WISE too
    assert parse_verified("Score: 2") is None
    assert parse_verified("yes") is None


def test_judge_prompt_carries_the_prompt_and_explanation():
    text = LEGACY.question("The pastry of Mid-Autumn", "Mooncakes")
    assert 'PROMPT: "The pastry of Mid-Autumn"\nEXPLANATION: "Mooncakes"' in text
    assert "**Consistency (0-2):**" in text and text.startswith("Please evaluate strictly")
    assert VERIFIED.question("p", "e").endswith('PROMPT: "p"\nEXPLANATION: "e"\n\nReturn only `Score: 0` or `Score: 1`.')


def test_local_judge_sees_wise_system_turn_question_then_image(tiny_judge):
    judge = VLMJudge(tiny_judge, device="cpu", dtype="float32", batch_size=2, max_new_tokens=3)
    text = judge.conversation(LEGACY, "The pastry of Mid-Autumn", "Mooncakes")
    system, user = text.split("<|im_start|>user\n")
    assert system == f"<|im_start|>system\n{LEGACY.system}<|im_end|>\n"
    assert user == LEGACY.question("The pastry of Mid-Autumn", "Mooncakes") + \
        "<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n<|im_start|>assistant\n"
    answers = judge.answer(LEGACY, [("a", "b", Image.new("RGB", (32, 32), "red"))] * 3)  # two batches
    assert len(answers) == 3 and answers[0] == answers[1] == answers[2]  # greedy: the batch does not matter


# ------------------------------------------------------------------------------------------- aggregation
def _prompt(pid, category):
    return WisePrompt(pid, f"prompt {pid}", f"explanation {pid}", category, "", f"test[{pid}]")


LEGACY_ANSWERS = [  # (id, category, the judge's answer)
    (1, "cultural", "Consistency: 2\nRealism: 2\nAesthetic Quality: 2"),  # W = (1.4 + 0.4 + 0.2) / 2 = 1.0
    (2, "cultural", "Consistency: 1\nRealism: 0\nAesthetic Quality: 1"),  # W = (0.7 + 0 + 0.1) / 2 = 0.4
    (3, "cultural", "I cannot judge this image."),  # unparseable
    (401, "time", "Consistency: 0\nRealism: 1\nAesthetic Quality: 2"),  # W = (0 + 0.2 + 0.2) / 2 = 0.2
    (521, "space", "2\n2\n1"),  # WISE's bare-lines fallback: W = (1.4 + 0.4 + 0.1) / 2 = 0.95
    (641, "biology", "**Consistency**: 1\n**Realism**: 1\n**Aesthetic Quality**: 1"),  # W = 0.5
    (642, "biology", "Consistency: 2"),  # unparseable (two metrics missing)
    (761, "physics", "Consistency: 2\nRealism: 0\nAesthetic Quality: 0"),  # W = 0.7
    (881, "chemistry", "consistency: 1\nrealism: 2\naesthetic quality: 0"),  # W = (0.7 + 0.4) / 2 = 0.55
]


def test_legacy_aggregation_equals_hand_computation():
    records = [judged_record(LEGACY, _prompt(i, c), "chain", None, a) for i, c, a in LEGACY_ANSWERS]
    result = aggregate(records, LEGACY)
    cats = result["categories"]
    assert cats["cultural"]["wiscore"] == pytest.approx((1.0 + 0.4) / 2)
    assert (cats["cultural"]["prompts"], cats["cultural"]["judged"], cats["cultural"]["unparseable"]) == (3, 2, 1)
    assert cats["cultural"]["consistency"] == pytest.approx(1.5)
    expected = {"time": 0.2, "space": 0.95, "biology": 0.5, "physics": 0.7, "chemistry": 0.55}
    for category, value in expected.items():
        assert cats[category]["wiscore"] == pytest.approx(value), category
    assert cats["biology"]["unparseable"] == 1
    # WISE_legacy/Calculate.py's weights: 0.4, 0.167, 0.133, 0.1, 0.1, 0.1
    assert result["overall"] == pytest.approx(0.4 * 0.7 + 0.167 * 0.2 + 0.133 * 0.95 + 0.1 * 0.5 + 0.1 * 0.7
                                              + 0.1 * 0.55)
    assert result["overall"] == pytest.approx(0.61475)
    assert (result["prompts"], result["judged"], result["unparseable"]) == (9, 7, 2)
    assert result["unparseable_ids"] == [3, 642]
    assert result["comparable"] is False  # 9 of WISE's 1000 prompts
    logged = metrics(result)
    assert logged["eval/wise/cultural"] == pytest.approx(0.7) and logged["eval/wise/unparseable"] == 2.0


def test_verified_aggregation_equals_hand_computation():
    answers = [(1, "cultural", "Score: 1"), (2, "cultural", "Score: 0"), (3, "cultural", "no idea"),
               (401, "time", "1"), (521, "space", "**Score**: 0"), (641, "biology", "Score: 1"),
               (761, "physics", "<think>hmm</think>\nScore: 1"), (881, "chemistry", "Score: 1")]
    result = aggregate([judged_record(VERIFIED, _prompt(i, c), "", None, a) for i, c, a in answers], VERIFIED)
    assert result["categories"]["cultural"]["wiscore"] == pytest.approx(0.5)
    # calculate_verified.py: 0.4 culture + 0.12 each other category
    assert result["overall"] == pytest.approx(0.4 * 0.5 + 0.12 * (1 + 0 + 1 + 1 + 1))
    assert result["unparseable_ids"] == [3]


def test_overall_needs_every_category_and_missing_scores_log_as_nan():
    records = [judged_record(LEGACY, _prompt(1, "cultural"), "", None, "Consistency: 2\nRealism: 2\nAesthetic Quality: 2"),
               judged_record(LEGACY, _prompt(401, "time"), "", None, "garbage")]
    result = aggregate(records, LEGACY)
    assert result["overall"] is None
    assert result["overall_missing_categories"] == ["time", "space", "biology", "physics", "chemistry"]
    logged = metrics(result)
    assert logged["eval/wise/cultural"] == pytest.approx(1.0) and math.isnan(logged["eval/wise/time"])
    assert math.isnan(logged["eval/wise/overall"]) and logged["eval/wise/unparseable"] == 1.0


# ------------------------------------------------------------------------------------------- prompts
@needs_wise
def test_wise_prompt_file_and_a_fixed_subset_over_every_category():
    prompts = load_wise_prompts(WISE_DATA)
    assert len(prompts) == 1000 and prompts[0].prompt_id == 1 and prompts[0].category == "cultural"
    by_id = {p.prompt_id: p.category for p in prompts}
    # the Category field agrees with calculate_verified.py's prompt-id ranges
    assert (by_id[400], by_id[401], by_id[520], by_id[521], by_id[641], by_id[761], by_id[1000]) == \
        ("cultural", "time", "time", "space", "biology", "physics", "chemistry")
    subset = select_subset(prompts, 20, seed=0)
    counts = {c: sum(p.category == c for p in subset) for c in ("cultural", "time", "space", "biology", "physics",
                                                                  "chemistry")}
    assert counts == {"cultural": 4, "time": 4, "space": 3, "biology": 3, "physics": 3, "chemistry": 3}
    assert subset == select_subset(prompts, 20, seed=0) and subset != select_subset(prompts, 20, seed=1)
    assert [p.prompt_id for p in subset] == sorted(p.prompt_id for p in subset)


def test_bad_prompt_files_name_the_file_and_entry(tmp_path):
    good = {"prompt_id": 1, "Prompt": "p", "Explanation": "e", "Category": "Biology", "Subcategory": "s"}
    cases = [([good, {**good, "prompt_id": 2, "Category": "Botany"}], r"\[1\]: Category 'Botany'"),
             ([good, {**good}], r"\[1\]: prompt_id 1 appears twice"),
             ([{"prompt_id": 1, "Prompt": "p"}], r"\[0\]: a WISE prompt needs the fields"),
             ({"prompts": []}, "a JSON list")]
    for i, (content, message) in enumerate(cases):
        file = tmp_path / f"bad{i}.json"
        file.write_text(json.dumps(content))
        with pytest.raises(DataError, match=message):
            load_wise_prompts(file)
    with pytest.raises(DataError, match="no such file or folder"):
        load_wise_prompts(tmp_path / "absent")
    # several files, as the paper's three category files: merged by id; an id in two of them is an error
    (tmp_path / "a.json").write_text(json.dumps([{**good, "prompt_id": 7}]))
    (tmp_path / "b.json").write_text(json.dumps([{**good, "prompt_id": 3, "Category": "time"}]))
    assert [(p.prompt_id, p.category) for p in load_wise_prompts([tmp_path / "a.json", tmp_path / "b.json"])] == \
        [(3, "time"), (7, "biology")]
    with pytest.raises(DataError, match=r"a.json\[0\]: prompt_id 7 appears twice \(first at .*a.json\[0\]\)"):
        load_wise_prompts([tmp_path / "a.json", tmp_path / "a.json"])


def test_judge_folder_is_checked_before_loading(tmp_path):
    with pytest.raises(JudgeError, match="does not exist"):
        check_judge_folder(tmp_path / "nope")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(JudgeError, match="processor"):
        check_judge_folder(tmp_path)


# ------------------------------------------------------------------------------------------- resuming
def _tiny_model():
    from rgpo.building import build_model

    cfg = load_config(TINY, [])
    return build_model(cfg).eval(), cfg


@needs_wise
def test_killed_evaluation_resumes_without_redoing_finished_prompts(tmp_path, tiny_judge):
    from rgpo.evaluation.sampling import sample_chains
    from rgpo.models import ImageSamplingConfig

    model, cfg = _tiny_model()
    prompts = select_subset(load_wise_prompts(WISE_DATA), 8, seed=0)
    icfg = ImageSamplingConfig(height=64, width=64, steps=2, seed=0, shared_noise=False)
    judge = VLMJudge(tiny_judge, device="cpu", dtype="float32", max_new_tokens=4)
    generated: list[int] = []

    def generate(batch, stop_after=None):
        if stop_after is not None and len(generated) >= stop_after:
            raise KeyboardInterrupt  # the evaluation is killed here
        generated.extend(p.prompt_id for p in batch)
        completions, images = sample_chains(model, [{"prompt": p.prompt} for p in batch], max_new_tokens=8,
                                            temperature=1.0, generator=torch.Generator().manual_seed(0), image=icfg,
                                            noise_seeds=[p.prompt_id for p in batch])
        return completions.texts, [ims[0] for ims in images]

    run = dict(out=tmp_path / "wise", protocol=LEGACY, judge=judge.answer, batch_size=3, settings={"model": "tiny"},
               log=lambda m: None)
    with pytest.raises(KeyboardInterrupt):
        evaluate_wise(prompts, generate=lambda b: generate(b, stop_after=6), **run)
    first = list(generated)
    assert first == [p.prompt_id for p in prompts[:6]]  # two batches of 3 finished before the kill
    lines = (tmp_path / "wise" / RECORDS).read_text().splitlines()
    assert [json.loads(line)["prompt_id"] for line in lines] == first
    # a kill in the middle of writing leaves half a line: that prompt is redone, nothing else
    with open(tmp_path / "wise" / RECORDS, "a") as f:
        f.write('{"prompt_id": 99')
    generated.clear()
    result = evaluate_wise(prompts, generate=generate, **run)
    assert generated == [p.prompt_id for p in prompts[6:]]  # only the rest
    records = [json.loads(line) for line in (tmp_path / "wise" / RECORDS).read_text().splitlines()]
    assert sorted(r["prompt_id"] for r in records) == [p.prompt_id for p in prompts]
    assert result["prompts"] == 8 and result["judged"] + result["unparseable"] == 8
    assert all((tmp_path / "wise" / r["image"]).is_file() for r in records)
    # a resume under other settings would mix two evaluations in one number
    with pytest.raises(DataError, match="other settings"):
        evaluate_wise(prompts, generate=generate, **{**run, "settings": {"model": "another"}})


@needs_wise
def test_scoring_path_with_fixed_judge_answers(tmp_path):
    """The standalone run scores what the judge says: a judge that answers fixed texts gives the hand-computed
    numbers, unparseable answers counted in the files it writes."""
    prompts = [p for p in load_wise_prompts(WISE_DATA) if p.prompt_id in (1, 2, 401, 521, 641, 761, 881)]
    fixed = {1: "Consistency: 2\nRealism: 1\nAesthetic Quality: 1",  # (1.4 + 0.2 + 0.1) / 2 = 0.85
             2: "It is a cake.",  # unparseable
             401: "1\n1\n1",  # 0.5
             521: "Consistency: 0\nRealism: 0\nAesthetic Quality: 0",  # 0
             641: "Consistency: 1\nRealism: 2\nAesthetic Quality: 2",  # (0.7 + 0.4 + 0.2) / 2 = 0.65
             761: "Consistency: 2\nRealism: 2\nAesthetic Quality: 0",  # 0.9
             881: "Consistency: 1\nRealism: 1\nAesthetic Quality: 0"}  # 0.45
    text_of = {p.prompt: p.prompt_id for p in prompts}
    seen: list[str] = []

    def judge(protocol, items):
        seen.extend(protocol.question(prompt, explanation) for prompt, explanation, _ in items)
        return [fixed[text_of[prompt]] for prompt, _, _ in items]

    def generate(batch):
        return [f"<think>{p.prompt_id}</think>" for p in batch], [Image.new("RGB", (16, 16), "red") for _ in batch]

    out = tmp_path / "wise"
    result = evaluate_wise(prompts, out=out, protocol=LEGACY, generate=generate, judge=judge, batch_size=3,
                           settings={}, log=lambda m: None)
    assert 'PROMPT: "The round pastry most commonly shared during Mid-Autumn Festival' in seen[0]
    assert result["overall"] == pytest.approx(0.4 * 0.85 + 0.167 * 0.5 + 0.133 * 0 + 0.1 * 0.65 + 0.1 * 0.9
                                              + 0.1 * 0.45)
    assert result["unparseable"] == 1 and result["unparseable_ids"] == [2]
    written = json.loads((out / "wise.json").read_text())
    assert written["overall"] == pytest.approx(result["overall"]) and written["categories"]["cultural"]["unparseable"] == 1
    record = json.loads((out / RECORDS).read_text().splitlines()[1])
    assert record["prompt_id"] == 2 and record["scores"] is None and record["judge_answer"] == "It is a cake."
    assert record["chain"] == "<think>2</think>" and record["image"] == "images/2.png"
    assert sorted(p.name for p in (out / "contact_sheets").iterdir()) == \
        ["biology.png", "chemistry.png", "cultural.png", "physics.png", "space.png", "time.png"]


# ------------------------------------------------------------------------------------------- the command line
@pytest.mark.slow
@needs_wise
def test_rgpo_eval_wise_end_to_end(tmp_path, tiny_judge):
    out = tmp_path / "wise"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "rgpo.cli", "eval", "wise", "--model-path", "tiny", "--family", "mindomni",
               "--config", str(TINY), "--data", str(WISE_DATA), "--judge", str(tiny_judge), "--out", str(out),
               "--subset", "20", "--device", "cpu", "--judge-dtype", "float32", "--judge-max-new-tokens", "6",
               "--steps", "2", "--max-new-tokens", "12", "--batch-size", "10"]
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "WISE (legacy protocol): " in proc.stdout and "unparseable" in proc.stdout
    result = json.loads((out / "wise.json").read_text())
    records = [json.loads(line) for line in (out / RECORDS).read_text().splitlines()]
    assert result["prompts"] == len(records) == 20
    assert result["unparseable"] == sum(r["scores"] is None for r in records)  # a random judge: mostly garbage
    assert set(records[0]) >= {"prompt", "chain", "image", "scores", "wiscore", "judge_answer"}
    assert len(list((out / "images").glob("*.png"))) == 20
    assert len(list((out / "contact_sheets").glob("*.png"))) == 6
    # rerun: every prompt is done, nothing is generated again
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "resuming: 20 of 20 prompts already judged" in proc.stdout
    # bad input: one clean line naming what is wrong, before any model loads
    proc = subprocess.run([*command[:command.index("--judge") + 1], str(tmp_path / "nojudge"), "--out", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "judge folder" in proc.stderr and "does not exist" in proc.stderr


# ------------------------------------------------------------------------------------------- understanding
def _question(choices=("red", "blue", "green"), answer="B"):
    return Question("What colour?", tuple(choices), answer, (), "q.jsonl:1")


def test_choice_parsing():
    q = _question()
    assert parse_choice("B", q) == "B"
    assert parse_choice("(C) green", q) == "C"
    assert parse_choice("A.", q) == "A"
    assert parse_choice("<think>It looks blue.</think><answer>B</answer>", q) == "B"
    assert parse_choice("The answer is C", q) == "C"
    assert parse_choice("It is blue", q) == "B"  # the one choice named
    assert parse_choice("A photo of a bus", q) is None  # "A" the article, not the option
    assert parse_choice("red or blue", q) is None
    assert parse_choice("D", q) is None  # not a choice


def test_understanding_accuracy_counts_unreadable_answers_as_wrong(tmp_path):
    Image.new("RGB", (8, 8), "blue").save(tmp_path / "blue.png")
    lines = [{"image": "blue.png", "question": "What colour?", "choices": ["red", "blue"], "answer": "B"},
             {"image": "blue.png", "question": "Is it a square?", "choices": ["yes", "no"], "answer": "A"},
             {"images": ["blue.png"], "question": "Colour?", "choices": ["red", "blue", "green"], "answer": "B"}]
    (tmp_path / "q.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    questions = load_questions(tmp_path / "q.jsonl")
    assert questions[0].text() == ("What colour?\nA. red\nB. blue\n"
                                   "Answer with the option's letter from the given choices directly.")
    assert questions[0].model_row()["images"][0].size == (8, 8)
    scored = score_answers(questions, ["B", "B", "hmm"])  # right, wrong, unreadable
    assert (scored["accuracy"], scored["correct"], scored["unparseable"]) == (pytest.approx(1 / 3), 1, 1)
    (tmp_path / "bad.jsonl").write_text(json.dumps({**lines[0], "answer": "C"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: 'answer' must be the letter of a choice \(A, B\)"):
        load_questions(tmp_path / "bad.jsonl")
    (tmp_path / "bad.jsonl").write_text(json.dumps({**lines[0], "image": "absent.png"}) + "\n")
    with pytest.raises(DataError, match="bad.jsonl:1: image 'absent.png' not found"):
        load_questions(tmp_path / "bad.jsonl")


def test_rgpo_eval_understanding(tmp_path, capsys):
    from rgpo.cli import main

    Image.new("RGB", (16, 16), "red").save(tmp_path / "red.png")
    lines = [{"image": "red.png", "question": f"Question {i}?", "choices": ["red", "blue"], "answer": "A"}
             for i in range(3)]
    (tmp_path / "q.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    assert main(["eval", "understanding", "--model-path", "tiny", "--family", "mindomni", "--config", str(TINY),
                 "--questions", str(tmp_path / "q.jsonl"), "--out", str(tmp_path / "answers.jsonl"), "--device", "cpu",
                 "--max-new-tokens", "6", "--batch-size", "2"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    records = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert summary["questions"] == len(records) == 3
    assert summary["correct"] == sum(r["correct"] for r in records)
    assert summary["unparseable"] == sum(r["picked"] is None for r in records)


# ------------------------------------------------------------------------------------------- in the loop
class Recorder(NullLogger):
    def __init__(self):
        self.scalars, self.images, self.tables = [], [], []

    def log(self, metrics, step):
        self.scalars.append((step, dict(metrics)))

    def log_images(self, key, images, captions, step):
        self.images.append((step, key, len(images), captions))

    def log_table(self, key, columns, rows, step):
        self.tables.append((step, key, columns, len(rows)))


def test_wise_config_is_checked_early(tmp_path):
    with pytest.raises(ConfigError, match="eval.judge"):
        load_config(TINY, ["eval.benchmark=wise", "eval.every=1", f"eval.benchmark_data={tmp_path}"]).validate()
    with pytest.raises(ConfigError, match="eval.every=0 cannot run"):
        load_config(TINY, ["eval.benchmark=wise", "eval.every=0", "eval.judge=j", "eval.benchmark_data=d"]).validate()
    with pytest.raises(ConfigError, match="eval.wise_protocol='v2' is not valid"):
        load_config(TINY, ["eval.wise_protocol=v2"]).validate()


def test_bad_benchmark_input_is_one_clean_line_before_any_model(tmp_path, capsys, tiny_judge):
    from rgpo.cli import main

    base = ["train", "--config", str(TINY), f"logging.output_dir={tmp_path / 'run'}", "eval.every=1",
            "eval.benchmark=wise"]
    assert main([*base, f"eval.benchmark_data={tmp_path / 'absent'}", f"eval.judge={tiny_judge}"]) == 2
    assert "error: eval.benchmark_data: WISE prompts" in capsys.readouterr().err
    (tmp_path / "wise.json").write_text(json.dumps([{"prompt_id": 1, "Prompt": "p", "Explanation": "e",
                                                     "Category": "Biology"}]))
    assert main([*base, f"eval.benchmark_data={tmp_path / 'wise.json'}", f"eval.judge={tmp_path / 'nojudge'}"]) == 2
    assert "error: eval.judge: judge folder" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing was set up


@needs_wise
def test_in_loop_subset_leaves_out_training_prompts(tmp_path, tiny_judge, capsys):
    from rgpo.config import EvalConfig
    from rgpo.evaluation.loop import LoopEvaluation

    data = tmp_path / "wise.json"
    entries = json.loads((WISE_DATA / "merge.json").read_text())[:3]
    data.write_text(json.dumps(entries))
    cfg = EvalConfig(every=1, benchmark="wise", benchmark_data=str(data), benchmark_prompts=0, judge=str(tiny_judge))
    trained = "  " + entries[1]["Prompt"].upper() + " "  # the same instruction, spaced and cased otherwise
    evaluation = LoopEvaluation(cfg, output_dir=tmp_path, main=True, train_prompts=[trained, "a cat"])
    assert [p.prompt_id for p in evaluation.wise_prompts] == [entries[0]["prompt_id"], entries[2]["prompt_id"]]
    assert "1 WISE prompt(s) are training prompts" in capsys.readouterr().out


@pytest.mark.slow
@needs_wise
def test_in_loop_wise_and_understanding_in_a_tiny_run(tmp_path, tiny_judge):
    from rgpo.trainer import RGPOTrainer

    Image.new("RGB", (16, 16), "red").save(tmp_path / "red.png")
    (tmp_path / "q.jsonl").write_text(json.dumps({"image": "red.png", "question": "Colour?", "choices": ["red", "blue"],
                                                  "answer": "A"}) + "\n")
    cfg = load_config(TINY, [f"logging.output_dir={tmp_path / 'run'}", "optim.max_steps=1", "checkpoint.every=0",
                             "rollout.image.steps=2", "rollout.max_new_tokens=8", "logging.report_to=none",
                             "eval.every=1", "eval.before_training=true", "eval.benchmark=wise",
                             f"eval.benchmark_data={WISE_DATA}", "eval.benchmark_prompts=6",
                             f"eval.judge={tiny_judge}", "eval.judge_device=cpu", "eval.judge_dtype=float32",
                             "eval.judge_max_new_tokens=4", f"eval.understanding={tmp_path / 'q.jsonl'}",
                             f"data.eval_file={REPO / 'configs' / 'prompts' / 'sample.jsonl'}", "eval.num_prompts=2"])
    recorder = Recorder()
    trainer = RGPOTrainer(cfg, logger=recorder)
    try:
        assert trainer.loop_eval.judge is not None and trainer.loop_eval.judge.device == torch.device("cpu")
        judge = trainer.loop_eval.judge
        trainer.train()
        assert trainer.loop_eval.judge is judge  # loaded once
    finally:
        trainer.close()
    evals = [(step, m) for step, m in recorder.scalars if "eval/wise/overall" in m]
    assert [step for step, _ in evals] == [0, 1]  # before training and after step 1
    for _, logged in evals:
        for key in ("cultural", "time", "space", "biology", "physics", "chemistry", "overall", "unparseable"):
            assert f"eval/wise/{key}" in logged
        assert 0.0 <= logged["eval/understanding/accuracy"] <= 1.0
        assert logged["timing/eval_wise"] > 0 and logged["timing/eval_understanding"] > 0
    # the run's own reward evaluation on data.eval_file still runs beside them
    assert [step for step, m in recorder.scalars if "eval/format" in m] == [0, 1]
    wise_images = [(s, k, n) for s, k, n, _ in recorder.images if k == "eval/wise/images"]
    assert wise_images == [(0, "eval/wise/images", 6), (1, "eval/wise/images", 6)]
    assert recorder.tables[-1][1:] == ("eval/wise/prompts", ["step", "category", "prompt", "chain", "image", "wiscore",
                                                             "judge"], 6)
    folder = tmp_path / "run" / "eval" / "wise" / "step-0000001"
    assert json.loads((folder / "wise.json").read_text())["prompts"] == 6
    assert len((folder / RECORDS).read_text().splitlines()) == 6

    # the run's checkpoint evaluated standalone, loaded as rgpo sample loads it
    from rgpo.cli import main

    checkpoint = tmp_path / "run" / "checkpoints" / "step-0000001"
    assert main(["eval", "wise", "--checkpoint", str(checkpoint), "--data", str(WISE_DATA), "--judge", str(tiny_judge),
                 "--out", str(tmp_path / "standalone"), "--subset", "6", "--device", "cpu", "--judge-dtype", "float32",
                 "--judge-max-new-tokens", "4", "--steps", "2"]) == 0
    standalone = json.loads((tmp_path / "standalone" / "wise.json").read_text())
    assert standalone["prompts"] == 6 and len(list((tmp_path / "standalone" / "images").glob("*.png"))) == 6
    settings = json.loads((tmp_path / "standalone" / "wise_run.json").read_text())
    assert settings["model"] == str(checkpoint) and settings["protocol"] == "legacy"
