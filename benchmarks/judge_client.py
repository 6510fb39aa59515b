"""Benchmark: the OpenAI judge client against a loopback server with a fixed latency.

    python benchmarks/judge_client.py [--n 256] [--concurrency 16] [--latency 0.25]

N judgments at concurrency C against a server that takes L seconds per request must take at
most 1.2 * N * L / C wall time; a second pass over the same judgments (same sqlite cache) must
make zero requests. Prints both figures and exits 1 if either bound is missed. Not a timed test.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fake_openai_server import FakeOpenAIServer  # noqa: E402

from rdpo.config import JudgeConfig  # noqa: E402
from rdpo.demo import toy  # noqa: E402
from rdpo.judging.judges import OpenAIJudge  # noqa: E402
from rdpo.pool import load_pool  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=256, help="judgments (prompts x responses)")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--latency", type=float, default=0.25, help="server seconds per request")
    args = p.parse_args(argv)
    # The server runs in its own process, as a real one would (no shared GIL with the client).
    with tempfile.TemporaryDirectory() as tmp, FakeOpenAIServer(latency=args.latency) as srv:
        pools = toy.write_pools(Path(tmp) / "task", n_train=args.n, n_heldout=1)
        records = load_pool(pools.train)[:args.n]
        items = [(r, [f"Answer {i}."]) for i, r in enumerate(records)]
        cfg = JudgeConfig(kind="openai", model=srv.model, base_url=srv.url,
                          concurrency=args.concurrency, cache=str(Path(tmp) / "cache.sqlite"))
        judge = OpenAIJudge(cfg)
        # Warm the client (connections, the client's lazily built models): one wave of other
        # judgments, outside the timing, as in any run past its first seconds.
        judge.judge_many([(r, ["warm-up"]) for r in records[:args.concurrency]])
        warm_requests = srv.request_count
        start = time.perf_counter()
        judge.judge_many(items)
        first = time.perf_counter() - start
        first_requests, max_inflight = srv.request_count - warm_requests, srv.max_inflight
        again = OpenAIJudge(cfg)  # a new client and a new connection to the same cache
        start = time.perf_counter()
        again.judge_many(items)
        second = time.perf_counter() - start
        second_requests = srv.request_count - first_requests - warm_requests
        assert not srv.problems, srv.problems
    bound = 1.2 * args.n * args.latency / args.concurrency
    ideal = args.n * args.latency / args.concurrency
    print(f"first pass:  {args.n} judgments, concurrency {args.concurrency}, latency "
          f"{args.latency:.3f}s: {first:.3f}s wall ({first_requests} requests; ideal N*L/C = "
          f"{ideal:.3f}s, bound 1.2*N*L/C = {bound:.3f}s, max in flight {max_inflight})")
    print(f"second pass: {second:.3f}s wall, {second_requests} requests (cache hits "
          f"{again.stats['cache_hits']})")
    ok = first <= bound and second_requests == 0 and first_requests == args.n
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
