"""Chat backends: *how* to ask a VLM one question about some images, shared by the judges and the
offline rubric builder (which differ only in *what* they ask).

Every backend has ``complete(requests) -> list[str]``: one answer per `ChatRequest`, in order.
`TransformersChat` runs a local model (batched); `OpenAIChat` calls any OpenAI-compatible
``/v1/chat/completions`` endpoint (vLLM, SGLang, TGI, hosted) with a concurrency limit, a
per-request timeout and the official client's bounded retries with exponential backoff.
Transport failures that survive the retries raise `ChatError`; answers are returned verbatim
(parsing them is the caller's business, see `extract_json`). `make_chat` builds the backend a
`JudgeConfig` section describes; the backends themselves take explicit settings, with no
defaults of their own for what the config sets.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

if TYPE_CHECKING:
    from rdpo.config import JudgeConfig


class ChatError(RuntimeError):
    """A request that could not be answered (endpoint unreachable, HTTP error after retries)."""


@dataclass(frozen=True)
class ChatRequest:
    """One user turn: the images (files) first, then the text."""

    images: tuple[Path, ...]
    text: str


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
    """
    decoder = json.JSONDecoder()
    opener = re.compile(r"\{\s*" + re.escape(json.dumps(key)) + r"\s*:")
    found, end, broken, pos = None, 0, -1, 0
    while (start := text.find("{", pos)) >= 0:
        try:
            obj, stop = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            if opener.match(text, start):
                broken = start
            pos = start + 1
            continue
        if isinstance(obj, dict) and key in obj:
            found, end, pos = obj, stop, stop
        else:
            pos = start + 1
    return None if broken >= end else found


_HASHES: dict[tuple[str, int, int], str] = {}


def image_hash(path: Path) -> str:
    """sha256 of an image file's bytes (memoised by path, size and mtime)."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        _HASHES[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return _HASHES[key]


def data_url(path: Path) -> str:
    """The image file as a base64 ``data:`` URL; formats other than PNG/JPEG/WebP become PNG."""
    raw = path.read_bytes()
    with Image.open(io.BytesIO(raw)) as im:
        fmt = (im.format or "").upper()
        if fmt not in ("PNG", "JPEG", "WEBP"):
            buf = io.BytesIO()
            im.convert("RGB").save(buf, format="PNG")
            raw, fmt = buf.getvalue(), "PNG"
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(raw).decode('ascii')}"


class TransformersChat:
    """A local VLM through transformers (``AutoModelForImageTextToText`` + ``AutoProcessor``).

    Requests are left-padded into batches of `batch_size` and decoded greedily by default, so a
    judge gives the same verdict for the same question. Pass a path, or a loaded
    ``(model, processor)`` to share weights with a policy already in memory.
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

    def complete(self, requests: Sequence[ChatRequest]) -> list[str]:
        """One greedy (or sampled) answer per request, in order.

        Through the policy's own sampler (`rdpo.rollout.generate`): the same chat template,
        stop ids, suppressed vision tokens and explicit generation settings.
        """
        from rdpo.config import RolloutConfig
        from rdpo.pool import PromptRecord, Rubric
        from rdpo.rollout import generate

        records = [PromptRecord(id=str(i), images=tuple(req.images), instruction=req.text,
                                rubric=Rubric(essential=(), additional=()))
                   for i, req in enumerate(requests)]
        settings = RolloutConfig(samples_per_prompt=1, max_new_tokens=self.max_new_tokens,
                                 temperature=self.temperature, batch_size=self.batch_size)
        return [r.responses[0] for r in generate(self.model, self.processor, records, settings)]


class OpenAIChat:
    """An OpenAI-compatible ``/v1/chat/completions`` endpoint through the official client.

    Up to `concurrency` requests are in flight at once (a thread pool over one pooled HTTP
    client). Connection errors, timeouts, 408/409/429 and 5xx are retried by the client up to
    `max_retries` times with exponential backoff (0.5 s doubling, jittered; a server's
    ``retry-after`` is honoured); `timeout` bounds each attempt. The API key is read from the
    environment variable named `api_key_env` and kept only inside the client: it is never
    part of this object's repr, a log line, a saved config or a cache key.
    """

    def __init__(self, base_url: str, model: str, *, api_key_env: str | None, concurrency: int,
                 timeout: float, max_retries: int, max_tokens: int, temperature: float = 0.0):
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
        self._client = openai.OpenAI(
            base_url=base_url, api_key=api_key, timeout=timeout, max_retries=max_retries,
            # One connection per worker thread: the pool must not be the concurrency limit.
            http_client=openai.DefaultHttpxClient(limits=_limits(concurrency)))

    def __repr__(self) -> str:
        return f"OpenAIChat(base_url={self.base_url!r}, model={self.name!r})"

    def _one(self, req: ChatRequest) -> str:
        import openai

        content: list[dict] = [{"type": "image_url", "image_url": {"url": data_url(p)}}
                               for p in req.images]
        content.append({"type": "text", "text": req.text})
        try:
            resp = self._client.chat.completions.create(
                model=self.name, messages=[{"role": "user", "content": content}],
                max_tokens=self.max_tokens, temperature=self.temperature)
        except openai.APIConnectionError as err:  # includes timeouts
            raise ChatError(f"cannot reach {self.base_url} ({type(err).__name__}: {err}) after "
                            f"{self.max_retries} retries") from None
        except openai.APIStatusError as err:
            raise ChatError(f"{self.base_url} answered HTTP {err.status_code} after "
                            f"{self.max_retries} retries: {err.message}") from None
        if not resp.choices:
            return ""
        return resp.choices[0].message.content or ""

    def complete(self, requests: Sequence[ChatRequest]) -> list[str]:
        """One answer per request, in order; raises `ChatError` if any request fails."""
        if len(requests) <= 1:
            return [self._one(r) for r in requests]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(requests))) as pool:
            return list(pool.map(self._one, requests))

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
                          max_retries=cfg.max_retries, max_tokens=cfg.max_tokens)
    if cfg.kind == "transformers":
        return TransformersChat(model or cfg.model, batch_size=cfg.batch_size,
                                max_new_tokens=cfg.max_tokens)
    raise ValueError(f"judge.kind: {cfg.kind!r} has no chat backend (transformers, openai)")
