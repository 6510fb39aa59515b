"""Rollouts through a vLLM server: the policy reaches the server as a LoRA adapter.

rdpo never imports vllm (it pins its own torch); it talks HTTP to a stock OpenAI-compatible vLLM
server started with ``--enable-lora`` and ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`` on the
policy's base (model.path). At each policy version (a round, the held-out evaluation) rank 0
saves the adapter in PEFT format under ``run.dir/adapters/`` (storage the server can read),
loads it with ``POST /v1/load_lora_adapter``, every rank waits at a barrier, then every rank
samples its prompts with ``n = K`` under the adapter's name; the previous adapter is unloaded.

Several runs may share one server: adapter names carry the run's id (`run_id`: the run
directory's name and a hash of its absolute path, the same on every rank and across resumes),
every load is checked against ``/v1/models`` (the server must list the name with ``root`` = the
path rdpo saved), an adapter of that name served from another path is an error, never
replaced, and `VLLMRollout.close` unloads the run's last adapter when the run ends or fails. A
run's first load also unloads what an earlier process of the same run (killed, then resumed)
left on the server: every adapter whose root is in this run's adapters folder. Each process
saves into folders of its own (``round_0001-<start>``): vLLM keys cached prompt blocks by the
adapter's name and path, so weights saved again under a name used before (a resume, a re-run
in the same run.dir) must come from a new path, or prompts would reuse the old weights' blocks.

The trained sequence is the prompt ids rdpo encodes (`rdpo.engine.encode.encode_prompt`) followed by
the server's completion ids (``return_token_ids``), so each answer's prompt ids are checked
against rdpo's encoding: a chat template or image processing that differs is an error, never a
silent shift. Finish reasons map to ``stop`` / ``length`` as in `rdpo.rollout`.

Faults: the client retries connection errors, timeouts, 429 and 5xx (``rollout.max_retries``,
exponential backoff); a server that lost the adapter (restarted) gets it loaded again, at most
``max_retries`` times; what survives that raises `RolloutServerError`, which `rdpo.fit` turns
into an error naming the checkpoint to resume from.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import shutil
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rdpo.config import RolloutConfig
from rdpo.engine.encode import PromptCache
from rdpo.judging.chat import _limits, data_url
from rdpo.pool import PromptRecord
from rdpo.rollout import LENGTH, STOP, Rollout

log = logging.getLogger("rdpo")


class RolloutServerError(RuntimeError):
    """The rollout server failed for good (down, lost the adapter, or answered out of line)."""


def adapter_name(step: int, every_n_steps: int) -> str:
    """The adapter of the policy at optimizer step `step`: ``round_NNNN`` at a round's first step
    (the held-out "before" shares round 0's), else ``step_NNNNNN``."""
    if step % every_n_steps == 0:
        return f"round_{step // every_n_steps:04d}"
    return f"step_{step:06d}"


def run_id(adapters_dir: str | Path) -> str:
    """This run's prefix of adapter names on a shared server: the run directory's name and a
    hash of the adapters folder's absolute path. Every rank and every resume of a run computes
    the same id (ranks need no exchange; a resumed run finds and unloads what it left); two
    runs differ because their folders do (two runs cannot save into one folder anyway)."""
    path = Path(adapters_dir).resolve()
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:10]
    readable = re.sub(r"[^A-Za-z0-9._]+", "-", path.parent.name).strip("-")[:40] or "run"
    return f"{readable}-{digest}"


def request_seed(seed: int, record_id: str) -> int:
    """A per-prompt sampling seed: a prompt's K samples depend on (seed, prompt), not on the
    order or concurrency of requests."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{record_id}".encode()).digest()[:4], "little") >> 1


class VLLMRollout:
    """Samples K responses per prompt from a vLLM server under the current policy's adapter.

    `settings` is the run's `RolloutConfig` (engine vllm); `adapters_dir` is where adapters are
    saved (the server must read the same path). `publish` makes an adapter current; `sample`
    uses it. One object per process; every rank publishes (rank 0 saves and loads).
    """

    def __init__(self, settings: RolloutConfig, adapters_dir: str | Path, *, http_client=None):
        import openai

        if settings.api_key_env:
            api_key = os.environ.get(settings.api_key_env)
            if not api_key:
                raise RolloutServerError(
                    f"environment variable {settings.api_key_env} (rollout.api_key_env) is not "
                    f"set; export it with the API key for {settings.base_url}")
        else:
            api_key = "EMPTY"
        self.settings = settings
        self.base_url = settings.base_url
        self.adapters_dir = Path(adapters_dir).resolve()
        self.run_id = run_id(self.adapters_dir)
        self.current: tuple[int, str, Path | None] | None = None
        """(step, name, path) of the adapter in use; the path is rank 0's (None elsewhere)."""
        self._loaded_here = False
        """Whether this process loaded the current adapter (rank 0, or a reload): it unloads it
        at `close`."""
        self._cleaned = False
        self._start = secrets.token_hex(4)
        self._reload_lock = threading.Lock()
        self._client = openai.OpenAI(
            base_url=settings.base_url, api_key=api_key, timeout=settings.timeout,
            max_retries=settings.max_retries,
            http_client=http_client or openai.DefaultHttpxClient(limits=_limits(settings.concurrency)))

    def __repr__(self) -> str:
        return f"VLLMRollout(base_url={self.base_url!r})"

    # -- adapters ---------------------------------------------------------------------------

    def served_models(self) -> list[dict]:
        return [m.model_dump() for m in self._call(lambda: list(self._client.models.list()))]

    def base_model(self) -> str:
        """The served base model: ``rollout.model``, checked against /v1/models, or the one
        model there that is not an adapter."""
        models = self.served_models()
        bases = [m["id"] for m in models if not m.get("parent")]
        if self.settings.model:
            if self.settings.model not in bases:
                raise RolloutServerError(f"{self.base_url} does not serve rollout.model="
                                         f"{self.settings.model!r} (it serves {bases})")
            return self.settings.model
        if len(bases) != 1:
            raise RolloutServerError(f"{self.base_url} serves {bases}: set rollout.model")
        return bases[0]

    def adapter_name(self, step: int) -> str:
        """The server-side name of this run's adapter at `step` (`run_id` + `adapter_name`)."""
        return f"{self.run_id}-{adapter_name(step, self.settings.every_n_steps)}"

    def publish(self, model, step: int, *, is_main: bool, barrier: Callable[[], None]) -> str:
        """Make the policy at `step` the server's current adapter (no-op if it already is).

        Collective: every rank calls it. Rank 0 saves `model`'s adapter (a PEFT model) and
        loads it; all ranks wait; rank 0 then unloads the previous one, which no rank uses any
        more (every rank finished its previous sampling before reaching this barrier), and
        deletes its directory.
        """
        if self.current is not None and self.current[0] == step:
            return self.current[1]
        name, path = self.adapter_name(step), None
        if is_main:
            path = self.adapters_dir / f"{adapter_name(step, self.settings.every_n_steps)}-{self._start}"
            model.save_pretrained(str(path))
            # Where the other ranks find it if the server loses it (`_reload`).
            tmp = self.adapters_dir / f"{POINTER}.tmp"
            tmp.write_text(f"{name}\n{path}\n")
            os.replace(tmp, self.adapters_dir / POINTER)
            if not self._cleaned:
                self._clean_leftovers(path)
            self._load(name, path)
        barrier()
        previous, self.current = self.current, (step, name, path)
        self._loaded_here = is_main
        if is_main and previous is not None and previous[1] != name:
            self._unload(previous[1])
            shutil.rmtree(previous[2], ignore_errors=True)  # run.dir/adapter keeps the final one
        return name

    def _served(self) -> dict[str, str | None]:
        """Adapter name -> the path the server loaded it from (``root`` in /v1/models)."""
        return {m["id"]: m.get("root") for m in self.served_models() if m.get("parent")}

    def _clean_leftovers(self, keep_path: Path) -> None:
        """Unload what earlier processes of this run left loaded (killed before `close`): any
        adapter loaded from this run's adapters folder; delete the folders they saved."""
        self._cleaned = True
        for name, root in self._served().items():
            if root and root != str(keep_path) and Path(root).parent == self.adapters_dir:
                log.info("rollout server %s: unloading %s, left by an earlier process of this run",
                         self.base_url, name)
                self._unload(name)
        for folder in self.adapters_dir.iterdir():
            if folder.is_dir() and folder != keep_path:
                shutil.rmtree(folder, ignore_errors=True)

    def _load(self, name: str, path: Path) -> None:
        """Load `path` as `name` and check the server serves it from there. Already loaded from
        `path` (another rank reloaded it first) is success; from another path, an error: it is
        not this process's adapter, and replacing it would pull it from under its user."""
        body = {"lora_name": name, "lora_path": str(path)}
        try:
            self._call(lambda: self._client.post("/load_lora_adapter", body=body, cast_to=str))
        except _AlreadyLoaded:
            pass
        root = self._served().get(name, "(not listed)")
        if root != str(path):
            raise RolloutServerError(self._elsewhere(name, path, root))
        log.info("rollout server %s: adapter %s loaded from %s", self.base_url, name, path)

    def _elsewhere(self, name: str, path: Path, root) -> str:
        return (f"rollout server {self.base_url} serves adapter {name} from {root}, not from "
                f"{path}: another process uses this run's adapter names (two runs with one "
                "run.dir?); give each run its own run.dir")

    def _unload(self, name: str) -> None:
        try:
            self._call(lambda: self._client.post("/unload_lora_adapter", body={"lora_name": name},
                                                 cast_to=str))
        except _NotFound:  # a restarted server has nothing to unload
            log.debug("rollout server %s: adapter %s was not loaded", self.base_url, name)
        except RolloutServerError as err:
            log.warning("rollout server %s: unloading adapter %s failed: %s", self.base_url, name, err)

    def _reload(self, name: str) -> None:
        with self._reload_lock:  # one reload for all threads that saw the adapter missing
            log.warning("rollout server %s lost adapter %s (restarted?): loading it again",
                        self.base_url, name)
            path = self.current[2]
            if path is None:  # rank 0 saved it: its pointer names the folder
                pointed, _, folder = (self.adapters_dir / POINTER).read_text().partition("\n")
                if pointed != name:
                    raise RolloutServerError(f"{self.adapters_dir / POINTER} names {pointed}, not "
                                             f"{name}: cannot load the adapter again")
                path = Path(folder.strip())
            # Another rank (or thread) that saw it missing may have loaded it first: that is
            # success; replacing it would break that rank's requests in flight.
            self._load(name, path)
            self._loaded_here = True

    def _call(self, fn):
        """`fn()` with the client's errors as rdpo's: the client has already retried."""
        import openai

        try:
            return fn()
        except openai.NotFoundError as err:
            raise _NotFound(str(err)) from None
        except openai.BadRequestError as err:
            if "already" in str(err).lower():
                raise _AlreadyLoaded(str(err)) from None
            raise RolloutServerError(f"{self.base_url} refused the request: {err}") from None
        except openai.APIConnectionError as err:  # includes timeouts
            raise RolloutServerError(f"cannot reach the rollout server {self.base_url} "
                                     f"({type(err).__name__}) after {self.settings.max_retries} "
                                     "retries") from None
        except openai.APIStatusError as err:
            raise RolloutServerError(f"rollout server {self.base_url} answered HTTP "
                                     f"{err.status_code} after {self.settings.max_retries} retries: "
                                     f"{err.message}") from None

    # -- sampling ---------------------------------------------------------------------------

    def sample(self, processor, records: Sequence[PromptRecord], settings: RolloutConfig, *,
               stop_ids: Sequence[int], suppress_ids: Sequence[int], seed: int,
               num_samples: int | None = None, prompts: PromptCache | None = None) -> list[Rollout]:
        """One `Rollout` per record (in order) from the current adapter, K samples each.

        `settings` gives the sampling (temperature, top_p, top_k, repetition_penalty,
        max_new_tokens; the evaluation passes its own); `stop_ids` and `suppress_ids` are the
        transformers engine's (`rdpo.rollout.stop_token_ids`, `suppressed_token_ids`).
        """
        return list(self.iter_sample(processor, records, settings, stop_ids=stop_ids,
                                     suppress_ids=suppress_ids, seed=seed,
                                     num_samples=num_samples, prompts=prompts))

    def iter_sample(self, processor, records: Sequence[PromptRecord], settings: RolloutConfig, *,
                    stop_ids: Sequence[int], suppress_ids: Sequence[int], seed: int,
                    num_samples: int | None = None, prompts: PromptCache | None = None
                    ) -> Iterator[Rollout]:
        """`sample`, yielding each prompt's `Rollout` in record order as soon as it and those
        before it are answered (up to ``concurrency`` prompts in flight meanwhile): a
        pipelined round judges them while the rest are sampled."""
        if self.current is None:
            raise RolloutServerError("no adapter published: call publish() first")
        prompts = prompts if prompts is not None else PromptCache(processor, max_mb=0)
        k = num_samples or settings.samples_per_prompt
        greedy = settings.temperature == 0
        params = dict(
            n=k, max_tokens=settings.max_new_tokens, temperature=settings.temperature,
            top_p=1.0 if greedy else settings.top_p,
            # A large negative bias is vLLM's way to forbid a token (transformers: suppress_tokens).
            logit_bias={str(i): -100 for i in suppress_ids} or None,
            extra_body={"top_k": -1 if greedy or not settings.top_k else settings.top_k,
                        "repetition_penalty": settings.repetition_penalty,
                        "stop_token_ids": list(stop_ids), "return_token_ids": True,
                        "skip_special_tokens": True})
        stops = {int(i) for i in stop_ids}

        def one(record: PromptRecord) -> Rollout:
            expected = prompts.get(record)["input_ids"][0].tolist()
            resp = self._complete(record, params, request_seed(seed, record.id))
            got = _extra(resp, "prompt_token_ids")
            if got is None:
                raise RolloutServerError(f"{self.base_url} returned no token ids: rollouts need a "
                                         "vLLM server that supports return_token_ids")
            if list(got) != expected:
                at = next((i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b),
                          min(len(got), len(expected)))
                raise RolloutServerError(
                    f"prompt {record.id}: the server's prompt ids differ from rdpo's encoding at "
                    f"position {at} ({len(got)} vs {len(expected)} ids): serve model.path with its "
                    "own chat template and processor")
            ids, reasons = [], []
            for choice in sorted(resp.choices, key=lambda c: c.index):
                sampled, reason = _completion(choice, stops)
                ids.append(sampled)
                reasons.append(reason)
            texts = processor.tokenizer.batch_decode(
                [s[:-1] if r == STOP else s for s, r in zip(ids, reasons, strict=True)],
                skip_special_tokens=True)
            return Rollout(record, [t.strip() for t in texts], ids, reasons)

        if len(records) <= 1:
            yield from map(one, records)
            return
        with ThreadPoolExecutor(max_workers=min(self.settings.concurrency, len(records))) as pool:
            yield from pool.map(one, records)

    def _complete(self, record: PromptRecord, params: dict, seed: int):
        if record.video:  # a video_url of frames would be encoded differently from rdpo's prompt
            raise RolloutServerError(f"{record.source}: video records sample with "
                                     "rollout.engine=transformers only")
        content: list[dict] = [{"type": "image_url", "image_url": {"url": data_url(p)}}
                               for p in record.images]
        content.append({"type": "text", "text": record.instruction})
        messages = [{"role": "user", "content": content}]
        for attempt in range(self.settings.max_retries + 1):
            name = self.current[1]
            try:
                return self._call(lambda name=name: self._client.chat.completions.create(
                    model=name, messages=messages, seed=seed, **params))
            except _NotFound as err:
                if attempt == self.settings.max_retries:
                    raise RolloutServerError(
                        f"rollout server {self.base_url} lost adapter {name} and did not keep it "
                        f"after {self.settings.max_retries} reloads: {err}") from None
                self._reload(name)
        raise AssertionError("unreachable")

    def close(self) -> None:
        """Unload the run's current adapter if this process loaded it (the run ended or
        failed: nothing samples from it any more), then close the connections. Every rank
        calls it; failures are logged, never raised over the run's own error."""
        if self.current is not None and self._loaded_here:
            self._loaded_here = False
            self._unload(self.current[1])
        self._client.close()


POINTER = "current"
"""File in the adapters folder: the current adapter's name and folder (rank 0 writes it)."""


class _NotFound(Exception):
    pass


class _AlreadyLoaded(Exception):
    pass


def _extra(obj, key: str):
    value = getattr(obj, key, None)
    if value is None and getattr(obj, "model_extra", None):
        value = obj.model_extra.get(key)
    return value


def _completion(choice, stops: set[int]) -> tuple[tuple[int, ...], str]:
    """A choice's sampled ids and finish reason, in `rdpo.rollout`'s terms: a stopped answer
    ends with its stop id (vLLM leaves an end-of-sequence id out of the ids when told to skip
    special tokens on some versions, so it is put back from ``stop_reason``)."""
    sampled = _extra(choice, "token_ids")
    if sampled is None:
        raise RolloutServerError("the server returned no token ids for an answer")
    ids = tuple(int(i) for i in sampled)
    if choice.finish_reason == "length":
        return ids, LENGTH
    if choice.finish_reason != "stop":
        raise RolloutServerError(f"unexpected finish reason {choice.finish_reason!r}")
    if not ids or ids[-1] not in stops:
        reason = _extra(choice, "stop_reason")
        if not isinstance(reason, int):
            raise RolloutServerError(
                f"answer stopped on {reason!r}, not on one of rdpo's stop ids {sorted(stops)}")
        ids = (*ids, reason)
    return ids, STOP


__all__ = ["RolloutServerError", "VLLMRollout", "adapter_name", "request_seed", "run_id"]
