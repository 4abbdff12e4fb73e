"""Prompt files and the sampler: both formats, file:line errors, group placement across ranks, resume."""

import json

import pytest
from PIL import Image

from rgpo.data import DataError, PromptSampler, check_columns, load_prompts


def write_jsonl(path, lines):
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_both_formats_and_columns(tmp_path):
    Image.new("RGB", (32, 32), "red").save(tmp_path / "cat.png")
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "a cat", "gt_prompt": "a cat sitting", "category": "animal"},
        "",
        {"conversations": [{"from": "human", "value": "(3+6)-lived animal"}], "gt_prompt": "a cat"},
        {"prompt": "edit this", "images": ["cat.png"]},
    ])
    rows = load_prompts(path)
    assert [r.prompt for r in rows] == ["a cat", "(3+6)-lived animal", "edit this"]
    assert rows[0].columns == {"gt_prompt": "a cat sitting", "category": "animal"}
    assert rows[1].columns == {"gt_prompt": "a cat"}
    assert rows[1].source.endswith("p.jsonl:3")
    images = rows[2].as_model_row()["images"]
    assert images[0].size == (32, 32) and images[0].getpixel((0, 0)) == (255, 0, 0)


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "ok"', r"p\.jsonl:2: not valid JSON"),
    ('["a list"]', r"p\.jsonl:2: each line must be a JSON object"),
    ('{"text": "no prompt"}', r"p\.jsonl:2: no 'prompt' field.*\['text'\]"),
    ('{"prompt": ""}', r"p\.jsonl:2: 'prompt' must be a non-empty string"),
    ('{"prompt": "x", "images": ["missing.png"]}', r"p\.jsonl:2: image 'missing.png' does not exist"),
    ('{"prompt": "x", "images": ["not_an_image.png"]}', r"p\.jsonl:2: image 'not_an_image.png' is not a readable image"),
])
def test_bad_lines_name_file_and_line(tmp_path, line, message):
    (tmp_path / "not_an_image.png").write_text("hello")
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "fine"}, line])
    with pytest.raises(DataError, match=message):
        load_prompts(path)


def test_empty_and_missing_files(tmp_path):
    with pytest.raises(DataError, match="holds no prompts"):
        load_prompts(write_jsonl(tmp_path / "e.jsonl", [""]))
    with pytest.raises(DataError, match="does not exist"):
        load_prompts(tmp_path / "nope.jsonl")


def test_missing_reward_column_names_row(tmp_path):
    rows = load_prompts(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "gt_prompt": "x"}, {"prompt": "b"}]))
    with pytest.raises(DataError, match=r"p\.jsonl:2: reward 'clip_consistency' needs column 'gt_prompt'"):
        check_columns(rows, "gt_prompt", "clip_consistency")


def test_too_few_prompts_for_a_step():
    with pytest.raises(DataError, match="holds 3 prompts but one step needs 4"):
        PromptSampler(3, 4, 2)


def test_groups_are_contiguous_and_split_across_ranks():
    # 3 prompts x G=4 = 12 chains over 2 ranks: rank 0 takes p0 x4 + p1 x2, rank 1 takes p1 x2 + p2 x4.
    slots = [PromptSampler(10, 3, 4, seed=1, rank=r, world_size=2).next_step() for r in (0, 1)]
    prompts0 = [s.prompt_index for s in slots[0]]
    prompts1 = [s.prompt_index for s in slots[1]]
    assert prompts0[:4] == [prompts0[0]] * 4 and prompts0[4:] == [prompts1[0]] * 2
    assert [s.group for s in slots[0]] == [0, 0, 0, 0, 1, 1] and [s.group for s in slots[1]] == [1, 1, 2, 2, 2, 2]
    assert [s.global_index for s in slots[0] + slots[1]] == list(range(12))


def test_epochs_visit_every_prompt_and_resume_continues_identically():
    sampler = PromptSampler(6, 2, 2, seed=3)
    first_epoch = [sampler.next_step()[0].prompt_index for _ in range(3)]
    seconds = sampler.next_step()  # next epoch
    assert sampler.epoch == 1
    assert len(set(first_epoch)) == 3
    state = sampler.state_dict()
    expected = [[s.prompt_index for s in sampler.next_step()] for _ in range(4)]
    resumed = PromptSampler(6, 2, 2, seed=3)
    resumed.load_state_dict(state)
    assert [[s.prompt_index for s in resumed.next_step()] for _ in range(4)] == expected
    assert len(seconds) == 4  # the new epoch starts with a full step: 2 prompts x 2 chains


def test_seed_changes_order():
    a = [PromptSampler(50, 5, 2, seed=s).next_step()[0].prompt_index for s in range(8)]
    assert len(set(a)) > 1
