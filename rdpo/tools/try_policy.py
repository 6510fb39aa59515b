"""Try a policy: sample answers for an image and a prompt, and judge them against a rubric.

    python -m rdpo.generate --run RUN_DIR --image IMG --prompt TEXT [--samples K]
    python -m rdpo.generate --run RUN_DIR --rubric POOL.jsonl --id ID      (the record's image
                                                                            and instruction)
    python -m rdpo.generate --model DIR ...        (an exported or any transformers VLM folder)

``--run`` loads the run's policy as it trained (base as model.* says, the LoRA adapter on it,
or the full fine-tuned model) and samples with the run's rollout settings through the
rollouts' own code (`rdpo.rollout.generate`). With a rubric (``--rubric`` and ``--id``), each
answer is judged as the run judged (judge.*; a rule judge exactly, without simulated noise)
and printed with its per-criterion verdicts and score. ``--model DIR`` samples with the default
rollout settings and judges with the rubric's own checks (RuleJudge). A LoRA adapter is
loaded only on the base it was trained on (its rdpo_adapter.json; ``--allow-base-mismatch``
loads it anyway).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

from rdpo import console
from rdpo.config import ConfigError, RolloutConfig
from rdpo.pool import PoolError, PromptRecord, Rubric, load_pool

log = logging.getLogger("rdpo")

VERDICT = {True: "met", False: "NOT met", None: "unknown"}


def load_run_policy(run_dir: str | Path, device: str = "cpu", *,
                    allow_base_mismatch: bool = False):
    """(policy, processor, config) of a finished run, loaded as it trained; a LoRA run's base
    must be the one its adapter was trained on (`rdpo.tools.export.check_base`)."""
    from rdpo.model import load_base, load_processor
    from rdpo.tools.export import check_base, find_weights

    run = find_weights(run_dir)
    if run.kind == "model":
        from dataclasses import replace

        model = load_base(replace(run.cfg.model, path=str(run.weights)))
    else:
        from peft import PeftModel

        base = load_base(run.cfg.model)
        check_base(run.weights, base, run.cfg.model.path, allow=allow_base_mismatch)
        model = PeftModel.from_pretrained(base, run.weights)
    if device != "cpu":  # a 4-bit (nf4) base is placed by bitsandbytes on load; it cannot move
        model = model.to(device)
    return model.eval(), load_processor(str(run.weights)), run.cfg


def load_model(path: str | Path, device: str = "cpu", *, allow_base_mismatch: bool = False):
    """(model, processor) of a transformers VLM folder (an export, or an adapter folder with
    adapter_config.json naming its base, checked against its rdpo_adapter.json if any)."""
    import json

    import torch
    from transformers import AutoModelForImageTextToText

    from rdpo.model import ADAPTER_INFO, load_processor
    from rdpo.tools.export import check_base

    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    if (Path(path) / ADAPTER_INFO).is_file():
        base = json.loads((Path(path) / "adapter_config.json").read_text())
        check_base(path, model, base.get("base_model_name_or_path"), allow=allow_base_mismatch)
    return model.to(device).eval(), load_processor(str(path))


def prompt_record(image: str | None, prompt: str | None, pool: str | None = None,
                  record_id: str | None = None) -> PromptRecord:
    """The prompt to answer: the pool record `record_id` (its rubric; `image` and `prompt`
    replace its own when given), or a rubric-less record of `image` and `prompt`."""
    if pool is not None:
        records = {r.id: r for r in load_pool(pool)}
        if record_id not in records:
            raise ValueError(f"--id {record_id!r}: no such record in {pool} "
                             f"({len(records)} records, e.g. {next(iter(records), 'none')})")
        record = records[record_id]
        if image is not None:
            record = dataclasses.replace(record, images=(Path(image).resolve(),), video=())
        if prompt is not None:
            record = dataclasses.replace(record, instruction=prompt)
        return record
    if image is None or prompt is None:
        raise ValueError("give --image and --prompt (or --rubric POOL --id ID)")
    if not Path(image).is_file():
        raise ValueError(f"--image {image}: no such file")
    return PromptRecord("prompt", (Path(image).resolve(),), prompt, Rubric((), ()))


def sample(model, processor, record: PromptRecord, settings: RolloutConfig, k: int, seed: int):
    """K answers to `record` (a `rdpo.rollout.Rollout`), as a round samples them."""
    import torch

    from rdpo.rollout import generate

    torch.manual_seed(seed)
    return next(iter(generate(model, processor, [record], settings, num_samples=k)))


def report(rollout, judge=None, aggregation: str = "lexicographic") -> str:
    """The answers as text; with `judge`, each answer's verdicts and score, then the mean."""
    from rdpo.rounds import score_rollouts

    record = rollout.record
    scored = (score_rollouts(judge, [rollout], aggregation, strategy="rubric")[0]
              if judge is not None else None)
    lines = []
    for i, text in enumerate(rollout.responses):
        cut = " (cut at max_new_tokens)" if rollout.truncated[i] else ""
        lines.append(f"[{i + 1}] " + text.replace("\n", "\n    ") + cut)
        if scored is None:
            continue
        verdicts, score = scored.verdicts[i], scored.scores[i]
        for kind, criteria in (("essential", record.rubric.essential),
                               ("additional", record.rubric.additional)):
            for c in criteria:
                lines.append(f"    {c.id:<4} {VERDICT[verdicts.get(c.id)]:<8} {c.text}"
                             + (" (essential)" if kind == "essential" else ""))
        lines.append(f"    score {score.value:.3f} (essential met {score.essential_met:.0%}, "
                     f"additional {score.additional_met:.0%})")
    if scored is not None:
        values = [s.value for s in scored.scores]
        passed = sum(s.essential_pass is True for s in scored.scores)
        lines.append(f"mean score {sum(values) / len(values):.3f} over {len(values)} answers; "
                     f"{passed}/{len(values)} meet every essential criterion")
    return "\n".join(lines)


def _judge(cfg, kind_rule_only: bool):
    from rdpo.judging.judges import RuleJudge, make_judge

    if kind_rule_only or cfg.judge.kind == "rule":
        return RuleJudge()  # the rubric's own checks, exactly (no simulated judge noise)
    return make_judge(cfg.judge, strategy="rubric")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rdpo.generate",
                                     description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="a finished run's run.dir (its policy and settings)")
    source.add_argument("--model", help="a transformers VLM folder (e.g. python -m rdpo.export)")
    parser.add_argument("--image", help="image file (default: the --id record's)")
    parser.add_argument("--prompt", help="instruction (default: the --id record's)")
    parser.add_argument("--samples", type=int, help="answers to sample (default: the run's "
                        "rollout.samples_per_prompt; 4 with --model)")
    parser.add_argument("--rubric", metavar="POOL.jsonl", help="rubric pool to judge against")
    parser.add_argument("--id", help="the record of --rubric whose rubric judges the answers")
    parser.add_argument("--temperature", type=float, help="override the sampling temperature")
    parser.add_argument("--max-new-tokens", type=int, help="override the longest answer")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--allow-base-mismatch", action="store_true",
                        help="load the adapter even on a base other than the one it was trained "
                             "on (rdpo_adapter.json)")
    console.add_arguments(parser)
    args = parser.parse_args(argv)
    console.setup(console.verbosity(args))
    if (args.rubric is None) != (args.id is None):
        parser.error("--rubric and --id go together")
    if args.samples is not None and args.samples < 1:
        parser.error("--samples must be at least 1")
    from rdpo.tools.export import ExportError

    try:
        record = prompt_record(args.image, args.prompt, args.rubric, args.id)
        if args.run:
            model, processor, cfg = load_run_policy(args.run, args.device,
                                                    allow_base_mismatch=args.allow_base_mismatch)
            settings, aggregation = cfg.rollout, cfg.pairs.aggregation
            judge = _judge(cfg, False) if args.rubric else None
        else:
            model, processor = load_model(args.model, args.device,
                                          allow_base_mismatch=args.allow_base_mismatch)
            settings, aggregation = RolloutConfig(samples_per_prompt=4), "lexicographic"
            judge = _judge(None, True) if args.rubric else None
    except (ExportError, ConfigError, PoolError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    overrides = {k: v for k, v in (("temperature", args.temperature),
                                   ("max_new_tokens", args.max_new_tokens)) if v is not None}
    settings = dataclasses.replace(settings, **overrides)
    k = args.samples or settings.samples_per_prompt
    if settings.temperature == 0 and k > 1:
        log.info("temperature 0 (greedy): the %d answers are identical; sampling 1", k)
        k = 1
    log.info("%s; temperature %g, top_p %g, top_k %d, up to %d new tokens, %d answer%s",
             f"run {args.run}" if args.run else f"model {args.model}", settings.temperature,
             settings.top_p, settings.top_k, settings.max_new_tokens, k, "s" * (k > 1))
    rollout = sample(model, processor, record, settings, k, args.seed)
    print(f"{record.id}: {record.instruction}  [{', '.join(p.name for p in record.images)}]")
    print(report(rollout, judge, aggregation))
    return 0


if __name__ == "__main__":
    sys.exit(main())
