"""Check behind the fidelity notes: continue two stalled leave-one-task-out retrainings (the two with
the largest final gradient norms in results/removal/removal.json) from 14 to 40 exact Newton steps,
and retrain them proximally (ρ = 1e-2). Run from the repository root:
    .venv/bin/python experiments/stall_check.py
"""
import sys, time, json
sys.path.insert(0, "experiments")
import common as C, numpy as np, jax, metaif
from metaif import evaluation as E
r = json.load(open("results/removal/removal.json"))["omniglot"]
g = np.array(r["loo"]["grad_norms"]); idx = np.argsort(g)[-3:-1]
s = C.build(C.CONFIGS["cpu"]); tr = C.meta_train(s, log=lambda *a: None); lam = tr.meta_params
n,m,q = s.train.n_tasks, s.train.n_support, s.train.n_query
w = E.removal_weights(n,m,q,"tasks",idx)
f = C.mean_loss(s, s.val)
for steps in (14, 40):
    t=time.perf_counter(); res = jax.block_until_ready(E.retrain(s.problem, lam, s.train, w, steps=steps, batch_size=None))
    print("tasks", idx, "steps", steps, "grad", np.asarray(res.grad_norm), "change", np.asarray(E.target_values(f, res)) - float(f(lam)), f"{time.perf_counter()-t:.0f}s", flush=True)
res = jax.block_until_ready(E.retrain(s.problem, lam, s.train, w, steps=14, batch_size=None, proximal=1e-2))
print("proximal 1e-2, 14 steps: grad", np.asarray(res.grad_norm), flush=True)
