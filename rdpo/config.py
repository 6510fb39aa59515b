"""Typed run configuration: dataclasses first, YAML and ``key=value`` overrides merged on top.

A misspelt key, a wrong type or a missing required value fails at start, naming every offending
key at once (``ConfigError``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


@dataclass
class RunConfig:
    dir: str = MISSING
    """Run directory: config.yaml, metrics, rounds/, adapter/, eval.json are written here."""
    seed: int = 0
    """Seeds Python, NumPy and torch (and so prompt selection and sampling)."""
    accelerator: str = "auto"
    """Lightning accelerator: auto, cpu, gpu."""
    devices: int = 1
    """Devices (processes) per node."""
    num_nodes: int = 1
    """Nodes; under SLURM, Lightning reads the rest of the topology from the environment."""
    strategy: str = "auto"
    """Lightning strategy: auto, ddp, deepspeed_stage_2, ..."""
    precision: str = "32-true"
    """Lightning precision: 32-true, bf16-mixed, ..."""
    log_every_n_steps: int = 1
    """How often Lightning writes step metrics."""
    progress_bar: bool = True
    """Show Lightning's progress bar."""
    threads: int = 0
    """torch CPU threads (0: leave torch's default)."""
    report: bool = True
    """At the end, write report.png and report.md (plots and summary, `rdpo.report`) in run.dir."""
    resume: str = "none"
    """none: start over; auto: continue from the newest checkpoint in run.dir (none there: start);
    or the path of a checkpoint to continue from."""
    checkpoint: bool = True
    """Save run.dir/checkpoints/last.ckpt (adapter, optimizer, round, pairs, RNG) after each
    round is built and every checkpoint_every_n_steps steps."""
    checkpoint_every_n_steps: int = 0
    """Optimizer steps between checkpoints (0: at the end of every round)."""
    on_nonfinite: str = "skip"
    """A non-finite loss: skip (the batch adds no gradient; counted in train/nonfinite_skipped)
    or stop (the run fails with the step's numbers)."""
    deepspeed_stage: int = 2
    """ZeRO stage (2 or 3) when run.strategy=deepspeed; the config is built in rdpo.strategy."""
    deepspeed_offload: bool = False
    """run.strategy=deepspeed: keep optimizer state (and, at stage 3, parameters) in CPU memory."""


@dataclass
class ToyConfig:
    enabled: bool = False
    """Build (first run) or reuse the embedded tiny VLM and synthetic shapes task, and use them
    as model.path, data.train_pool and data.heldout_pool."""
    cache_dir: str = ".cache/rdpo"
    """Where the tiny model, the warm-started policy and the task pools are cached."""
    family: str = "qwen2_vl"
    """Architecture of the tiny model: qwen2_vl, qwen2_5_vl, qwen3_vl."""
    hidden_size: int = 64
    """Width of the tiny model's language and vision towers."""
    layers: int = 2
    """Depth of the tiny model's language and vision towers."""
    n_train: int = 96
    """Training prompts in the shapes task."""
    n_heldout: int = 48
    """Held-out prompts (disjoint from training prompts)."""
    task_seed: int = 0
    """Seed of the shapes task (images, instructions, rubrics)."""
    warmstart_steps: int = 1500
    """Supervised warm-start steps that teach the random-init model the task's language."""
    warmstart_lr: float = 2e-3
    """Warm-start learning rate (AdamW, full fine-tuning)."""
    flaw_rate: float = 0.8
    """Fraction of warm-start answers that carry a flaw (hallucination, wrong fact, terse,
    rambling), so the starting policy samples both good and bad answers for DPO to sort."""


@dataclass
class LoraConfig:
    r: int = 16
    """LoRA rank."""
    alpha: int = 32
    """LoRA scaling numerator (scale = alpha / r)."""
    dropout: float = 0.0
    """Dropout on the LoRA input."""
    target_modules: str = (
        r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    )
    """Regex over module names: the language model only (plain names would also hit the vision
    tower of Qwen2.5-VL)."""


@dataclass
class ModelConfig:
    path: str = MISSING
    """Local directory of a transformers VLM checkpoint with its processor (set by toy.enabled)."""
    dtype: str = "float32"
    """Weights dtype: float32, bfloat16, float16."""
    quantization: str = "none"
    """none, or nf4 (QLoRA: 4-bit base weights through bitsandbytes; vision tower and lm_head
    stay unquantised)."""
    finetune: str = "lora"
    """lora: train a LoRA adapter (reference = adapters off); full: train every language-model
    weight (vision tower frozen; reference = a frozen copy, twice the weights in memory)."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA adapter on the language model."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""


@dataclass
class DataConfig:
    train_pool: str = MISSING
    """Rubric pool (JSONL) the rounds sample prompts from."""
    heldout_pool: str | None = None
    """Rubric pool for the before/after evaluation (null: no evaluation)."""
    prompts_per_round: int = 32
    """Prompts each round samples (per rank) from its shard of the train pool."""
    batch_size: int = 8
    """Pairs per DPO micro-batch."""
    accumulate_grad_batches: int = 1
    """Micro-batches per optimizer step."""


@dataclass
class RolloutConfig:
    every_n_steps: int = 10
    """Optimizer steps between rounds; the first round runs before the first step."""
    samples_per_prompt: int = 4
    """K: responses sampled per prompt."""
    max_new_tokens: int = 32
    """Longest response sampled."""
    temperature: float = 1.0
    """Sampling temperature (0: greedy)."""
    top_p: float = 1.0
    """Nucleus sampling threshold."""
    batch_size: int = 32
    """Prompts per generation batch."""


@dataclass
class JudgeConfig:
    kind: str = "rule"
    """rule: the regex `check` of each criterion (RuleJudge); transformers: a local VLM
    (TransformersJudge); openai: an OpenAI-compatible server such as vLLM or SGLang (OpenAIJudge)."""
    model: str | None = None
    """transformers: checkpoint directory of the judge VLM; openai: the served model name."""
    base_url: str | None = None
    """openai: the endpoint's base URL, e.g. http://localhost:8000/v1."""
    api_key_env: str | None = None
    """openai: NAME of the environment variable holding the API key (the key itself is never
    saved); null for servers that need none."""
    concurrency: int = 8
    """openai: requests in flight at once."""
    timeout: float = 60.0
    """openai: seconds per request attempt."""
    max_retries: int = 4
    """openai: retries (exponential backoff) on connection errors, timeouts, 429 and 5xx."""
    parse_retries: int = 2
    """Times an answer without parseable JSON is asked again before its verdicts become null."""
    max_tokens: int = 1024
    """Longest judge answer (tokens)."""
    batch_size: int = 8
    """transformers: judge prompts per generation batch."""
    cache: str | None = "${run.dir}/judge_cache.sqlite"
    """sqlite file caching model judgments across rounds and runs (null: no cache; unused by rule)."""


@dataclass
class PairsConfig:
    strategy: str = "rubric"
    """rubric: pairs from the per-criterion rubric score; outcome: from one holistic judge score
    per response (the paper's outcome-filtering baseline), same selection rules."""
    aggregation: str = "lexicographic"
    """How verdicts aggregate to a score: lexicographic (essential first) or weighted."""
    min_margin: float = 0.1
    """Drop a prompt whose best and worst scores differ by less than this."""
    require_chosen_essential: bool = True
    """Keep a pair only when the chosen response meets every essential criterion."""


@dataclass
class DPOConfig:
    beta: float = 0.1
    """KL strength β of the DPO objective."""
    loss_type: str = "sigmoid"
    """sigmoid, robust, hinge or ipo."""
    label_smoothing: float = 0.0
    """Label smoothing ε (conservative DPO / robust DPO)."""
    sft_weight: float = 0.0
    """Weight of a length-normalised NLL term on chosen responses (RPO); 0 turns it off."""
    lr: float = 1e-4
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 0
    """Linear warm-up steps."""
    schedule: str = "constant"
    """After warm-up: constant or cosine (to zero at max_steps)."""
    max_steps: int = 40
    """Optimizer steps in the whole run."""
    grad_clip: float = 1.0
    """Gradient norm clip (0: off)."""
    reference: str = "base"
    """Reference policy of the DPO log-ratios, computed once per pair when the round builds it:
    base (adapters disabled) or round_start (the policy as the round begins: iterative DPO)."""
    prefix_sharing: bool = True
    """Pack each pair as one sequence [prompt, chosen, rejected] so the image and the prompt are
    encoded once per pair; models that cannot (no 4-D mask support) fall back with a notice."""


@dataclass
class EvalConfig:
    samples_per_prompt: int = 4
    """Responses sampled per held-out prompt; the score is the mean over all of them."""
    temperature: float = 1.0
    """Sampling temperature of the evaluation (0: greedy, one response)."""
    max_prompts: int = 0
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


class ConfigError(ValueError):
    """Every problem of a configuration, one per line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid config:\n  " + "\n  ".join(problems))


_CHOICES = {
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.quantization": ("none", "nf4"),
    "model.finetune": ("lora", "full"),
    "toy.family": ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"),
    "judge.kind": ("rule", "transformers", "openai"),
    "pairs.strategy": ("rubric", "outcome"),
    "pairs.aggregation": ("lexicographic", "weighted"),
    "dpo.loss_type": ("sigmoid", "robust", "hinge", "ipo"),
    "dpo.schedule": ("constant", "cosine"),
    "dpo.reference": ("base", "round_start"),
    "run.on_nonfinite": ("skip", "stop"),
}
_POSITIVE = ("judge.concurrency", "judge.timeout", "judge.max_tokens", "judge.batch_size",
             "data.prompts_per_round", "data.batch_size", "data.accumulate_grad_batches",
             "rollout.every_n_steps", "rollout.samples_per_prompt", "rollout.max_new_tokens",
             "rollout.batch_size", "dpo.beta", "dpo.max_steps", "dpo.lr", "model.lora.r",
             "eval.samples_per_prompt", "run.devices", "run.num_nodes")
_NON_NEGATIVE = ("run.checkpoint_every_n_steps", "judge.max_retries", "judge.parse_retries", "rollout.temperature", "eval.temperature", "pairs.min_margin",
                 "dpo.warmup_steps", "dpo.grad_clip", "dpo.sft_weight", "dpo.weight_decay", "toy.warmstart_steps")


def _leaves(tree, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _merge_errors(base: DictConfig, sources: list[tuple[str, DictConfig]]) -> list[str]:
    """Merge each source into `base` one leaf at a time, so every bad key is reported."""
    problems = []
    for where, src in sources:
        for dotted, value in _leaves(OmegaConf.to_container(src, resolve=False)):
            nested: object = value
            for part in reversed(dotted.split(".")):
                nested = {part: nested}
            try:
                base.merge_with(OmegaConf.create(nested))
            except OmegaConfBaseException as e:
                reason = str(e).splitlines()[0]
                if type(e).__name__ == "ConfigKeyError":
                    reason = "unknown key"
                problems.append(f"{dotted}: {reason} (from {where})")
    return problems


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
    problems = _merge_errors(base, sources)
    if base.toy.enabled:
        # The toy's model and pools live in the cache under a key of the toy settings; writing
        # the paths into the config makes the saved config.yaml say what was trained.
        from rdpo.warmstart import toy_paths

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


def validate(cfg: DictConfig) -> list[str]:
    """Every value problem of a merged config (missing required values, ranges, choices)."""
    problems = []
    for key in ("run.dir", "model.path", "data.train_pool"):
        parent, _, leaf = key.rpartition(".")
        if OmegaConf.is_missing(OmegaConf.select(cfg, parent), leaf):
            problems.append(f"{key}: missing required value")
    for key, choices in _CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in choices:
            problems.append(f"{key}: {value!r} is not one of {', '.join(choices)}")
    for key in _POSITIVE:
        if not OmegaConf.select(cfg, key) > 0:
            problems.append(f"{key}: must be > 0, got {OmegaConf.select(cfg, key)}")
    for key in _NON_NEGATIVE:
        if not OmegaConf.select(cfg, key) >= 0:
            problems.append(f"{key}: must be >= 0, got {OmegaConf.select(cfg, key)}")
    if cfg.run.deepspeed_stage not in (2, 3):
        problems.append(f"run.deepspeed_stage: {cfg.run.deepspeed_stage} is not one of 2, 3")
    if not 0 <= cfg.dpo.label_smoothing < 0.5:
        problems.append(f"dpo.label_smoothing: must be in [0, 0.5), got {cfg.dpo.label_smoothing}")
    if not 0 < cfg.rollout.top_p <= 1:
        problems.append(f"rollout.top_p: must be in (0, 1], got {cfg.rollout.top_p}")
    if not 0 <= cfg.toy.flaw_rate <= 1:
        problems.append(f"toy.flaw_rate: must be in [0, 1], got {cfg.toy.flaw_rate}")
    if cfg.judge.kind != "rule" and not cfg.judge.model:
        problems.append(f"judge.model: a {cfg.judge.kind} judge needs a model")
    if cfg.judge.kind == "openai" and not cfg.judge.base_url:
        problems.append("judge.base_url: an openai judge needs the server URL")
    if cfg.model.finetune == "full" and cfg.model.quantization != "none":
        problems.append("model.finetune: full fine-tuning cannot train 4-bit weights "
                        f"(model.quantization={cfg.model.quantization}); use lora (QLoRA)")
    if cfg.rollout.samples_per_prompt < 2:
        problems.append("rollout.samples_per_prompt: a pair needs at least 2 samples per prompt")
    return problems


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    Path(path).write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
