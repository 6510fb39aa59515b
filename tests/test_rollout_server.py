"""The vLLM rollout client against a scripted in-process server (no vLLM, no model) that answers
adapter loads, unloads and /v1/models as vLLM 0.32 does: adapter publishing, two runs on one
server, token ids and finish reasons, the prompt-id check, lost adapters, a dead server."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from rdpo.config import ConfigError, RolloutConfig, load_config
from rdpo.pool import PromptRecord, Rubric
from rdpo.rollout import LENGTH, STOP
from rdpo.rollout_server import RolloutServerError, VLLMRollout, adapter_name, run_id

PROMPT = [1, 2, 3]
EOT = 9


class FakeVLLM(BaseHTTPRequestHandler):
    state: dict = {}

    def log_message(self, *args):
        pass

    def _send(self, code: int, obj) -> None:
        body = (obj if isinstance(obj, str) else json.dumps(obj)).encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain" if isinstance(obj, str) else "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        # As vLLM lists them: the base, then each adapter with root = the path it was loaded from.
        models = [{"id": "base", "object": "model", "root": "base", "parent": None}]
        models += [{"id": n, "object": "model", "root": root, "parent": "base"}
                   for n, root in self.state["loaded"].items()]
        self._send(200, {"object": "list", "data": models})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        s = self.state
        s["requests"].append((self.path, body))
        # vLLM 0.32's answers (vllm/entrypoints/openai/models/serving.py).
        if self.path.endswith("/load_lora_adapter"):
            name = body["lora_name"]
            if name in s["loaded"]:
                return self._send(400, {"error": {"message": f"The lora adapter '{name}' has "
                                                  "already been loaded.", "code": 400}})
            s["loaded"][name] = s.get("serve_from", {}).get(name, body["lora_path"])
            return self._send(200, f"Success: LoRA adapter '{name}' added successfully.")
        if self.path.endswith("/unload_lora_adapter"):
            name = body["lora_name"]
            if name not in s["loaded"]:
                return self._send(404, {"error": {"message": f"The lora adapter '{name}' cannot "
                                                  "be found.", "code": 404}})
            del s["loaded"][name]
            return self._send(200, f"Success: LoRA adapter '{name}' removed successfully.")
        if s.get("forget_once"):  # a restarted server: the adapter is gone
            s["forget_once"] = False
            s["loaded"].clear()
        if body["model"] not in s["loaded"]:
            return self._send(404, {"error": {"message": f"The model `{body['model']}` does not exist."}})
        # Which adapter weights answered: what a run samples from.
        s.setdefault("served", []).append((body["model"], s["loaded"][body["model"]]))
        choices = [
            {"index": 0, "message": {"role": "assistant", "content": "a"}, "finish_reason": "stop",
             "token_ids": [4, 5, EOT], "stop_reason": None},
            # vLLM may leave the stop id out of the ids; stop_reason names it.
            {"index": 1, "message": {"role": "assistant", "content": "b"}, "finish_reason": "stop",
             "token_ids": [6], "stop_reason": EOT},
            {"index": 2, "message": {"role": "assistant", "content": "c"}, "finish_reason": "length",
             "token_ids": [7, 7, 7], "stop_reason": None}][:body["n"]]
        self._send(200, {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                         "choices": choices, "prompt_token_ids": s.get("prompt", PROMPT)})


@pytest.fixture
def fake():
    FakeVLLM.state = {"loaded": {}, "requests": []}
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FakeVLLM)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd, FakeVLLM.state
    httpd.shutdown()


class Tok:
    def batch_decode(self, rows, skip_special_tokens):
        return [" ".join(map(str, r)) for r in rows]


class Proc:
    tokenizer = Tok()


class Prompts:
    def get(self, record):
        return {"input_ids": torch.tensor([PROMPT])}


class Adapter:
    def save_pretrained(self, path):
        from pathlib import Path

        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "adapter_config.json").write_text("{}")


RECORDS = [PromptRecord(id=f"p{i}", images=(), instruction="hi", rubric=Rubric((), ()))
           for i in range(3)]


def _client(fake, tmp_path, **kw):
    httpd, _ = fake
    settings = RolloutConfig(engine="vllm", base_url=f"http://127.0.0.1:{httpd.server_port}/v1",
                             samples_per_prompt=3, every_n_steps=5, max_retries=1, timeout=5, **kw)
    return VLLMRollout(settings, tmp_path / "adapters"), settings


def _sample(client, settings, records=RECORDS):
    return client.sample(Proc(), records, settings, stop_ids=[EOT], suppress_ids=[42], seed=0,
                         prompts=Prompts())


def test_adapter_names(tmp_path):
    assert adapter_name(0, 5) == "round_0000"
    assert adapter_name(10, 5) == "round_0002"
    assert adapter_name(12, 5) == "step_000012"
    # On the server, names carry the run: its folder's name and a hash of its absolute path.
    one, other = run_id(tmp_path / "my run" / "adapters"), run_id(tmp_path / "b/my run/adapters")
    assert re.fullmatch(r"my-run-[0-9a-f]{10}", one) and one != other
    assert run_id(tmp_path / "my run" / "adapters") == one  # every rank, every resume


def test_publish_sample_and_unload(fake, tmp_path):
    _, state = fake
    client, settings = _client(fake, tmp_path)
    name = f"{client.run_id}-round_0000"
    assert client.base_model() == "base"
    waited = []
    assert client.publish(Adapter(), 0, is_main=True, barrier=lambda: waited.append(1)) == name
    assert client.publish(Adapter(), 0, is_main=True, barrier=lambda: waited.append(1)) == name
    assert waited == [1]  # the same step is published once
    out = _sample(client, settings)
    assert [r.record.id for r in out] == ["p0", "p1", "p2"]
    assert out[0].token_ids == [(4, 5, EOT), (6, EOT), (7, 7, 7)]
    assert out[0].finish_reasons == [STOP, STOP, LENGTH]
    assert out[0].responses == ["4 5", "6", "7 7 7"]
    chat = [b for p, b in state["requests"] if p.endswith("/chat/completions")][0]
    assert chat["model"] == name and chat["n"] == 3 and chat["return_token_ids"]
    assert chat["stop_token_ids"] == [EOT] and chat["logit_bias"] == {"42": -100}
    assert chat["top_k"] == -1 and chat["max_tokens"] == settings.max_new_tokens
    first = client.current[2]
    assert first.parent == tmp_path / "adapters" and first.name.startswith("round_0000-")
    client.publish(Adapter(), 5, is_main=True, barrier=lambda: None)
    path = client.current[2]
    assert path.name == f"round_0001-{first.name.split('-')[1]}"  # this process's folders
    assert state["loaded"] == {f"{client.run_id}-round_0001": str(path)}
    assert not first.exists()
    assert sorted(p.name for p in path.parent.iterdir()) == ["current", path.name]
    client.close()  # the run ended: its last adapter is unloaded, its files stay
    assert state["loaded"] == {} and path.is_dir()


def test_other_ranks_only_wait(fake, tmp_path):
    _, state = fake
    client, _ = _client(fake, tmp_path)
    client.publish(Adapter(), 0, is_main=False, barrier=lambda: None)
    assert state["requests"] == [] and client.current[1] == f"{client.run_id}-round_0000"
    client.close()  # it loaded nothing: it unloads nothing
    assert state["requests"] == []


def test_two_runs_share_one_server(fake, tmp_path):
    """Runs A and B publish the same rounds on one server: each samples its own adapter, and
    once both ended the server holds neither's."""
    _, state = fake
    a, settings = _client(fake, tmp_path / "a")
    b, _ = _client(fake, tmp_path / "b")
    for step in (0, 5, 7):
        for run in (a, b):
            run.publish(Adapter(), step, is_main=True, barrier=lambda: None)
        for run, folder in ((a, "a"), (b, "b")):
            del state.setdefault("served", [])[:]
            _sample(run, settings)
            roots = {root for _, root in state["served"]}
            assert roots == {str(run.current[2])}
            assert run.current[2].parent == tmp_path / folder / "adapters"
    assert len(state["loaded"]) == 2
    a.close()
    b.close()
    assert state["loaded"] == {}


def test_an_adapter_served_from_another_path_is_refused(fake, tmp_path):
    """A name this run uses, loaded from another folder (another process with this run's
    names), is never replaced; a server that lists the name from another path after the load
    is an error too."""
    _, state = fake
    client, _ = _client(fake, tmp_path)
    name = client.adapter_name(0)
    state["loaded"][name] = "/elsewhere/adapters/round_0000"
    with pytest.raises(RolloutServerError, match=f"serves adapter {name} from /elsewhere/adapters"
                                                 f"/round_0000, not from {tmp_path}"):
        client.publish(Adapter(), 0, is_main=True, barrier=lambda: None)
    assert state["loaded"][name] == "/elsewhere/adapters/round_0000"
    state["serve_from"] = {client.adapter_name(5): "/elsewhere/adapters/round_0001"}
    with pytest.raises(RolloutServerError, match="from /elsewhere/adapters/round_0001, not from"):
        client.publish(Adapter(), 5, is_main=True, barrier=lambda: None)


def test_resume_unloads_what_the_killed_process_left(fake, tmp_path):
    """A killed process of this run left two adapters loaded, one under the name the resumed
    run loads first: both are unloaded and their folders deleted, and the resumed run loads
    from a folder of its own (vLLM's prefix cache keys prompt blocks by name and path: its
    weights must not pass for the old ones). Another run's adapter stays."""
    _, state = fake
    client, _ = _client(fake, tmp_path)
    folder = tmp_path / "adapters"
    for old in ("round_0000-dead0000", "step_000007-dead0000"):
        Adapter().save_pretrained(folder / old)
    state["loaded"].update({client.adapter_name(0): str(folder / "round_0000-dead0000"),
                            client.adapter_name(7): str(folder / "step_000007-dead0000"),
                            "other-0123456789-round_0000": "/other/adapters/round_0000"})
    client.publish(Adapter(), 0, is_main=True, barrier=lambda: None)
    path = client.current[2]
    assert path != folder / "round_0000-dead0000" and path.parent == folder
    assert state["loaded"] == {client.adapter_name(0): str(path),
                               "other-0123456789-round_0000": "/other/adapters/round_0000"}
    calls = [(p.rsplit("/", 1)[1], b["lora_name"]) for p, b in state["requests"] if "lora" in p]
    assert calls == [("unload_lora_adapter", client.adapter_name(0)),
                     ("unload_lora_adapter", client.adapter_name(7)),
                     ("load_lora_adapter", client.adapter_name(0))]
    assert sorted(p.name for p in folder.iterdir()) == ["current", path.name]


def test_ranks_reloading_after_a_restart_keep_each_others_load(fake, tmp_path):
    """Two ranks both saw the adapter missing (server restarted): the second reload finds it
    loaded from the same path and keeps it; unloading it would fail the first rank's requests."""
    _, state = fake
    rank0, settings = _client(fake, tmp_path)
    rank1, _ = _client(fake, tmp_path)
    rank0.publish(Adapter(), 0, is_main=True, barrier=lambda: None)
    rank1.publish(Adapter(), 0, is_main=False, barrier=lambda: None)
    state["loaded"].clear()
    del state["requests"][:]
    name = rank0.current[1]
    rank1._reload(name)  # rank 1 first: it finds rank 0's folder by the pointer
    rank0._reload(name)
    assert [p.rsplit("/", 1)[1] for p, _ in state["requests"] if "lora" in p] == [
        "load_lora_adapter", "load_lora_adapter"]
    assert state["loaded"] == {name: str(rank0.current[2])}  # rank 1 found it by the pointer
    assert rank1.current[2] is None
    assert _sample(rank1, settings, RECORDS[:1])[0].token_ids[0] == (4, 5, EOT)


def test_lost_adapter_is_loaded_again(fake, tmp_path):
    _, state = fake
    client, settings = _client(fake, tmp_path)
    client.publish(Adapter(), 0, is_main=True, barrier=lambda: None)
    state["forget_once"] = True
    out = _sample(client, settings, RECORDS[:1])
    assert out[0].token_ids[0] == (4, 5, EOT)
    loads = [p for p, _ in state["requests"] if p.endswith("/load_lora_adapter")]
    assert len(loads) == 2


def test_prompt_ids_must_match_rdpos_encoding(fake, tmp_path):
    _, state = fake
    state["prompt"] = [1, 2, 8]
    client, settings = _client(fake, tmp_path)
    client.publish(Adapter(), 0, is_main=True, barrier=lambda: None)
    with pytest.raises(RolloutServerError, match="position 2"):
        _sample(client, settings, RECORDS[:1])


def test_dead_server_is_a_clear_error(fake, tmp_path):
    httpd, _ = fake
    client, settings = _client(fake, tmp_path)
    client.publish(Adapter(), 0, is_main=True, barrier=lambda: None)
    httpd.shutdown()
    httpd.server_close()
    with pytest.raises(RolloutServerError, match="cannot reach the rollout server .* after 1 retries"):
        _sample(client, settings, RECORDS[:1])


def test_config_rules(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"run.dir={tmp_path}", "model.path=x", "rollout.engine=vllm",
                           "model.finetune=full"])
    assert "rollout.base_url: the vllm engine needs the server's URL" in str(err.value)
    assert "model.finetune=full needs rollout.engine=transformers" in str(err.value)


@pytest.mark.parametrize("fails", [False, True])
def test_fit_unloads_the_last_adapter_when_training_ends_or_fails(fake, tmp_path, fails):
    from types import SimpleNamespace

    from rdpo.fit import train

    _, state = fake
    client, _ = _client(fake, tmp_path)

    def fit(*args, **kwargs):
        client.publish(Adapter(), 5, is_main=True, barrier=lambda: None)
        if fails:
            raise RuntimeError("a step failed")

    run = SimpleNamespace(trainer=SimpleNamespace(fit=fit, global_step=5), module=None,
                          datamodule=None, checkpoint=None, run_dir=tmp_path,
                          scoring=SimpleNamespace(server=client))
    if fails:
        with pytest.raises(RuntimeError, match="a step failed"):
            train(run)
    else:
        train(run)
    assert state["loaded"] == {}
