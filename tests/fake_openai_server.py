"""A fault-injecting OpenAI-compatible server on loopback, for judge and rubric-builder tests.

A real HTTP server (``http.server`` in a thread) answering ``POST /v1/chat/completions``. It
checks every request it receives (model name, bearer key, the image present as a decodable
base64 data URL, a text part, criterion ids listed in a judge prompt) and records a problem
(answering 400) for any that is wrong. Faults are queued in `faults` and consumed one per
request: ``500``, ``429``, ``drop`` (close the connection without answering), ``slow`` (sleep
past the client's timeout), ``malformed`` (an answer with no JSON), ``missing`` (leave one
criterion out) and ``invalid_rubric`` (a generator answer that is not a valid rubric).
"""

from __future__ import annotations

import base64
import io
import json
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image

_DATA_URL = re.compile(r"^data:image/(png|jpeg|webp);base64,([A-Za-z0-9+/=]+)$")
_CRITERION = re.compile(r"^\[([^\]\s]+)\] ", re.MULTILINE)

DEFAULT_RUBRIC = {
    "essential": [{"id": "E1", "text": "States the main fact correctly."}],
    "additional": [{"id": "A1", "text": "Does not mention objects absent from the image.",
                    "weight": 0.5}],
}


@dataclass
class Seen:
    """One request as received."""

    text: str
    images: int
    ids: list[str]
    fault: str | None


@dataclass
class FakeOpenAIServer:
    """Start with `start()` (or as a context manager); `url` is the ``base_url`` for clients."""

    model: str = "fake-judge"
    api_key: str | None = None
    latency: float = 0.0
    slow_seconds: float = 2.0
    faults: list[str] = field(default_factory=list)
    unmet: set[str] = field(default_factory=set)
    """Criterion ids answered ``met: false`` (all others ``true``)."""
    score: int = 7
    rubric: dict = field(default_factory=lambda: DEFAULT_RUBRIC)
    requests: list[Seen] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    max_inflight: int = 0

    def __post_init__(self):
        self._lock = threading.Lock()
        self._inflight = 0
        self._httpd: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def start(self) -> FakeOpenAIServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body go out in separate writes; with Nagle's algorithm and the
            # client's delayed ACK each response would stall ~40 ms (real servers set NODELAY).
            disable_nagle_algorithm = True

            def log_message(self, *args):  # keep test output clean
                pass

            def do_POST(self):
                server._handle(self)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- request handling -------------------------------------------------------------------

    def _problem(self, message: str) -> str:
        with self._lock:
            self.problems.append(message)
        return message

    def _check(self, h: BaseHTTPRequestHandler, body: bytes) -> tuple[str, int] | str:
        """(prompt text, image count) of a well-formed request, else the problem found."""
        if h.path != "/v1/chat/completions":
            return self._problem(f"unexpected path {h.path}")
        if self.api_key is not None and h.headers.get("Authorization") != f"Bearer {self.api_key}":
            return self._problem("missing or wrong bearer key")
        try:
            req = json.loads(body)
        except json.JSONDecodeError:
            return self._problem("request body is not JSON")
        if req.get("model") != self.model:
            return self._problem(f"model {req.get('model')!r}, expected {self.model!r}")
        messages = req.get("messages")
        if not isinstance(messages, list) or not messages:
            return self._problem("no messages")
        content = messages[-1].get("content")
        if not isinstance(content, list):
            return self._problem("user content is not a list of parts")
        texts = [p.get("text", "") for p in content if p.get("type") == "text"]
        urls = [p.get("image_url", {}).get("url", "") for p in content
                if p.get("type") == "image_url"]
        if not texts:
            return self._problem("no text part")
        if not urls:
            return self._problem("no image part")
        for url in urls:
            m = _DATA_URL.match(url)
            if not m:
                return self._problem(f"image is not a base64 data URL: {url[:40]!r}")
            try:
                with Image.open(io.BytesIO(base64.b64decode(m.group(2)))) as im:
                    im.verify()
            except Exception as err:
                return self._problem(f"image data URL does not decode: {err}")
        text = "\n".join(texts)
        if '"verdicts"' in text and not _CRITERION.findall(text):
            return self._problem("judge prompt lists no criterion ids")
        return text, len(urls)

    def _answer(self, text: str, fault: str | None) -> str:
        if fault == "malformed":
            return "I think the response is mostly fine, verdicts: E1 yes"
        if '"verdicts"' in text:
            ids = _CRITERION.findall(text)
            if fault == "missing":
                ids = ids[:-1]
            verdicts = [{"id": i, "met": i not in self.unmet} for i in ids]
            # Prose and a code fence around the JSON, as real models often write.
            return "Here is my grading:\n```json\n" + json.dumps({"verdicts": verdicts}) + "\n```"
        if '"score"' in text:
            return json.dumps({"score": self.score})
        if fault == "invalid_rubric":
            return json.dumps({"essential": [], "additional": [{"id": "A1", "text": "x",
                                                                 "weight": -1}]})
        return "```json\n" + json.dumps(self.rubric) + "\n```"

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        with self._lock:
            self._inflight += 1
            self.max_inflight = max(self.max_inflight, self._inflight)
            fault = self.faults.pop(0) if self.faults else None
        try:
            body = h.rfile.read(int(h.headers.get("Content-Length", 0)))
            checked = self._check(h, body)
            if isinstance(checked, str):
                return self._send(h, 400, {"error": {"message": checked}})
            text, n_images = checked
            with self._lock:
                self.requests.append(Seen(text, n_images, _CRITERION.findall(text), fault))
            if self.latency:
                time.sleep(self.latency)
            if fault == "drop":
                h.close_connection = True
                h.connection.shutdown(socket.SHUT_RDWR)
                return
            if fault == "slow":
                time.sleep(self.slow_seconds)
            if fault in ("500", "429"):
                # retry-after-ms keeps the client's backoff short in tests.
                return self._send(h, int(fault), {"error": {"message": f"injected {fault}"}},
                                  {"retry-after-ms": "10"})
            content = self._answer(text, fault)
            self._send(h, 200, {
                "id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()),
                "model": self.model,
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": content}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout): nothing to answer
        finally:
            with self._lock:
                self._inflight -= 1

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, status: int, obj: dict, headers: dict | None = None):
        data = json.dumps(obj).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(data)

    @property
    def request_count(self) -> int:
        with self._lock:
            return len(self.requests)
