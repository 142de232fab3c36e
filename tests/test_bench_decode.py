"""`ar2dlm bench decode`: a student's sampler against its teacher's `generate`, on the shipped micro teacher
(2M parameters) converted in memory, with small numbers."""

import json

import pytest

from ar2dlm_ray import cli
from ar2dlm_ray.bench import bench_decode, decode_prompts
from ar2dlm_ray.config import RunConfig, SamplerConfig
from ar2dlm_ray.pretrain import SHIPPED_TEACHER, teacher_accuracy
from ar2dlm_ray.sampler import sample
from ar2dlm_ray.student import convert, load_causal_lm

TEACHER = str(SHIPPED_TEACHER)


@pytest.fixture(scope="module")
def pair():
    teacher, tokenizer = load_causal_lm(TEACHER)
    student = convert(*load_causal_lm(TEACHER), block_size=4, shift=True)
    return student, teacher, tokenizer


def test_bench_decode_rows_and_tokens_per_forward(pair):
    student, teacher, tokenizer = pair
    prompts, examples = decode_prompts(RunConfig(), tokenizer, TEACHER, 3)
    # Two tokens committed per step: 8 new tokens (two blocks of 4) in 4 forwards per sequence.
    cfg = SamplerConfig(remasking="static", steps_per_block=2, temperature=0.0)
    result = bench_decode(student, teacher, tokenizer, prompts, cfg, [1, 2], 8, repeats=1, examples=examples)
    assert [r["batch"] for r in result["rows"]] == [1, 2] and result["prompts"] == 3 and result["new_tokens"] == 8

    # An independent count: the student's model calls at batch 1, less one prefill per prompt.
    calls = [0]
    hook = student.model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        for p in prompts:
            sample(student, [student.tokenizer.encode(p, add_special_tokens=False)], cfg, eos_ids=[],
                   max_new_tokens=8)
    finally:
        hook.remove()
    one = result["rows"][0]
    assert one["student_calls"] == calls[0] and one["teacher_calls"] == 3 * 8
    assert one["tokens_per_forward"] == pytest.approx(3 * 8 / (calls[0] - 3)) == pytest.approx(2.0)
    assert result["rows"][1]["teacher_calls"] == 2 * 8  # two chunks (2 + 1 prompts), 8 calls each

    # Generating through EOS leaves each answer as it was: the teacher's accuracy is the one of greedy
    # decoding that stops at EOS.
    assert one["teacher_acc"] == teacher_accuracy(teacher, tokenizer, examples, max_new_tokens=8)["overall"]
    for row in result["rows"]:
        assert 0.0 <= row["student_acc"] <= 1.0
        assert row["student_over_teacher"] == pytest.approx(row["student_tokens_per_s"] / row["teacher_tokens_per_s"])
        assert row["model_cost_ratio"] > 0 and row["student_other_ms_per_call"] >= 0


def test_bench_decode_command(tmp_path, capsys, pair):
    student, _, _ = pair
    student_dir = student.save(tmp_path / "student")
    out = tmp_path / "decode.json"
    assert cli.main(["bench", "decode", "--model", str(student_dir), "--teacher", TEACHER, "--batch", "1", "2",
                     "--prompts", "2", "--max-new-tokens", "4", "--repeats", "1", "--out", str(out)]) == 0
    assert "speed ratio" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["teacher"] == TEACHER and [r["batch"] for r in result["rows"]] == [1, 2]
    assert result["remasking"] == "dynamic" and result["temperature"] == 0.0  # micro.yaml's sampler, greedy

    # Bad input is one line.
    for argv, expected in ((["--model", str(student_dir)], "needs --model STUDENT_DIR and --teacher"),
                           (["--model", str(tmp_path / "none"), "--teacher", TEACHER], "--model: no such directory"),
                           (["--model", TEACHER, "--teacher", TEACHER], "is not a student directory"),
                           (["--model", str(student_dir), "--teacher", str(student_dir)], "is a converted student")):
        assert cli.main(["bench", "decode", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and expected in err, err
    # Only bench decode takes several batch sizes.
    assert cli.main(["bench", "sampler", "--model", str(student_dir), "--batch", "1", "2"]) == 2
    assert "takes one --batch" in capsys.readouterr().err
