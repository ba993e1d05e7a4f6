"""Conv4: the standard few-shot convolutional network, as a Flax NNX module.

Batch normalisation is deliberately absent: its running statistics are state that the forward
pass updates, and its batch statistics couple the examples of a batch, while metaif's losses are
pure per-example functions of the parameters. `norm="layer"` or `norm="group"` gives a stateless
per-example normalisation instead (`GroupNorm`).
"""

from __future__ import annotations

from typing import Callable, Literal, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from .. import _validate
from . import _inputs


class GroupNorm(nnx.Module):
    """Per-example group normalisation of feature maps [B, H, W, C], stateless.

    The channels are split into `groups` groups; each example's group is normalised by its own
    mean and variance over (H, W, channels in the group), then scaled and shifted per channel
    (learnable `scale`, `bias`). `groups=1` is layer normalisation over (H, W, C). Written out
    (not `nnx.GroupNorm`) so it computes in `dtype` under strict dtype promotion in float64.
    """

    def __init__(self, features: int, groups: int, *, epsilon: float = 1e-5, param_dtype=jnp.float32, dtype=None):
        features = _validate.positive_int("GroupNorm.features", features)
        groups = _validate.positive_int("GroupNorm.groups", groups)
        if features % groups:
            raise ValueError(
                f"GroupNorm.groups must divide the number of channels {features}; received groups={groups}."
            )
        self.groups = groups
        self.epsilon = _validate.positive("GroupNorm.epsilon", epsilon)
        self.dtype = jnp.dtype(param_dtype if dtype is None else dtype)
        self.scale = nnx.Param(jnp.ones((features,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((features,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        grouped = jnp.asarray(x, self.dtype).reshape(b, h, w, self.groups, c // self.groups)
        mean = jnp.mean(grouped, axis=(1, 2, 4), keepdims=True)
        centred = grouped - mean
        var = jnp.mean(jnp.square(centred), axis=(1, 2, 4), keepdims=True)
        y = (centred * jax.lax.rsqrt(var + self.epsilon)).reshape(b, h, w, c)
        scale = jnp.asarray(self.scale[...], self.dtype).reshape(1, 1, 1, c)
        bias = jnp.asarray(self.bias[...], self.dtype).reshape(1, 1, 1, c)
        return y * scale + bias


def _pool2x2(x: jax.Array, kind: str, padding: str) -> jax.Array:
    """2×2 max- or average-pooling with stride 2 over [B, H, W, C] in x's dtype (an average over
    the window's four cells, padding counted as 0)."""
    if kind == "max":
        return nnx.max_pool(x, (2, 2), strides=(2, 2), padding=padding)
    b, h, w, c = x.shape
    if padding == "VALID":
        x = x[:, : h - h % 2, : w - w % 2]
    else:
        x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
    b, h, w, c = x.shape
    return jnp.mean(x.reshape(b, h // 2, 2, w // 2, 2, c), axis=(2, 4))


def _pooled(size: int, padding: str) -> int:
    return size // 2 if padding == "VALID" else -(-size // 2)


class Conv4(nnx.Module):
    """`blocks` × [3×3 conv ('SAME', `filters` channels) → optional norm → activation → 2×2 pool],
    then a linear head from the flattened feature map to `ways` logits.

    Smoothness: with ReLU or max-pooling the MAML meta-gradient is discontinuous in λ (the inner
    step differentiates the network, so activation and argmax switches make it jump). Its Hessian
    is then that of the smooth piece only, and ‖∇F‖ -> 0 retraining (Newton, proximal leave-one-out)
    may not exist. `activation=jax.nn.softplus, pool="avg"` gives a C² network where those hold
    (docs/real-networks.md measures both).

    Args:
      image_shape: one image's shape (H, W) or (H, W, C); (H, W) means C = 1.
      ways: number of classes (output logits).
      filters: channels of every conv layer (64 in the standard network).
      blocks: number of conv blocks (4 in the standard network).
      norm: None (default: no normalisation), "layer" (per example over H, W, C) or "group"
        (`groups` channel groups per example). Never batch norm: see the module docstring.
      groups: channel groups for `norm="group"` (must divide `filters`).
      pool: "max" (default, the standard) or "avg" (smooth: see above).
      pool_padding: "VALID" (floor, the standard: 28 → 14 → 7 → 3 → 1; 84 → 5) or "SAME" (ceil:
        28 → 2, 14 → 1), for small images that VALID would reduce to nothing.
      activation: elementwise nonlinearity (default `jax.nn.relu`).
      param_dtype, dtype: parameter and computation dtypes (as in `MLP`).
      rngs: `nnx.Rngs` for the initialisation.

    Call: x [..., H, W, C] (or [..., H, W] when C = 1) with any batch axes -> logits [..., ways].
    """

    def __init__(
        self,
        image_shape: Sequence[int],
        ways: int,
        *,
        filters: int = 64,
        blocks: int = 4,
        norm: Literal["layer", "group"] | None = None,
        groups: int = 4,
        pool: Literal["max", "avg"] = "max",
        pool_padding: Literal["VALID", "SAME"] = "VALID",
        activation: Callable[[jax.Array], jax.Array] = jax.nn.relu,
        param_dtype=jnp.float32,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        shape = _inputs.example_shape("Conv4.image_shape", image_shape)
        if len(shape) not in (2, 3):
            raise ValueError(f"Conv4.image_shape must be (H, W) or (H, W, C); received {image_shape!r}.")
        self.image_shape = shape if len(shape) == 3 else shape + (1,)
        ways = _validate.positive_int("Conv4.ways", ways)
        filters = _validate.positive_int("Conv4.filters", filters)
        blocks = _validate.positive_int("Conv4.blocks", blocks)
        if norm not in (None, "layer", "group"):
            raise ValueError(
                f"Conv4.norm must be None, 'layer' or 'group' (batch norm is not supported: it is stateful); received {norm!r}."
            )
        if pool not in ("max", "avg"):
            raise ValueError(f"Conv4.pool must be 'max' or 'avg'; received {pool!r}.")
        if pool_padding not in ("VALID", "SAME"):
            raise ValueError(f"Conv4.pool_padding must be 'VALID' or 'SAME'; received {pool_padding!r}.")
        _validate.callable_("Conv4.activation", activation, "array -> array (elementwise)")
        self.dtype = jnp.dtype(param_dtype if dtype is None else dtype)
        self.activation = activation
        self.pool = pool
        self.pool_padding = pool_padding
        height, width, channels = self.image_shape
        for _ in range(blocks):
            height, width = _pooled(height, pool_padding), _pooled(width, pool_padding)
        if height < 1 or width < 1:
            raise ValueError(
                f"Conv4.image_shape {self.image_shape} is pooled to nothing by {blocks} blocks with "
                f"pool_padding={pool_padding!r}; use pool_padding='SAME', fewer blocks or larger images."
            )
        count = None if norm is None else 1 if norm == "layer" else _validate.positive_int("Conv4.groups", groups)
        if count is not None and filters % count:
            raise ValueError(f"Conv4.groups must divide filters={filters} for norm='group'; received groups={groups}.")
        kw = dict(dtype=self.dtype, param_dtype=param_dtype)
        self.convs = nnx.List(
            [
                nnx.Conv(channels if i == 0 else filters, filters, (3, 3), padding="SAME", rngs=rngs, **kw)
                for i in range(blocks)
            ]
        )
        self.norms = None if count is None else nnx.List([GroupNorm(filters, count, **kw) for _ in range(blocks)])
        self.head = nnx.Linear(height * width * filters, ways, rngs=rngs, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        leading = _inputs.leading_axes("Conv4 input x", x, self.image_shape)
        h = jnp.asarray(x, self.dtype).reshape((-1, *self.image_shape))
        for i, conv in enumerate(self.convs):
            h = conv(h)
            if self.norms is not None:
                h = self.norms[i](h)
            h = _pool2x2(self.activation(h), self.pool, self.pool_padding)
        logits = self.head(h.reshape(h.shape[0], -1))
        return logits.reshape(leading + logits.shape[-1:])
