"""Selectors: which units of a model an operation applies to.

Selectors compose with ``&`` (both), ``|`` (either) and ``~`` (not) and always return
selectors. An operation applies to exactly the units selected, each acting on its own
parameters; ``S.path("base.**")`` selects ``base`` and everything inside it.

Example:
    >>> from xfer import select as S
    >>> sel = S.path("base.**") & ~S.bn()
    >>> sel
    (path('base.**') & ~bn())
"""

from __future__ import annotations

import builtins
import fnmatch
from collections.abc import Callable, Sequence

from xfer._adapter import KINDS, Unit
from xfer._checks import check_integer

__all__ = [
    "Selector",
    "all",
    "type",
    "bn",
    "name",
    "path",
    "top",
    "from_index",
    "check_selector",
]


class Selector:
    """A set of units, decided against the list of all units of a model.

    Build one with the functions of this module rather than directly.
    """

    def __init__(self, describe: str, pick: Callable[[Sequence[Unit]], set[str]]):
        self._describe = describe
        self._pick = pick

    def paths(self, units: Sequence[Unit]) -> set[str]:
        """The paths of the selected units among ``units``."""
        return self._pick(units)

    def __call__(self, units: Sequence[Unit]) -> list[Unit]:
        chosen = self._pick(units)
        return [u for u in units if u.path in chosen]

    def __and__(self, other: Selector) -> Selector:
        other = check_selector(other)
        return Selector(f"({self} & {other})", lambda units: self.paths(units) & other.paths(units))

    def __or__(self, other: Selector) -> Selector:
        other = check_selector(other)
        return Selector(f"({self} | {other})", lambda units: self.paths(units) | other.paths(units))

    def __invert__(self) -> Selector:
        return Selector(f"~{self}", lambda units: {u.path for u in units} - self.paths(units))

    def __repr__(self) -> str:
        return self._describe


def check_selector(selector: object) -> Selector:
    """``selector`` itself if it is an xfer selector; a ``TypeError`` that says how to build
    one if not.

    Example:
        >>> from xfer import select as S
        >>> S.check_selector(S.bn())
        bn()
    """
    if not isinstance(selector, Selector):
        raise TypeError(
            f"Expected an xfer selector, got {selector!r} ({builtins.type(selector).__name__}). "
            "Build one with xfer.select, e.g. S.path('base.**') or S.bn()."
        )
    return selector


def _where(describe: str, keep: Callable[[Unit], bool]) -> Selector:
    return Selector(describe, lambda units: {u.path for u in units if keep(u)})


def all() -> Selector:  # noqa: A001 - mirrors the design's S.all()
    """Every unit of the model.

    Example:
        >>> from xfer import select as S
        >>> S.all()
        all()
    """
    return _where("all()", lambda u: True)


def type(*kinds: str) -> Selector:  # noqa: A001 - mirrors the design's S.type()
    """Units of the given kinds: ``batchnorm``, ``dropout``, ``conv``, ``dense``, ``norm``,
    ``container``, ``other``. (``norm`` means every normalisation, BatchNorm included.)

    Example:
        >>> from xfer import select as S
        >>> S.type("conv", "dense")
        type('conv', 'dense')
    """
    unknown = [k for k in kinds if k not in KINDS]
    if not kinds or unknown:
        raise ValueError(
            f"S.type() got unknown kind(s) {unknown or '(none)'}: expected some of "
            f"{', '.join(KINDS)}, e.g. S.type('batchnorm')."
        )
    wanted = set(kinds)
    if "norm" in wanted:
        wanted.add("batchnorm")
    return _where(f"type({', '.join(map(repr, kinds))})", lambda u: u.kind in wanted)


def bn() -> Selector:
    """Every BatchNorm unit.

    Example:
        >>> from xfer import select as S
        >>> S.bn()
        bn()
    """
    return _where("bn()", lambda u: u.kind == "batchnorm")


def name(pattern: str) -> Selector:
    """Units whose own name matches a glob, e.g. ``"*preact_bn"``.

    Example:
        >>> from xfer import select as S
        >>> S.name("*_bn")
        name('*_bn')
    """
    _check_pattern(pattern, "name")
    return _where(f"name({pattern!r})", lambda u: fnmatch.fnmatchcase(u.name, pattern))


def path(pattern: str) -> Selector:
    """Units whose dotted path from the root matches a glob.

    ``*`` matches within one segment, ``**`` any number of segments (zero included), so
    ``"base.**"`` is ``base`` and everything inside it.

    The glob is matched against the path's segments as the framework names them, never
    against the joined string split again at its dots. A Keras layer name may contain a
    dot (``keras.applications.MobileNetV2`` is ``mobilenetv2_1.00_224``); that name is
    one segment, and the pattern is written as the path is printed: the dotted pieces
    of a pattern may together match one such segment (``"mobilenetv2_1.00_224.**"``),
    and a ``*`` matches a segment's dots too (``"mobilenetv2*.**"``, ``"*.Conv1"``). A
    ``**`` always stands for whole segments. On torch and Flax, whose names have no dots,
    this is the plain segment glob.

    Example:
        >>> from xfer import select as S
        >>> S.path("head.**")
        path('head.**')
        >>> from xfer._adapter import Unit
        >>> unit = Unit("mobilenetv2_1.00_32.Conv1", "conv", 0, 0, None, None,
        ...             segments=("mobilenetv2_1.00_32", "Conv1"))
        >>> [len(S.path(p)([unit])) for p in ("mobilenetv2_1.00_32.**", "*.Conv1", "00_32.*")]
        [1, 1, 0]
    """
    _check_pattern(pattern, "path")
    parts = pattern.split(".")
    return _where(f"path({pattern!r})", lambda u: _glob_segments(parts, u.segments))


def top(k: int) -> Selector:
    """The last ``k`` top-level units (closest to the output) and everything inside them.

    Example:
        >>> from xfer import select as S
        >>> S.top(2)
        top(2)
    """
    check_integer(k, "S.top(k): k", 1)

    def pick(units: Sequence[Unit]) -> set[str]:
        n_top = 1 + max((u.index for u in units), default=-1)
        return {u.path for u in units if u.index >= n_top - k}

    return Selector(f"top({k})", pick)


def from_index(i: int) -> Selector:
    """Top-level units from position ``i`` on and everything inside them, like Keras's
    ``model.layers[i:]`` (negative ``i`` counts from the end).

    Example:
        >>> from xfer import select as S
        >>> S.from_index(3)
        from_index(3)
    """
    check_integer(i, "S.from_index(i): i")

    def pick(units: Sequence[Unit]) -> set[str]:
        n_top = 1 + max((u.index for u in units), default=-1)
        start = i if i >= 0 else max(n_top + i, 0)
        return {u.path for u in units if u.index >= start}

    return Selector(f"from_index({i})", pick)


def _glob_segments(pattern: Sequence[str], segments: Sequence[str]) -> bool:
    if not pattern:
        return not segments
    head, rest = pattern[0], pattern[1:]
    if head == "**":
        return any(_glob_segments(rest, segments[j:]) for j in range(len(segments) + 1))
    if not segments:
        return False
    # The next 1, 2, ... pattern pieces, joined again by their dots, against one segment:
    # a segment with a dot in its name (Keras) takes as many pieces as the user wrote. A
    # joined glob has literal dots, so it can only match a segment that has them.
    for j in range(1, len(pattern) + 1):
        if "**" in pattern[:j]:
            break
        if fnmatch.fnmatchcase(segments[0], ".".join(pattern[:j])) and _glob_segments(
            pattern[j:], segments[1:]
        ):
            return True
    return False


def _check_pattern(pattern: object, fn: str) -> None:
    if not isinstance(pattern, str) or not pattern:
        raise TypeError(
            f"S.{fn}() needs a non-empty glob string, got {pattern!r}; "
            f"e.g. S.{fn}({'*_bn' if fn == 'name' else 'base.**'!r})."
        )
