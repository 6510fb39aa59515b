"""Chat backends: *how* to ask a VLM one question about some images, shared by the judges and the
offline rubric builder (which differ only in *what* they ask).

Every backend has ``complete(requests, *, deadline=None, on_answer=None) -> list[str]``: one
answer per `ChatRequest`, in order; ``on_answer(index, answer)`` is called (in the caller's
thread) as each answer arrives, so a caller can keep what it received before a failure, and
past `deadline` (a `time.monotonic` value) the call raises `ChatTimeout`. `TransformersChat`
runs a local model (batched); `OpenAIChat` calls any OpenAI-compatible
``/v1/chat/completions`` endpoint (vLLM, SGLang, TGI, hosted) with a concurrency limit, a
per-request timeout and the official client's bounded retries with exponential backoff.
Transport failures that survive the retries raise `ChatError` at once: requests not yet sent
are cancelled, none is waited for. Answers are returned verbatim (parsing them is the caller's
business, see `extract_json`). A request's `system` text goes first, as a system message
where the backend can send one. `make_chat` builds the backend a `JudgeConfig` section
describes; the backends themselves take explicit settings, with no defaults of their own for
what the config sets.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import io
import json
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

if TYPE_CHECKING:
    from rdpo.config import JudgeConfig


class ChatError(RuntimeError):
    """A request that could not be answered (endpoint unreachable, HTTP error after retries)."""


class ChatTimeout(ChatError):
    """Requests still unanswered when the caller's deadline passed."""


@dataclass(frozen=True)
class ChatRequest:
    """One user turn: the images (files) first, then the text; `system`: instructions that
    precede the turn (a system message where the backend has one)."""

    images: tuple[Path, ...]
    text: str
    system: str | None = None


OnAnswer = Callable[[int, str], None]


@dataclass(frozen=True)
class RequestUsage:
    """What one answered request cost: tokens in and out, and its seconds (an HTTP request's
    latency, retries included; a local batch's time shared by its requests)."""

    prompt_tokens: int
    completion_tokens: int
    seconds: float


class Usage:
    """A backend's running totals of answered requests and their tokens (`RequestUsage`), safe
    to add to from worker threads. `last`: one `RequestUsage` (None: unanswered) per request of
    the latest ``complete`` call, for a caller that attributes cost per request (the rubric
    builder)."""

    def __init__(self) -> None:
        self.answers = self.prompt_tokens = self.completion_tokens = 0
        self.last: list[RequestUsage | None] = []
        self._lock = threading.Lock()

    def start(self, n: int) -> None:
        self.last = [None] * n

    def add(self, index: int, used: RequestUsage) -> None:
        with self._lock:
            self.answers += 1
            self.prompt_tokens += used.prompt_tokens
            self.completion_tokens += used.completion_tokens
            if index < len(self.last):
                self.last[index] = used

    def totals(self) -> dict[str, int]:
        with self._lock:
            return {"answers": self.answers, "prompt_tokens": self.prompt_tokens,
                    "completion_tokens": self.completion_tokens}


def extract_json(text: str, key: str) -> dict | None:
    """The last JSON object in `text` that has `key`, or None.

    A model's answer is prose, maybe a quote of the response it grades (which can itself hold
    JSON, even an object with `key`), then its own JSON, last. So every ``{`` is tried as the
    start of an object, left to right, and the last object with `key` wins; an object with
    `key` is taken whole (objects inside it are not candidates), one without it is searched
    inside (``{"a": {"score": 5}}`` gives ``{"score": 5}``). Code fences need no special case:
    the object in a fence is found where it stands. If the text tries an object with `key`
    after the last one that parses (``{"verdicts": [...`` cut off at the token limit), the
    answer is None, so the caller asks again rather than read an earlier, quoted object.
    Not JSON, hence not an object: ``NaN``/``Infinity`` (Python's decoder would take them) and a
    number too long to convert; nesting deeper than Python's recursion limit makes the whole
    answer None (no start inside it could parse either).
    """
    decoder = json.JSONDecoder(parse_constant=_not_json, parse_float=_finite)
    opener = re.compile(r"\{\s*" + re.escape(json.dumps(key)) + r"\s*:")
    found, end, broken, pos = None, 0, -1, 0
    while match := _OBJECT_START.search(text, pos):
        start = match.start()
        try:
            obj, stop = decoder.raw_decode(text, start)
        except RecursionError:
            return None
        except ValueError:  # JSONDecodeError, a non-finite constant, an over-long integer
            if opener.match(text, start):
                broken = start
            pos = start + 1
            continue
        if isinstance(obj, dict) and key in obj:
            found, end, pos = obj, stop, stop
        else:
            pos = start + 1
    return None if broken >= end else found


# Where an object can start: "{" then a key or "}". Every failed start costs a JSONDecodeError,
# which scans the text for its line number: a run of bare "{" would be quadratic.
_OBJECT_START = re.compile(r'\{\s*["}]')


def _not_json(name: str):
    raise ValueError(f"{name} is not JSON")


def _finite(literal: str) -> float:
    value = float(literal)
    if value in (float("inf"), float("-inf")):  # 1e999: valid JSON, but no number
        raise ValueError(f"{literal} overflows")
    return value


_HASHES: dict[tuple[str, int, int], str] = {}


def image_hash(path: Path) -> str:
    """sha256 of an image file's bytes (memoised by path, size and mtime)."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        _HASHES[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return _HASHES[key]


def data_url(path: Path) -> str:
    """The image as a base64 ``data:`` URL carrying its pixels and nothing else: no EXIF (camera,
    GPS, dates), ICC profile, comment or text chunk reaches a server. A JPEG keeps its coded
    pixels with its metadata segments dropped (`_strip_jpeg`); any other image is re-encoded as
    a PNG of its RGB pixels, the pixels rdpo's processor sees (`rdpo.pool.load_images`)."""
    st = path.stat()
    fmt, raw = _clean_image(str(path), st.st_size, st.st_mtime_ns)
    return f"data:image/{fmt};base64,{base64.b64encode(raw).decode('ascii')}"


@functools.lru_cache(maxsize=32)  # a prompt's K responses are judged at once, on one image
def _clean_image(path: str, size: int, mtime_ns: int) -> tuple[str, bytes]:
    raw = Path(path).read_bytes()
    with Image.open(io.BytesIO(raw)) as im:
        if im.format == "JPEG" and (stripped := _strip_jpeg(raw)) is not None:
            return "jpeg", stripped
        rgb = im.convert("RGB")
    rgb.info = {}  # convert copies the source's info (icc_profile, exif), which save would write
    buf = io.BytesIO()
    rgb.save(buf, format="PNG")
    return "png", buf.getvalue()


# JPEG segments that only describe the image (APP1: EXIF/XMP, APP2: ICC, APP3-13, APP15, COM):
# dropping them leaves the coded pixels, and so every decoder's output, unchanged. APP0 (JFIF)
# and APP14 (Adobe: the colour transform of the coded data) stay.
_JPEG_METADATA = frozenset([*range(0xE1, 0xEE), 0xEF, 0xFE])


def _strip_jpeg(raw: bytes) -> bytes | None:
    """`raw` without its metadata segments, or None when it does not parse as a baseline
    marker sequence or PIL still finds metadata in the result (the caller re-encodes)."""
    if raw[:2] != b"\xff\xd8":
        return None
    out, i = [raw[:2]], 2
    while i + 4 <= len(raw):
        if raw[i] != 0xFF:
            return None
        marker = raw[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0xDA:  # start of scan: the coded data follows, kept as it is
            out.append(raw[i:])
            break
        length = int.from_bytes(raw[i + 2:i + 4], "big")
        if length < 2:
            return None
        if marker not in _JPEG_METADATA:
            out.append(raw[i:i + 2 + length])
        i += 2 + length
    else:
        return None
    stripped = b"".join(out)
    try:
        with Image.open(io.BytesIO(stripped)) as im:
            if set(im.info) & {"exif", "icc_profile", "comment", "xmp"} or im.getexif():
                return None  # metadata after the first scan (rare): re-encode instead
    except Exception:
        return None
    return stripped


class TransformersChat:
    """A local VLM through transformers (``AutoModelForImageTextToText`` + ``AutoProcessor``).

    Requests are left-padded into batches of `batch_size` and decoded greedily by default, so a
    judge gives the same verdict for the same question. Pass a path, or a loaded
    ``(model, processor)`` to share weights with a policy already in memory. A request's
    `system` text is a system message where the chat template renders one (with these images),
    else the start of the user turn (`judge_messages`).
    """

    def __init__(self, model: str | Path | tuple, *, batch_size: int, max_new_tokens: int,
                 temperature: float = 0.0, dtype: str = "auto", device: str | None = None):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        if isinstance(model, tuple):
            self.model, self.processor = model
            self.name = getattr(self.model.config, "_name_or_path", "") or type(self.model).__name__
        else:
            self.name = str(model)
            self.processor = AutoProcessor.from_pretrained(model)
            torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
            self.model = AutoModelForImageTextToText.from_pretrained(model, dtype=torch_dtype)
            self.model.eval()
            if device is None:
                device = "cuda" if torch.cuda.is_available() else "cpu"
            self.model.to(device)
        self.batch_size, self.max_new_tokens, self.temperature = batch_size, max_new_tokens, temperature
        self.usage = Usage()
        """Tokens counted with the judge's own tokenizer: the prompt as encoded (image
        placeholder tokens included), the answer as sampled (its end-of-turn id included)."""

    def identity(self) -> dict:
        """What decides this backend's answers besides the prompt (part of judge cache keys)."""
        return {"backend": "transformers", "model": self.name,
                "max_new_tokens": self.max_new_tokens, "temperature": self.temperature}

    @property
    def special_tokens(self) -> tuple[str, ...]:
        """Every string this tokenizer reads as one special token (a judge keeps them out of
        the text it quotes)."""
        tok = getattr(self.processor, "tokenizer", self.processor)
        added = [t.content for t in tok.added_tokens_decoder.values() if t.special]
        return tuple(sorted(set(added) | set(tok.all_special_tokens)))

    def complete(self, requests: Sequence[ChatRequest], *, deadline: float | None = None,
                 on_answer: OnAnswer | None = None) -> list[str]:
        """One greedy (or sampled) answer per request, in order.

        Through the policy's own sampler (`rdpo.rollout.generate`): the same stop ids,
        suppressed vision tokens and explicit generation settings. `deadline` is checked
        between batches (a batch in progress is not interrupted).
        """
        from rdpo.config import RolloutConfig
        from rdpo.pool import PromptRecord, Rubric
        from rdpo.rollout import generate

        records = [PromptRecord(id=str(i), images=tuple(req.images), instruction=req.text,
                                rubric=Rubric(essential=(), additional=()))
                   for i, req in enumerate(requests)]
        settings = RolloutConfig(samples_per_prompt=1, max_new_tokens=self.max_new_tokens,
                                 temperature=self.temperature, batch_size=self.batch_size)
        answers = []
        prompts = _Prompts(self.processor, requests)
        self.usage.start(len(requests))
        mark = time.perf_counter()
        for i, rollout in enumerate(generate(self.model, self.processor, records, settings,
                                             prompts=prompts)):
            answers.append(rollout.responses[0])
            if i % self.batch_size == 0:  # a batch's answers arrive together: it shares its time
                now = time.perf_counter()
                share, mark = (now - mark) / min(self.batch_size, len(requests) - i), now
            self.usage.add(i, RequestUsage(prompts.lengths.get(i, 0),
                                           len(rollout.token_ids[0]) if rollout.token_ids else 0,
                                           share))
            if on_answer is not None:
                on_answer(i, answers[-1])
            if deadline is not None and time.monotonic() > deadline and i + 1 < len(requests):
                raise ChatTimeout(f"judge {self.name}: {len(requests) - i - 1} of "
                                  f"{len(requests)} requests unanswered at the deadline")
        return answers


def judge_messages(processor, request: ChatRequest) -> list[dict]:
    """The chat messages of `request` for a local processor's template: `system` as a system
    message where the template renders it with these images (Qwen, Gemma 3, Idefics3, ...;
    Llama 3.2 Vision refuses a system message beside an image), else at the top of the user
    turn."""
    user = [{"type": "image"} for _ in request.images]
    if not request.system:
        return [{"role": "user", "content": [*user, {"type": "text", "text": request.text}]}]
    user.append({"type": "text", "text": request.text})
    probe_user = [*user[:-1], {"type": "text", "text": "\x00user"}]
    # Templates differ in what a system message's content may be (a string, or parts): the
    # first form the template renders, whole and once, is the one it has.
    for content in (request.system, [{"type": "text", "text": request.system}]):
        probe = [{"role": "system", "content": "\x00system"
                  if isinstance(content, str) else [{"type": "text", "text": "\x00system"}]},
                 {"role": "user", "content": probe_user}]
        try:
            text = processor.apply_chat_template(probe, add_generation_prompt=True,
                                                 tokenize=False)
        except Exception:  # noqa: BLE001  (jinja's raise_exception, a TypeError in a template)
            continue
        if text.count("\x00system") == 1 and "'type'" not in text:
            return [{"role": "system", "content": content}, {"role": "user", "content": user}]
    user[-1] = {"type": "text", "text": f"{request.system}\n\n{request.text}"}
    return [{"role": "user", "content": user}]


class _Prompts:
    """`rdpo.rollout.generate`'s prompt source for judge requests (record id = request index):
    the system message rendered where the template has one."""

    def __init__(self, processor, requests: Sequence[ChatRequest]):
        self.processor, self.requests = processor, requests
        self.lengths: dict[int, int] = {}
        """Request index -> its prompt's length in tokens (as encoded, before padding)."""

    def get(self, record) -> dict:
        from rdpo.pool import load_images

        messages = judge_messages(self.processor, self.requests[int(record.id)])
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True,
                                                  tokenize=False)
        # The template writes every special token itself (see rdpo.engine.encode.encode_prompt).
        encoded = dict(self.processor(text=[text], images=load_images(record) or None,
                                      return_tensors="pt", add_special_tokens=False))
        self.lengths[int(record.id)] = int(encoded["input_ids"].shape[-1])
        return encoded


class OpenAIChat:
    """An OpenAI-compatible ``/v1/chat/completions`` endpoint through the official client.

    Up to `concurrency` requests are in flight at once (worker threads over one pooled HTTP
    client). Connection errors, timeouts, 408/409/429 and 5xx are retried by the client up to
    `max_retries` times with exponential backoff (0.5 s doubling to 8 s, jittered); a
    server's ``retry-after`` (or ``retry-after-ms``) of up to 120 s is honoured instead (the
    openai client's own rule; a longer one is not retried). A request still rate limited
    (429) after that gets `rate_limit_retries` more, by the same client rules: a rate limit is
    the server asking for time, not failing. `timeout` bounds each attempt. The first request
    that fails for good ends the call: requests not yet sent are cancelled and the ones in
    flight are left to finish on their own (daemon threads: they never hold up the caller or
    the process's exit). `system_role`: send a request's `system` text as a system message
    (else at the top of the user turn, for served templates that refuse one). The API key is
    read from the environment variable named `api_key_env` and kept only inside the client:
    it is never part of this object's repr, a log line, a saved config or a cache key.
    """

    def __init__(self, base_url: str, model: str, *, api_key_env: str | None, concurrency: int,
                 timeout: float, max_retries: int, max_tokens: int, rate_limit_retries: int,
                 system_role: bool, temperature: float = 0.0):
        import openai

        if api_key_env:
            api_key = os.environ.get(api_key_env)
            if not api_key:
                raise ChatError(f"environment variable {api_key_env} (judge.api_key_env) is not "
                                f"set; export it with the API key for {base_url}")
        else:
            api_key = "EMPTY"  # local servers (vLLM, SGLang) accept any key
        self.base_url, self.name, self.concurrency = base_url, model, concurrency
        self.max_retries, self.max_tokens, self.temperature = max_retries, max_tokens, temperature
        self.rate_limit_retries, self.system_role = rate_limit_retries, system_role
        self._client = openai.OpenAI(
            base_url=base_url, api_key=api_key, timeout=timeout, max_retries=max_retries,
            # One connection per worker thread: the pool must not be the concurrency limit.
            http_client=openai.DefaultHttpxClient(limits=_limits(concurrency)))
        self.usage = Usage()
        """The tokens each response's ``usage`` reports (a server that reports none counts 0,
        with one warning)."""
        self._warned_usage = False

    def __repr__(self) -> str:
        return f"OpenAIChat(base_url={self.base_url!r}, model={self.name!r})"

    def identity(self) -> dict:
        """What decides this endpoint's answers besides the prompt (part of judge cache keys):
        a new judge served under the same name elsewhere, or asked with other sampling
        settings, is another judge."""
        return {"backend": "openai", "base_url": self.base_url.rstrip("/"), "model": self.name,
                "max_tokens": self.max_tokens, "temperature": self.temperature,
                "system_role": self.system_role}

    def messages(self, req: ChatRequest) -> list[dict]:
        """The request's chat messages: images, then text; `system` first."""
        text = req.text
        if req.system and not self.system_role:
            text = f"{req.system}\n\n{text}"
        content: list[dict] = [{"type": "image_url", "image_url": {"url": data_url(p)}}
                               for p in req.images]
        content.append({"type": "text", "text": text})
        system = [{"role": "system", "content": req.system}] if req.system and self.system_role else []
        return [*system, {"role": "user", "content": content}]

    def _one(self, req: ChatRequest, index: int = -1) -> str:
        import openai

        start = time.perf_counter()
        kwargs = dict(model=self.name, messages=self.messages(req), max_tokens=self.max_tokens,
                      temperature=self.temperature)
        retries = self.max_retries
        try:
            try:
                resp = self._client.chat.completions.create(**kwargs)
            except openai.RateLimitError:
                if not self.rate_limit_retries:
                    raise
                retries += 1 + self.rate_limit_retries
                resp = self._client.with_options(max_retries=self.rate_limit_retries) \
                    .chat.completions.create(**kwargs)
        except openai.APIConnectionError as err:  # includes timeouts
            raise ChatError(f"cannot reach {self.base_url} ({type(err).__name__}: {err}) after "
                            f"{retries} retries") from None
        except openai.APIStatusError as err:
            after = err.response.headers.get("retry-after")
            after = f" (retry-after: {after} s; the client waits at most 120 s)" if after else ""
            raise ChatError(f"{self.base_url} answered HTTP {err.status_code} after "
                            f"{retries} retries{after}: {err.message}") from None
        self._count(index, resp, time.perf_counter() - start)
        if not resp.choices:
            return ""
        return resp.choices[0].message.content or ""

    def _count(self, index: int, resp, seconds: float) -> None:
        usage = getattr(resp, "usage", None)
        if usage is None and not self._warned_usage:
            self._warned_usage = True
            import logging

            logging.getLogger("rdpo").warning(
                "%s reports no token usage in its answers: their tokens count as 0 in cost.json",
                self.base_url)
        self.usage.add(index, RequestUsage(int(getattr(usage, "prompt_tokens", 0) or 0),
                                           int(getattr(usage, "completion_tokens", 0) or 0),
                                           seconds))

    def complete(self, requests: Sequence[ChatRequest], *, deadline: float | None = None,
                 on_answer: OnAnswer | None = None) -> list[str]:
        """One answer per request, in order; the first request that fails raises its
        `ChatError` at once (nothing more is sent), and `ChatTimeout` past `deadline`."""
        todo: queue.SimpleQueue[int] = queue.SimpleQueue()
        for i in range(len(requests)):
            todo.put(i)
        done: queue.SimpleQueue[tuple[int, str | None, BaseException | None]] = queue.SimpleQueue()
        stop = threading.Event()
        self.usage.start(len(requests))

        def work() -> None:
            while not stop.is_set():
                try:
                    i = todo.get_nowait()
                except queue.Empty:
                    return
                try:
                    done.put((i, self._one(requests[i], i), None))
                except BaseException as err:  # noqa: BLE001  (handed to the caller's thread)
                    stop.set()  # before the caller hears of it: no worker sends another
                    done.put((i, None, err))

        for _ in range(min(self.concurrency, len(requests))):
            threading.Thread(target=work, daemon=True, name="rdpo-openai-chat").start()
        answers: list[str] = [""] * len(requests)
        try:
            for received in range(len(requests)):
                wait = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    i, answer, err = done.get(timeout=wait)
                except queue.Empty:
                    raise ChatTimeout(
                        f"judge {self.base_url}: {len(requests) - received} of {len(requests)} "
                        "requests unanswered at the deadline") from None
                if err is not None:
                    raise err
                answers[i] = answer
                if on_answer is not None:
                    on_answer(i, answer)
        finally:
            stop.set()  # a failure or the deadline: the workers send nothing more
        return answers

    def close(self) -> None:
        self._client.close()


def _limits(concurrency: int):
    try:  # openai >= 3 ships on httpx2; older releases on httpx
        import httpx2 as httpx
    except ImportError:
        import httpx

    return httpx.Limits(max_connections=max(concurrency, 1),
                        max_keepalive_connections=max(concurrency, 1))


def make_chat(cfg: JudgeConfig, model: tuple | None = None) -> TransformersChat | OpenAIChat:
    """The backend of a ``transformers`` or ``openai`` `JudgeConfig` (greedy answers);
    `model`: an already loaded ``(model, processor)`` to use instead of loading ``cfg.model``."""
    if cfg.kind == "openai":
        return OpenAIChat(cfg.base_url, cfg.model, api_key_env=cfg.api_key_env,
                          concurrency=cfg.concurrency, timeout=cfg.timeout,
                          max_retries=cfg.max_retries, max_tokens=cfg.max_tokens,
                          rate_limit_retries=cfg.rate_limit_retries,
                          system_role=cfg.system_role)
    if cfg.kind == "transformers":
        return TransformersChat(model or cfg.model, batch_size=cfg.batch_size,
                                max_new_tokens=cfg.max_tokens)
    raise ValueError(f"judge.kind: {cfg.kind!r} has no chat backend (transformers, openai)")
