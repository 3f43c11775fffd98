"""Settings that nothing can change after they are made: ``freeze`` turns YAML's dicts and lists into
``FrozenDict`` and tuples, all the way down, so that a frozen dataclass holding them is frozen deeply (a
plan handed to every worker is the plan the driver logged). ``thaw`` gives plain dicts and lists back
for JSON, YAML and MLflow."""

from __future__ import annotations

from typing import Any


class FrozenDict(dict):
    """A dict that refuses every change; hashable, picklable, and a dict to every reader (``json``,
    ``isinstance(x, dict)``, ``**x``)."""

    def _refuse(self, *args, **kwargs):
        raise TypeError(f"a frozen setting cannot change: {dict(self)!r}")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = _refuse  # type: ignore[assignment]
    __ior__ = _refuse  # type: ignore[assignment]

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(frozenset(self.items()))

    def __reduce__(self):
        return FrozenDict, (dict(self),)

    def __copy__(self) -> FrozenDict:
        return self

    def __deepcopy__(self, memo) -> FrozenDict:
        return self


def freeze(value: Any) -> Any:
    """dicts -> FrozenDict and lists -> tuples, recursively; anything else as it is."""
    if isinstance(value, dict):
        return (
            value if isinstance(value, FrozenDict) else FrozenDict({k: freeze(v) for k, v in value.items()})
        )
    if isinstance(value, (list, tuple)):
        return tuple(freeze(v) for v in value)
    return value


def thaw(value: Any) -> Any:
    """The plain form: FrozenDict -> dict and tuples -> lists, recursively."""
    if isinstance(value, dict):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [thaw(v) for v in value]
    return value
