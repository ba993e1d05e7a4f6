"""Per-example losses with metaif's signature `(params, meta_params, example) -> scalar`.

A loss is `ExampleLoss(predict, output_loss)`: the model's outputs for `example["x"]`, scored
against `example["y"]`. Keeping the two parts apart is what `metaif.curvature.GaussNewton` needs
(`loss.gauss_newton()`). All are frozen dataclasses or module-level functions: hashable and
equal across calls, so a `BilevelProblem` built from them reuses compiled code.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from .. import _validate
from .. import problems as _problems
from .. import curvature as _curvature

if TYPE_CHECKING:
    from ._pure import PureModel

PyTree = Any


def field(example: Any, key: str, loss: str) -> Any:
    """example[key], or an error naming the loss and the example's keys."""
    try:
        return example[key]
    except (KeyError, TypeError, IndexError):
        keys = sorted(map(str, example)) if isinstance(example, dict) else None
        raise ValueError(
            f"{loss}: each example must be a dict with keys 'x' (input) and 'y' (target); received "
            f"{'a dict with keys ' + str(keys) if keys is not None else _validate.describe(example)}."
        ) from None


def softmax_cross_entropy(outputs: jax.Array, example: PyTree) -> jax.Array:
    """−log softmax(outputs)[y]: logits [classes] and an integer label example["y"] of shape [];
    NaN for a label outside [0, classes) (`metaif.problems.cross_entropy`)."""
    y = field(example, "y", "softmax_cross_entropy")
    y = y if hasattr(y, "dtype") else np.asarray(y)
    if jnp.ndim(outputs) != 1:
        raise ValueError(
            f"softmax_cross_entropy: outputs must be one example's logits [classes]; received {_validate.describe(outputs)}. "
            "If the module only takes batches, use from_nnx(module, add_batch_axis=True)."
        )
    if jnp.ndim(y) != 0 or not np.issubdtype(np.dtype(y.dtype), np.integer):
        raise TypeError(
            f"softmax_cross_entropy: example['y'] must be one integer class label (shape []); received {_validate.describe(y)}."
        )
    return _problems.cross_entropy(outputs, jnp.asarray(y))


def squared_error(outputs: jax.Array, example: PyTree) -> jax.Array:
    """½‖outputs − y‖² with example["y"] of the outputs' size (reshaped, cast to their dtype)."""
    y = field(example, "y", "squared_error")
    if jnp.size(y) != jnp.size(outputs):
        raise ValueError(
            f"squared_error: example['y'] must have as many entries as the model's outputs {jnp.shape(outputs)}; "
            f"received {_validate.describe(y)}."
        )
    diff = outputs - jnp.asarray(y, outputs.dtype).reshape(jnp.shape(outputs))
    return 0.5 * jnp.sum(jnp.square(diff))


@dataclasses.dataclass(frozen=True)
class Predict:
    """`(params, meta_params, example) -> outputs`: `model.apply(params, example["x"])`.

    With `model.add_batch_axis` the input gets a leading axis of size 1 and the outputs lose it.
    `meta_params` is unused (MAML-style models: the coupling to λ is in the adaptation).
    """

    model: "PureModel"

    def __call__(self, params: PyTree, meta_params: PyTree, example: PyTree) -> Any:
        x = field(example, "x", "predict")
        if not self.model.add_batch_axis:
            return self.model.apply(params, x)
        outputs = self.model.apply(params, jax.tree.map(lambda leaf: jnp.expand_dims(leaf, 0), x))
        return jax.tree.map(lambda leaf: leaf[0], outputs)


@dataclasses.dataclass(frozen=True)
class ExampleLoss:
    """`(params, meta_params, example) -> scalar` = output_loss(predict(params, meta_params, example), example).

    Args:
      predict: `(params, meta_params, example) -> outputs`, for example `PureModel.predict`.
      output_loss: `(outputs, example) -> scalar`, convex in outputs for Gauss–Newton
        (`softmax_cross_entropy`, `squared_error`).
    """

    predict: Callable[[PyTree, PyTree, PyTree], Any]
    output_loss: Callable[[Any, PyTree], jax.Array]

    def __post_init__(self):
        _validate.callable_("ExampleLoss.predict", self.predict, "(params, meta_params, example) -> outputs")
        _validate.callable_("ExampleLoss.output_loss", self.output_loss, "(outputs, example) -> scalar")

    def __call__(self, params: PyTree, meta_params: PyTree, example: PyTree) -> jax.Array:
        return self.output_loss(self.predict(params, meta_params, example), example)

    def gauss_newton(self) -> _curvature.GaussNewton:
        """`metaif.curvature.GaussNewton(predict, output_loss)` for this loss."""
        return _curvature.GaussNewton(self.predict, self.output_loss)
