"""A fault-injecting OpenAI-compatible server on loopback, in its own process, for the tests
and the round benchmark (``python -m rdpo.bench round``; the tests import it as
``tests/fake_openai_server.py``).

`FakeOpenAIServer` starts ``python -m rdpo.dev.bench.openai_server`` on a free 127.0.0.1 port
(so it never shares the GIL with the client under test) and talks to it over small control
endpoints on the same port. The server answers ``POST /v1/chat/completions``; it checks every
request (model name, bearer key, each image a decodable base64 data URL, a text part, criterion
ids listed in a judge prompt) and records a problem (answering 400) for any that is wrong.

Faults are queued (``queue``) and consumed one per request, in arrival order: ``500``, ``429``
(with ``retry-after-ms: 10``), ``429@S`` (with ``retry-after: S`` seconds), ``drop`` (close the
connection without answering), ``slow`` (answer nothing until the client gives up: its
timeout), ``malformed`` (an answer with no JSON), ``missing`` (leave one criterion out),
``invalid_rubric`` (a generator answer that is not a valid rubric) and ``answer:TEXT`` (answer
TEXT verbatim); ``None`` is a request without a fault.

A request's system message (if any) is recorded apart from the user text; a judge prompt's
criterion ids are read before its ``<<<RESPONSE`` line only, and the response between the
markers (HTML-unescaped, as rdpo escapes it) is what ``judging=rule`` grades.

Judge verdicts (``judging``): ``fixed`` (met unless the id is in ``unmet``), ``hash`` (a hash
of prompt and criterion: deterministic, and different between responses) or ``rule`` (the
criterion's regex ``check`` from the pools in ``pools``, as `rdpo.judging.judges.RuleJudge` reads it,
the record found by its images and instruction; like a real model judge it now and then leaves
a criterion out).

Every answer reports its token ``usage`` as a real server does (`usage_of`: a token per four
characters, 85 per image) and the server sums them (``usage`` in the state); the setting
``usage=false`` leaves the object out of the answers.

Control (JSON): ``GET /_control/state`` (what the server saw), ``POST /_control/faults``
(queue faults), ``POST /_control/settings`` (change settings), ``POST /_control/hold``
(let ``n`` more chat requests through, then hold the rest unanswered until released or until
their client hangs up) and ``POST /_control/reset`` (back to the start settings, nothing seen).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import html
import io
import json
import re
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_DATA_URL = re.compile(r"^data:image/(png|jpeg|webp);base64,([A-Za-z0-9+/=]+)$")
_CRITERION = re.compile(r"^\[([^\]\s]+)\] ", re.MULTILINE)
_QUESTION = re.compile(r"^Question: (.*)$", re.MULTILINE)
_RESPONSE = re.compile(r"\n<<<RESPONSE\n(.*)\nRESPONSE>>>$", re.DOTALL)

DEFAULT_RUBRIC = {
    "essential": [{"id": "E1", "text": "States the main fact correctly."}],
    "additional": [{"id": "A1", "text": "Does not mention objects absent from the image.",
                    "weight": 0.5}],
}

SETTINGS = {
    "model": "fake-judge",
    "api_key": None,
    "latency": 0.0,          # seconds before each answer
    "slow_seconds": 60.0,    # longest a `slow` fault waits for its client to hang up
    "unmet": [],             # judging=fixed: criterion ids answered met: false
    "score": 7,              # outcome-mode answer
    "rubric": DEFAULT_RUBRIC,
    "judging": "fixed",      # fixed, hash or rule
    "pools": [],             # judging=rule: rubric pools (JSONL) with the criteria's checks
    "omit_every": 7,         # judging=rule: leave a criterion out of about 1 answer in this many
    "gate": 0,               # hold requests until this many are in flight at once (0: off)
    "gate_timeout": 10.0,    # ... or until this many seconds passed
    "usage": True,           # report token usage in each answer (false: no usage object)
}

IMAGE_TOKENS = 85
"""Prompt tokens an image counts for in the reported usage (a low-detail image at OpenAI)."""


def usage_of(texts: list[str], images: int, content: str) -> dict:
    """The ``usage`` the server reports: a token per four characters (rounded up) of each text
    part (the system message and the user text), `IMAGE_TOKENS` per image, and the answer's
    tokens counted the same way (at least one)."""
    def tokens(text: str) -> int:
        return -(-len(text) // 4)
    prompt = sum(tokens(t) for t in texts) + IMAGE_TOKENS * images
    completion = max(1, tokens(content))
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


# -- the server process -----------------------------------------------------------------------


class _Server:
    """State and request handling of the server process."""

    def __init__(self, settings: dict):
        self.start_settings = {**SETTINGS, **settings}
        self.cond = threading.Condition()
        self._records_lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self.cond:
            self.settings = json.loads(json.dumps(self.start_settings))
            self.faults = list(self.settings.pop("faults", []))
            self.seen: list[dict] = []
            self.problems: list[str] = []
            self.answered: list[str] = []
            self.usage = {"prompt_tokens": 0, "completion_tokens": 0}
            self.inflight = self.max_inflight = self.held = 0
            self.gate_open = False
            self.hold_remaining: int | None = None
            self._records = None
            self.cond.notify_all()

    def state(self) -> dict:
        with self.cond:  # a copy: handler threads go on appending while it is sent
            return json.loads(json.dumps({
                "requests": self.seen, "problems": self.problems, "answered": self.answered,
                "usage": self.usage,
                "max_inflight": self.max_inflight, "held": self.held,
                "faults_left": len(self.faults)}))

    def control(self, path: str, body: dict) -> dict:
        with self.cond:
            if path == "/_control/faults":
                self.faults += body["faults"]
            elif path == "/_control/settings":
                unknown = set(body) - set(SETTINGS)
                if unknown:
                    raise ValueError(f"unknown setting(s) {sorted(unknown)}")
                self.settings.update(body)
                self._records = None
            elif path == "/_control/hold":
                self.hold_remaining = body["n"]
            elif path != "/_control/reset":
                raise ValueError(f"unknown control {path}")
            self.cond.notify_all()
            answered = len(self.answered)
        if path == "/_control/reset":
            self.reset()
        return {"ok": True, "answered": answered}

    # -- checks and answers ---------------------------------------------------------------------

    def problem(self, message: str) -> str:
        with self.cond:
            self.problems.append(message)
        return message

    def check(self, h: BaseHTTPRequestHandler, body: bytes
              ) -> tuple[str, list[bytes], str | None] | str:
        """(prompt text, image bytes, system text) of a well-formed request, else the problem
        found."""
        from PIL import Image

        s = self.settings
        if h.path != "/v1/chat/completions":
            return self.problem(f"unexpected path {h.path}")
        if s["api_key"] is not None and h.headers.get("Authorization") != f"Bearer {s['api_key']}":
            return self.problem("missing or wrong bearer key")
        try:
            req = json.loads(body)
        except json.JSONDecodeError:
            return self.problem("request body is not JSON")
        if req.get("model") != s["model"]:
            return self.problem(f"model {req.get('model')!r}, expected {s['model']!r}")
        messages = req.get("messages")
        if not isinstance(messages, list) or not messages:
            return self.problem("no messages")
        system = [m.get("content") for m in messages[:-1] if m.get("role") == "system"]
        if len(messages) > 1 and (len(system) != 1 or not isinstance(system[0], str)
                                  or messages[-1].get("role") != "user"):
            return self.problem("expected an optional system message (a string), then the user")
        system = system[0] if system else None
        content = messages[-1].get("content")
        if not isinstance(content, list):
            return self.problem("user content is not a list of parts")
        texts = [p.get("text", "") for p in content if p.get("type") == "text"]
        urls = [p.get("image_url", {}).get("url", "") for p in content
                if p.get("type") == "image_url"]
        if not texts:
            return self.problem("no text part")
        if not urls:
            return self.problem("no image part")
        images = []
        for url in urls:
            m = _DATA_URL.match(url)
            if not m:
                return self.problem(f"image is not a base64 data URL: {url[:40]!r}")
            try:
                raw = base64.b64decode(m.group(2))
                with Image.open(io.BytesIO(raw)) as im:
                    im.verify()
            except Exception as err:
                return self.problem(f"image data URL does not decode: {err}")
            images.append(raw)
        text = "\n".join(texts)
        if '"verdicts"' in f"{system}{text}" and not criterion_ids(text):
            return self.problem("judge prompt lists no criterion ids")
        return text, images, system

    def records(self) -> dict:
        """judging=rule: (image hashes, instruction) -> record of the configured pools."""
        with self._records_lock:  # handler threads ask at once; one builds, all wait for it
            if self._records is None:
                from rdpo.pool import load_pool

                records = {}
                for pool in self.settings["pools"]:
                    for r in load_pool(pool):
                        key = (tuple(hashlib.sha256(p.read_bytes()).hexdigest()
                                     for p in r.images), r.instruction)
                        records[key] = r
                self._records = records
            return self._records

    def verdicts(self, text: str, images: list[bytes]) -> list[dict]:
        ids = criterion_ids(text)
        mode = self.settings["judging"]
        if mode == "fixed":
            return [{"id": i, "met": i not in self.settings["unmet"]} for i in ids]
        digest = hashlib.sha256(text.encode()).digest()
        if mode == "hash":
            return [{"id": i, "met": hashlib.sha256(f"{text}\0{i}".encode()).digest()[0] % 3 != 0}
                    for i in ids]
        if mode != "rule":
            raise ValueError(f"judging {mode!r} is not one of fixed, hash, rule")
        from rdpo.judging.judges import RuleJudge

        key = (tuple(hashlib.sha256(b).hexdigest() for b in images),
               _QUESTION.search(text).group(1))
        record = self.records().get(key)
        if record is None:
            self.problem(f"judging=rule: no pool record for {key[1]!r} with these images")
            return []
        response = html.unescape(_RESPONSE.search(text).group(1))
        verdicts = RuleJudge().judge(record, [response])[0]
        out = [{"id": i, "met": verdicts[i]} for i in ids if verdicts.get(i) is not None]
        if out and self.settings["omit_every"] and digest[0] % self.settings["omit_every"] == 0:
            out.pop(digest[1] % len(out))  # a real judge now and then forgets one criterion
        return out

    def answer(self, text: str, images: list[bytes], fault: str | None, system: str | None) -> str:
        if fault == "malformed":
            return "I think the response is mostly fine, verdicts: E1 yes"
        if fault and fault.startswith("answer:"):
            return fault[len("answer:"):]
        instructions = f"{system}\n{text}"
        if '"verdicts"' in instructions:
            verdicts = self.verdicts(text, images)
            if fault == "missing":
                verdicts = verdicts[:-1]
            # Prose and a code fence around the JSON, as real models often write.
            return "Here is my grading:\n```json\n" + json.dumps({"verdicts": verdicts}) + "\n```"
        if '"score"' in instructions:
            return json.dumps({"score": self.settings["score"]})
        if fault == "invalid_rubric":
            return json.dumps({"essential": [], "additional": [{"id": "A1", "text": "x",
                                                                 "weight": -1}]})
        return "```json\n" + json.dumps(self.settings["rubric"]) + "\n```"

    # -- one chat request -----------------------------------------------------------------------

    def _wait(self, h: BaseHTTPRequestHandler, released, seconds: float) -> bool:
        """Wait (holding no lock) until ``released()`` or the client hangs up; False on hang-up."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            with self.cond:
                if released():
                    return True
                self.cond.wait(0.02)
            if _hung_up(h.connection):
                return False
        return True

    def _admit(self, h: BaseHTTPRequestHandler) -> bool:
        """The gate and the hold; False when the client hung up while held."""
        s = self.settings
        if s["gate"]:
            def gate_reached():
                if self.inflight >= s["gate"]:
                    self.gate_open = True
                return self.gate_open

            self._wait(h, gate_reached, s["gate_timeout"])
        with self.cond:
            if self.hold_remaining is None:
                return True
            if self.hold_remaining > 0:
                self.hold_remaining -= 1
                return True
            self.held += 1
        try:
            return self._wait(h, lambda: self.hold_remaining is None, float("inf"))
        finally:
            with self.cond:
                self.held -= 1

    def chat(self, h: BaseHTTPRequestHandler, body: bytes) -> None:
        with self.cond:
            self.inflight += 1
            self.max_inflight = max(self.max_inflight, self.inflight)
            fault = self.faults.pop(0) if self.faults else None
            self.cond.notify_all()
        seen = None
        try:
            checked = self.check(h, body)
            if isinstance(checked, str):
                return _send(h, 400, {"error": {"message": checked}})
            text, images, system = checked
            seen = {"text": text, "system": system, "images": len(images),
                    "ids": criterion_ids(text), "fault": fault, "outcome": None,
                    "t": time.monotonic(), "usage": None}
            with self.cond:
                self.seen.append(seen)
            if not self._admit(h):
                seen["outcome"] = "hangup"
                return
            if self.settings["latency"]:
                time.sleep(self.settings["latency"])
            if fault == "drop":
                h.close_connection = True
                h.connection.shutdown(socket.SHUT_RDWR)
                seen["outcome"] = "drop"
                return
            if fault == "slow":
                self._wait(h, lambda: False, self.settings["slow_seconds"])
                h.close_connection = True
                seen["outcome"] = "hangup" if _hung_up(h.connection) else "timeout"
                return
            if fault in ("500", "429"):
                # retry-after-ms keeps the client's backoff short in tests.
                _send(h, int(fault), {"error": {"message": f"injected {fault}"}},
                      {"retry-after-ms": "10"})
                seen["outcome"] = int(fault)
                return
            if fault and fault.startswith("429@"):
                _send(h, 429, {"error": {"message": "injected 429 (rate limited)"}},
                      {"retry-after": fault[len("429@"):]})
                seen["outcome"] = 429
                return
            content = self.answer(text, images, fault, system)
            usage = usage_of([t for t in (system, text) if t], len(images), content) \
                if self.settings["usage"] else None
            _send(h, 200, {
                "id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()),
                "model": self.settings["model"],
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": content}}],
                **({"usage": usage} if usage else {})})
            seen["outcome"], seen["usage"] = 200, usage
            with self.cond:
                for key in self.usage if usage else ():
                    self.usage[key] += usage[key]
                # What identifies a judgment (as rdpo's judge cache keys it): the images and the
                # text. Two prompts with the same question and response about different images
                # are different judgments.
                digest = hashlib.sha256(b"".join(images)).hexdigest()[:16]
                self.answered.append(f"[images {digest}] {text}")
        except (BrokenPipeError, ConnectionResetError):
            if seen is not None:
                seen["outcome"] = "hangup"  # the client gave up (timeout): nothing to answer
        finally:
            with self.cond:
                self.inflight -= 1
                self.cond.notify_all()


def criterion_ids(text: str) -> list[str]:
    """The ``[id] text`` lines of a judge prompt, before its response (whose own lines are not
    criteria, whatever they look like)."""
    return _CRITERION.findall(text.split("\n<<<RESPONSE\n", 1)[0])


def response_of(text: str) -> str | None:
    """The response between the markers of a judge prompt, as the judge was shown it."""
    m = _RESPONSE.search(text)
    return m.group(1) if m else None


def _hung_up(conn: socket.socket) -> bool:
    """Whether the client closed its end (readable with nothing to read)."""
    try:
        readable, _, _ = select.select([conn], [], [], 0)
        return bool(readable) and conn.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


def _send(h: BaseHTTPRequestHandler, status: int, obj: dict, headers: dict | None = None):
    data = json.dumps(obj).encode()
    h.send_response(status)
    h.send_header("Content-Type", "application/json")
    h.send_header("Content-Length", str(len(data)))
    for k, v in (headers or {}).items():
        h.send_header(k, v)
    h.end_headers()
    h.wfile.write(data)


def serve(port: int, settings: dict) -> None:
    server = _Server(settings)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body go out in separate writes; with Nagle's algorithm and the client's
        # delayed ACK each response would stall ~40 ms (real servers set NODELAY).
        disable_nagle_algorithm = True

        def log_message(self, *args):  # keep test output clean
            pass

        def do_GET(self):
            if self.path == "/_control/state":
                return _send(self, 200, server.state())
            _send(self, 404, {"error": {"message": f"no GET {self.path}"}})

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if self.path.startswith("/_control/"):
                try:
                    return _send(self, 200, server.control(self.path, json.loads(body or b"{}")))
                except (ValueError, KeyError) as err:
                    return _send(self, 400, {"error": {"message": str(err)}})
            server.chat(self, body)

    httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    httpd.daemon_threads = True
    httpd.serve_forever()


# -- the test's handle ------------------------------------------------------------------------


@dataclass
class Seen:
    """One chat request as the server received it."""

    text: str
    """The user turn's text."""
    system: str | None
    """The system message, if the request had one."""
    images: int
    ids: list[str]
    fault: str | None
    outcome: int | str | None
    """HTTP status sent, ``drop`` (connection closed unanswered), ``hangup`` (the client gave
    up waiting) or ``timeout`` (a `slow` fault outlasted ``slow_seconds``)."""
    t: float
    """When the request arrived (the server's monotonic clock, seconds)."""
    usage: dict | None = None
    """The ``usage`` answered (`usage_of`); None when unanswered or the server reports none."""


@dataclass
class FakeOpenAIServer:
    """Start with `start()` (or as a context manager); `url` is the ``base_url`` for clients.

    Fields are the server's start settings (see ``SETTINGS``); `faults` are queued at start.
    Reading `requests`, `problems`, `answered`, `max_inflight` or `request_count` asks the
    server what it has seen so far."""

    model: str = "fake-judge"
    api_key: str | None = None
    latency: float = 0.0
    slow_seconds: float = 60.0
    faults: list[str | None] = field(default_factory=list)
    unmet: set[str] = field(default_factory=set)
    """judging=fixed: criterion ids answered ``met: false`` (all others ``true``)."""
    score: int = 7
    rubric: dict = field(default_factory=lambda: DEFAULT_RUBRIC)
    judging: str = "fixed"
    pools: list[str] = field(default_factory=list)
    gate: int = 0

    def __post_init__(self):
        self._proc: subprocess.Popen | None = None
        self.port: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def _start_settings(self) -> dict:
        return {"model": self.model, "api_key": self.api_key, "latency": self.latency,
                "slow_seconds": self.slow_seconds, "faults": list(self.faults),
                "unmet": sorted(self.unmet), "score": self.score, "rubric": self.rubric,
                "judging": self.judging, "pools": [str(p) for p in self.pools], "gate": self.gate}

    def start(self, timeout: float = 30.0) -> FakeOpenAIServer:
        """Start the server process and wait (at most `timeout` s) until its port answers."""
        self._log = tempfile.NamedTemporaryFile("w+", prefix="fake-openai-", suffix=".log")
        for _ in range(3):  # the free port can be taken between our probe and the server's bind
            self.port = _free_port()
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "rdpo.dev.bench.openai_server", "--port", str(self.port),
                 "--settings", json.dumps(self._start_settings())],
                stdout=self._log, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + timeout
            while self._proc.poll() is None and time.monotonic() < deadline:
                try:
                    socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                    return self
                except OSError:
                    time.sleep(0.05)
            if self._proc.poll() is None:
                self.stop()
                raise RuntimeError(f"fake OpenAI server not listening after {timeout:.0f} s")
        self._log.seek(0)
        raise RuntimeError(f"fake OpenAI server did not start:\n{self._log.read()[-3000:]}")

    def stop(self) -> None:
        """End the server process: open connections are closed, new ones refused."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        self._log.close()

    # -- control --------------------------------------------------------------------------------

    def _call(self, path: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read())

    def queue(self, *faults: str | None) -> None:
        """Queue faults for the next requests, one each, in arrival order."""
        self._call("/_control/faults", {"faults": list(faults)})

    def configure(self, **settings) -> None:
        """Change settings of the running server (``unmet``, ``score``, ``judging``, ...)."""
        if "unmet" in settings:
            settings["unmet"] = sorted(settings["unmet"])
        self._call("/_control/settings", settings)

    def hold_after(self, n: int) -> int:
        """Let `n` more chat requests through, then hold the rest unanswered until `release`
        (or until their client hangs up); returns how many were answered before."""
        return self._call("/_control/hold", {"n": n})["answered"]

    def release(self) -> None:
        self._call("/_control/hold", {"n": None})

    def reset(self) -> None:
        """Back to the start settings, with nothing seen and no fault queued."""
        self._call("/_control/reset", {})

    def state(self) -> dict:
        return self._call("/_control/state")

    @property
    def requests(self) -> list[Seen]:
        return [Seen(**s) for s in self.state()["requests"]]

    @property
    def request_count(self) -> int:
        return len(self.state()["requests"])

    @property
    def problems(self) -> list[str]:
        return self.state()["problems"]

    @property
    def answered(self) -> list[str]:
        """The prompt texts answered (HTTP 200), in the order the answers went out."""
        return self.state()["answered"]

    @property
    def usage(self) -> dict:
        """Prompt and completion tokens of every answer sent so far (`usage_of`)."""
        return self.state()["usage"]

    @property
    def max_inflight(self) -> int:
        """The most chat requests the server had in progress at one time."""
        return self.state()["max_inflight"]

    def judge_overrides(self, concurrency: int = 2) -> list[str]:
        """`rdpo.fit` overrides that make this server the run's judge."""
        return ["judge.kind=openai", f"judge.model={self.model}", f"judge.base_url={self.url}",
                f"judge.concurrency={concurrency}", "judge.max_retries=1", "judge.timeout=20"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="fake OpenAI-compatible server (tests)")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--settings", default="{}", help="JSON object of start settings")
    args = parser.parse_args()
    serve(args.port, json.loads(args.settings))
