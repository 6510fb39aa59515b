"""Offline rubric-pool building: a generator model writes one checklist rubric per prompt.

Prompts (``id``, ``images``, ``instruction``, optional ``reference``) go to any chat backend;
each answer's JSON is validated with the pool schema (`rdpo.pool`), invalid output is asked for
again up to `attempts` times, and a record that still fails is written to the failures file,
never dropped silently. Records are appended to the output as soon as they are built (flushed
and fsynced), so an interrupted run loses at most the records in flight, and a re-run skips
every id already in the output.

What building cost goes beside the pool, in ``OUT.cost.json`` (rewritten atomically after each
chunk, added to by a re-run): per record the generator requests (attempts), prompt and
completion tokens (the server's ``usage``; a local model's own tokenizer) and seconds (its
requests' latencies), built or not; in total the same summed, the wall seconds of the build
runs and the mean per built record: the "rubric creation" side of a run's bill, beside what
labelling costs in the run's cost.json (`rdpo.cost`).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rdpo.judging.chat import ChatRequest, extract_json
from rdpo.pool import (
    PromptRecord,
    _Collector,
    check_id_and_instruction,
    check_images,
    check_rubric,
    jsonl_objects,
)

GENERATOR_TEMPLATE = """You write grading rubrics for answers to questions about images.

Question about the image(s) above: {instruction}
{reference}
Write a checklist that a grader can apply to any answer, criterion by criterion:
- "essential": the facts a correct answer must state (every one is required).
- "additional": nice-to-haves, each with a "weight" between 0.1 and 1.0, and pitfalls phrased as "Does not ..." (for example "Does not mention a dog.").
Each criterion has a short unique "id" (E1, E2, ... for essential; A1, A2, ... for additional) and a one-sentence "text" that can be checked from the answer and the image alone.
Answer with JSON only, in this shape:
{{"essential": [{{"id": "E1", "text": "..."}}], "additional": [{{"id": "A1", "text": "...", "weight": 0.5}}]}}"""

PROMPT_KEYS = frozenset({"id", "images", "instruction", "reference"})


@dataclass(frozen=True)
class PromptIn:
    """One input prompt; `images` absolute, `raw_images` as written in the input."""

    id: str
    images: tuple[Path, ...]
    instruction: str
    reference: str | None


def generator_prompt(p: PromptIn) -> str:
    ref = (f"Reference answer (use it to decide what is correct): {p.reference}\n"
           if p.reference else "")
    return GENERATOR_TEMPLATE.format(instruction=p.instruction, reference=ref)


def read_prompts(path: str | os.PathLike) -> list[PromptIn]:
    """Read and validate a prompts file; raise ValueError listing every FILE:LINE: field problem."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: prompts file not found")
    base, problems, out, seen = path.resolve().parent, [], [], {}
    for lineno, raw, report in jsonl_objects(path, problems):
        extra = sorted(set(raw) - PROMPT_KEYS - {"rubric", "outcome"})
        if extra:
            report("record", f"unknown key(s) {extra}; allowed: {', '.join(sorted(PROMPT_KEYS))}")
        check_id_and_instruction(raw, lineno, seen, report)
        ref = raw.get("reference")
        if ref is not None and not isinstance(ref, str):
            report("reference", f"must be a string, got {type(ref).__name__}")
        images = check_images(raw.get("images"), base, True, report)
        if not report.count:
            out.append(PromptIn(raw["id"], images, raw["instruction"], ref))
    if problems:
        raise ValueError("\n".join(str(p) for p in problems))
    return out


def parse_rubric(text: str) -> tuple[dict | None, list[str]]:
    """The generator's answer as a pool-schema rubric dict, or None and the problems found."""
    obj = extract_json(text, "essential")
    if obj is None:
        return None, ["no JSON object with an 'essential' list in the answer"]
    obj = {k: v for k, v in obj.items() if k in ("essential", "additional")}
    problems: list = []
    rubric = check_rubric(obj, _Collector("<generator>", 0, problems))
    if rubric is None:
        return None, [f"{p.field}: {p.message}" for p in problems]
    return rubric.to_json(), []


@dataclass
class BuildSummary:
    """What a build run did."""

    records: int
    skipped: int
    built: int
    failed: list[str] = field(default_factory=list)
    criteria_per_record: list[int] = field(default_factory=list)
    failures_file: Path | None = None
    cost_file: Path | None = None
    cost: dict = field(default_factory=dict)
    """The total of `cost_file` (`BuildCost.document`)."""

    def text(self) -> str:
        c = self.criteria_per_record
        per = (f"criteria per built record: min {min(c)}, mean {statistics.mean(c):.1f}, "
               f"max {max(c)}" if c else "no record built")
        lines = [f"{self.records} prompts: {self.skipped} already built, {self.built} built, "
                 f"{len(self.failed)} failed; {per}"]
        if self.failed:
            lines.append(f"failed ids listed in {self.failures_file}")
        if self.cost:
            c = self.cost
            lines.append(f"generator: {c['requests']} requests, {c['prompt_tokens']} prompt + "
                         f"{c['completion_tokens']} completion tokens, {c['wall_seconds']:.1f} s "
                         f"in all builds ({self.cost_file})")
        return "\n".join(lines)


class BuildCost:
    """``OUT.cost.json``: per record and in total, what the generator was asked (see the module
    docstring); an existing file is continued."""

    KEYS = ("requests", "prompt_tokens", "completion_tokens", "seconds")

    def __init__(self, path: Path):
        self.path = path
        try:
            old = json.loads(path.read_text()) if path.is_file() else {}
        except ValueError as err:
            raise ValueError(f"{path}: not the JSON a build wrote ({err}); move it away to "
                             "count the build's cost afresh") from None
        self.records: dict[str, dict] = old.get("records", {})
        self.wall_seconds = float(old.get("total", {}).get("wall_seconds", 0.0))

    def add(self, record_id: str, used, built: bool) -> None:
        """One request for `record_id` (`used`: its `rdpo.judging.chat.RequestUsage`, None
        when the backend does not report one)."""
        r = self.records.setdefault(record_id, {**dict.fromkeys(self.KEYS, 0), "built": False})
        r["requests"] += 1
        if used is not None:
            r["prompt_tokens"] += used.prompt_tokens
            r["completion_tokens"] += used.completion_tokens
            r["seconds"] = round(r["seconds"] + used.seconds, 6)
        r["built"] = r["built"] or built

    def document(self) -> dict:
        total = {k: sum(r[k] for r in self.records.values()) for k in self.KEYS}
        built = sum(r["built"] for r in self.records.values())
        total |= {"records": len(self.records), "built": built,
                  "wall_seconds": round(self.wall_seconds, 3),
                  "per_built_record": {k: total[k] / built for k in self.KEYS} if built else None}
        return {"records": self.records, "total": total}

    def write(self, wall_seconds: float = 0.0) -> None:
        from rdpo.rundir import atomic_write

        self.wall_seconds += wall_seconds
        atomic_write(self.path, json.dumps(self.document(), indent=1) + "\n")


def _done_ids(out: Path) -> set[str]:
    """Ids already in the output; a torn last line (interrupted write) is cut off."""
    if not out.exists():
        return set()
    data = out.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        with out.open("r+b") as f:
            f.truncate(cut)
        data = data[:cut]
    ids = set()
    for lineno, line in enumerate(data.decode("utf-8").splitlines(), 1):
        if line.strip():
            try:
                ids.add(json.loads(line)["id"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"{out}:{lineno}: existing output line is not a pool record; "
                                 "fix or remove it before resuming") from None
    return ids


def build_pool(input_path: str | os.PathLike, out_path: str | os.PathLike, chat, *,
               failures: str | os.PathLike | None = None, attempts: int = 3,
               progress: bool = True) -> BuildSummary:
    """Build (or resume building) a rubric pool; see the module docstring."""
    from tqdm.auto import tqdm

    prompts = read_prompts(input_path)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fail_path = Path(failures) if failures else out.with_name(out.name + ".failures.jsonl")
    done = _done_ids(out)
    todo = [p for p in prompts if p.id not in done]
    summary = BuildSummary(len(prompts), len(prompts) - len(todo), 0, failures_file=fail_path,
                           cost_file=out.with_name(out.name + ".cost.json"))
    fail_path.unlink(missing_ok=True)  # it lists the failures of the latest run only
    cost = BuildCost(summary.cost_file)
    usage = getattr(chat, "usage", None)
    clock = time.perf_counter()
    # As many records in flight as the backend runs at once, so a remote server stays busy.
    step = max(1, getattr(chat, "concurrency", getattr(chat, "batch_size", 1)))
    out_dir = out.resolve().parent
    bar = tqdm(total=len(todo), desc="rubrics", unit="prompt", disable=not progress)
    with out.open("a", encoding="utf-8") as f_out:
        for start in range(0, len(todo), step):
            chunk = todo[start:start + step]
            pending = {p.id: p for p in chunk}
            last: dict[str, tuple[str, list[str]]] = {}
            results: dict[str, dict] = {}
            for _ in range(attempts):
                if not pending:
                    break
                batch = list(pending.values())
                answers = chat.complete([ChatRequest(p.images, generator_prompt(p)) for p in batch])
                used = list(usage.last) if usage is not None else [None] * len(batch)
                for p, answer, spent in zip(batch, answers, used, strict=True):
                    rubric, problems = parse_rubric(answer)
                    cost.add(p.id, spent, rubric is not None)
                    if rubric is None:
                        last[p.id] = (answer, problems)
                    else:
                        results[p.id] = rubric
                        del pending[p.id]
            for p in chunk:
                if p.id in results:
                    rec = {"id": p.id,
                           "images": [os.path.relpath(i, out_dir) for i in p.images],
                           "instruction": p.instruction}
                    if p.reference is not None:
                        rec["reference"] = p.reference
                    rec["rubric"] = results[p.id]
                    f_out.write(json.dumps(rec, ensure_ascii=False) + "\n")
                    summary.built += 1
                    summary.criteria_per_record.append(
                        len(rec["rubric"]["essential"]) + len(rec["rubric"]["additional"]))
                else:
                    answer, problems = last[p.id]
                    with fail_path.open("a", encoding="utf-8") as f_fail:
                        f_fail.write(json.dumps({"id": p.id, "attempts": attempts,
                                                 "problems": problems,
                                                 "last_answer": answer[:2000]}) + "\n")
                    summary.failed.append(p.id)
            f_out.flush()
            os.fsync(f_out.fileno())
            now = time.perf_counter()
            cost.write(now - clock)
            clock = now
            bar.update(len(chunk))
    bar.close()
    if not todo:
        cost.write()
    summary.cost = cost.document()["total"]
    return summary


def _dist(values: Sequence[float]) -> dict:
    hist = Counter(values)
    return {"min": min(values, default=0), "mean": statistics.mean(values) if values else 0.0,
            "max": max(values, default=0),
            "histogram": {str(k): hist[k] for k in sorted(hist)}}


def pool_stats(records: Sequence[PromptRecord]) -> dict:
    """Counts and distributions of a pool's criteria (JSON-ready)."""
    criteria = [c for r in records for c in r.rubric.criteria()]
    return {
        "records": len(records),
        "images_per_record": _dist([len(r.images) for r in records]),
        "essential_per_record": _dist([len(r.rubric.essential) for r in records]),
        "additional_per_record": _dist([len(r.rubric.additional) for r in records]),
        "criteria_per_record": _dist([len(r.rubric.criteria()) for r in records]),
        "additional_weight": _dist([c.weight for r in records for c in r.rubric.additional]),
        "pitfalls": sum(c.text.lower().startswith(("does not", "doesn't", "do not"))
                        for c in criteria),
        "with_checks": sum(c.check is not None for c in criteria),
        "with_reference": sum(r.reference is not None for r in records),
        "with_outcome": sum(r.outcome is not None for r in records),
    }
