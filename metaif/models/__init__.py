"""Reference models as Flax NNX modules, and the adapter that makes any NNX module pure.

metaif differentiates pure functions of a parameter pytree; Flax NNX modules are stateful objects.
`from_nnx(module)` splits a module (`nnx.split`) into its static graph and its `nnx.Param`
values, and gives back `PureModel` with:

* `params`: the parameters as a nested dict of arrays, the meta-parameters λ;
* `apply(params, x)`: the module called on x with those parameters (`nnx.merge`), pure;
* per-example losses `(params, meta_params, example) -> scalar` on examples {"x", "y"}:
  `cross_entropy` (integer labels) and `squared_error` (½‖f(x) − y‖²), and for
  `metaif.curvature.GaussNewton` their parts `loss.predict`, `loss.output_loss`
  (or `loss.gauss_newton()`);
* `to_module(params)`: a trained NNX module back.

The losses are hashable and equal across accesses, as `BilevelProblem` (a static jit argument)
needs. Make the `PureModel` once and reuse it. Models: `MLP` and `Conv4` (the 4-block few-shot
conv net, optional stateless `GroupNorm`; batch norm is not supported because its statistics
are state). Give `param_dtype=jnp.float64` for float64 work.

Bring your own model: any `nnx.Module` whose forward pass changes no variable works:

    from flax import nnx
    import jax.numpy as jnp, metaif

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.hidden = nnx.Linear(784, 32, param_dtype=jnp.float64, rngs=rngs)
            self.out = nnx.Linear(32, 5, param_dtype=jnp.float64, rngs=rngs)
        def __call__(self, x):                  # one example [28, 28] -> logits [5]
            return self.out(jnp.tanh(self.hidden(x.reshape(-1))))

    pure = metaif.models.from_nnx(Net(nnx.Rngs(0)))   # add_batch_axis=True if it needs [B, ...]
    problem = metaif.BilevelProblem(pure.cross_entropy, pure.cross_entropy, metaif.Unrolled(steps=1, lr=0.1))
    scores = metaif.influence(problem, pure.params, tasks, target=test_loss, solver=metaif.solvers.CG())
    trained = pure.to_module(meta_params)          # an NNX module again
"""

from ._conv import Conv4 as Conv4
from ._conv import GroupNorm as GroupNorm
from ._losses import ExampleLoss as ExampleLoss
from ._losses import Predict as Predict
from ._losses import softmax_cross_entropy as softmax_cross_entropy
from ._losses import squared_error as squared_error
from ._mlp import MLP as MLP
from ._pure import PureModel as PureModel
from ._pure import from_nnx as from_nnx

__all__ = [
    "Conv4",
    "ExampleLoss",
    "GroupNorm",
    "MLP",
    "Predict",
    "PureModel",
    "from_nnx",
    "softmax_cross_entropy",
    "squared_error",
]
