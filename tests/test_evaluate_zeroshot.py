"""Zero-shot accuracy through the real lm-eval package, offline from local files, on stories260K."""
from __future__ import annotations

import json
import random

import pytest
import torch

from conftest import need_shared

pytest.importorskip("lm_eval")
from LLMPruner.evaluate.zeroshot import average, check_tasks, evaluate_zeroshot  # noqa: E402


@pytest.fixture(scope="module")
def stories():
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = need_shared("models", "stories260K")
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def test_local_piqa_and_arc_easy_give_accuracies_in_range_and_repeat(stories):
    zeroshot = need_shared("data", "zeroshot")
    model, tok = stories
    first = evaluate_zeroshot(model, tok, ["piqa", "arc_easy"], data_dir=zeroshot, limit=24, batch_size=8)
    second = evaluate_zeroshot(model, tok, ["piqa", "arc_easy"], data_dir=zeroshot, limit=24, batch_size=4)
    assert first == second
    for task in ("piqa", "arc_easy"):
        assert set(first[task]) == {"acc", "acc_norm"}
        assert all(0.0 <= v <= 1.0 for v in first[task].values())
        assert all(v * 24 == pytest.approx(round(v * 24)) for v in first[task].values())  # counts of 24
    avg = average(first)
    assert avg["acc"] == pytest.approx((first["piqa"]["acc"] + first["arc_easy"]["acc"]) / 2)


def _toy_piqa(folder, correct: bool) -> None:
    """PIQA-schema rows whose right answer is the story the model knows, the wrong one gibberish."""
    rng = random.Random(0)
    rows = []
    for i in range(8):
        good, bad = " there was a little girl named Lily.", " qzx vkw jjq prr zzt mmq."
        label = rng.randint(0, 1)
        sols = [good, bad] if label == 0 else [bad, good]
        rows.append({"goal": "Once upon a time,", "sol1": sols[0], "sol2": sols[1],
                     "label": label if correct else 1 - label})
    (folder / "piqa").mkdir(parents=True)
    (folder / "piqa" / "validation.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_harness_scores_the_answer_the_model_knows(stories, tmp_path):
    model, tok = stories
    _toy_piqa(tmp_path / "right", correct=True)
    _toy_piqa(tmp_path / "wrong", correct=False)
    right = evaluate_zeroshot(model, tok, ["piqa"], data_dir=tmp_path / "right")
    wrong = evaluate_zeroshot(model, tok, ["piqa"], data_dir=tmp_path / "wrong")
    assert right["piqa"] == {"acc": 1.0, "acc_norm": 1.0}
    assert wrong["piqa"] == {"acc": 0.0, "acc_norm": 0.0}


def test_unknown_task_suggests_close_names():
    with pytest.raises(ValueError, match=r"unknown task 'piqaa'\. Did you mean piqa"):
        check_tasks(["piqa", "piqaa"])
    with pytest.raises(ValueError, match="--tasks is empty"):
        check_tasks([])


def test_missing_local_file_names_the_flag_and_expected_path(stories, tmp_path):
    model, tok = stories
    with pytest.raises(FileNotFoundError, match=r"--zeroshot_dir.*hellaswag.*validation\.jsonl"):
        evaluate_zeroshot(model, tok, ["hellaswag"], data_dir=tmp_path, limit=2)
    with pytest.raises(FileNotFoundError, match=r"arc_challenge.*test\.jsonl"):
        evaluate_zeroshot(model, tok, ["arc_challenge"], data_dir=tmp_path, limit=2)
