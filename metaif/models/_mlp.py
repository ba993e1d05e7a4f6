"""MLP: a multilayer perceptron on flattened examples, as a Flax NNX module."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from .. import _validate
from . import _inputs


class MLP(nnx.Module):
    """Dense layers with an activation between them; each example is flattened first.

    Args:
      in_shape: one example's shape, an int d for vectors [d] or a tuple such as (28, 28) or
        (28, 28, 1); inputs are [..., *in_shape] with any batch axes (a trailing channel axis of
        size 1 may be present or not).
      hidden: widths of the hidden layers (may be empty: a linear model).
      out: output size (classes for logits, or regression outputs).
      activation: elementwise function between layers (default `jax.nn.relu`; use `jnp.tanh`
        for a model with non-zero third derivatives).
      param_dtype: dtype of the parameters (float32 default, float64 for exact tests).
      dtype: computation dtype (default `param_dtype`); inputs are cast to it explicitly, so
        strict dtype promotion holds.
      rngs: `nnx.Rngs` for the initialisation (LeCun-normal kernels, zero biases).

    Call: x [..., *in_shape] -> outputs [..., out].
    """

    def __init__(
        self,
        in_shape: int | Sequence[int],
        hidden: Sequence[int],
        out: int,
        *,
        activation: Callable[[jax.Array], jax.Array] = jax.nn.relu,
        param_dtype=jnp.float32,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        self.in_shape = _inputs.example_shape("MLP.in_shape", in_shape)
        hidden = tuple(hidden) if isinstance(hidden, (tuple, list)) else hidden
        if not isinstance(hidden, tuple) or not all(
            isinstance(h, int) and not isinstance(h, bool) and h >= 1 for h in hidden
        ):
            raise ValueError(
                f"MLP.hidden must be a sequence of ints >= 1 (may be empty); received {_validate.describe(hidden)}."
            )
        out = _validate.positive_int("MLP.out", out)
        _validate.callable_("MLP.activation", activation, "array -> array (elementwise)")
        self.dtype = jnp.dtype(param_dtype if dtype is None else dtype)
        self.activation = activation
        sizes = (math.prod(self.in_shape), *hidden, out)
        self.layers = nnx.List(
            [
                nnx.Linear(a, b, dtype=self.dtype, param_dtype=param_dtype, rngs=rngs)
                for a, b in zip(sizes[:-1], sizes[1:])
            ]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        leading = _inputs.leading_axes("MLP input x", x, self.in_shape)
        h = jnp.asarray(x, self.dtype).reshape(leading + (-1,))
        for layer in self.layers[:-1]:
            h = self.activation(layer(h))
        return self.layers[-1](h)
