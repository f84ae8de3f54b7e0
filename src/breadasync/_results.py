"""What per-target results of many targets share: a sequence in input order, and their
failures."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol, TypeVar, overload

from ._errors import BreadError


class _Outcome(Protocol):
    @property
    def ok(self) -> bool: ...

    @property
    def error(self) -> BreadError | None: ...


R = TypeVar("R", bound=_Outcome)


class Results(Sequence[R]):
    """One result per input target, in input order."""

    def __init__(self, results: list[R]) -> None:
        self._results = results

    @overload
    def __getitem__(self, index: int) -> R: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[R]: ...
    def __getitem__(self, index: int | slice) -> R | Sequence[R]:
        return self._results[index]

    def __len__(self) -> int:
        return len(self._results)

    def __iter__(self) -> Iterator[R]:
        return iter(self._results)

    def failures(self) -> list[R]:
        """The results that are not ``ok``."""
        return [r for r in self._results if not r.ok]

    def raise_for_failures(self) -> None:
        """Raise the first failure's error, if any target did not end ``ok``."""
        for result in self._results:
            if not result.ok and result.error is not None:
                raise result.error
