"""Judges: give a verdict per (response, criterion) of a prompt's rubric, or one holistic score.

A verdict is True (met), False (not met) or None (the judge cannot tell). Every judge follows
one protocol, `Judge`: `judge(record, responses)` (rubric mode: one ``{criterion id: verdict}``
dict per response), `outcome(record, responses)` (the outcome baseline: one score 1-10 or None
per response) and their `judge_many` / `outcome_many` over several prompts at once (a remote
judge then sees them all concurrently), so the scoring code does not care which judge it holds.
`strategy` says which of the two a training round builds its pairs from. `make_judge` builds
the judge a `JudgeConfig` section describes. None of this needs Lightning.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Protocol

from rdpo.chat import ChatRequest, extract_json, make_chat
from rdpo.config import ConfigError, JudgeConfig, PairsConfig, check
from rdpo.pool import PromptRecord

Verdicts = dict[str, bool | None]
Items = Sequence[tuple[PromptRecord, Sequence[str]]]

# Bump when a template below changes: it is part of every judgment's cache key.
TEMPLATE_VERSION = 1

RUBRIC_TEMPLATE = """You are grading a response to a question about the image(s) above.

Question: {instruction}

Response (verbatim, between the markers):
<<<RESPONSE
{response}
RESPONSE>>>

Criteria, each with its id:
{criteria}

For every criterion decide whether the response meets it. Judge the response only against the image(s) and the question.
Answer with JSON only: {{"verdicts": [{{"id": "<id>", "met": true or false}}, ...]}} with one entry per criterion id."""

OUTCOME_TEMPLATE = """You are grading a response to a question about the image(s) above.

Question: {instruction}
{reference}
Response (verbatim, between the markers):
<<<RESPONSE
{response}
RESPONSE>>>

Is the main answer right? Rate the response as a whole from 1 (wrong) to 10 (fully right).
Answer with JSON only: {{"score": N}}"""

OUTCOME_PASS, OUTCOME_FAIL = 10, 1


def rubric_prompt(record: PromptRecord, response: str) -> str:
    """The rubric-mode judge prompt: instruction, response verbatim, ``[id] text`` per criterion."""
    criteria = "\n".join(f"[{c.id}] {c.text}" for c in record.rubric.criteria())
    return RUBRIC_TEMPLATE.format(instruction=record.instruction, response=response,
                                  criteria=criteria)


def outcome_prompt(record: PromptRecord, response: str) -> str:
    """The outcome-mode prompt: no rubric; the reference answer when the record has one."""
    ref = f"Reference answer: {record.reference}\n" if record.reference else ""
    return OUTCOME_TEMPLATE.format(instruction=record.instruction, reference=ref,
                                   response=response)


_BOOL = {"true": True, "yes": True, "met": True, "false": False, "no": False, "not met": False}


def parse_verdicts(text: str, ids: Sequence[str]) -> dict[str, bool | None] | None:
    """``{"verdicts": [{"id", "met"}, ...]}`` anywhere in `text` -> one verdict per id in `ids`.

    Returns None if no such JSON is found (the caller may ask again). A criterion missing from
    the answer, given twice with different values, or with a `met` that is not a boolean is None;
    ids the rubric does not have are ignored.
    """
    obj = extract_json(text, "verdicts")
    if obj is None or not isinstance(obj["verdicts"], list):
        return None
    seen: dict[str, bool | None] = {}
    for item in obj["verdicts"]:
        if not isinstance(item, dict) or not isinstance(item.get("id"), str):
            continue
        met = item.get("met")
        if isinstance(met, str):
            met = _BOOL.get(met.strip().lower())
        if not isinstance(met, bool):
            met = None
        cid = item["id"].strip()
        seen[cid] = met if seen.get(cid, met) == met else None
    return {cid: seen.get(cid) for cid in ids}


def parse_score(text: str) -> int | None:
    """``{"score": N}`` with N an integer 1..10 anywhere in `text`, else None."""
    obj = extract_json(text, "score")
    if obj is None:
        return None
    score = obj["score"]
    if isinstance(score, str) and score.strip().isdigit():
        score = int(score)
    if isinstance(score, bool) or not isinstance(score, (int, float)) or score != int(score):
        return None
    return int(score) if 1 <= score <= 10 else None


class Judge(Protocol):
    """What the rounds and the evaluations ask of a judge; rdpo's judges and a user's own."""

    name: str
    """Identifies the judge (its model) in logs and in cache keys."""
    strategy: str
    """pairs.strategy: which of the two verdicts a training round builds its pairs from."""

    def judge(self, record: PromptRecord, responses: Sequence[str]) -> list[Verdicts]:
        """One verdict dict (criterion id -> met or None) per response, in response order."""

    def outcome(self, record: PromptRecord, responses: Sequence[str]) -> list[int | None]:
        """One holistic score 1-10 (or None) per response, without the rubric."""

    def judge_many(self, items: Items) -> list[list[Verdicts]]:
        """`judge` over several (record, responses) items, in order."""

    def outcome_many(self, items: Items) -> list[list[int | None]]:
        """`outcome` over several (record, responses) items, in order."""


class RuleJudge:
    """Judges responses with the regex `check` written in the rubric; a criterion without `check` is unknown (None).

    Patterns are Python regexes matched with `re.search` and `re.IGNORECASE`. `any` is met if
    at least one pattern matches, `all` if every pattern matches, `none` if no pattern
    matches; the keys present combine with AND. Needs no model, so it is the judge of the
    CPU quickstart and of tests, and a cheap first pass for checkable facts. Its outcome score
    is `OUTCOME_PASS` (10) when the record's ``outcome.check`` passes, else `OUTCOME_FAIL`
    (1), and None for a record without one.
    """

    name = "rule"

    def __init__(self, strategy: str = PairsConfig.strategy) -> None:
        self.strategy = strategy
        # Rounds re-judge the same rubrics every time; compile each pattern once.
        self._compiled: dict[str, re.Pattern[str]] = {}

    def _search(self, pattern: str, text: str) -> bool:
        compiled = self._compiled.get(pattern)
        if compiled is None:
            compiled = self._compiled[pattern] = re.compile(pattern, re.IGNORECASE)
        return compiled.search(text) is not None

    def check(self, check: Mapping[str, Sequence[str]], text: str) -> bool:
        """Whether `text` satisfies one criterion's `check` object."""
        unknown = set(check) - {"any", "all", "none"}
        if unknown:
            raise ValueError(f"unknown check key(s) {sorted(unknown)}")
        if not check:
            raise ValueError("empty check")
        met = True
        if "any" in check:
            met &= any(self._search(p, text) for p in check["any"])
        if "all" in check:
            met &= all(self._search(p, text) for p in check["all"])
        if "none" in check:
            met &= not any(self._search(p, text) for p in check["none"])
        return met

    def judge(self, record: PromptRecord, responses: Sequence[str]) -> list[dict[str, bool | None]]:
        """One verdict dict (criterion id -> met) per response, in response order."""
        criteria = record.rubric.criteria()
        return [
            {
                c.id: (self.check(c.check, response) if c.check is not None else None)
                for c in criteria
            }
            for response in responses
        ]

    def outcome(self, record: PromptRecord, responses: Sequence[str]) -> list[int | None]:
        """One holistic score per response from the record's coarse ``outcome`` check."""
        if record.outcome is None:
            return [None] * len(responses)
        return [OUTCOME_PASS if self.check(record.outcome, r) else OUTCOME_FAIL for r in responses]

    def judge_many(self, items: Items) -> list[list[Verdicts]]:
        """`judge` over several prompts (regexes: nothing to batch)."""
        return [self.judge(record, responses) for record, responses in items]

    def outcome_many(self, items: Items) -> list[list[int | None]]:
        """`outcome` over several prompts."""
        return [self.outcome(record, responses) for record, responses in items]


class ChatJudge:
    """A VLM judge over any chat backend (`TransformersChat`, `OpenAIChat`), with a cache.

    One request per (response, rubric): the prompt lists every criterion and asks for all
    verdicts at once. An answer without parseable JSON is asked again up to `parse_retries`
    times; still unparseable, every verdict of that response is None (counted by the round
    as unknown, never a pass or a fail) and nothing is cached, so a later run asks again.
    Criteria missing from a parsed answer are None, and that answer is cached.
    ``stats`` counts requests, cache hits and unparseable answers.
    """

    def __init__(self, chat, *, parse_retries: int, cache=None,
                 strategy: str = PairsConfig.strategy):
        self.chat, self.cache = chat, cache
        self.parse_retries, self.strategy = parse_retries, strategy
        self.name = getattr(chat, "name", type(chat).__name__)
        self.stats = {"requests": 0, "cache_hits": 0, "unparseable": 0}

    def _ask(self, prompts: list[tuple[tuple, str]], parse) -> list:
        """Answer (images, prompt) items through cache, chat and ``parse(index, answer)``.

        None for an item whose answer stayed unparseable."""
        from rdpo.judge_cache import judgment_key

        keys = [judgment_key(self.name, TEMPLATE_VERSION, text, images) for images, text in prompts]
        cached = self.cache.get_many(keys) if self.cache is not None else {}
        self.stats["cache_hits"] += sum(k in cached for k in keys)
        results = [cached.get(k) for k in keys]
        todo = [i for i, k in enumerate(keys) if k not in cached]
        fresh: dict[str, object] = {}
        for _ in range(1 + self.parse_retries):
            if not todo:
                break
            # Each distinct prompt is asked once per attempt, even if it occurs several times
            # (K identical samples are common at low temperature).
            first = {keys[i]: i for i in reversed(todo)}
            asks = sorted(first.values())
            answers = self.chat.complete([ChatRequest(*prompts[i]) for i in asks])
            self.stats["requests"] += len(asks)
            for i, answer in zip(asks, answers, strict=True):
                value = parse(i, answer)
                if value is not None:
                    fresh[keys[i]] = value
            for i in todo:
                results[i] = fresh.get(keys[i])
            todo = [i for i in todo if keys[i] not in fresh]
        self.stats["unparseable"] += len({keys[i] for i in todo})
        if self.cache is not None:
            self.cache.put_many(fresh)
        return results

    def judge_many(self, items: Sequence[tuple[PromptRecord, Sequence[str]]]
                   ) -> list[list[dict[str, bool | None]]]:
        """`judge` over several prompts at once, so a remote backend sees them all concurrently."""
        prompts, ids = [], []
        for record, responses in items:
            prompts += [(record.visuals, rubric_prompt(record, r)) for r in responses]
            ids += [[c.id for c in record.rubric.criteria()]] * len(responses)
        flat = self._ask(prompts, lambda i, text: parse_verdicts(text, ids[i]))
        flat = [got if got is not None else dict.fromkeys(ids[i]) for i, got in enumerate(flat)]
        out, pos = [], 0
        for _, responses in items:
            out.append(flat[pos:pos + len(responses)])
            pos += len(responses)
        return out

    def judge(self, record: PromptRecord, responses: Sequence[str]) -> list[dict[str, bool | None]]:
        """One verdict dict (criterion id -> met or None) per response, in response order."""
        return self.judge_many([(record, responses)])[0]

    def outcome_many(self, items: Sequence[tuple[PromptRecord, Sequence[str]]]
                     ) -> list[list[int | None]]:
        """`outcome` over several prompts at once."""
        prompts = [(record.visuals, outcome_prompt(record, r)) for record, rs in items for r in rs]
        flat = self._ask(prompts, lambda i, text: parse_score(text))
        out, pos = [], 0
        for _, responses in items:
            out.append(flat[pos:pos + len(responses)])
            pos += len(responses)
        return out

    def outcome(self, record: PromptRecord, responses: Sequence[str]) -> list[int | None]:
        """One holistic score 1-10 (or None) per response, without the rubric."""
        return self.outcome_many([(record, responses)])[0]


class TransformersJudge(ChatJudge):
    """A local VLM judge: ``cfg.model`` is its checkpoint directory, or pass an already loaded
    ``(model, processor)`` as `model` (``cfg.model`` is then unused)."""

    def __init__(self, cfg: JudgeConfig, *, strategy: str = PairsConfig.strategy,
                 model: tuple | None = None):
        super().__init__(make_chat(cfg, model), cache=_open_cache(cfg),
                         parse_retries=cfg.parse_retries, strategy=strategy)


class OpenAIJudge(ChatJudge):
    """A judge behind any OpenAI-compatible endpoint (vLLM, SGLang, TGI, hosted APIs)."""

    def __init__(self, cfg: JudgeConfig, *, strategy: str = PairsConfig.strategy):
        super().__init__(make_chat(cfg), cache=_open_cache(cfg),
                         parse_retries=cfg.parse_retries, strategy=strategy)


def _open_cache(cfg: JudgeConfig):
    from rdpo.judge_cache import JudgeCache

    if cfg.cache and "${" in cfg.cache:
        raise ConfigError([f"judge.cache: {cfg.cache!r} is filled in by rdpo.config.load_config; "
                           "outside it give a file path or None"])
    return JudgeCache(cfg.cache) if cfg.cache else None


JUDGES = {"rule": RuleJudge, "transformers": TransformersJudge, "openai": OpenAIJudge}


def make_judge(cfg: JudgeConfig, strategy: str = PairsConfig.strategy, *, toy=None,
               seed: int = 0) -> Judge:
    """The judge a `JudgeConfig` describes, checked first (`ConfigError` naming each key);
    `strategy` is pairs.strategy. A rule judge with ``noise`` or ``outcome=holistic`` is a
    `rdpo.simjudges.SimulatedJudge` (seeded by `seed`; the holistic one reads the `toy`)."""
    problems = check(cfg, "judge.{}".format)
    if problems:
        raise ConfigError(problems)
    if cfg.kind == "rule":
        from rdpo.simjudges import make_simulated  # it builds on RuleJudge: imported late

        return make_simulated(cfg, toy, seed, strategy)
    return JUDGES[cfg.kind](cfg, strategy=strategy)
