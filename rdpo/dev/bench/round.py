"""``python -m rdpo.bench round --judge-latency SECONDS [--rounds N] [--json]``: a round's wall
time with the pipelined round (rollout.pipeline=true) and the sequential one, same run settings.

The quickstart toy (configs/quickstart.yaml: the tiny Qwen2-VL warm-started on the shapes task,
its 96 training prompts every round, K = 8, CPU; built once under toy.cache_dir) is judged by
the scripted OpenAI-compatible server (`rdpo.dev.bench.openai_server`, in its own process,
grading each criterion with its regex as the rule judge does) that answers every request after
`--judge-latency` seconds, `--judge-concurrency` requests in flight. `rdpo.fit` runs `--rounds`
rounds of 2 training steps with pipelining on, then the same run with it off, in this process;
no held-out evaluation and no judge cache (the second run must ask what the first asked).
A one-round run first warms the process up, unmeasured.

Per round (means over the rounds, each run's own rows): ``sampling_seconds``,
``judging_seconds``, ``reference_seconds`` (the seconds each phase was busy; in the pipelined
round they overlap), ``round_seconds`` (the round's wall time, its files written) and
``overlap_ratio`` = round_seconds / max(sampling_seconds, judging_seconds + reference_seconds),
1.0 when the round takes no longer than its longest chain; ``sequential_round_seconds`` is
the same work with pipelining off (about the sum of the phases). Both runs train on the same
pairs (`tests/test_pipeline.py`): ``same_pairs`` checks it here too.

``--async`` adds a third run, pipelined with rollout.async_rounds=true (round r+1 sampled
when round r starts and judged while it trains), and reports training steps per second of
wall time (the whole ``fit`` call: model loading, every round, every step) for it and for the
synchronous pipelined run: ``async`` holds both, their ratio and the async run's mean wait at
a round's start. `--steps-per-round` sets how much training there is to hide the judge behind.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

PHASES = ("sampling", "judging", "reference")
QUICKSTART = Path(__file__).resolve().parents[3] / "configs/quickstart.yaml"
SMALL = ["toy.n_train=16", "toy.n_heldout=8", "toy.warmstart_steps=150", "toy.head_dim=32",
         "toy.warmstart_lr=3e-3", "toy.flaw_rate=0.5", "rollout.samples_per_prompt=4",
         "data.prompts_per_round=16", "data.batch_size=4"]
"""--small: the test suite's small toy (tests/small_toy.py), for the smoke test."""


def add_arguments(parser) -> None:
    parser.add_argument("--judge-latency", type=float, default=0.1,
                        help="round: seconds the judge server waits before each answer")
    parser.add_argument("--judge-concurrency", type=int, default=8,
                        help="round: judge requests in flight (judge.concurrency)")
    parser.add_argument("--rounds", type=int, default=3, help="round: rounds per run")
    parser.add_argument("--threads", type=int, default=1,
                        help="round: torch CPU threads (run.threads); 1 by default: with two "
                        "threads on a CPU that other processes load, OpenMP barriers spin while "
                        "a descheduled thread waits, and the same round varies 20x in time")
    parser.add_argument("--rollout-batch", type=int, default=8,
                        help="round: prompts per generation batch (rollout.batch_size)")
    parser.add_argument("--toy-cache", help="round: toy.cache_dir (default: WORK/toy with "
                        "--work, else the config's)")
    parser.add_argument("--async", dest="async_rounds", action="store_true",
                        help="round: also run with rollout.async_rounds=true and report training "
                        "steps per second of wall time, sync vs async")
    parser.add_argument("--steps-per-round", type=int, default=2,
                        help="round: optimizer steps per round (rollout.every_n_steps)")
    parser.add_argument("--small", action="store_true",
                        help="round: the tests' small toy (16 prompts, K = 4) instead of the "
                        "quickstart's")


def _mean(rows: list[dict], key: str) -> float:
    return statistics.fmean(r[key] for r in rows)


def _summary(rows: list[dict]) -> dict:
    out = {f"{p}_seconds": _mean(rows, f"{p}_seconds") for p in PHASES}
    out["round_seconds"] = _mean(rows, "seconds")
    out["overlap_ratio"] = out["round_seconds"] / max(
        out["sampling_seconds"], out["judging_seconds"] + out["reference_seconds"])
    out["per_round"] = [{"round": r["round"], "seconds": r["seconds"],
                         **{f"{p}_seconds": r[f"{p}_seconds"] for p in PHASES}} for r in rows]
    return out


def round_bench(args) -> dict:
    """Run the toy with pipelining on, then off; the numbers of both."""
    from rdpo.config import load_config
    from rdpo.dev.bench.openai_server import FakeOpenAIServer
    from rdpo.fit import fit

    work = Path(args.work or tempfile.mkdtemp(prefix="rdpo-bench-round-"))
    steps = args.steps_per_round * args.rounds
    base = [f"dpo.max_steps={steps}", f"rollout.every_n_steps={args.steps_per_round}",
            f"rollout.batch_size={args.rollout_batch}", f"run.threads={args.threads}",
            "run.progress_bar=false",
            "data.heldout_pool=null", "judge.cache=null", "run.overwrite=true",
            *(SMALL if args.small else [])]
    if args.toy_cache or args.work:
        base.append(f"toy.cache_dir={args.toy_cache or work / 'toy'}")
    cfg = load_config(QUICKSTART, [*base, f"run.dir={work / 'pipelined'}"])
    from rdpo.demo.warmstart import prepare_toy

    paths = prepare_toy(cfg.toy)  # built (or found) before any clock starts
    runs = {}
    with FakeOpenAIServer(judging="rule", pools=[str(paths.train_pool)],
                          latency=args.judge_latency) as server:
        judge = [*server.judge_overrides(args.judge_concurrency), "judge.max_retries=2"]
        # A one-round, one-step warm-up (not measured): the process's one-time costs (first
        # model load, first generate, kernel set-up) would otherwise fall on the first run.
        fit(load_config(QUICKSTART, [*base, *judge, f"run.dir={work / 'warmup'}",
                                     "dpo.max_steps=1"]))
        requests = {}
        settings = [("pipelined", ["rollout.pipeline=true"]),
                    ("sequential", ["rollout.pipeline=false"])]
        if args.async_rounds:
            settings.append(("async", ["rollout.pipeline=true", "rollout.async_rounds=true"]))
        for name, extra in settings:
            cfg = load_config(QUICKSTART, [*base, *judge, f"run.dir={work / name}", *extra])
            before, start = server.request_count, time.perf_counter()
            result = fit(cfg)
            runs[name] = (result, time.perf_counter() - start)
            requests[name] = server.request_count - before
    (on, on_s), (off, off_s) = runs["pipelined"], runs["sequential"]
    same = all((on.run_dir / f"rounds/{i:04d}/pairs.jsonl").read_bytes()
               == (off.run_dir / f"rounds/{i:04d}/pairs.jsonl").read_bytes()
               for i in range(args.rounds))
    seq = _summary(off.rounds)
    out = {
        "bench": "round", "toy": "small" if args.small else "quickstart",
        "judge_latency": args.judge_latency, "judge_concurrency": args.judge_concurrency,
        "rounds": args.rounds, "rollout_batch_size": args.rollout_batch, "threads": args.threads,
        "prompts_per_round": cfg.data.prompts_per_round,
        "samples_per_prompt": cfg.rollout.samples_per_prompt,
        "judge_requests": requests,
        **{k: v for k, v in _summary(on.rounds).items() if k != "per_round"},
        "sequential_round_seconds": seq["round_seconds"],
        "sequential": seq,
        "pipelined": _summary(on.rounds),
        "speedup": seq["round_seconds"] / _mean(on.rounds, "seconds"),
        "same_pairs": same,
        "run_seconds": {"pipelined": on_s, "sequential": off_s},
    }
    if args.async_rounds:
        ahead, ahead_s = runs["async"]
        out["run_seconds"]["async"] = ahead_s
        out["async"] = {
            "steps": steps, "steps_per_round": args.steps_per_round,
            "sync_steps_per_second": steps / on_s, "async_steps_per_second": steps / ahead_s,
            "speedup": on_s / ahead_s,
            "sync_round_seconds": _mean(on.rounds, "seconds"),
            "async_round_seconds": _mean(ahead.rounds, "seconds"),
            "policy_rounds": [r["policy_round"] for r in ahead.rounds],
        }
    return out


def report(result: dict) -> None:
    print(f"round benchmark: {result['toy']} toy, {result['prompts_per_round']} prompts x "
          f"K={result['samples_per_prompt']}, judge latency {result['judge_latency']} s at "
          f"concurrency {result['judge_concurrency']}, {result['rounds']} rounds")
    print(f"{'':12} {'sampling':>9} {'judging':>9} {'reference':>9} {'round':>9} {'overlap':>8}")
    for name in ("pipelined", "sequential"):
        r = result[name]
        print(f"{name:12} {r['sampling_seconds']:9.2f} {r['judging_seconds']:9.2f} "
              f"{r['reference_seconds']:9.2f} {r['round_seconds']:9.2f} {r['overlap_ratio']:8.2f}")
    print(f"speedup {result['speedup']:.2f}x; same pairs: {result['same_pairs']}")
    if "async" in result:
        a = result["async"]
        print(f"training steps per second of wall time ({a['steps']} steps, "
              f"{a['steps_per_round']} per round): sync {a['sync_steps_per_second']:.3f}, "
              f"async {a['async_steps_per_second']:.3f} ({a['speedup']:.2f}x); wait at a round's "
              f"start {a['sync_round_seconds']:.2f} s vs {a['async_round_seconds']:.2f} s")
