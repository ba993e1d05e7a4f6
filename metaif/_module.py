"""Options as pytrees: frozen dataclasses whose numeric fields are leaves and whose structural
fields are static (the pattern of equinox modules and lineax solvers).

A class decorated with `options` is a registered pytree. Its numeric fields (damping, tol, lr,
reg, scale, seed...) are leaves, so they are traced, not hashed, when the object is an argument
of a jitted function: a new value reuses the compiled code. Fields declared with `static()`
(iteration counts, kinds, functions, flags) are part of the tree structure: changing them
retraces. `None` in a numeric field is an empty subtree (a structural choice such as "estimate
the damping"), so switching between None and a number retraces once.

Validation runs once, at construction (`__post_init__`); rebuilding an object from leaves (JAX
does it inside every transformation) bypasses `__init__`, so validators never see tracers.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar, dataclass_transform

import jax

T = TypeVar("T")


def static(default: Any = dataclasses.MISSING) -> Any:
    """A dataclass field that is part of the pytree structure (hashed, compared, never traced)."""
    return dataclasses.field(default=default, metadata={"static": True})


@dataclass_transform(frozen_default=True, field_specifiers=(dataclasses.field, static))
def options(cls: type[T]) -> type[T]:
    """Make `cls` a frozen dataclass registered as a pytree: numeric fields are leaves, fields
    declared with `static()` are structure."""
    cls = dataclasses.dataclass(frozen=True)(cls)
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]  # cls is a dataclass from the line above
    dynamic = tuple(f.name for f in fields if not f.metadata.get("static", False))
    structural = tuple(f.name for f in fields if f.metadata.get("static", False))
    keys = tuple(jax.tree_util.GetAttrKey(name) for name in dynamic)

    def flatten(obj):
        return [getattr(obj, name) for name in dynamic], tuple(getattr(obj, name) for name in structural)

    def flatten_with_keys(obj):
        return [(key, getattr(obj, name)) for key, name in zip(keys, dynamic)], tuple(
            getattr(obj, name) for name in structural
        )

    def unflatten(aux, children):
        obj = object.__new__(cls)
        for name, value in zip(dynamic, children):
            object.__setattr__(obj, name, value)
        for name, value in zip(structural, aux):
            object.__setattr__(obj, name, value)
        return obj

    jax.tree_util.register_pytree_with_keys(cls, flatten_with_keys, unflatten, flatten)
    return cls
