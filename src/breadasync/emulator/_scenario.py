"""Scenarios: an emulator described as data (a mapping, a ``.json`` or a ``.toml`` file).

Owns the scenario keys and their parsing into :class:`Emulator` arguments and
:meth:`Emulator.add_target` arguments; unknown keys fail loudly.

Top-level keys: ``api_key``, ``dialect``, ``profile`` (``realistic`` or ``simple``),
``speed``, ``seed``, ``master_key``, ``out_of_credit``, ``cache_bytes``, ``huge_body_bytes``,
``plan`` (a :class:`TargetPlan` table), ``faults`` (a :class:`Faults` table) and ``targets``.
Target keys: ``repo``, ``target``, ``overrides``, ``template``, ``plan``, ``profile``,
``stim``, ``rollout``, ``rows``, ``faults``.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson

from ._faults import Faults
from ._state import TargetPlan

SCENARIO_KEYS = frozenset(
    {
        "api_key",
        "dialect",
        "profile",
        "speed",
        "seed",
        "master_key",
        "out_of_credit",
        "plan",
        "faults",
        "targets",
        "cache_bytes",
        "huge_body_bytes",
    }
)
TARGET_KEYS = frozenset(
    {
        "repo",
        "target",
        "overrides",
        "template",
        "plan",
        "profile",
        "stim",
        "rollout",
        "rows",
        "faults",
    }
)


def emulator_kwargs(
    scenario: Mapping[str, Any] | str | Path,
) -> tuple[dict[str, Any], list[Mapping[str, Any]]]:
    """The :class:`Emulator` keyword arguments of a scenario, and its target tables."""
    data = load_scenario(scenario) if isinstance(scenario, str | Path) else dict(scenario)
    unknown = set(data) - SCENARIO_KEYS
    if unknown:
        raise ValueError(f"unknown scenario key(s): {', '.join(sorted(unknown))}")
    targets = list(data.pop("targets", []))
    if "plan" in data:
        data["plan"] = TargetPlan(**data["plan"])
    if data.get("faults") is not None:
        data["faults"] = Faults.from_dict(data["faults"])
    return data, targets


def target_kwargs(entry: Mapping[str, Any]) -> dict[str, Any]:
    """The :meth:`Emulator.add_target` keyword arguments of one target table."""
    entry = dict(entry)
    unknown = set(entry) - TARGET_KEYS
    if unknown:
        raise ValueError(f"unknown target key(s): {', '.join(sorted(unknown))}")
    if not isinstance(entry.get("repo"), str) or not isinstance(entry.get("target"), str):
        raise ValueError("a target entry needs 'repo' and 'target' strings")
    return {
        "repo": entry["repo"],
        "target": entry["target"],
        "overrides": entry.get("overrides"),
        "template": entry.get("template", "default"),
        "plan": TargetPlan(**entry["plan"]) if entry.get("plan") is not None else None,
        "profile": entry.get("profile"),
        "stim": entry.get("stim", "complete"),
        "rollout": entry.get("rollout", "not_started"),
        "rows": entry.get("rows"),
        "faults": Faults.from_dict(entry["faults"]) if entry.get("faults") is not None else None,
    }


def load_scenario(path: str | Path) -> dict[str, Any]:
    """A scenario file (JSON, or TOML by its suffix) as a mapping."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read scenario file {str(path)!r}: {exc.strerror}") from exc
    try:
        data = tomllib.loads(raw.decode()) if path.suffix == ".toml" else orjson.loads(raw)
    except (tomllib.TOMLDecodeError, orjson.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(
            f"scenario file {str(path)!r} is not valid "
            f"{'TOML' if path.suffix == '.toml' else 'JSON'}: {exc}"
        ) from exc
    if not isinstance(data, dict):
        raise ValueError(f"scenario file {str(path)!r} must hold an object at the top")
    return data
