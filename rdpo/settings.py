"""The machinery under rdpo's typed config: `setting` metadata, checks and merge errors.

Generic over any dataclass schema (`rdpo.config` holds rdpo's); no torch, no Lightning.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Callable, Mapping
from dataclasses import field

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


def setting(default=MISSING, *, choices: tuple | None = None, ge=None, gt=None, le=None, lt=None,
            finite: bool = True):
    """A field with what it allows written beside its default: `choices`, or bounds
    (``ge`` >=, ``gt`` >, ``le`` <=, ``lt`` <). No default (`MISSING`) means required.
    Every float setting must be finite (`check`); ``finite=False`` lets this one be inf."""
    meta = {k: v for k, v in (("choices", choices), ("ge", ge), ("gt", gt), ("le", le),
                              ("lt", lt)) if v is not None}
    if not finite:
        meta["finite"] = False
    return field(default=default, metadata=meta)


class ConfigError(ValueError):
    """Every problem of a configuration, one per line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid config:\n  " + "\n  ".join(problems))


_BOUNDS = {"ge": (">=", "[", lambda v, b: v >= b), "gt": (">", "(", lambda v, b: v > b),
           "le": ("<=", "]", lambda v, b: v <= b), "lt": ("<", ")", lambda v, b: v < b)}


def allowed(meta) -> str:
    """A field's metadata in words: ``one of a, b``, ``> 0``, ``in [0, 0.5)``; "" if unconstrained."""
    if "choices" in meta:
        return "one of " + ", ".join(str(c).lower() if isinstance(c, bool) else str(c)
                                     for c in meta["choices"])
    lo = next((k for k in ("ge", "gt") if k in meta), None)
    hi = next((k for k in ("le", "lt") if k in meta), None)
    if lo and hi:
        return f"in {_BOUNDS[lo][1]}{meta[lo]}, {meta[hi]}{_BOUNDS[hi][1]}"
    return " ".join(f"{_BOUNDS[k][0]} {meta[k]}" for k in (lo, hi) if k)


def _nonfinite(meta, value) -> bool:
    """`value` is a float inf or nan where the field wants a finite number (every float field
    unless ``finite=False``): a timeout, a rate or a bound of inf passes ``> 0`` and means
    nothing (nan fails every bound, and is named as non-finite too)."""
    return (isinstance(value, float) and not math.isfinite(value)
            and (meta.get("finite", True) or math.isnan(value)))


def _allows(meta, value) -> bool:
    if "choices" in meta:
        return value in meta["choices"]
    try:
        return all(test(value, meta[k]) for k, (_, _, test) in _BOUNDS.items() if k in meta)
    except TypeError:  # None, or a string where a number belongs
        return False


def choices(section: type, name: str) -> tuple:
    """The values field `name` of a section class allows, for code that dispatches on it."""
    return next(f for f in dataclasses.fields(section) if f.name == name).metadata["choices"]


def _is_section(f: dataclasses.Field) -> bool:
    return f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory)


def _missing(section, name: str) -> bool:
    if isinstance(section, DictConfig):
        return OmegaConf.is_missing(section, name)
    return getattr(section, name) == MISSING


def check(section, name: Callable[[str], str], rules: Mapping[type, Callable] | None = None
          ) -> list[str]:
    """Every value problem of a section (a dataclass instance or its DictConfig): missing
    required values, then choices and bounds from each field's metadata, then the section's
    rules across fields (`rules`: section class → function). `name` turns a field name into the key the problem names
    (``"judge.{}".format``, or a command-line option)."""
    cls = OmegaConf.get_type(section) if isinstance(section, DictConfig) else type(section)
    floats = {k for k, t in typing.get_type_hints(cls).items() if float in (t, *typing.get_args(t))}
    problems = []
    for f in dataclasses.fields(cls):
        if _missing(section, f.name):
            problems.append(f"{name(f.name)}: missing required value")
        elif _is_section(f):
            problems += check(getattr(section, f.name), lambda n, p=f.name: name(f"{p}.{n}"),
                              rules)
        elif f.name in floats and _nonfinite(f.metadata, value := getattr(section, f.name)):
            problems.append(f"{name(f.name)}: must be a finite number, got {value}")
        elif f.metadata:
            value = getattr(section, f.name)
            if _allows(f.metadata, value):
                continue
            if "choices" in f.metadata:
                problems.append(f"{name(f.name)}: {value!r} is not {allowed(f.metadata)}")
            else:
                problems.append(f"{name(f.name)}: must be {allowed(f.metadata)}, got {value}")
    rule = (rules or {}).get(cls)
    return problems + (rule(section, name) if rule else [])


def _leaves(tree, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _field_meta(base: DictConfig, dotted: str) -> dict:
    """The schema metadata of the field at `dotted` in a structured config ({} if none)."""
    *parents, leaf = dotted.split(".")
    node = base
    for part in parents:
        node = node.get(part) if isinstance(node, DictConfig) else None
    cls = OmegaConf.get_type(node) if isinstance(node, DictConfig) else None
    if not dataclasses.is_dataclass(cls):
        return {}
    return next((dict(f.metadata) for f in dataclasses.fields(cls) if f.name == leaf), {})


def merge_errors(base: DictConfig, sources: list[tuple[str, DictConfig]]) -> list[str]:
    """Merge each source into `base` one leaf at a time, so every bad key is reported."""
    problems = []
    for where, src in sources:
        for dotted, value in _leaves(OmegaConf.to_container(src, resolve=False)):
            nested: object = value
            for part in reversed(dotted.split(".")):
                nested = {part: nested}
            try:
                base.merge_with(OmegaConf.create(nested))
            except OmegaConfBaseException as e:
                reason = str(e).splitlines()[0]
                if type(e).__name__ == "ConfigKeyError":
                    reason = "unknown key"
                elif limits := allowed(_field_meta(base, dotted)):
                    reason += f"; {limits}"
                problems.append(f"{dotted}: {reason} (from {where})")
    return problems
