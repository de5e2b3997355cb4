"""The distillation Trainer on tiny models built in code: the tapped head equals the full-logits loss, a
student equal to its teacher does not move, full-weight and LoRA training resume exactly, packing."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import Interrupt, kill_at_step, tiny_model

from LLMPruner.recover import RecoveryConfig, build_trainer
from LLMPruner.recover.distill import DistillConfig, distill_trainer_class, logits_are_head_output
from LLMPruner.recover.packing import build_packed_datasets, pack_documents

VOCAB, SEQ = 96, 16


def blocks(n: int, seed: int = 0):
    from datasets import Dataset
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, SEQ), generator=g).tolist()
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * SEQ] * n, "labels": ids})


def config(tmp_path, **overrides) -> RecoveryConfig:
    c = RecoveryConfig(output_dir=str(tmp_path / "out"), batch_size=4, micro_batch_size=2, max_steps=6,
                       learning_rate=5e-3, warmup_steps=0, lora_target_modules=["q_proj", "v_proj", "down_proj"],
                       eval_steps=2, save_steps=2, save_total_limit=10, logging_steps=1, disable_tqdm=True,
                       use_cpu=True)
    for k, v in overrides.items():
        setattr(c, k, v)
    return c


def make_trainer(tmp_path, student, teacher, kd: DistillConfig | None = None, callbacks=None, **overrides):
    return build_trainer(student, tokenizer(), blocks(24), {"val": blocks(4, seed=1)}, config(tmp_path, **overrides),
                         callbacks=callbacks, trainer_class=distill_trainer_class(teacher, kd or DistillConfig()))


def tokenizer():
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {f"t{i}": i for i in range(VOCAB)}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=word_level)
    tok.pad_token, tok.eos_token = "t0", "t2"
    return tok


def batch(n: int = 2, seed: int = 3) -> dict[str, torch.Tensor]:
    data = blocks(n, seed)
    ids = torch.tensor(data["input_ids"])
    labels = ids.clone()
    labels[0, :5] = -100  # a masked prompt: those positions are no targets
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def models():
    return (tiny_model(vocab_size=VOCAB, seed=0, tie_word_embeddings=True),
            tiny_model(vocab_size=VOCAB, seed=1, intermediate_size=64, tie_word_embeddings=True))


@pytest.mark.parametrize("loss,temperature", [("kl", 1.0), ("kl+ce", 2.0)])
def test_tapped_head_loss_equals_full_logits_reference(tmp_path, loss, temperature):
    student, teacher = models()
    kd = DistillConfig(loss=loss, temperature=temperature, alpha=0.25, chunk_tokens=5)
    trainer = make_trainer(tmp_path, student, teacher, kd, train_mode="full")
    inputs = batch()
    assert logits_are_head_output(student, inputs["input_ids"], None)
    trainer._setup(student, inputs)
    assert trainer._fused
    got = trainer._kd(student, inputs)
    grads = torch.autograd.grad(got.loss, list(student.parameters()))
    # reference: full logits of both, unchunked, by autograd
    sel = inputs["labels"][:, 1:] != -100
    zs = student(input_ids=inputs["input_ids"]).logits[:, :-1][sel]
    with torch.no_grad():
        zt = teacher(input_ids=inputs["input_ids"]).logits[:, :-1][sel]
    y = inputs["labels"][:, 1:][sel]
    t, (w_kl, w_ce) = temperature, kd.weights
    want = w_kl * t * t * F.kl_div(F.log_softmax(zs / t, -1), F.log_softmax(zt / t, -1), log_target=True,
                                   reduction="batchmean") + w_ce * F.cross_entropy(zs, y)
    torch.testing.assert_close(got.loss, want, rtol=1e-5, atol=1e-6)
    for g, w in zip(grads, torch.autograd.grad(want, list(student.parameters()))):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    trainer._fused = False  # the fallback (full logits) path gives the same loss
    torch.testing.assert_close(trainer._kd(student, inputs).loss, want, rtol=1e-5, atol=1e-6)


def test_student_equal_to_teacher_does_not_move(tmp_path):
    student = models()[0]
    teacher = copy.deepcopy(student)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    trainer = make_trainer(tmp_path, student, teacher, max_steps=2, train_mode="full")
    trainer.train()
    kls = [h["kl"] for h in trainer.state.log_history if "kl" in h]
    assert len(kls) == 2 and max(kls) < 1e-7, kls
    assert all("ce" in h for h in trainer.state.log_history if "kl" in h)
    for k, v in student.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=1e-7, msg=k)
    assert not any(p.requires_grad for p in teacher.parameters()) and not hasattr(teacher, "peft_config")


def test_distillation_moves_the_student_towards_the_teacher(tmp_path):
    student, teacher = models()
    trainer = make_trainer(tmp_path, student, teacher, max_steps=8, learning_rate=2e-2, train_mode="full")
    trainer.train()
    evals = [h["eval_val_loss"] for h in trainer.state.log_history if "eval_val_loss" in h]
    assert evals[-1] < 0.8 * evals[0], evals


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_resume_after_interruption_matches_an_uninterrupted_run(tmp_path, mode):
    from transformers import set_seed

    def run(folder, callbacks=None, resume=None):
        set_seed(1)
        student, teacher = models()
        trainer = make_trainer(tmp_path / folder, student, teacher, DistillConfig(loss="kl+ce", temperature=2.0),
                               callbacks=callbacks, train_mode=mode, lora_dropout=0.1)
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    full = run("full")
    with pytest.raises(Interrupt):
        run("killed", callbacks=[kill_at_step(3)])
    checkpoint = tmp_path / "killed" / "out" / "checkpoint-2"
    resumed = run("killed", resume=str(checkpoint))
    assert resumed.state.global_step == full.state.global_step == 6
    a = {k: v for k, v in full.model.named_parameters() if v.requires_grad}
    b = {k: v for k, v in resumed.model.named_parameters() if v.requires_grad}
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=key)
    logged = lambda t, k: [h[k] for h in t.state.log_history if k in h and h.get("step", 0) > 2]  # noqa: E731
    for key in ("loss", "kl", "ce"):
        assert logged(resumed, key) == pytest.approx(logged(full, key), rel=1e-5), key


def test_packing_cuts_the_concatenated_documents_into_full_blocks(tmp_path):
    tok = tokenizer()
    docs = ["t5 t6 t7", "t8 t9", "t10 t11 t12 t13"]
    # stream: 5 6 7 EOS 8 9 EOS 10 11 12 13 EOS (12 ids) -> blocks of 5: two, the tail of 2 dropped
    assert pack_documents(docs, tok, 5) == [[5, 6, 7, 2, 8], [9, 2, 10, 11, 12]]
    assert pack_documents(docs, tok, 4, add_eos=False) == [[5, 6, 7, 8], [9, 10, 11, 12]]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join('{"text": "%s"}' % d for d in docs * 4))
    train, val = build_packed_datasets(path, tok, 4, val_set_size=2, seed=0)
    assert len(train) + len(val) == 12 and len(val) == 2 and train["labels"] == train["input_ids"]
    with pytest.raises(ValueError, match="--val_set_size 12: .* packs into only 12 blocks"):
        build_packed_datasets(path, tok, 4, val_set_size=12)
    (tmp_path / "bad.jsonl").write_text('{"text": "t5"}\n{"body": "x"}\n')
    with pytest.raises(ValueError, match="--distill_on .*bad.jsonl.*: record 1 has no string field 'text'"):
        build_packed_datasets(tmp_path / "bad.jsonl", tok, 4)
