"""`from_nnx`: a Flax NNX module as pure functions of a parameter pytree (`PureModel`)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from flax import nnx

from .. import _validate
from ._losses import ExampleLoss, Predict, softmax_cross_entropy, squared_error

PyTree = Any


@dataclasses.dataclass(frozen=True, eq=False)
class PureModel:
    """A Flax NNX module split into a static graph and its parameters (see `from_nnx`).

    Attributes:
      graphdef: the module's `nnx.GraphDef` (structure and static attributes).
      params: the module's `nnx.Param` values as a nested dict of arrays: the meta-parameters λ.
      state: every other variable of the module (`nnx.State`), held constant by `apply`.
      add_batch_axis: whether `predict` adds a leading batch axis of 1 to each example.

    Hashed and compared by identity: make it once and reuse it (and the losses taken from it),
    so problems built from it hit the jit cache.
    """

    graphdef: nnx.GraphDef
    params: PyTree
    state: nnx.State
    add_batch_axis: bool
    _template: nnx.State = dataclasses.field(repr=False)

    def _check_params(self, params: PyTree) -> PyTree:
        if isinstance(params, nnx.State):
            params = nnx.to_pure_dict(params)
        expected = jax.tree.structure(self.params)
        if jax.tree.structure(params) != expected:
            raise ValueError(
                "params must have the structure of PureModel.params (a nested dict of arrays with keys "
                f"{_paths(self.params)}); received {_validate.describe(params)} with keys {_paths(params)}."
            )
        for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(self.params)):
            if np.shape(got) != np.shape(want):
                raise ValueError(
                    f"params{jax.tree_util.keystr(path)} must have shape {np.shape(want)} (as in PureModel.params); "
                    f"received {_validate.describe(got)}."
                )
        return params

    def to_module(self, params: PyTree | None = None) -> nnx.Module:
        """A fresh NNX module with these parameters (default `self.params`); `self` is not changed."""
        params = self.params if params is None else self._check_params(params)
        state = jax.tree.map(lambda leaf: leaf, self._template)  # fresh Variables, same metadata
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(self.graphdef, state, self.state, copy=True)

    def apply(self, params: PyTree, x: Any, *args, **kwargs) -> Any:
        """The module called on x with these parameters: pure, traceable (jit, vmap, grad)."""
        return self.to_module(params)(x, *args, **kwargs)

    @property
    def predict(self) -> Predict:
        """`(params, meta_params, example) -> outputs` on example["x"] (GaussNewton's predict)."""
        return Predict(self)

    @property
    def cross_entropy(self) -> ExampleLoss:
        """Classification loss `(params, meta_params, example) -> −log softmax(logits)[example["y"]]`."""
        return ExampleLoss(Predict(self), softmax_cross_entropy)

    @property
    def squared_error(self) -> ExampleLoss:
        """Regression loss `(params, meta_params, example) -> ½‖outputs − example["y"]‖²`."""
        return ExampleLoss(Predict(self), squared_error)

    def __repr__(self) -> str:
        size = sum(int(np.size(leaf)) for leaf in jax.tree.leaves(self.params))
        nodes = getattr(self.graphdef, "nodes", None) or [None]
        kind = getattr(getattr(nodes[0], "type", None), "__name__", "module")
        return f"PureModel({kind}, {size} parameters, add_batch_axis={self.add_batch_axis})"


def _paths(tree: PyTree) -> list[str]:
    try:
        return [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(tree)][:8]
    except Exception:  # an unusual pytree: show nothing rather than fail while reporting
        return []


def from_nnx(module: nnx.Module, *, add_batch_axis: bool = False) -> PureModel:
    """Split a Flax NNX module into pure functions of its parameters.

    Args:
      module: any `flax.nnx.Module` whose forward pass reads its `nnx.Param`s and changes no
        variable (no `nnx.BatchNorm`: its statistics are state; use `Conv4(norm="group")`-style
        stateless normalisation). Other variables (RNG streams, constant buffers) are held
        constant and changes a call makes to them are discarded: put dropout in evaluation
        mode first (`nnx.view(module, deterministic=True)`).
      add_batch_axis: True when the module only accepts batches [B, ...]: the per-example
        `predict` and losses then call it on [1, ...] and drop the batch axis.

    Returns:
      `PureModel` with `params` (λ, a dict of arrays), `apply(params, x)`, `predict`, and
      per-example losses `cross_entropy` and `squared_error` for `metaif.BilevelProblem`.
    """
    if not isinstance(module, nnx.Module):
        hint = (
            " (a flax.linen module: convert it with flax.nnx.bridge.ToNNX, or write it with flax.nnx)"
            if hasattr(module, "init") and hasattr(module, "apply")
            else ""
        )
        raise TypeError(f"module must be a flax.nnx.Module{hint}; received {_validate.describe(module)}.")
    if not isinstance(add_batch_axis, (bool, np.bool_)):
        raise TypeError(f"add_batch_axis must be True or False; received {_validate.describe(add_batch_axis)}.")
    stats = nnx.state(module, nnx.BatchStat)
    if jax.tree.leaves(stats):
        where = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(stats))][:4]
        raise ValueError(
            f"module must hold no batch statistics (nnx.BatchStat at {where}): batch norm's running statistics "
            "are state updated by the forward pass and its batch statistics couple examples, which per-example "
            "bilevel losses cannot express. Use no normalisation or a stateless one (Conv4(norm='layer' or 'group'))."
        )
    graphdef, param_state, rest = nnx.split(module, nnx.Param, ...)  # type: ignore[misc]
    params = nnx.to_pure_dict(param_state)
    if not jax.tree.leaves(params):
        raise ValueError(
            f"module must hold at least one nnx.Param; received {type(module).__name__} without parameters."
        )
    _validate.floating_tree(f"the nnx.Param variables of {type(module).__name__}", params)
    return PureModel(graphdef, params, rest, bool(add_batch_axis), param_state)
