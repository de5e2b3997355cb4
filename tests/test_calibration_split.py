"""Calibration windows know their documents, so the rest can be held out (bench/obs_explore.py --heldout)."""
from types import SimpleNamespace

import pytest
import torch

from LLMPruner.data.calibration import calibration_examples, calibration_windows, heldout_windows


class Bytes:
    """A tokenizer built in code: one id per byte."""

    def __call__(self, text, return_tensors="pt"):
        return SimpleNamespace(input_ids=torch.tensor([list(text.encode())]))


def docs(n: int = 12) -> list[str]:
    # document i is the letter chr(97 + i) repeated: every token says which document it came from;
    # every third one is too short for a 16-token window
    return [chr(97 + i) * (8 if i % 3 == 0 else 40 + i) for i in range(n)]


def test_windows_come_from_the_documents_they_name():
    windows, used = calibration_windows(docs(), Bytes(), 5, 16, seed=3)
    assert windows.shape == (5, 16) and len(used) == len(set(used)) == 5
    for w, i in zip(windows, used):
        assert i % 3 != 0                                 # short documents are skipped
        assert set(w.tolist()) == {97 + i}                # the window is document i's text


def test_file_source_gives_the_same_windows(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text("".join(f'{{"text": "{d}"}}\n' for d in docs()))
    windows, _ = calibration_windows(docs(), Bytes(), 5, 16, seed=3)
    assert torch.equal(calibration_examples(str(path), Bytes(), 5, 16, seed=3), windows)


def test_heldout_windows_avoid_the_calibration_documents():
    d = docs()
    _, used = calibration_windows(d, Bytes(), 5, 16, seed=3)
    held = heldout_windows(d, Bytes(), used, num_windows=100, seq_len=16)
    sources = {int(w[0]) - 97 for w in held}
    assert not sources & set(used)
    expected = sum((40 + i) // 16 for i in range(12) if i % 3 and i not in used)  # non-overlapping windows
    assert len(held) == expected and all(len(set(w.tolist())) == 1 for w in held)
    assert len(heldout_windows(d, Bytes(), used, num_windows=2, seq_len=16)) == 2


def test_joined_fallback_uses_every_document_and_holds_none_out():
    d = ["ab"] * 10
    windows, used = calibration_windows(d, Bytes(), 3, 4, seed=0)
    assert windows.shape == (3, 4) and used == list(range(10))
    with pytest.raises(ValueError, match="no held-out document has 4 tokens"):
        heldout_windows(d, Bytes(), used, 8, seq_len=4)
