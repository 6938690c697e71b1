"""Optimizers against torch.optim, step by step on the same parameters and gradient sequence."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flaxlab import optim

torch = pytest.importorskip("torch", reason="torch (pip install torch==2.13.0) is the reference for the optimizers")


def run_both(cfg, torch_opt, steps=8, shape=(5, 3)):
    """Feeds the same gradients (changing sign now and then) to both; returns both parameter paths."""
    rng = np.random.default_rng(0)
    p0 = rng.normal(size=shape).astype(np.float32)
    grads = [rng.normal(size=shape).astype(np.float32) for _ in range(steps)]
    tx = optim.make_optimizer(cfg)
    params = {"w": jnp.asarray(p0)}
    state = tx.init(params)
    ours = []
    for g in grads:
        updates, state = tx.update({"w": jnp.asarray(g)}, state, params)
        params = optax.apply_updates(params, updates)
        ours.append(np.asarray(params["w"]))
    tp = torch.nn.Parameter(torch.tensor(p0))
    opt = torch_opt([tp])
    theirs = []
    for g in grads:
        tp.grad = torch.tensor(g)
        opt.step()
        theirs.append(tp.detach().numpy().copy())
    return ours, theirs


@pytest.mark.parametrize("cfg,make", [
    ({"name": "rprop", "lr": 0.01}, lambda p: torch.optim.Rprop(p, lr=0.01)),
    ({"name": "rprop", "lr": 0.1}, lambda p: torch.optim.Rprop(p, lr=0.1)),
    ({"name": "sgd", "lr": 0.1}, lambda p: torch.optim.SGD(p, lr=0.1)),
    ({"name": "sgd", "lr": 0.1, "momentum": 0.9}, lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)),
    ({"name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True},
     lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True)),
    ({"name": "sgd", "lr": 0.1, "weight_decay": 1e-2}, lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=1e-2)),
    ({"name": "adam", "lr": 1e-3}, lambda p: torch.optim.Adam(p, lr=1e-3)),
    ({"name": "adam", "lr": 1e-3, "weight_decay": 1e-3}, lambda p: torch.optim.Adam(p, lr=1e-3, weight_decay=1e-3)),
])
def test_matches_torch_every_step(cfg, make):
    ours, theirs = run_both(cfg, make)
    for step, (a, b) in enumerate(zip(ours, theirs)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=f"step {step + 1}")


def test_rprop_first_step_already_moves():
    """optax 0.2.8's rprop returns zeros here (it lags one step); torch and iRprop- move by lr."""
    g = {"w": jnp.array([0.3, -2.0, 0.0])}
    p = {"w": jnp.zeros(3)}
    ours, _ = optim.rprop(0.01).update(g, optim.rprop(0.01).init(p))
    chex.assert_trees_all_close(ours, {"w": jnp.array([-0.01, 0.01, 0.0])})


def test_rprop_jits_and_vmaps():
    tx = optim.make_optimizer({"name": "rprop", "lr": 0.05})
    params = {"w": jnp.ones((4, 2, 3))}
    state = jax.vmap(tx.init)(params)
    updates, _ = jax.jit(jax.vmap(tx.update))({"w": -jnp.ones((4, 2, 3))}, state, params)
    chex.assert_trees_all_close(updates, {"w": jnp.full((4, 2, 3), 0.05)})


def test_cosine_schedule_scales_each_models_learning_rate_down_to_zero():
    params = {"w": jnp.ones(3)}
    grads = {"w": jnp.ones(3)}
    tx = optim.make_optimizer({"name": "sgd", "lr": 0.5, "schedule": "cosine", "decay_steps": 4})
    state = tx.init(params)
    steps = []
    for _ in range(6):
        updates, state = tx.update(grads, state, params)
        steps.append(float(-updates["w"][0]))
    np.testing.assert_allclose(steps, [0.5, 0.5 * (1 + np.cos(np.pi / 4)) / 2, 0.25,
                                       0.5 * (1 + np.cos(3 * np.pi / 4)) / 2, 0.0, 0.0], atol=1e-6)
    with pytest.raises(optim.UsageError, match="unknown schedule 'step'"):
        optim.make_optimizer({"name": "sgd", "lr": 0.1, "schedule": "step"})
