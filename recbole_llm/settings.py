"""Typed readers for config values: every plugin key is read and checked through one of these; and where the
plugin's YAML defaults live (:func:`properties_dir`).

Defaults live only in the YAMLs (``properties/``); a reader never supplies one. Each returns the value in its
type or raises :class:`~recbole_llm.errors.ConfigError` with one line naming the key, what it must be and an
example, so a check at any call site is one line::

    self.item_repr = choice("item_repr", config["item_repr"], ITEM_REPRS)
    self.hidden_dropout_prob = number("hidden_dropout_prob", config["hidden_dropout_prob"], low=0, high=1,
                                      high_open=True, example=0.1)

bools are never numbers here (``True`` is an ``int`` to Python, never to a config). Imports nothing heavy.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from recbole_llm.errors import ConfigError


def listed(choices: Sequence[str]) -> str:
    """``a, b or c``: choices as a sentence."""
    choices = list(choices)
    return ", ".join(choices[:-1]) + f" or {choices[-1]}" if len(choices) > 1 else choices[0]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def choice(key: str, value: Any, choices: Sequence[str]) -> str:
    """``value`` lower-cased when it is one of ``choices`` (compared case-insensitively).

    Raises ConfigError: ``key=value is not supported; use a, b or c``.
    """
    if isinstance(value, str) and value.lower() in choices:
        return value.lower()
    raise ConfigError(f"{key}={value!r:.60} is not supported; use {listed(choices)}")


def integer(key: str, value: Any, low: int = 1, high: int | None = None, example: int | None = None) -> int:
    """``value`` when it is an integer in [``low``, ``high``] (``high`` None: no upper bound).

    Raises ConfigError naming the range and ``example`` (default ``low``).
    """
    example = low if example is None else example
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        if high is None and low == 1:
            wanted = "a positive integer"
        elif high is None:
            wanted = f"an integer of at least {low}"
        else:
            wanted = f"an integer from {low} to {high}"
        raise ConfigError(f"{key}={value!r:.60} must be {wanted}: e.g. {key}: {example}")
    return value


def number(key: str, value: Any, low: float | None = None, high: float | None = None, *, low_open: bool = False,
           high_open: bool = False, example: float | None = None) -> float:
    """``value`` as a float when it is a finite number in the interval from ``low`` to ``high`` (None: unbounded
    on that side; ``low_open``/``high_open``: that bound excluded).

    Raises ConfigError naming the interval (``(0, 1]``, ``above 0`` ...) and ``example`` when given.
    """
    inside = _is_number(value) and math.isfinite(value) and (
        low is None or (value > low if low_open else value >= low)) and (
        high is None or (value < high if high_open else value <= high))
    if inside:
        return float(value)
    if low is not None and high is not None:
        wanted = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    elif low is not None:
        wanted = f"above {low:g}" if low_open else f"at least {low:g}"
    elif high is not None:
        wanted = f"below {high:g}" if high_open else f"at most {high:g}"
    tail = f": e.g. {key}: {example}" if example is not None else ""
    if low is None and high is None:
        raise ConfigError(f"{key}={value!r:.60} must be a finite number{tail}")
    raise ConfigError(f"{key}={value!r:.60} must be a number {wanted}{tail}")


def names(key: str, value: Any, example: str) -> list[str]:
    """A list of names from ``value``: one string or a list of strings; None is the empty list.

    Raises ConfigError when it is anything else, with ``example`` (e.g. ``[movie_title, class]``).
    """
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(name, str) for name in value):
        return list(value)
    raise ConfigError(f"{key}={value!r:.60} must be a list of names: e.g. {key}: {example}")


def properties_dir() -> Path:
    """The folder holding the plugin's property files (one ``<Model>.yaml`` per plugin model).

    In a wheel it is the package ``recbole_llm.properties``; in a source checkout it is ``properties/``
    at the repository root (pyproject maps one onto the other).
    """
    try:
        from importlib.resources import files

        installed = Path(str(files("recbole_llm.properties")))
        if installed.is_dir():
            return installed
    except (ModuleNotFoundError, TypeError):
        pass
    return Path(__file__).resolve().parents[1] / "properties"
