"""The rubric pool: one prompt per JSON line, with its images, instruction and rubric.

The pool is written once, offline, and read at the start of every run, so loading validates
everything and reports every problem in the file at once (file, line and field), rather than
stopping at the first one or silently dropping bad records.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from PIL import Image

RECORD_KEYS = frozenset({"id", "images", "video", "instruction", "reference", "rubric", "outcome"})
OUTCOME_KEYS = frozenset({"check", "text"})
RUBRIC_KEYS = frozenset({"essential", "additional"})
CRITERION_KEYS = frozenset({"id", "text", "weight", "check"})
CHECK_KEYS = ("any", "all", "none")
MAX_IMAGE_PIXELS = 89_478_485
"""Default bound on an image's width × height (`data.max_image_pixels`): PIL's own
``Image.MAX_IMAGE_PIXELS``, above which PIL warns of a decompression bomb (and refuses at twice
it)."""
OUTSIDE_SETTING = "data.allow_outside_paths"
"""The setting that lets a pool name files outside its folder."""
PIXELS_SETTING = "data.max_image_pixels"
"""The setting that bounds an image's pixels."""


@dataclass(frozen=True)
class Criterion:
    """One rubric item; `check` holds optional regexes that only `RuleJudge` reads."""

    id: str
    text: str
    weight: float = 1.0
    check: dict | None = None


@dataclass(frozen=True)
class Rubric:
    """Essential criteria (a good answer meets all) and weighted additional ones."""

    essential: tuple[Criterion, ...]
    additional: tuple[Criterion, ...]

    def criteria(self) -> tuple[Criterion, ...]:
        """All criteria, essential first."""
        return self.essential + self.additional

    def to_json(self) -> dict:
        """The rubric in the pool's JSONL shape (essential criteria carry no weight)."""

        def item(c: Criterion, weighted: bool) -> dict:
            out: dict[str, Any] = {"id": c.id, "text": c.text}
            if weighted:
                out["weight"] = c.weight
            if c.check is not None:
                out["check"] = {k: list(v) for k, v in c.check.items()}
            return out

        return {
            "essential": [item(c, False) for c in self.essential],
            "additional": [item(c, True) for c in self.additional],
        }


@dataclass(frozen=True)
class PromptRecord:
    """One prompt of the pool; `images` are absolute, `source` is "FILE:LINE"."""

    id: str
    images: tuple[Path, ...]
    instruction: str
    rubric: Rubric
    reference: str | None = None
    source: str = ""
    outcome: dict | None = None
    """Optional coarse check of the main answer (`check` syntax): the outcome baseline's verdict."""
    video: tuple[Path, ...] = ()
    """Frames of one video, in order (absolute), shown after the images (Qwen-VL families)."""

    @property
    def visuals(self) -> tuple[Path, ...]:
        """What a judge is shown: the images, then the video's frames."""
        return self.images + self.video

    @cached_property
    def content_key(self) -> str:
        """sha256 of what the policy is shown: the instruction and the bytes of every image and
        video frame (not their paths), computed once per record. The key of every cache of
        encoded prompts and image features: two pools may both number their records from 0,
        and the same content under two ids is the same prompt."""
        h = hashlib.sha256()
        for part in (self.instruction, str(len(self.images)), *map(file_digest, self.images),
                     str(len(self.video)), *map(file_digest, self.video)):
            h.update(part.encode("utf-8"))
            h.update(b"\0")  # separator: ("ab", "c") and ("a", "bc") must not collide
        return h.hexdigest()


_DIGESTS: dict[tuple, str] = {}


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes (memoised by path, size and modification time)."""
    st = os.stat(path)
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


@dataclass(frozen=True)
class Problem:
    """One validation problem, located by file, 1-based line and field path."""

    file: str
    line: int
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.field}: {self.message}"


class PoolError(ValueError):
    """A pool with problems; `.problems` lists every one of them."""

    def __init__(self, problems: list[Problem]):
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class _Collector:
    """Problems of one line, so validators can report and carry on."""

    def __init__(self, file: str, line: int, problems: list[Problem]):
        self.file, self.line, self.problems = file, line, problems
        self.count = 0

    def __call__(self, field: str, message: str) -> None:
        self.problems.append(Problem(self.file, self.line, field, message))
        self.count += 1


def _nonempty_str(value: Any) -> bool:
    return isinstance(value, str) and value.strip() != ""


def jsonl_objects(path: Path, problems: list[Problem]) -> Iterator[tuple[int, dict, _Collector]]:
    """(line number, object, the line's reporter) for each non-blank line of a JSON Lines file;
    a line that is not UTF-8, not JSON or not an object is reported to `problems` and skipped."""
    for lineno, raw_line in enumerate(path.read_bytes().splitlines(), 1):
        report = _Collector(str(path), lineno, problems)
        try:
            line = raw_line.decode("utf-8")
        except UnicodeDecodeError as err:
            report("json", f"not UTF-8: {err}")
            continue
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as err:
            report("json", f"invalid JSON: {err}")
            continue
        if not isinstance(raw, dict):
            report("record", f"must be a JSON object, got {type(raw).__name__}")
            continue
        yield lineno, raw, report


def check_id_and_instruction(raw: dict, lineno: int, seen: dict[str, int], report: _Collector) -> None:
    """`id` and `instruction` are non-empty strings and `id` is new (`seen`: id -> first line)."""
    for key in ("id", "instruction"):
        if not _nonempty_str(raw.get(key)):
            report(key, "missing or not a non-empty string")
    rid = raw.get("id")
    if _nonempty_str(rid):
        if rid in seen:
            report("id", f"duplicate id {rid!r} (first on line {seen[rid]})")
        else:
            seen[rid] = lineno


def _unknown_keys(obj: dict, allowed: frozenset | tuple, field: str, report: _Collector) -> None:
    extra = sorted(set(obj) - set(allowed))
    if extra:
        report(
            field,
            f"unknown key(s) {', '.join(map(repr, extra))}; allowed: {', '.join(sorted(allowed))}",
        )


def _check_check(check: Any, field: str, report: _Collector) -> dict | None:
    if not isinstance(check, dict):
        report(
            field, f"must be an object with keys {'/'.join(CHECK_KEYS)}, got {type(check).__name__}"
        )
        return None
    _unknown_keys(check, CHECK_KEYS, field, report)
    if not check:
        report(field, f"is empty; give at least one of {', '.join(CHECK_KEYS)}")
    before = report.count
    out = {}
    for key in CHECK_KEYS:
        if key not in check:
            continue
        patterns = check[key]
        if not isinstance(patterns, list) or not patterns:
            report(f"{field}.{key}", "must be a non-empty list of regex strings")
            continue
        for i, pattern in enumerate(patterns):
            if not isinstance(pattern, str):
                report(f"{field}.{key}[{i}]", f"must be a string, got {type(pattern).__name__}")
                continue
            try:
                # Compile with the flags RuleJudge uses, so validation and judging agree.
                re.compile(pattern, re.IGNORECASE)
            except re.error as err:
                report(f"{field}.{key}[{i}]", f"invalid regex {pattern!r}: {err}")
        out[key] = tuple(patterns)
    return out if report.count == before else None


def _check_criterion(raw: Any, field: str, essential: bool, report: _Collector) -> Criterion | None:
    if not isinstance(raw, dict):
        report(field, f"must be an object, got {type(raw).__name__}")
        return None
    before = report.count
    _unknown_keys(raw, CRITERION_KEYS, field, report)
    for key in ("id", "text"):
        if key not in raw:
            report(f"{field}.{key}", "missing")
        elif not _nonempty_str(raw[key]):
            report(f"{field}.{key}", "must be a non-empty string")
    weight = raw.get("weight", 1.0)
    # bool is an int subclass: `"weight": true` is a typo, not a weight of 1.
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        report(f"{field}.weight", f"must be a number, got {type(weight).__name__}")
    elif not math.isfinite(weight) or weight <= 0:
        report(f"{field}.weight", f"must be a finite number > 0, got {weight}")
    elif essential and weight != 1.0:
        # Essential criteria are all-or-nothing; a weight there would be silently meaningless.
        report(f"{field}.weight", f"essential criteria are unweighted (1.0), got {weight}")
    check = None
    if raw.get("check") is not None:  # null reads as "no check", like an absent key
        check = _check_check(raw["check"], f"{field}.check", report)
    if report.count > before:
        return None
    return Criterion(id=raw["id"], text=raw["text"], weight=float(weight), check=check)


def check_rubric(raw: Any, report: _Collector) -> Rubric | None:
    """A record's ``rubric`` object as a `Rubric`, or None with its problems reported."""
    if not isinstance(raw, dict):
        report("rubric", f"must be an object, got {type(raw).__name__}")
        return None
    before = report.count
    _unknown_keys(raw, RUBRIC_KEYS, "rubric", report)
    groups: dict[str, list[Criterion | None]] = {"essential": [], "additional": []}
    for name in ("essential", "additional"):
        items = raw.get(name, [] if name == "additional" else None)
        if items is None and name == "essential":
            report("rubric.essential", "missing; a rubric needs at least one essential criterion")
            continue
        if not isinstance(items, list):
            report(f"rubric.{name}", f"must be a list, got {type(items).__name__}")
            continue
        if name == "essential" and not items:
            report("rubric.essential", "is empty; a rubric needs at least one essential criterion")
        for i, item in enumerate(items):
            groups[name].append(
                _check_criterion(item, f"rubric.{name}[{i}]", name == "essential", report)
            )
    seen: dict[str, str] = {}
    for name, items in groups.items():
        for i, c in enumerate(items):
            if c is None:
                continue
            if c.id in seen:
                report(
                    f"rubric.{name}[{i}].id",
                    f"duplicate criterion id {c.id!r} (first at {seen[c.id]})",
                )
            else:
                seen[c.id] = f"rubric.{name}[{i}]"
    if report.count > before:
        return None
    return Rubric(essential=tuple(groups["essential"]), additional=tuple(groups["additional"]))


def _check_outcome(raw: Any, report: _Collector) -> dict | None:
    """`{"check": {...}, "text": optional}`: one coarse rule for the outcome baseline."""
    if not isinstance(raw, dict):
        report("outcome", f"must be an object with a 'check', got {type(raw).__name__}")
        return None
    _unknown_keys(raw, OUTCOME_KEYS, "outcome", report)
    if "text" in raw and not _nonempty_str(raw["text"]):
        report("outcome.text", "must be a non-empty string")
    if "check" not in raw:
        report("outcome.check", "missing")
        return None
    return _check_check(raw["check"], "outcome.check", report)


def check_images(
    raw: Any, base: Path, open_images: bool, report: _Collector, key: str = "images", *,
    max_pixels: int = MAX_IMAGE_PIXELS, allow_outside: bool = False
) -> tuple[Path, ...] | None:
    """A record's ``images`` (or the `key` list, e.g. ``video`` frames; paths relative to `base`)
    as resolved paths, or None with its problems reported. `open_images` also checks each file:
    inside `base` once symlinks are resolved (unless `allow_outside`), a readable image of at
    most `max_pixels` pixels (read from its header, before anything is decoded)."""
    if not isinstance(raw, list) or not raw:
        report(key, "must be a non-empty list of image paths")
        return None
    before = report.count
    paths = []
    for i, item in enumerate(raw):
        if not _nonempty_str(item):
            report(f"{key}[{i}]", "must be a non-empty string")
            continue
        path = (base / item).resolve()
        paths.append(path)
        if not open_images:
            continue
        if not allow_outside and not path.is_relative_to(base):
            # An absolute path, '..' or a symlink out of the folder: a pool from elsewhere could
            # otherwise have any readable file encoded, or sent to a remote judge.
            report(f"{key}[{i}]", f"{item} is outside the pool's folder {base} (as {path}); "
                                  f"move it under that folder, or set {OUTSIDE_SETTING}=true")
            continue
        if not path.is_file():
            report(f"{key}[{i}]", f"file not found: {path}")
            continue
        try:
            # PIL warns above its limit and raises at twice it (`allow_pixels`): the bound
            # here is the one reported.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                im = Image.open(path)
            with im:
                width, height = im.size
                if width * height > max_pixels:
                    report(f"{key}[{i}]", _too_large(path, f"{width}x{height} = "
                                          f"{width * height:,} pixels", max_pixels))
                    continue
                im.verify()
        except Image.DecompressionBombError as err:
            report(f"{key}[{i}]", _too_large(path, f"too large for PIL ({err})", max_pixels))
        except Exception as err:  # PIL raises many types for corrupt files
            report(f"{key}[{i}]", f"unreadable image {path}: {err}")
    return tuple(paths) if report.count == before else None


def _too_large(path: Path, size: str, max_pixels: int) -> str:
    return (f"image {path} is {size}, above the bound of {max_pixels:,} pixels (a decompression "
            f"bomb?); downscale it, or raise {PIXELS_SETTING}")


def allow_pixels(max_pixels: int) -> None:
    """Raise PIL's own decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``, process-wide) to
    `max_pixels` when it is lower, so every later open (processor, judge) accepts the images
    validation accepted; a lower bound is enforced by validation alone."""
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels


def _check_record(raw: dict, lineno: int, seen: dict[str, int], base: Path, open_images: bool,
                  report: _Collector, **files) -> PromptRecord | None:
    _unknown_keys(raw, RECORD_KEYS, "record", report)
    # Ids of broken records are tracked too, so a duplicate is caught whichever copy is bad.
    check_id_and_instruction(raw, lineno, seen, report)
    # A record shows images, a video (its frames), or both; "images": [] is fine beside a video.
    if "rubric" not in raw:
        report("rubric", "missing")
    if "images" not in raw and "video" not in raw:
        report("images", "missing (or give a video)")
    video = (check_images(raw["video"], base, open_images, report, "video", **files)
             if "video" in raw else ())
    images = ()
    if "images" in raw and not (raw["images"] == [] and "video" in raw):
        images = check_images(raw["images"], base, open_images, report, **files)
    rubric = check_rubric(raw["rubric"], report) if "rubric" in raw else None
    reference = raw.get("reference")
    if reference is not None and not isinstance(reference, str):
        report("reference", f"must be a string, got {type(reference).__name__}")
    outcome = None
    if raw.get("outcome") is not None:
        outcome = _check_outcome(raw["outcome"], report)
    if report.count or images is None or video is None or rubric is None:
        return None
    return PromptRecord(
        id=raw["id"],
        images=images,
        video=video,
        instruction=raw["instruction"],
        rubric=rubric,
        reference=reference,
        source=f"{report.file}:{report.line}",
        outcome=outcome,
    )


def check_pool(
    path: str | os.PathLike, *, open_images: bool = True, max_pixels: int = MAX_IMAGE_PIXELS,
    allow_outside: bool = False
) -> tuple[list[PromptRecord], list[Problem]]:
    """Validate a pool file; return its good records and every problem found.

    Records with problems are left out of the first list, so callers that train must use
    `load_pool`, which refuses a pool with any problem. An empty pool is a problem too.
    `open_images` checks the files too (`check_images`: inside the pool's folder unless
    `allow_outside`, readable, at most `max_pixels` pixels); without it only the records'
    structure is checked, nothing about the files they name.
    """
    path = Path(path)
    file = str(path)
    if not path.is_file():
        return [], [Problem(file, 0, "file", "pool file not found")]
    base = path.resolve().parent
    records: list[PromptRecord] = []
    problems: list[Problem] = []
    seen: dict[str, int] = {}
    if open_images:
        allow_pixels(max_pixels)
    try:
        for lineno, raw, report in jsonl_objects(path, problems):
            record = _check_record(raw, lineno, seen, base, open_images, report,
                                   max_pixels=max_pixels, allow_outside=allow_outside)
            if record is not None:
                records.append(record)
    except OSError as err:
        return [], [Problem(file, 0, "file", f"cannot read pool file: {err}")]
    if not records and not problems:
        problems.append(Problem(file, 0, "file", "pool has no records"))
    return records, problems


def load_pool(path: str | os.PathLike, *, open_images: bool = True,
              max_pixels: int = MAX_IMAGE_PIXELS, allow_outside: bool = False
              ) -> list[PromptRecord]:
    """Load a pool (`check_pool`), raising `PoolError` listing every problem if there is any."""
    records, problems = check_pool(path, open_images=open_images, max_pixels=max_pixels,
                                   allow_outside=allow_outside)
    if problems:
        raise PoolError(problems)
    return records


def load_images(record: PromptRecord, paths: tuple[Path, ...] | None = None) -> list[Image.Image]:
    """Open a record's images (or `paths`, e.g. ``record.video``) as RGB (fully loaded, files
    closed)."""
    images = []
    for path in record.images if paths is None else paths:
        with Image.open(path) as im:
            images.append(im.convert("RGB"))
    return images


def write_pool(path: str | os.PathLike, records_as_dicts: Iterable[dict]) -> None:
    """Write records as JSON Lines; the file is replaced only once fully written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for record in records_as_dicts:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    # Atomic rename: a crash mid-build never leaves a truncated pool behind.
    os.replace(tmp, path)
