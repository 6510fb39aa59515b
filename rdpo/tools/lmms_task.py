"""An lmms-eval task over a rubric pool: score an exported policy in lmms-eval as rdpo does.

`write_task` writes a folder that ``python -m lmms_eval --include_path DIR --tasks NAME`` runs
offline: ``NAME.yaml`` (``dataset_path: json`` over a local ``docs.jsonl``: id, absolute image
paths, instruction), ``task.json`` (the pool, the toy settings) and ``utils.py``, which only
imports the functions below, so the metric lmms-eval reports is rdpo's own code:

- ``rubric_score``: the rubric's own checks (`rdpo.judging.judges.RuleJudge`) aggregated by
  `rdpo.judging.scoring`, as the held-out evaluation of a run with ``judge.kind=rule``;
- ``truth_score``, ``truth_correct`` (toy pools only): the toy's ground truth
  (`rdpo.demo.truth`), the yardstick of the quickstart's held-out evaluation.

Generation is greedy with the run's ``rollout.max_new_tokens``: what the policy was trained to
answer within. The images are given to lmms-eval as opened by rdpo (RGB, as on disk).
This module imports nothing heavy: lmms-eval imports it through utils.py.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from functools import cache
from pathlib import Path

UTILS = '''"""Written by rdpo.tools.lmms_task.write_task: the task's functions are rdpo's."""
from pathlib import Path

from rdpo.tools.lmms_task import doc_to_text, doc_to_visual, task_scorer

process_results = task_scorer(Path(__file__).with_name("task.json"))
'''


def write_task(out_dir: str | Path, pool: str | Path, *, name: str, max_new_tokens: int,
               toy=None, aggregation: str = "lexicographic", limit: int | None = None) -> Path:
    """Write the lmms-eval task `name` over `pool` into `out_dir`; returns the YAML's path.

    `toy`: the run's `ToyConfig` when the pool is the toy's (adds the ground-truth metrics).
    `limit`: only the pool's first prompts (lmms-eval's ``--limit`` does the same at run time).
    """
    from rdpo.pool import load_pool

    records = load_pool(pool)[:limit]
    if toy is not None:
        from rdpo.demo.truth import GroundTruth

        GroundTruth.for_toy(toy).check_records(records)  # the pool is that toy's draw
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "docs.jsonl").open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps({"id": r.id, "images": [str(p) for p in r.images],
                                "instruction": r.instruction}) + "\n")
    settings = {"pool": str(Path(pool).resolve()), "aggregation": aggregation,
                "toy": asdict(toy) if toy is not None else None}
    (out / "task.json").write_text(json.dumps(settings, indent=2) + "\n")
    (out / "utils.py").write_text(UTILS)
    metrics = ["rubric_score", *(("truth_score", "truth_correct") if toy is not None else ())]
    yaml = out / f"{name}.yaml"
    yaml.write_text("\n".join([
        f"task: {name}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {json.dumps(str((out / 'docs.jsonl').resolve()))}",
        "test_split: test",
        "output_type: generate_until",
        "doc_to_visual: !function utils.doc_to_visual",
        "doc_to_text: !function utils.doc_to_text",
        'doc_to_target: ""',
        "process_results: !function utils.process_results",
        "generation_kwargs:",
        f"  max_new_tokens: {max_new_tokens}",
        "  temperature: 0",
        "  do_sample: false",
        "  num_beams: 1",
        "metric_list:",
        *[line for m in metrics for line in (f"  - metric: {m}", "    aggregation: mean",
                                             "    higher_is_better: true")],
        f"metadata:\n  source: rdpo.tools.lmms_task ({Path(pool).name}, {len(records)} prompts)",
    ]) + "\n")
    return yaml


def doc_to_visual(doc: dict) -> list:
    """The prompt's images, opened as rdpo opens them (`rdpo.pool.load_images`)."""
    from PIL import Image

    images = []
    for path in doc["images"]:
        with Image.open(path) as im:
            images.append(im.convert("RGB"))
    return images


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    """The instruction as it is: rdpo adds no pre- or post-prompt."""
    return doc["instruction"]


class Scorer:
    """rdpo's scores of answers to a pool's prompts: the rubric score of the rubric's own
    checks, and the toy's ground truth when `toy` (a `ToyConfig`) is given."""

    def __init__(self, pool: str | Path, toy=None, aggregation: str = "lexicographic"):
        from rdpo.pool import load_pool

        self.records = {r.id: r for r in load_pool(pool)}
        self.aggregation = aggregation
        self.truth = None
        if toy is not None:
            from rdpo.demo.truth import GroundTruth

            self.truth = GroundTruth.for_toy(toy)

    def score(self, record_id: str, answer: str) -> dict[str, float]:
        from rdpo.judging.judges import RuleJudge
        from rdpo.judging.scoring import score_response

        record = self.records[record_id]
        verdicts = RuleJudge().judge(record, [answer])[0]
        out = {"rubric_score": score_response(record.rubric, verdicts, self.aggregation).value}
        if self.truth is not None:
            t = self.truth.check(record_id, answer)
            out |= {"truth_score": t.score, "truth_correct": float(t.correct)}
        return out

    def mean(self, answers: Sequence[tuple[str, str]]) -> dict[str, float]:
        """Mean of each score over (record id, answer) pairs, as lmms-eval aggregates them."""
        scores = [self.score(rid, a) for rid, a in answers]
        return {k: sum(s[k] for s in scores) / len(scores) for k in scores[0]} if scores else {}


@cache
def _scorer(task_json: str) -> Scorer:
    from rdpo.config import ToyConfig

    settings = json.loads(Path(task_json).read_text())
    toy = ToyConfig(**settings["toy"]) if settings["toy"] else None
    return Scorer(settings["pool"], toy, settings["aggregation"])


def task_scorer(task_json: str | Path):
    """lmms-eval's ``process_results(doc, results)`` for the task written in task.json's folder."""

    def process_results(doc: dict, results: list) -> dict[str, float]:
        answer = results[0]
        answer = getattr(answer, "text", answer)  # a GenerationResult or a str
        return _scorer(str(task_json)).score(doc["id"], answer.strip())

    return process_results
