"""Retiring old argument names and positions for one release, with a DeprecationWarning that says
what to write instead (the way optax retires APIs)."""

from __future__ import annotations

import functools
import warnings
from typing import Callable

from .solvers._damping import caller_level


def renamed(**old_to_new: str) -> Callable:
    """Accept the keyword `old` for `new` (warning once per call); passing both is an error."""

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            for old, new in old_to_new.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(f"{fn.__name__}() got both {old}= (deprecated) and {new}=; pass only {new}=.")
                    warnings.warn(
                        f"{fn.__name__}({old}=...) is deprecated and will be removed in the next release; "
                        f"write {new}=... (same meaning).",
                        DeprecationWarning,
                        stacklevel=caller_level(),
                    )
                    kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)

        return wrapper

    return decorate


def keyword_only(positional: int, names: tuple[str, ...]) -> Callable:
    """Accept, with a warning, the arguments `names` given positionally after the first
    `positional` ones (they have become keyword-only)."""

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if len(args) > positional:
                extra = args[positional:]
                if len(extra) > len(names):
                    raise TypeError(
                        f"{fn.__name__}() takes {positional} positional arguments (then keywords "
                        f"{', '.join(names)}=...); received {len(args)}."
                    )
                given = names[: len(extra)]
                for name in given:
                    if name in kwargs:
                        raise TypeError(f"{fn.__name__}() got {name} both by position and by keyword.")
                warnings.warn(
                    f"passing {', '.join(given)} to {fn.__name__}() by position is deprecated and will be an error "
                    f"in the next release; write {', '.join(f'{n}=...' for n in given)}.",
                    DeprecationWarning,
                    stacklevel=caller_level(),
                )
                kwargs.update(zip(given, extra))
                args = args[:positional]
            return fn(*args, **kwargs)

        return wrapper

    return decorate
