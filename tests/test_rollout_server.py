"""The vLLM rollout client against a scripted in-process server (no vLLM, no model): adapter
publishing, token ids and finish reasons, the prompt-id check, lost adapters, a dead server."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from rdpo.config import ConfigError, RolloutConfig, load_config
from rdpo.pool import PromptRecord, Rubric
from rdpo.rollout import LENGTH, STOP
from rdpo.rollout_server import RolloutServerError, VLLMRollout, adapter_name

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
        models = [{"id": "base", "object": "model"}]
        models += [{"id": n, "object": "model", "parent": "base"} for n in self.state["loaded"]]
        self._send(200, {"object": "list", "data": models})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        s = self.state
        s["requests"].append((self.path, body))
        if self.path.endswith("/load_lora_adapter"):
            if body["lora_name"] in s["loaded"]:
                return self._send(400, {"error": {"message": "The lora adapter has already been loaded."}})
            s["loaded"][body["lora_name"]] = body["lora_path"]
            return self._send(200, "Success")
        if self.path.endswith("/unload_lora_adapter"):
            s["loaded"].pop(body["lora_name"], None)
            return self._send(200, "Success")
        if s.get("forget_once"):  # a restarted server: the adapter is gone
            s["forget_once"] = False
            s["loaded"].clear()
        if body["model"] not in s["loaded"]:
            return self._send(404, {"error": {"message": f"The model `{body['model']}` does not exist."}})
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


def test_adapter_names():
    assert adapter_name(0, 5) == "round_0000"
    assert adapter_name(10, 5) == "round_0002"
    assert adapter_name(12, 5) == "step_000012"


def test_publish_sample_and_unload(fake, tmp_path):
    _, state = fake
    client, settings = _client(fake, tmp_path)
    assert client.base_model() == "base"
    waited = []
    client.publish(Adapter(), 0, is_main=True, barrier=lambda: waited.append(1))
    assert client.publish(Adapter(), 0, is_main=True, barrier=lambda: waited.append(1)) == "round_0000"
    assert waited == [1]  # the same step is published once
    out = _sample(client, settings)
    assert [r.record.id for r in out] == ["p0", "p1", "p2"]
    assert out[0].token_ids == [(4, 5, EOT), (6, EOT), (7, 7, 7)]
    assert out[0].finish_reasons == [STOP, STOP, LENGTH]
    assert out[0].responses == ["4 5", "6", "7 7 7"]
    chat = [b for p, b in state["requests"] if p.endswith("/chat/completions")][0]
    assert chat["model"] == "round_0000" and chat["n"] == 3 and chat["return_token_ids"]
    assert chat["stop_token_ids"] == [EOT] and chat["logit_bias"] == {"42": -100}
    assert chat["top_k"] == -1 and chat["max_tokens"] == settings.max_new_tokens
    client.publish(Adapter(), 5, is_main=True, barrier=lambda: None)
    assert list(state["loaded"]) == ["round_0001"]
    assert not (tmp_path / "adapters" / "round_0000").exists()


def test_other_ranks_only_wait(fake, tmp_path):
    _, state = fake
    client, _ = _client(fake, tmp_path)
    client.publish(Adapter(), 0, is_main=False, barrier=lambda: None)
    assert state["requests"] == [] and client.current[1] == "round_0000"


def test_adapter_already_loaded_is_replaced(fake, tmp_path):
    """A resumed run loads a name an earlier process of the run left on the server."""
    _, state = fake
    state["loaded"]["round_0000"] = "old"
    client, _ = _client(fake, tmp_path)
    client.publish(Adapter(), 0, is_main=True, barrier=lambda: None)
    assert state["loaded"]["round_0000"] == str(tmp_path / "adapters" / "round_0000")


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
