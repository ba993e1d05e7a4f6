"""The README's API example: meta-train MAML on generated tasks, score every task and example,
and check the most harmful task against retraining without it.

    .venv/bin/python docs/examples/quickstart.py

tests/test_package.py runs this file and checks that the README shows its code and its output.
"""

import jax
import optax

import metaif
from metaif import problems

jax.config.update("jax_enable_x64", True)
tasks = problems.classification_tasks(n_tasks=40, n_support=15, n_query=15, dim=5, ways=3)  # 40 training tasks
test = problems.classification_tasks(20, 15, 15, 5, 3, seed=1)  # 20 held-out tasks

loss = problems.linear_cross_entropy  # (params, meta_params, example) -> scalar
problem = metaif.BilevelProblem(loss, loss, metaif.Unrolled(steps=1, lr=0.5), meta_reg=1e-2)  # MAML, one inner step
init = problems.linear_init(jax.random.key(0), 5, 3)
trained = metaif.meta_train(problem, init, tasks, optax.adam(0.05), steps=500)
lam = metaif.newton_refine(problem, trained.meta_params, tasks).meta_params  # polish to a stationary point

target = lambda lam: metaif.task_losses(problem, lam, test).mean()  # the held-out (meta-test) loss
scores = metaif.influence(problem, lam, tasks, target=target)  # every task and example, one pass
print(f"‖∇F(λ*)‖ = {float(scores.grad_norm):.1e}; held-out loss {float(target(lam)):.4f}")
print(f"scores: tasks {scores.tasks.shape}, support {scores.support.shape}, query {scores.query.shape}")
k = int(scores.tasks.argmax())  # influence > 0: harmful
change, _ = metaif.evaluation.leave_one_out(problem, lam, tasks, "tasks", [k], target)  # retrain without task k
print(
    f"most harmful task {k}: predicted change if removed {-float(scores.tasks[k]):+.2e}, retrained {float(change[0]):+.2e}"
)
