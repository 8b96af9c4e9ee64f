"""Argument checks of the optimizers: every error names the parameter and the value it got.

One place for the checks that ``KBFGS``, ``KFAC`` and the baselines of ``make_optimizer`` share,
so that the same kind of argument is rejected with the same message everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

__all__ = ["check_choice", "check_common", "check_int", "check_number", "check_param_groups",
           "is_int"]


def is_int(value: Any) -> bool:
    """An integral number (``3``, ``3.0``), not a bool."""
    if isinstance(value, bool):
        return False
    try:
        return bool(int(value) == value)
    except (TypeError, ValueError, OverflowError):
        return False


def check_int(name: str, value: Any, low: int | None = None, *, allow_none: bool = False) -> None:
    """``value`` is an integer ``>= low`` (any integer when ``low`` is ``None``; ``None`` itself
    too with ``allow_none``)."""
    if allow_none and value is None:
        return
    if is_int(value) and (low is None or value >= low):
        return
    what = "an integer" if low is None else f"an integer >= {low}"
    raise ValueError(f"{name} must be {'None or ' if allow_none else ''}{what}, got {value!r}")


def check_number(name: str, value: Any, low: float, *, strict: bool = False,
                 high: float | None = None, high_strict: bool = True) -> None:
    """``value`` is a finite real number (not a bool) with ``value >= low`` (``> low`` when
    ``strict``) and, with ``high``, ``value < high`` (``<= high`` when not ``high_strict``)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if strict else value >= low)
    ok = ok and (high is None or (value < high if high_strict else value <= high))
    if ok:
        return
    if high is None:
        rng = f"a number > {low}" if strict else f"a number >= {low}"
    else:
        rng = f"in {'(' if strict else '['}{low}, {high}{')' if high_strict else ']'}"
    raise ValueError(f"{name} must be {rng}, got {value!r}")


def check_choice(name: str, value: Any, choices: Iterable[str]) -> None:
    """``value`` is one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def check_common(defaults: dict[str, Any]) -> None:
    """The hyper-parameters every Kronecker optimizer has, at construction: finite ``lr > 0``,
    ``damping > 0``, ``momentum`` in [0, 1), ``weight_decay >= 0``."""
    check_number("lr", defaults["lr"], 0.0, strict=True)
    check_number("damping", defaults["damping"], 0.0, strict=True)
    check_number("momentum", defaults["momentum"], 0.0, high=1.0)
    check_number("weight_decay", defaults["weight_decay"], 0.0)


def check_param_groups(groups: Iterable[dict[str, Any]]) -> None:
    """The same checks on the values of ``param_groups`` before a step (a value set after
    construction, e.g. by a scheduler); Python numbers only, no host sync. ``lr = 0`` is
    accepted here (a warm-up schedule starting from zero), a negative or non-finite one is not."""
    for i, group in enumerate(groups):
        where = f"param_groups[{i}]"
        try:
            check_number(f"{where}['lr']", group["lr"], 0.0)
            check_number(f"{where}['damping']", group["damping"], 0.0, strict=True)
            check_number(f"{where}['momentum']", group["momentum"], 0.0, high=1.0)
            check_number(f"{where}['weight_decay']", group["weight_decay"], 0.0)
        except ValueError as err:
            raise ValueError(f"{err} (set after construction; the step was not taken and "
                             "nothing was changed)") from None
