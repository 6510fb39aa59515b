"""``python -m rdpo.bench {dpo,rollout,round}`` (also ``python -m rdpo.dev.bench``); ``_worker`` runs one
benchmark setting in its own process (`rdpo.dev.bench.workers`)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from rdpo.dev.bench import dpo, rollout, workers
from rdpo.dev.bench import round as round_bench
from rdpo.dev.bench.fixtures import SHAPES


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_worker"]:
        import torch

        torch.set_num_threads(int(os.environ.get("RDPO_BENCH_THREADS", "2")))
        print(json.dumps(workers.run(json.loads(argv[1]))))
        return 0
    parser = argparse.ArgumentParser(prog="python -m rdpo.bench", description=dpo.__doc__.splitlines()[0])
    parser.add_argument("what", choices=["dpo", "rollout", "round"],
                        help="dpo: rdpo vs TRL training; rollout: tokens/s per rollout engine "
                        "(rdpo.dev.bench.rollout); round: a round's wall time with pipelining "
                        "on and off (rdpo.dev.bench.round)")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="cpu")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4, help="pairs per step")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--response-tokens", type=int, default=64)
    parser.add_argument("--image-side", type=int, default=448)
    parser.add_argument("--images", type=int, default=1, help="images per prompt")
    parser.add_argument("--peak-tflops", type=float, default=790.0,
                        help="the GPU's dense bf16 peak for rdpo's MFU (cuda only)")
    parser.add_argument("--levers", action="store_true",
                        help="rdpo only: each of its levers (packing, vision cache, gradient "
                        "checkpointing) alone and together")
    parser.add_argument("--work", help="directory for the model and data (reused when present)")
    rollout.add_arguments(parser)
    round_bench.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.what in ("round", "rollout"):
        run, report = ((round_bench.round_bench, round_bench.report) if args.what == "round"
                       else (rollout.rollout, rollout.report))
        result = run(args)
        if args.json:
            print(json.dumps(result))
        else:
            report(result)
        return 0
    result = dpo.dpo(args)
    if args.json:
        for run in result["runs"]:
            run.pop("losses")
        print(json.dumps(result))
    else:
        dpo.report(result, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
