"""Optimizers of the reports (SGD with momentum/Nesterov, Adam, Rprop) plus L2 and L1 terms.

The learning rate and weight decay are injected as optimizer state (`optax.inject_hyperparams`), so
models trained side by side in one program may use different values without a recompile.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from flaxlab.errors import UsageError

OPTIMIZERS = ("sgd", "adam", "rprop")


class RpropState(NamedTuple):
    step_size: optax.Updates
    prev_grad: optax.Updates


def rprop(learning_rate=0.01, eta_minus=0.5, eta_plus=1.2, min_step_size=1e-6, max_step_size=50.0):
    """iRprop- as torch.optim.Rprop computes it: the very first update is already -lr * sign(grad).

    optax.rprop (0.2.8) starts from a zero previous update and so lags one step; this one keeps the
    previous gradient instead, zeroing it where the sign flipped, as Igel & Huesken's iRprop- does.
    """

    def init_fn(params):
        return RpropState(step_size=jax.tree.map(lambda p: jnp.full_like(p, learning_rate), params),
                          prev_grad=jax.tree.map(jnp.zeros_like, params))

    def update_fn(grads, state, params=None):
        del params

        def leaf(g, prev, step):
            agreement = g * prev
            factor = jnp.where(agreement > 0, eta_plus, jnp.where(agreement < 0, eta_minus, 1.0))
            step = jnp.clip(step * factor, min_step_size, max_step_size)
            g = jnp.where(agreement < 0, 0.0, g)
            return -step * jnp.sign(g), g, step

        out = jax.tree.map(leaf, grads, state.prev_grad, state.step_size)
        is_triple = lambda x: isinstance(x, tuple) and len(x) == 3
        pick = lambda i: jax.tree.map(lambda t: t[i], out, is_leaf=is_triple)
        return pick(0), RpropState(step_size=pick(2), prev_grad=pick(1))

    return optax.GradientTransformation(init_fn, update_fn)


# Each factory chains coupled L2 (torch's `weight_decay`: decay * param added to the gradient) before the
# optimizer, with the decay injected like the learning rate: models stacked in one program may differ in both.

def _sgd(learning_rate, weight_decay, momentum=0.0, nesterov=False):
    return optax.chain(optax.add_decayed_weights(weight_decay),
                       optax.sgd(learning_rate, momentum=momentum or None, nesterov=nesterov))


def _adam(learning_rate, weight_decay, b1=0.9, b2=0.999, eps=1e-8):
    return optax.chain(optax.add_decayed_weights(weight_decay), optax.adam(learning_rate, b1=b1, b2=b2, eps=eps))


def _rprop(learning_rate, weight_decay):
    return optax.chain(optax.add_decayed_weights(weight_decay), rprop(learning_rate))


SCHEDULES = ("constant", "cosine")


def make_optimizer(cfg):
    """An optax transform from the config's optimizer section, its lr and weight decay injected as state.

    `schedule` cosine scales every update by a cosine decay from 1 to 0 over `decay_steps` (the run's
    steps; set by the runner), on top of each model's own injected learning rate.
    The L1 penalty lives in the loss (see `flaxlab.train.l1_penalty`).
    """
    schedule = cfg.get("schedule", "constant")
    if schedule not in SCHEDULES:
        raise UsageError(f"unknown schedule '{schedule}'; known: {', '.join(SCHEDULES)}")
    if schedule == "cosine":
        decay = optax.cosine_decay_schedule(1.0, max(int(cfg["decay_steps"]), 1))
        return optax.chain(make_optimizer({**cfg, "schedule": "constant"}), optax.scale_by_schedule(decay))
    name, hyper = cfg["name"], dict(learning_rate=cfg["lr"], weight_decay=cfg.get("weight_decay", 0.0))
    if name == "sgd":
        return optax.inject_hyperparams(_sgd, static_args=("momentum", "nesterov"))(
            **hyper, momentum=cfg.get("momentum", 0.0), nesterov=cfg.get("nesterov", False))
    if name == "adam":
        return optax.inject_hyperparams(_adam)(**hyper, b1=cfg.get("b1", 0.9), b2=cfg.get("b2", 0.999),
                                               eps=cfg.get("eps", 1e-8))
    if name == "rprop":
        return optax.inject_hyperparams(_rprop)(**hyper)
    raise UsageError(f"unknown optimizer '{name}'; known: {', '.join(OPTIMIZERS)}")
