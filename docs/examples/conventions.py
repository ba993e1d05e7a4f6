"""The worked example of docs/conventions.md: three scalar tasks, every number checked by hand.

    .venv/bin/python docs/examples/conventions.py

Task i has one support example s_i and one query example y_i; λ and θ are scalars. One MAML step
with lr 0.5 on the support loss ½(θ − s)² gives θ_i = λ − 0.5·a_i·(λ − s_i); the query loss is
½(θ_i − y_i)²; F = (1/3) Σ_i t_i b_i ½(θ_i − y_i)² + (0.25/2)·λ². The printed values equal the
closed forms in docs/conventions.md (asserted below; tests/test_docs.py runs this file and
compares its output with the block in the doc).
"""

import metaif  # noqa: E402

metaif.configure_cpu()  # before the first JAX computation: single-threaded Eigen kernels on CPU

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import metaif  # noqa: E402
from metaif import evaluation  # noqa: E402


def loss(params, meta_params, example):
    return 0.5 * (params - example["y"]) ** 2


def _list(x) -> list:
    return (np.round(np.asarray(x), 4) + 0.0).tolist()  # + 0.0 turns -0.0 into 0.0


def main() -> str:
    s = jnp.array([[0.0], [2.0], [4.0]])  # support targets [n=3, m=1]
    y = jnp.array([[1.0], [3.0], [8.0]])  # query targets   [n=3, q=1]; task 2 is the odd one out
    tasks = metaif.TaskSet({"y": s}, {"y": y})
    problem = metaif.BilevelProblem(loss, loss, metaif.Unrolled(steps=1, lr=0.5), meta_reg=0.25)
    lam = metaif.newton_refine(problem, jnp.array(0.0), tasks, steps=3).meta_params  # F is quadratic
    test = metaif.TaskSet({"y": jnp.array([[1.0]])}, {"y": jnp.array([[3.0]])})  # one test task
    target = lambda lam: metaif.task_losses(problem, lam, test).mean()  # f(λ)

    on_lam = metaif.influence(problem, lam, tasks)  # I_λ: dλ*/dω, leading axes [3], [3, 1]
    on_f = metaif.influence(problem, lam, tasks, target=target)  # I_f = f'(λ*) · I_λ
    retrained, _ = evaluation.leave_one_out(problem, lam, tasks, "tasks", None, lambda l: l, steps=3)
    f_change, _ = evaluation.leave_one_out(problem, lam, tasks, "tasks", None, target, steps=3)

    eps = 1e-6  # up-weighting task 2 by ε moves λ* by ≈ ε · I_λ(t_2)
    up = metaif.newton_refine(problem, lam, tasks, steps=3, task_weights=jnp.array([1.0, 1.0, 1.0 + eps])).meta_params

    lines = [
        f"lambda*                     {float(lam):+.4f}",
        f"theta_i(lambda*)            {_list(np.asarray(metaif.adapt_tasks(problem, lam, tasks)))}",
        f"f(lambda*)                  {float(target(lam)):+.4f}",
        f"I_lambda(t_k)               {_list(np.asarray(on_lam.tasks))}",
        f"I_f(t_k)                    {_list(np.asarray(on_f.tasks))}",
        f"I_f(b_k1) (query example)   {_list(np.asarray(on_f.query)[:, 0])}",
        f"I_f(a_k1) (support example) {_list(np.asarray(on_f.support)[:, 0])}",
        f"predicted d lambda, removal {_list(-np.asarray(on_lam.tasks))}",
        f"actual d lambda, removal    {_list(np.asarray(retrained))}",
        f"predicted d f, removal      {_list(-np.asarray(on_f.tasks))}",
        f"actual d f, removal         {_list(np.asarray(f_change))}",
        f"(lambda*(t_2 = 1 + eps) - lambda*) / eps = {float((up - lam) / eps):+.4f}",
    ]
    # the closed forms of docs/conventions.md
    np.testing.assert_allclose(float(lam), 3.0, atol=1e-12)
    np.testing.assert_allclose(on_lam.tasks, [-1 / 6, 1 / 6, 1.5], atol=1e-12)
    np.testing.assert_allclose(on_f.tasks, [1 / 12, -1 / 12, -0.75], atol=1e-12)
    np.testing.assert_allclose(on_f.support[:, 0], [-1 / 3, 0.0, 5 / 6], atol=1e-12)
    np.testing.assert_allclose(retrained, [3.2 - 3, 2.8 - 3, 1.2 - 3], atol=1e-12)
    np.testing.assert_allclose(f_change, [0.405 - 0.5, 0.605 - 0.5, 1.805 - 0.5], atol=1e-12)
    np.testing.assert_allclose(float((up - lam) / eps), 1.5, atol=1e-5)
    return "\n".join(lines)


if __name__ == "__main__":
    print(main())
