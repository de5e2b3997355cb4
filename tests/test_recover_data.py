"""Recovery data: prompt masking, cutoff, EOS, schemas, and clear errors for bad files.

Also defines ``char_tokenizer()`` (one token per character, BOS prepended), used by the other
``test_recover_*`` files so that they run without ../shared.
"""
from __future__ import annotations

import json
import string

import pytest

from LLMPruner.recover import (IGNORE_INDEX, DataFormatError, Prompter, build_instruction_datasets,
                               load_instruction_records, tokenize_example)


def char_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(sorted(set(string.printable)))}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def alpaca_records(n: int) -> list[dict]:
    return [{"instruction": f"Count to {i % 7}.", "input": "" if i % 2 else "digits",
             "output": " ".join(str(j) for j in range(i % 7 + 1))} for i in range(n)]


def write(tmp_path, name: str, content) -> str:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return str(path)


def test_prompt_tokens_are_masked_and_eos_appended():
    tok, prompter = char_tokenizer(), Prompter("alpaca")
    record = {"instruction": "Say hi.", "input": "", "output": "hi"}
    row = tokenize_example(record, "alpaca", tok, prompter, cutoff_len=512)
    prompt = prompter.generate_prompt("Say hi.", "")
    n_prompt = 1 + len(prompt)  # BOS + one token per character
    assert row["input_ids"] == tok(prompt + "hi")["input_ids"] + [tok.eos_token_id]
    assert row["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert row["labels"][n_prompt:] == tok("hi", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert row["attention_mask"] == [1] * len(row["input_ids"])


def test_train_on_inputs_keeps_every_label_and_no_eos_flag():
    tok, prompter = char_tokenizer(), Prompter("alpaca")
    record = {"instruction": "Say hi.", "input": "now", "output": "hi"}
    row = tokenize_example(record, "alpaca", tok, prompter, 512, train_on_inputs=True, add_eos_token=False)
    assert row["labels"] == row["input_ids"]
    assert row["input_ids"][-1] != tok.eos_token_id
    assert "### Input:\nnow" in tok.decode(row["input_ids"])


def test_cutoff_truncates_and_leaves_no_room_for_eos():
    tok, prompter = char_tokenizer(), Prompter(None)
    record = {"instruction": "x", "output": "y" * 100}
    row = tokenize_example(record, "alpaca", tok, prompter, cutoff_len=16)
    assert len(row["input_ids"]) == 16 and row["input_ids"][-1] == tok.convert_tokens_to_ids("y")
    assert row["labels"][:3] == [IGNORE_INDEX] * 3  # BOS, "x", "\n"
    # a prompt longer than the cutoff masks everything
    row = tokenize_example({"instruction": "z" * 40, "output": "y"}, "alpaca", tok, prompter, cutoff_len=16)
    assert row["labels"] == [IGNORE_INDEX] * 16


def test_no_instruction_prompt_and_lamini_schema(tmp_path):
    assert Prompter(None).generate_prompt("Do it", "with this", "done") == "Do it\nwith this\ndone"
    path = write(tmp_path, "lamini.jsonl", "\n".join(json.dumps({"instruction": f"q{i}", "response": f"a{i}"})
                                                       for i in range(5)))
    records, schema = load_instruction_records(path)
    assert schema == "lamini" and len(records) == 5
    row = tokenize_example(records[0], schema, char_tokenizer(), Prompter("alpaca"), 512)
    assert tok_text(row).endswith("### Response:\na0</s>")


def test_plain_text_documents_train_on_every_token(tmp_path):
    path = write(tmp_path, "stories.txt", "One day.\n\nTwo cats\nplayed.\n\n\n")
    records, schema = load_instruction_records(path)
    assert schema == "text" and records == [{"text": "One day."}, {"text": "Two cats\nplayed."}]
    tok = char_tokenizer()
    row = tokenize_example(records[1], schema, tok, Prompter("alpaca"), 512)
    assert row["input_ids"] == tok("Two cats\nplayed.")["input_ids"] + [tok.eos_token_id]
    assert row["labels"] == [IGNORE_INDEX] + row["input_ids"][1:]  # only BOS is not a target


def tok_text(row) -> str:
    return char_tokenizer().decode(row["input_ids"])


def test_split_sizes_and_cache(tmp_path):
    path = write(tmp_path, "data.json", alpaca_records(30))
    cache = tmp_path / "cache"
    kwargs = dict(cutoff_len=96, val_set_size=6, prompt_template_name="alpaca_short", cache_dir=cache)
    train, val = build_instruction_datasets(path, char_tokenizer(), **kwargs)
    assert (len(train), len(val)) == (24, 6)
    assert max(len(ids) for ids in train["input_ids"]) <= 96
    assert len(list(cache.iterdir())) == 1
    train2, val2 = build_instruction_datasets(path, char_tokenizer(), **kwargs)
    assert train2["input_ids"] == train["input_ids"] and val2["labels"] == val["labels"]
    with pytest.raises(ValueError, match=r"--val_set_size 30: must be in \[0, 29\]"):
        build_instruction_datasets(path, char_tokenizer(), val_set_size=30)
    # examples whose prompt fills the cutoff carry no loss: dropped, or an error naming the flag
    with pytest.raises(ValueError, match="--cutoff_len 40: every example's prompt fills the cutoff"):
        build_instruction_datasets(path, char_tokenizer(), cutoff_len=40, val_set_size=0,
                                   prompt_template_name="alpaca_short")


@pytest.mark.parametrize("name, content, message", [
    ("empty.json", "", "the file is empty"),
    ("broken.json", '[{"instruction": "a", ', "not valid JSON"),
    ("broken.jsonl", '{"instruction": "a", "output": "b"}\n{oops}\n', "line 2 is not valid JSON"),
    ("object.json", '{"instruction": "a"}', "expected a JSON list of records"),
    ("nolist.json", "[]", "no records"),
    ("scalar.json", "[1, 2]", "record 0 is a int"),
    ("fields.json", '[{"question": "a", "answer": "b"}]', r"fields \['answer', 'question'\]; expected the Alpaca"),
    ("missing.json", '[{"instruction": "a", "output": "b"}, {"instruction": "c"}]',
     r"record 1 lacks string field\(s\) \['output'\]"),
])
def test_bad_data_files_give_clear_errors(tmp_path, name, content, message):
    path = write(tmp_path, name, content)
    with pytest.raises(DataFormatError, match=message) as err:
        load_instruction_records(path)
    assert "--data_path" in str(err.value) and name in str(err.value)


def test_missing_file_and_unknown_template(tmp_path):
    with pytest.raises(FileNotFoundError, match="--data_path .*no such file"):
        load_instruction_records(str(tmp_path / "absent.json"))
    with pytest.raises(ValueError, match="--prompt_template_name 'nope': unknown template; use one of"):
        Prompter("nope")
