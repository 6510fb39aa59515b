"""rollout.engine=vllm against a real vLLM server (CPU build, started by the fixture).

The server runs from .venv-vllm (scripts/vllm_env.sh creates it; without network the tests skip
and say so) on the small toy's warm-started policy, float32.
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import pytest
import torch
from small_toy import QUICKSTART
from vllm_server import VLLMServer, vllm_python

from rdpo.config import RolloutConfig, load_config
from rdpo.rollout_server import RolloutServerError, VLLMRollout

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def vllm_server(small_toy, tmp_path_factory):
    python, why = vllm_python()
    if python is None:
        pytest.skip(why)
    server = VLLMServer(python, small_toy.paths.policy, tmp_path_factory.mktemp("vllm") / "server.log")
    server.start()
    yield server
    server.stop()


def _cfg(small_toy, run_dir, server, *extra):
    return load_config(QUICKSTART, [
        *small_toy.overrides, f"run.dir={run_dir}", "run.report=false", "dpo.max_steps=6",
        "rollout.every_n_steps=2", "rollout.engine=vllm", f"rollout.base_url={server.url}", *extra])


def _noisy_adapter(model, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)


def test_greedy_parity_with_transformers_and_peft(small_toy, vllm_server, tmp_path):
    """Greedy ids through the server equal transformers + PEFT's, for two different adapters,
    and the adapter changes what the server samples."""
    from rdpo.model import load_policy
    from rdpo.pool import load_pool
    from rdpo.rollout import generate, stop_token_ids, suppressed_token_ids

    cfg = _cfg(small_toy, tmp_path / "run", vllm_server)
    model, proc = load_policy(cfg.model)
    records = load_pool(cfg.data.heldout_pool)
    settings = RolloutConfig(engine="vllm", base_url=vllm_server.url, temperature=0.0,
                             samples_per_prompt=2, max_new_tokens=24)
    server = VLLMRollout(settings, tmp_path / "adapters")
    base = server.base_model()
    assert base == str(small_toy.paths.policy)
    kw = dict(stop_ids=stop_token_ids(proc, model), suppress_ids=suppressed_token_ids(proc),
              seed=0, num_samples=1)
    seen, paths = [], []
    for step, seed in ((0, 1), (2, 2)):
        _noisy_adapter(model, seed)
        server.publish(model, step, is_main=True, barrier=lambda: None)
        paths.append(server.current[2])
        remote = server.sample(proc, records, settings, **kw)
        local = list(generate(model, proc, records, settings, num_samples=1))
        assert [r.token_ids for r in remote] == [r.token_ids for r in local]
        assert [r.finish_reasons for r in remote] == [r.finish_reasons for r in local]
        assert [r.responses for r in remote] == [r.responses for r in local]
        seen.append([r.token_ids for r in remote])
    assert seen[0] != seen[1]
    names = [m["id"] for m in server.served_models()]
    assert server.adapter_name(2) in names and server.adapter_name(0) not in names  # unloaded
    assert not paths[0].exists()
    server.close()
    assert server.adapter_name(2) not in _adapters(vllm_server)


def _adapters(vllm_server) -> dict[str, str]:
    """The adapters the server lists: name -> root (the path it loaded)."""
    import urllib.request

    with urllib.request.urlopen(vllm_server.url + "/models", timeout=30) as resp:
        return {m["id"]: m["root"] for m in json.loads(resp.read())["data"] if m.get("parent")}


def test_two_runs_share_the_server(small_toy, vllm_server, tmp_path):
    """Two runs publish the same rounds with different weights on one server: each samples its
    own adapter (greedy ids = transformers + PEFT with that run's weights), and once both end
    the server lists neither's adapters."""
    from rdpo.model import load_policy
    from rdpo.pool import load_pool
    from rdpo.rollout import generate, stop_token_ids, suppressed_token_ids

    cfg = _cfg(small_toy, tmp_path / "run", vllm_server)
    model, proc = load_policy(cfg.model)
    records = load_pool(cfg.data.heldout_pool)[:4]
    settings = RolloutConfig(engine="vllm", base_url=vllm_server.url, temperature=0.0,
                             samples_per_prompt=1, max_new_tokens=16)
    kw = dict(stop_ids=stop_token_ids(proc, model), suppress_ids=suppressed_token_ids(proc),
              seed=0, num_samples=1)
    runs = {key: VLLMRollout(settings, tmp_path / key / "adapters") for key in ("a", "b")}
    expected = {}
    for step in (0, 2):
        for key, seed in (("a", 10 + step), ("b", 20 + step)):
            _noisy_adapter(model, seed)
            runs[key].publish(model, step, is_main=True, barrier=lambda: None)
            expected[key] = [r.token_ids for r in generate(model, proc, records, settings,
                                                           num_samples=1)]
        assert expected["a"] != expected["b"]
        for key, run in runs.items():
            assert [r.token_ids for r in run.sample(proc, records, settings, **kw)] == expected[key]
    served = _adapters(vllm_server)
    for key, run in runs.items():
        assert served[run.adapter_name(2)] == str(run.current[2])
        assert run.current[2].parent == tmp_path / key / "adapters"
    for run in runs.values():
        run.close()
    assert not any(str(tmp_path) in root for root in _adapters(vllm_server).values())


def test_fit_rounds_sample_on_the_server(small_toy, vllm_server, tmp_path, monkeypatch):
    """Several rounds: a new adapter every round, the trained ids are the server's ids, and the
    run directory has the transformers engine's artifacts."""
    from rdpo.fit import build, finish, train

    published, sampled = [], []
    publish, iter_sample = VLLMRollout.publish, VLLMRollout.iter_sample

    def recording_publish(self, model, step, **kw):
        name = publish(self, model, step, **kw)
        if not published or published[-1][0] != name:  # a repeated step publishes nothing
            weights = self.current[2] / "adapter_model.safetensors"
            published.append((name, hashlib.sha256(weights.read_bytes()).hexdigest()))
        return name

    def recording_iter_sample(self, *args, **kw):
        # Every sampling goes through iter_sample (`sample` collects it; the pipelined round
        # judges its prompts as they arrive): one list per call, in call order.
        out = []
        sampled.append(out)
        for rollout in iter_sample(self, *args, **kw):
            out.append(rollout)
            yield rollout

    monkeypatch.setattr(VLLMRollout, "publish", recording_publish)
    monkeypatch.setattr(VLLMRollout, "iter_sample", recording_iter_sample)
    run = build(_cfg(small_toy, tmp_path / "vllm", vllm_server))
    train(run)
    result = finish(run, 0.0)
    names = [n for n, _ in published]
    server = run.scoring.server
    assert names == [server.adapter_name(step) for step in (0, 2, 4, 6)]
    assert names[0] == f"{server.run_id}-round_0000" and server.run_id.startswith("vllm-")
    assert len({h for _, h in published}) == 4  # the policy changed every round
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "vllm" / "adapters").iterdir()) == [
        "current", "round_0003"]
    # sampled: held-out before, rounds 0-2, held-out after.
    assert len(sampled) == 5
    for index, rollouts in enumerate(sampled[1:4]):
        rows = [json.loads(line) for line in
                (tmp_path / "vllm" / "rounds" / f"{index:04d}" / "rollouts.jsonl").open()]
        assert [r["token_ids"] for r in rows] == [list(ids) for r in rollouts for ids in r.token_ids]
    server_ids = {ids for r in sampled[3] for ids in r.token_ids}
    assert run.datamodule.pairs
    for pair in run.datamodule.pairs:
        assert tuple(pair.chosen_ids) in server_ids and tuple(pair.rejected_ids) in server_ids
    assert result.eval["after"]["responses"] == result.eval["before"]["responses"] > 0
    assert not any(str(tmp_path) in root for root in _adapters(vllm_server).values())  # unloaded
    # The saved adapter records its base, and the base checks out against it.
    from rdpo.tools.export import check_base, find_weights

    saved = find_weights(tmp_path / "vllm")
    assert json.loads((saved.weights / "rdpo_adapter.json").read_text())["base"] == str(
        saved.cfg.model.path)
    check_base(saved.weights, run.model.get_base_model(), saved.cfg.model.path)

    # The same run through transformers generate writes the same files with the same fields.
    from rdpo.fit import fit

    fit(load_config(QUICKSTART, [*small_toy.overrides, f"run.dir={tmp_path / 'hf'}",
                                 "run.report=false", "dpo.max_steps=2", "rollout.every_n_steps=2"]))

    def shape(run_dir: Path) -> dict:
        files = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*")
                       if p.is_file() and "adapters" not in p.parts and "logs" not in p.parts
                       and "rounds" not in p.parts)
        rows = (run_dir / "rounds" / "0000" / "rollouts.jsonl").open()
        return {"files": files, "round": sorted(p.name for p in (run_dir / "rounds/0000").iterdir()),
                "fields": sorted(json.loads(next(rows)))}

    assert shape(tmp_path / "vllm") == shape(tmp_path / "hf")


def test_async_rounds_sample_from_the_round_start_adapter(small_toy, vllm_server, tmp_path,
                                                         monkeypatch):
    """rollout.async_rounds on the server: round r+1 is sampled on a thread of its own, while
    round r trains, from the adapter published when round r started; the round files say so."""
    from rdpo.fit import fit

    adapters = []
    iter_sample = VLLMRollout.iter_sample

    def recording(self, *args, **kw):
        name = self.current[1]
        for i, rollout in enumerate(iter_sample(self, *args, **kw)):
            if i == 0:  # where the answers are read: the round's thread
                adapters.append((name.rsplit("-", 1)[1], threading.current_thread().name))
            yield rollout

    monkeypatch.setattr(VLLMRollout, "iter_sample", recording)
    run_dir = tmp_path / "run"
    result = fit(_cfg(small_toy, run_dir, vllm_server, "rollout.async_rounds=true"))
    # Held-out before and round 0 on the trainer's thread; rounds 1 and 2 ahead, each from the
    # adapter of the previous round's start; held-out after from the final adapter (step 6).
    assert adapters == [("round_0000", "MainThread"), ("round_0000", "MainThread"),
                        ("round_0000", "rdpo-ahead-1"), ("round_0001", "rdpo-ahead-2"),
                        ("round_0003", "MainThread")]
    policies = [json.loads((run_dir / f"rounds/{i:04d}/pairs.jsonl").read_text().splitlines()[-1])
                ["summary"]["policy"] for i in range(3)]
    assert policies == [{"round": 0, "step": 0}, {"round": 0, "step": 0}, {"round": 1, "step": 2}]
    assert [r["policy_step"] for r in result.rounds] == [0, 0, 2]
    assert not any(str(run_dir) in root for root in _adapters(vllm_server).values())


def test_server_killed_mid_round_then_resume(small_toy, vllm_server, tmp_path, monkeypatch):
    """The server dies in round 1: bounded retries, then an error naming the checkpoint; with
    the server back (adapter lost), run.resume=auto finishes the run."""
    from rdpo.fit import fit

    iter_sample = VLLMRollout.iter_sample

    def killing_iter_sample(self, *args, **kw):
        if self.current[1].endswith("-round_0001"):
            vllm_server.stop()
        return iter_sample(self, *args, **kw)

    monkeypatch.setattr(VLLMRollout, "iter_sample", killing_iter_sample)
    run_dir = tmp_path / "run"
    fast = ["rollout.max_retries=1", "rollout.timeout=5"]
    with pytest.raises(RolloutServerError, match="Last checkpoint: .*checkpoints") as err:
        fit(_cfg(small_toy, run_dir, vllm_server, *fast))
    assert "cannot reach the rollout server" in str(err.value)
    assert "run.resume=auto" in str(err.value)
    monkeypatch.setattr(VLLMRollout, "iter_sample", iter_sample)
    vllm_server.start()
    result = fit(_cfg(small_toy, run_dir, vllm_server, *fast, "run.resume=auto"))
    assert result.resumed_from is not None
    assert [r["round"] for r in result.rounds][-1] == 2
    assert (run_dir / "rounds" / "0002" / "rollouts.jsonl").is_file()
    assert "after" in result.eval
    assert not any(str(run_dir) in root for root in _adapters(vllm_server).values())


def test_qlora_logprob_gap(small_toy, vllm_server, tmp_path):
    """The server serves the unquantised base: with model.quantization=nf4 its samples are scored
    by the trainer on the 4-bit base. The gap per token is measured (and printed); with the
    same float32 base as the server it is rounding only."""
    pytest.importorskip("bitsandbytes")
    from rdpo.engine.encode import PromptCache, collate_sequences
    from rdpo.engine.logps import sequence_logps
    from rdpo.model import load_policy
    from rdpo.pool import load_pool
    from rdpo.rollout import stop_token_ids
    from rdpo.rollout_server import request_seed

    cfg = _cfg(small_toy, tmp_path / "run", vllm_server)
    fp32, proc = load_policy(cfg.model)
    _noisy_adapter(fp32, 3)
    nf4, _ = load_policy(_cfg(small_toy, tmp_path / "run", vllm_server,
                              "model.quantization=nf4").model)
    lora = {n: p for n, p in fp32.named_parameters() if "lora_" in n}
    with torch.no_grad():
        for n, p in nf4.named_parameters():
            if "lora_" in n:
                p.copy_(lora[n])
    server = VLLMRollout(cfg.rollout, tmp_path / "adapters")
    name = server.publish(fp32, 0, is_main=True, barrier=lambda: None)
    prompts = PromptCache(proc, max_mb=0)
    gaps = {"float32": [], "nf4": []}
    for record in load_pool(cfg.data.heldout_pool):
        from rdpo.judging.chat import data_url

        content = [{"type": "image_url", "image_url": {"url": data_url(p)}} for p in record.images]
        resp = server._client.chat.completions.create(
            model=name, n=2, max_tokens=24, temperature=1.0, seed=request_seed(0, record.id),
            messages=[{"role": "user", "content": [*content, {"type": "text", "text": record.instruction}]}],
            logprobs=True, extra_body={"return_token_ids": True,
                                       "stop_token_ids": stop_token_ids(proc, fp32)})
        for choice in resp.choices:
            ids = list(choice.token_ids)
            served = sum(t.logprob for t in choice.logprobs.content)
            assert len(choice.logprobs.content) == len(ids)
            batch = collate_sequences(proc, [prompts.get(record)], [ids])
            for key, model in (("float32", fp32), ("nf4", nf4)):
                with torch.no_grad():
                    mine = sequence_logps(model.eval(), batch).item()
                gaps[key].append(abs(mine - served) / len(ids))
    mean = {k: sum(v) / len(v) for k, v in gaps.items()}
    print(f"\nmean |trainer - server| log-prob per token: {mean}")
    assert mean["float32"] < 1e-3
    assert mean["nf4"] > mean["float32"]
