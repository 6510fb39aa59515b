"""Typed run configuration: dataclasses first, YAML and ``key=value`` overrides merged on top.

Every setting is written once, beside its field: default, docstring and allowed values
(`setting(default, choices=... | ge=/gt=/le=/lt=...)`, in the field's metadata). Validation,
``--help``, the config reference (docs/configuration.md) and the judge CLIs' options (`rdpo.confighelp`) are
derived from the fields. A misspelt key, a wrong type, a missing or out-of-range value fails at
start, naming every offending key at once (``ConfigError``).

This module stays light (no torch, no Lightning): everything imports it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import MISSING, DictConfig, OmegaConf

from rdpo import settings
from rdpo.judging.scoring import AGGREGATIONS
from rdpo.settings import ConfigError, allowed, choices, setting  # noqa: F401  (public names)

DEEPSPEED = "deepspeed"
"""The one run.strategy name that builds rdpo's DeepSpeed config (`rdpo.strategy`)."""


@dataclass
class RunConfig:
    dir: str = MISSING
    """Run directory: config.yaml, metrics, rounds/, adapter/, eval.json are written here."""
    seed: int = 0
    """Seeds Python, NumPy and torch (and so prompt selection and sampling)."""
    accelerator: str = "auto"
    """Lightning accelerator: auto, cpu, gpu."""
    devices: int = setting(1, gt=0)
    """Devices (processes) per node."""
    num_nodes: int = setting(1, gt=0)
    """Nodes; under SLURM, Lightning reads the rest of the topology from the environment."""
    strategy: str = "auto"
    """Lightning strategy: auto, ddp, ..., or deepspeed (configured by run.deepspeed_stage and
    run.deepspeed_offload; Lightning's deepspeed_stage_N names are refused, they would bypass
    that config)."""
    precision: str = "32-true"
    """Lightning precision: 32-true, bf16-mixed, ..."""
    log_every_n_steps: int = setting(1, gt=0)
    """How often Lightning writes step metrics."""
    progress_bar: bool = True
    """Show Lightning's progress bar."""
    threads: int = setting(0, ge=0)
    """torch CPU threads (0: leave torch's default)."""
    report: bool = True
    """At the end, write report.png and report.md (plots and summary, `rdpo.report`) in run.dir."""
    resume: str = "none"
    """none: a new run (run.dir must be empty, or see run.overwrite); auto: continue from the
    newest checkpoint in run.dir (none there: start); or the path of a checkpoint to continue
    from. A resume is refused when a setting that changes the result (any but the few of
    `rdpo.rundir.FREE`) or a pool's contents differ from the checkpoint's: see resume_accept."""
    resume_accept: list[str] = field(default_factory=list)
    """Resume despite these changed settings, on purpose: keys (dpo.lr), sections (judge) or
    pools (data.train_pool: its contents); recorded in run.dir/resumes.jsonl. This start only
    (config.yaml records [])."""
    overwrite: bool = False
    """run.resume=none in a run.dir that holds an earlier run: delete it first (only a run
    directory: its config.yaml and files rdpo writes, never the root, home or working directory).
    This start only (config.yaml records false)."""
    checkpoint: bool = True
    """Save run.dir/checkpoints/last.ckpt (adapter, optimizer, round, pairs, RNG) after each
    round is built and every checkpoint_every_n_steps steps."""
    checkpoint_every_n_steps: int = setting(0, ge=0)
    """Optimizer steps between checkpoints (0: at the end of every round)."""
    on_nonfinite: str = setting("skip", choices=("skip", "stop"))
    """A non-finite loss: skip (the batch adds no gradient; counted in train/nonfinite_skipped)
    or stop (the run fails with the step's numbers)."""
    deepspeed_stage: int = setting(2, choices=(2, 3))
    """ZeRO stage when run.strategy=deepspeed; the config is built in rdpo.strategy."""
    deepspeed_offload: bool = False
    """run.strategy=deepspeed: keep optimizer state (and, at stage 3, parameters) in CPU memory."""
    loggers: list[str] = field(default_factory=lambda: ["csv"])
    """Experiment loggers (Lightning's), any of csv (run.dir/logs/metrics.csv), tensorboard,
    wandb, mlflow; their settings are under logger.*."""


LOGGERS = ("csv", "tensorboard", "wandb", "mlflow")
"""The names run.loggers takes (`rdpo.loggers`)."""


@dataclass
class TensorBoardConfig:
    save_dir: str = "${run.dir}/tensorboard"
    """Folder of the event files (tensorboard --logdir it, or a folder above it)."""


@dataclass
class WandbConfig:
    project: str = "rdpo"
    """W&B project."""
    name: str | None = None
    """Run name (null: the name of run.dir)."""
    entity: str | None = None
    """W&B team or user (null: your default entity)."""
    offline: bool = False
    """Write the run locally only (sync later with wandb sync); WANDB_MODE=offline does the same."""
    save_dir: str = "${run.dir}"
    """Folder of W&B's local files (a wandb/ folder is made in it)."""
    tags: list[str] = field(default_factory=list)
    """Tags of the W&B run."""


@dataclass
class MLflowConfig:
    experiment: str = "rdpo"
    """MLflow experiment name."""
    run_name: str | None = None
    """Run name (null: the name of run.dir)."""
    tracking_uri: str | None = None
    """Tracking store or server, e.g. sqlite:///mlflow.db or http://host:5000 (null:
    $MLFLOW_TRACKING_URI, else MLflow's default, sqlite:///mlflow.db in the working directory)."""
    artifact_location: str | None = None
    """Where a new experiment stores artifacts such as report.png (null: the store's default)."""


@dataclass
class LoggerConfig:
    """Settings of the experiment loggers run.loggers names."""

    tensorboard: TensorBoardConfig = field(default_factory=TensorBoardConfig)
    """TensorBoard (Lightning's TensorBoardLogger)."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """Weights & Biases (Lightning's WandbLogger)."""
    mlflow: MLflowConfig = field(default_factory=MLflowConfig)
    """MLflow (Lightning's MLFlowLogger)."""


@dataclass
class ToyConfig:
    enabled: bool = False
    """Build (first run) or reuse the embedded tiny VLM and synthetic shapes task, and use them
    as model.path, data.train_pool and data.heldout_pool."""
    cache_dir: str = ".cache/rdpo"
    """Where the tiny model, the warm-started policy and the task pools are cached."""
    family: str = setting("qwen2_vl", choices=("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_onevision",
                                               "idefics3", "gemma3", "internvl", "mllama"))
    """Architecture of the tiny model (`rdpo.demo.tiny`, `rdpo.families`)."""
    hidden_size: int = setting(64, gt=0)
    """Width of the tiny model's language and vision towers."""
    head_dim: int = setting(16, choices=(16, 32, 64))
    """Attention head size of the tiny language model (quickstart: 16; vLLM's CPU server needs 32)."""
    layers: int = setting(2, gt=0)
    """Depth of the tiny model's language and vision towers."""
    n_train: int = setting(96, gt=0)
    """Training prompts in the shapes task."""
    n_heldout: int = setting(48, ge=0)
    """Held-out prompts (disjoint from training prompts)."""
    task: str = setting("easy", choices=("easy", "hard"))
    """easy: 1-2 shapes, 4 question kinds; hard: 3-6 shapes, relations, counts by colour, more
    criteria per prompt (`rdpo.demo.hardtoy`)."""
    task_seed: int = 0
    """Seed of the shapes task (images, instructions, rubrics)."""
    warmstart_steps: int = setting(1500, ge=0)
    """Supervised warm-start steps that teach the random-init model the task's language."""
    warmstart_lr: float = setting(2e-3, gt=0)
    """Warm-start learning rate (AdamW, full fine-tuning)."""
    flaw_rate: float = setting(0.8, ge=0, le=1)
    """Fraction of warm-start answers that carry a flaw (hallucination, wrong fact, terse,
    rambling), so the starting policy samples both good and bad answers for DPO to sort."""


@dataclass
class LoraConfig:
    r: int = setting(16, gt=0)
    """LoRA rank."""
    alpha: int = setting(32, gt=0)
    """LoRA scaling numerator (scale = alpha / r)."""
    dropout: float = setting(0.0, ge=0, lt=1)
    """Dropout on the LoRA input."""
    target_modules: str = "auto"
    """Regex over module names, or auto: the language model's attention and MLP projections of
    the checkpoint's family (`rdpo.families`; never the vision tower)."""


@dataclass
class ModelConfig:
    path: str = MISSING
    """Local directory of a transformers VLM checkpoint with its processor (set by toy.enabled)."""
    dtype: str = setting("float32", choices=("float32", "bfloat16", "float16"))
    """Weights dtype."""
    quantization: str = setting("none", choices=("none", "nf4"))
    """none, or nf4 (QLoRA: 4-bit base weights through bitsandbytes; vision tower and lm_head
    stay unquantised)."""
    finetune: str = setting("lora", choices=("lora", "full"))
    """lora: train a LoRA adapter (reference = adapters off); full: train every language-model
    weight (vision tower frozen; reference = a frozen copy, twice the weights in memory)."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA adapter on the language model."""
    gradient_checkpointing: bool | str = setting(False, choices=(False, True, "selective"))
    """Recompute the language model's layer activations in the backward pass (the vision tower
    is frozen and never checkpointed). true: every layer's, far less kept for backward, one
    more forward of the language model per step; selective: only the cheap ones (element-wise
    work, norms, LoRA's rank-r up-projection), the matrix products' and attention's outputs
    kept (`rdpo.engine.recompute`): about 40 % less kept than false, element-wise work recomputed."""
    disable_dropout: bool = True
    """Turn every dropout of the model (the checkpoint's and LoRA's) off for DPO, as TRL does:
    the training step then computes the same function as the reference pass and the rollout,
    so a round's first step has loss ln 2. false keeps dropout in the training steps."""


@dataclass
class DataConfig:
    train_pool: str = MISSING
    """Rubric pool (JSONL) the rounds sample prompts from."""
    heldout_pool: str | None = None
    """Rubric pool for the before/after evaluation (null: no evaluation)."""
    prompts_per_round: int = setting(32, gt=0)
    """Prompts each round samples (per rank) from its shard of the train pool."""
    batch_size: int = setting(8, gt=0)
    """Pairs per DPO micro-batch."""
    accumulate_grad_batches: int = setting(1, gt=0)
    """Micro-batches per optimizer step."""
    prompt_cache_mb: int = setting(512, ge=0)
    """Encoded prompts (token ids and image patches) kept in memory for reuse, least recently
    used dropped first (MB; 0: no cache, every use re-encodes)."""
    vision_cache_mb: int = setting(1024, ge=0)
    """Image features kept per prompt (CPU memory, MB, least recently used dropped first): the
    reference pass encodes each image once and the DPO steps reuse its features, never running
    the frozen vision tower (a prompt beyond the bound is encoded again, without gradient; 0:
    every step runs the vision tower; off under DeepSpeed ZeRO-3)."""
    max_image_pixels: int = setting(89_478_485, gt=0)
    """Largest image a pool may name (width × height, read from the file's header before it is
    decoded): a larger one is refused when the pool is loaded (a decompression bomb). The default
    is PIL's own limit (Image.MAX_IMAGE_PIXELS); a higher bound raises PIL's for the process."""
    allow_outside_paths: bool = False
    """Let a pool name images outside its own folder (an absolute path, '..', a symlink leading
    out); refused by default, so a pool cannot have any readable file encoded or sent to a judge."""


@dataclass
class RolloutConfig:
    every_n_steps: int = setting(10, gt=0)
    """Optimizer steps between rounds; the first round runs before the first step."""
    samples_per_prompt: int = setting(4, ge=2)
    """K: responses sampled per prompt (a pair needs at least 2)."""
    max_new_tokens: int = setting(32, gt=0)
    """Longest response sampled."""
    temperature: float = setting(1.0, ge=0)
    """Sampling temperature (0: greedy)."""
    top_p: float = setting(1.0, gt=0, le=1)
    """Nucleus sampling threshold."""
    top_k: int = setting(0, ge=0)
    """Sample from the k most likely tokens only (0: off)."""
    repetition_penalty: float = setting(1.0, gt=0)
    """Repetition penalty (1.0: off). Sampling uses only rdpo's rollout settings: nothing of the
    checkpoint's generation_config.json is inherited except its end-of-sequence ids."""
    batch_size: int = setting(32, gt=0)
    """Prompts per generation batch."""
    pipeline: bool = True
    """Judge a round's prompts while the rest are sampled, and compute reference log-probs as
    judged prompts yield pairs (false: sample all, then judge all, then the reference pass).
    Same rollouts, pairs and losses either way; only the round's wall time differs."""
    async_rounds: bool = False
    """Build round r+1 while round r trains: its prompts are sampled from the policy as it was
    when round r started (one round off-policy; the round files record which), judged in the
    background, and given reference log-probs when round r+1 starts. Hides the judge's time
    (and, with rollout.engine=vllm, the sampling) behind training; docs/engine.md says when it
    pays. LoRA only, not with DeepSpeed ZeRO-3."""
    truncated: str = setting("drop", choices=("drop", "keep"))
    """A response cut at max_new_tokens (finish reason length): drop (never a pair member; its
    prompt may still pair two finished responses) or keep (trained on as sampled, no end of
    turn appended)."""
    engine: str = setting("transformers", choices=("transformers", "vllm"))
    """Who samples: transformers (``generate`` in the training process) or vllm (an
    OpenAI-compatible vLLM server serving model.path with --enable-lora; each round's adapter is
    saved to run.dir/adapters/ and loaded at run time, `rdpo.rollout_server`). LoRA only."""
    base_url: str | None = None
    """vllm: the server's base URL, e.g. http://localhost:8001/v1."""
    api_key_env: str | None = None
    """vllm: NAME of the environment variable holding the server's API key (null: none needed)."""
    model: str | None = None
    """vllm: the served base model's name (null: the one base model /v1/models lists)."""
    concurrency: int = setting(8, gt=0)
    """vllm: prompts in flight at once (each asks for K samples)."""
    timeout: float = setting(300.0, gt=0)
    """vllm: seconds per request attempt."""
    max_retries: int = setting(4, ge=0)
    """vllm: retries (exponential backoff) on connection errors, timeouts, 429 and 5xx, and
    reloads of an adapter the server lost (restarted), before the run stops naming its checkpoint."""


@dataclass
class JudgeConfig:
    kind: str = setting("rule", choices=("rule", "transformers", "openai"))
    """rule: the regex `check` of each criterion (RuleJudge); transformers: a local VLM
    (TransformersJudge); openai: an OpenAI-compatible server such as vLLM or SGLang (OpenAIJudge)."""
    model: str | None = None
    """transformers: checkpoint directory of the judge VLM; openai: the served model name."""
    base_url: str | None = None
    """openai: the endpoint's base URL, e.g. http://localhost:8000/v1."""
    api_key_env: str | None = None
    """openai: NAME of the environment variable holding the API key (the key itself is never
    saved); null for servers that need none."""
    concurrency: int = setting(8, gt=0)
    """openai: requests in flight at once."""
    timeout: float = setting(60.0, gt=0)
    """openai: seconds per request attempt."""
    max_retries: int = setting(4, ge=0)
    """openai: retries (exponential backoff) on connection errors, timeouts, 429 and 5xx."""
    parse_retries: int = setting(2, ge=0)
    """Times an answer without parseable JSON is asked again before its verdicts become null."""
    max_tokens: int = setting(1024, gt=0)
    """Longest judge answer (tokens)."""
    batch_size: int = setting(8, gt=0)
    """transformers: judge prompts per generation batch."""
    noise: float = setting(0.0, ge=0, le=0.5)
    """rule: simulated judge error, each verdict flips with this probability (seeded by run.seed;
    0: the exact RuleJudge; `rdpo.demo.simjudges`)."""
    outcome: str = setting("check", choices=("check", "holistic"))
    """rule: outcome scores from each record's outcome check, or (toy only) a simulated holistic
    1-10 judge that sees every flaw (`rdpo.demo.simjudges`)."""
    outcome_noise: float = setting(1.0, ge=0)
    """outcome=holistic: SD of the Gaussian noise on its 1-10 score."""
    cache: str | None = "${run.dir}/judge_cache.sqlite"
    """sqlite file caching model judgments across rounds and runs (null: no cache; unused by rule)."""

    rate_limit_retries: int = setting(10, ge=0)
    """openai: further retries of a request still rate limited (HTTP 429) after max_retries, each
    after the server's retry-after (the openai client honours up to 120 s) or its backoff."""
    round_timeout: float = setting(14400.0, gt=0, lt=float("inf"))
    """Seconds one round's judging (a training round, a held-out evaluation) may take in all;
    past it the run stops with an error naming the judge (answers received stay cached)."""
    system_role: bool = True
    """openai: send the grading instructions as a system message (false: at the top of the user
    turn, for a served model whose chat template refuses one, e.g. Llama 3.2 Vision with images)."""
    max_response_chars: int = setting(16000, gt=0)
    """Longest response a model judge is shown (characters); a longer one is cut, and the judge
    prompt says so."""
    price_input_per_mtok: float | None = None
    """Price of a million prompt tokens (any currency); with price_output_per_mtok, cost.json and
    the report give money per round and per kept pair (null: unknown, not free; `rdpo.cost`)."""
    price_output_per_mtok: float | None = None
    """Price of a million completion tokens, in the currency of price_input_per_mtok (null: unknown)."""
    audit: JudgeConfig | None = None
    """A second judge (its own kind, model, base_url, ... as under judge) that re-judges
    audit_fraction of each round's pairs against the rubric: agreement, its chosen − rejected
    margin and a reward-hacking warning in run.dir/judge_audit.json (`rdpo.judging.audit`); it
    changes no pair. null: no audit."""
    audit_fraction: float = setting(0.25, gt=0, le=1)
    """Share of each rank's kept pairs per round the audit judge re-judges (at least one pair)."""

@dataclass
class PairsConfig:
    strategy: str = setting("rubric", choices=("rubric", "outcome", "rubric_holistic"))
    """rubric: pairs from the per-criterion rubric score; outcome: from one holistic judge score
    per response (the paper's outcome-filtering baseline); rubric_holistic: from one 1-10 score
    per response by a judge shown the rubric as context (no per-criterion verdicts; the
    selection-vs-structure arm). Same selection rules."""
    aggregation: str = setting("lexicographic", choices=tuple(AGGREGATIONS))
    """How verdicts aggregate to a score (`rdpo.judging.scoring`): lexicographic (essential first) or
    weighted."""
    min_margin: float = setting(0.1, ge=0)
    """Drop a prompt whose best and worst scores differ by less than this."""
    require_chosen_essential: bool = True
    """Keep a pair only when the chosen response meets every essential criterion."""


@dataclass
class DPOConfig:
    beta: float = setting(0.1, gt=0)
    """KL strength β of the DPO objective."""
    loss_type: str = setting("sigmoid", choices=("sigmoid", "robust", "hinge", "ipo"))
    """DPO loss (`rdpo.engine.loss`)."""
    label_smoothing: float = setting(0.0, ge=0, lt=0.5)
    """Label smoothing ε (conservative DPO / robust DPO)."""
    sft_weight: float = setting(0.0, ge=0)
    """Weight of a length-normalised NLL term on chosen responses (RPO); 0 turns it off."""
    lr: float = setting(1e-4, gt=0)
    """Peak learning rate (AdamW)."""
    weight_decay: float = setting(0.0, ge=0)
    """AdamW weight decay."""
    warmup_steps: int = setting(0, ge=0)
    """Linear warm-up steps."""
    schedule: str = setting("constant", choices=("constant", "cosine"))
    """After warm-up: constant, or cosine (to zero at max_steps)."""
    max_steps: int = setting(40, gt=0)
    """Optimizer steps in the whole run."""
    grad_clip: float = setting(1.0, ge=0)
    """Gradient norm clip (0: off)."""
    reference: str = setting("base", choices=("base", "round_start"))
    """Reference policy of the DPO log-ratios, computed once per pair when the round builds it:
    base (adapters disabled) or round_start (the policy as the round begins: iterative DPO)."""
    prefix_sharing: bool = True
    """Pack each pair as one sequence [prompt, chosen, rejected] so the image and the prompt are
    encoded once per pair; models that cannot (no 4-D mask support) fall back with a notice."""


@dataclass
class EvalConfig:
    samples_per_prompt: int = setting(4, gt=0)
    """Responses sampled per held-out prompt; the score is the mean over all of them."""
    temperature: float = setting(1.0, ge=0)
    """Sampling temperature of the evaluation (0: greedy, one response)."""
    max_prompts: int = setting(0, ge=0)
    """Evaluate at most this many held-out prompts (0: all)."""


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    toy: ToyConfig = field(default_factory=ToyConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    pairs: PairsConfig = field(default_factory=PairsConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)


def _run_rules(run, name: Callable[[str], str]) -> list[str]:
    problems = [f"{name('loggers')}: {x!r} is not one of {', '.join(LOGGERS)}"
                for x in run.loggers if x not in LOGGERS]
    problems += [f"{name('loggers')}: {x!r} is listed twice" for x in sorted(set(run.loggers))
                 if list(run.loggers).count(x) > 1]
    if run.overwrite and run.resume != "none":
        problems.append(f"{name('overwrite')}: deletes the earlier run that {name('resume')}="
                        f"{run.resume} continues: choose one")
    strategy = run.strategy
    if not strategy.startswith(DEEPSPEED) or strategy == DEEPSPEED:
        return problems
    # Lightning's registered names (deepspeed_stage_2, deepspeed_stage_3_offload, ...) build
    # their own DeepSpeed config, which would silently ignore run.deepspeed_stage/_offload.
    m = re.fullmatch(rf"{DEEPSPEED}_stage_(\d)(_offload)?.*", strategy)
    fix = f"{name('strategy')}={DEEPSPEED}"
    if m:
        fix += f" {name('deepspeed_stage')}={m[1]}"
        fix += f" {name('deepspeed_offload')}=true" if m[2] else ""
    return problems + [f"{name('strategy')}: {strategy!r} is not supported (it would bypass "
                       f"rdpo's DeepSpeed config); use {fix}"]


def _model_rules(model, name: Callable[[str], str]) -> list[str]:
    if model.finetune == "full" and model.quantization != "none":
        return [f"{name('finetune')}: full fine-tuning cannot train 4-bit weights "
                f"({name('quantization')}={model.quantization}); use lora (QLoRA)"]
    return []


def _judge_rules(judge, name: Callable[[str], str]) -> list[str]:
    problems = []
    if judge.kind in ("transformers", "openai") and not judge.model:
        what = "checkpoint directory" if judge.kind == "transformers" else "served model name"
        article = "an" if judge.kind[:1] in "aeiou" else "a"
        problems.append(f"{name('model')}: {article} {judge.kind} judge needs a model (the {what})")
    if judge.kind != "rule" and (judge.noise or judge.outcome != "check"):
        problems.append(f"{name('noise')}, {name('outcome')}: simulate a judge on kind=rule only")
    if judge.kind == "openai" and not judge.base_url:
        problems.append(f"{name('base_url')}: an openai judge needs the server's URL, "
                        "e.g. http://localhost:8000/v1")
    for key in ("price_input_per_mtok", "price_output_per_mtok"):
        value = getattr(judge, key)
        if value is not None and not (isinstance(value, (int, float)) and 0 <= value < float("inf")):
            problems.append(f"{name(key)}: must be a finite number >= 0 or null, got {value}")
    if judge.audit is not None:
        if judge.audit.audit is not None or judge.audit.audit_fraction != JudgeConfig.audit_fraction:
            problems.append(f"{name('audit.audit')}, {name('audit.audit_fraction')}: an audit "
                            f"judge has no audit of its own (the share audited is "
                            f"{name('audit_fraction')})")
        problems += check(judge.audit, lambda n: name(f"audit.{n}"))
    return problems


def _rollout_rules(rollout, name: Callable[[str], str]) -> list[str]:
    if rollout.engine == "vllm" and not rollout.base_url:
        return [f"{name('base_url')}: the vllm engine needs the server's URL, "
                "e.g. http://localhost:8001/v1"]
    return []


def _config_rules(cfg, name: Callable[[str], str]) -> list[str]:
    problems = []
    if cfg.judge.outcome == "holistic" and not cfg.toy.enabled:
        problems.append(f"{name('judge.outcome')}: holistic reads the toy's scenes: toy.enabled")
    if cfg.rollout.engine == "vllm" and cfg.model.finetune == "full":
        # The server receives the policy as a LoRA adapter; full weights would need a weight
        # push into the running engine, which rdpo does not do.
        problems.append(f"{name('rollout.engine')}: vllm serves the policy as a LoRA adapter; "
                        f"{name('model.finetune')}=full needs rollout.engine=transformers")
    if cfg.rollout.async_rounds and cfg.model.finetune == "full":
        # The policy a round is sampled from is kept (in the checkpoint too) as its adapter.
        problems.append(f"{name('rollout.async_rounds')}: the sampling policy is kept as a LoRA "
                        f"adapter; {name('model.finetune')}=full needs rollout.async_rounds=false")
    if cfg.rollout.async_rounds and cfg.run.strategy.startswith(DEEPSPEED) \
            and cfg.run.deepspeed_stage == 3:
        problems.append(f"{name('rollout.async_rounds')}: ZeRO-3 shards the adapter the next round "
                        f"samples from; use {name('run.deepspeed_stage')}=2 or run.strategy=ddp")
    if cfg.rollout.engine == "vllm" and cfg.toy.enabled and cfg.toy.head_dim < 32:
        problems.append(f"{name('toy.head_dim')}: {cfg.toy.head_dim} is below the head sizes "
                        "vLLM's CPU attention serves; set toy.head_dim=32 with rollout.engine=vllm")
    return problems


_RULES = {RunConfig: _run_rules, ModelConfig: _model_rules, JudgeConfig: _judge_rules,
          RolloutConfig: _rollout_rules, Config: _config_rules}


def check(section, name: Callable[[str], str]) -> list[str]:
    """Every value problem of a section of rdpo's config (`rdpo.settings.check` with its rules)."""
    return settings.check(section, name, _RULES)


def validate(cfg: DictConfig | Config) -> list[str]:
    """Every value problem of a merged config (missing required values, ranges, choices, rules)."""
    return check(cfg, "{}".format)


# -- loading ---------------------------------------------------------------------------------

def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Schema defaults, then the YAML at `path`, then dotted ``key=value`` overrides; validated."""
    base = OmegaConf.structured(Config)
    sources = []
    if path is not None:
        if not Path(path).is_file():
            raise ConfigError([f"--config: no such file: {path}"])
        sources.append((str(path), OmegaConf.load(path)))
    if overrides:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError([f"override {o!r}: expected key=value" for o in bad])
        sources.append(("command line", OmegaConf.from_dotlist(list(overrides))))
    problems = settings.merge_errors(base, sources)
    if base.toy.enabled:
        # The toy's model and pools live in the cache under a key of the toy settings; writing
        # the paths into the config makes the saved config.yaml say what was trained.
        from rdpo.demo.paths import toy_paths

        paths = toy_paths(OmegaConf.to_object(base.toy))
        for key, value in (("model.path", paths.policy), ("data.train_pool", paths.train_pool),
                           ("data.heldout_pool", paths.heldout_pool)):
            parent, _, leaf = key.rpartition(".")
            if OmegaConf.is_missing(OmegaConf.select(base, parent), leaf) \
                    or OmegaConf.select(base, key) is None:
                OmegaConf.update(base, key, str(value))
    problems += validate(base)
    if problems:
        raise ConfigError(problems)
    return OmegaConf.to_object(base)
