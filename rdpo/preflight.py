"""Preflight: every input of a run checked in a second, before anything heavy loads.

`check_inputs(cfg)` looks at the policy checkpoint, a transformers judge's checkpoint, the rubric
pools and the checkpoint to resume, and raises one `ConfigError` listing every problem; a held-out
prompt that repeats a training prompt is warned about (`contamination`). Without
it, a checkpoint path that does not exist is taken for a Hub id and retried for minutes, a
directory without a processor ends in a transformers traceback, and a missing pool is found only
after the model has loaded.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

from rdpo.config import Config, ConfigError

log = logging.getLogger("rdpo")
OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
HUB_TIMEOUT = 10.0
"""Seconds the one Hub lookup of a preflight may take (no retries)."""
MAX_POOL_PROBLEMS = 20
"""Problems listed per pool; `python -m rdpo.rubrics validate` lists them all."""

# What `from_pretrained` reads: the model config and weights, the processor's image processor
# (transformers 5 writes it inside processor_config.json, older checkpoints beside it) and a
# tokenizer. Each entry: what is missing, and the file names that would do.
_PROCESSOR = ("processor_config.json", "preprocessor_config.json")
_TOKENIZER = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")
# huggingface_hub's repo id rule: letters, digits, '_', '-', '.'; parts start and end with a
# letter or digit; no '--' or '..'; at most 96 characters a part.
_HUB_PART = r"(?!.*(?:--|\.\.))(?:\w|\w[\w.-]{0,94}\w)"
_HUB_ID = re.compile(rf"{_HUB_PART}/{_HUB_PART}", re.ASCII)
_HINT = "(a local checkpoint directory, or a Hub id org/name with the Hub reachable)"


class HubError(OSError):
    """A checkpoint could not be downloaded from the Hugging Face Hub (named by its config key)."""


def check_inputs(cfg: Config) -> None:
    """Raise one `ConfigError` naming every input of `cfg` that is missing or unusable.

    With `toy.enabled`, the paths the toy builds (`prepare_toy`, after this check) are skipped;
    a path set by hand beside the toy is checked like any other.
    """
    toy = _toy_paths(cfg)
    problems: list[str] = []
    if cfg.model.path != toy.get("model.path"):
        problems += _checkpoint_problems("model.path", cfg.model.path)
    if cfg.judge.kind == "transformers" and cfg.judge.model:
        problems += _checkpoint_problems("judge.model", cfg.judge.model)
    audit = cfg.judge.audit
    if audit is not None and audit.kind == "transformers" and audit.model:
        problems += _checkpoint_problems("judge.audit.model", audit.model)
    checked: dict[Path, list] = {}
    records: dict[str, list] = {}
    for key, value in (("data.train_pool", cfg.data.train_pool),
                       ("data.heldout_pool", cfg.data.heldout_pool)):
        if value is None or value == toy.get(key):
            continue
        if Path(value).resolve() in checked:  # one file for both pools: its problems once
            records[key] = checked[Path(value).resolve()]
            continue
        records[key], lines = _pool_problems(key, value, cfg)
        checked[Path(value).resolve()] = records[key]
        problems += lines
    if records.get("data.train_pool") and records.get("data.heldout_pool"):
        repeats = contamination(records["data.train_pool"], records["data.heldout_pool"])
        if repeats:
            log.warning("data.heldout_pool: %d of its %d prompts repeat a training prompt (same "
                        "instruction and image bytes), so the held-out score partly measures "
                        "prompts the policy trains on: %s%s; remove them from one of the pools",
                        len(repeats), len(records["data.heldout_pool"]),
                        ", ".join(f"{h.source} ({h.id}) = {t.source} ({t.id})"
                                  for h, t in repeats[:5]),
                        f" and {len(repeats) - 5} more" if len(repeats) > 5 else "")
    if cfg.run.resume not in ("none", "auto") and not Path(cfg.run.resume).exists():
        problems.append(f"run.resume: no such checkpoint: {cfg.run.resume} "
                        "(none, auto, or the path of a checkpoint)")
    if problems:
        raise ConfigError(problems)


@contextlib.contextmanager
def hub_errors(key: str, path: str) -> Iterator[None]:
    """Around a `from_pretrained(path)`: when `path` is read as a Hub id, a failed download
    becomes one `HubError` naming `key` and the id instead of a traceback."""
    try:
        yield
    except OSError as err:
        if Path(path).is_dir():
            raise
        raise HubError(f"{key}: could not download {path} from the Hugging Face Hub: "
                       f"{_first_line(err)} (download it beforehand, e.g. hf download {path} "
                       f"--local-dir DIR, and set {key}=DIR)") from err


def hub_offline() -> str | None:
    """The variable that turns the Hub off (``HF_HUB_OFFLINE=1``), or None."""
    for var in OFFLINE_VARS:
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{var}={os.environ[var]}"
    return None


def looks_like_hub_id(value: str) -> bool:
    """`org/name` with valid repo-id characters (a path like ./x, /x or a/b/c is not)."""
    return _HUB_ID.fullmatch(value) is not None


def _toy_paths(cfg: Config) -> dict[str, str]:
    if not cfg.toy.enabled:
        return {}
    from rdpo.demo.paths import toy_paths

    paths = toy_paths(cfg.toy)
    return {"model.path": str(paths.policy), "data.train_pool": str(paths.train_pool),
            "data.heldout_pool": str(paths.heldout_pool)}


def _checkpoint_problems(key: str, value: str) -> list[str]:
    path = Path(value).expanduser()
    if path.is_dir():
        return _missing_files(key, value, path)
    if path.exists():
        return [f"{key}: not a directory: {value} {_HINT}"]
    # "checkpoints/Qwen2.5-VL-7B-Instruct" is also a valid Hub id; with checkpoints/ present it
    # is meant as a local path.
    if not looks_like_hub_id(value) or Path(value.split("/")[0]).is_dir():
        return [f"{key}: no such directory: {value} {_HINT}"]
    offline = hub_offline()
    if offline:
        snapshot = _cached_snapshot(value)
        if snapshot is None:
            return [f"{key}: no such directory: {value}; as a Hub id it is not in the local "
                    f"Hugging Face cache, and the Hub is offline ({offline}) {_HINT}"]
        return _missing_files(key, value, snapshot)
    return _hub_problems(key, value)


def _hub_problems(key: str, repo_id: str) -> list[str]:
    """One metadata request, no retries: the repo exists and lists the files a checkpoint
    needs. Unreachable, it fails now rather than after minutes of download retries."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        info = HfApi().model_info(repo_id, timeout=HUB_TIMEOUT)
    except RepositoryNotFoundError:
        return [f"{key}: no such directory: {repo_id}, nor a Hub repo of that name (or it is "
                f"private and no token is set) {_HINT}"]
    except Exception as err:  # connection refused, DNS, timeout, HTTP 5xx: all unreachable
        cached = " (it is in the local cache: set HF_HUB_OFFLINE=1 to use that copy)" \
            if _cached_snapshot(repo_id) else ""
        return [f"{key}: no such directory: {repo_id}; as a Hub id it needs the Hub, which "
                f"cannot be reached ({type(err).__name__}: {_first_line(err)}){cached} {_HINT}"]
    if info.siblings is None:
        return []
    return _missing_files(key, repo_id, files={s.rfilename for s in info.siblings})


def _cached_snapshot(repo_id: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "config.json")
    return Path(found).parent if isinstance(found, str) else None


def _missing_files(key: str, value: str, path: Path | None = None, *,
                   files: set[str] | None = None) -> list[str]:
    """What a checkpoint (a directory, or a Hub repo's file list) lacks, on one line."""
    if files is None:
        files = {p.name for p in path.iterdir() if p.is_file()}  # follows the cache's symlinks
    missing = []
    if "config.json" not in files:
        missing.append("config.json")
    if not files & set(_PROCESSOR):
        missing.append(f"processor config ({' or '.join(_PROCESSOR)})")
    if not files & set(_TOKENIZER):
        missing.append(f"tokenizer ({', '.join(_TOKENIZER)})")
    if not any(f.endswith(".safetensors") or re.fullmatch(r"pytorch_model.*\.bin", f)
               for f in files):
        missing.append("weights (*.safetensors or pytorch_model*.bin)")
    elif path is not None:
        shards = _missing_shards(path)
        if shards:
            missing.append(f"weight shards {', '.join(shards)} (an interrupted download?)")
    if not missing:
        return []
    return [f"{key}: {value} is not a transformers checkpoint with its processor: no "
            + ", no ".join(missing)]


def _missing_shards(path: Path) -> list[str]:
    """Shards an index names that are not in `path`."""
    missing: set[str] = set()
    for index in path.glob("*.index.json"):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
            missing |= {s for s in shards if not (path / s).is_file()}
    return sorted(missing)


def contamination(train: Sequence, heldout: Sequence) -> list[tuple]:
    """(held-out record, training record) for every held-out prompt whose content
    (`rdpo.pool.PromptRecord.content_key`: instruction and image bytes) is a training prompt's,
    whatever their ids."""
    by_content = {r.content_key: r for r in train}
    return [(h, by_content[h.content_key]) for h in heldout if h.content_key in by_content]


def _pool_problems(key: str, value: str, cfg: Config) -> tuple[list, list[str]]:
    """The pool's good records, and its problems as `python -m rdpo.rubrics validate` prints
    them, key first (images checked with the run's data.max_image_pixels and
    data.allow_outside_paths)."""
    from rdpo.pool import check_pool

    path = Path(value)
    if not path.exists():
        return [], [f"{key}: no such file: {value}"]
    if not path.is_file():
        return [], [f"{key}: not a file: {value}"]
    records, problems = check_pool(value, max_pixels=cfg.data.max_image_pixels,
                                   allow_outside=cfg.data.allow_outside_paths)
    lines = [f"{key}: {p}" for p in problems[:MAX_POOL_PROBLEMS]]
    if len(problems) > MAX_POOL_PROBLEMS:
        lines.append(f"{key}: ... and {len(problems) - MAX_POOL_PROBLEMS} more problems "
                     f"(python -m rdpo.rubrics validate {value} lists them all)")
    return records, lines


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
