"""optax optimisers, learning-rate schedules and per-parameter rules built from `config.optimizer`.

Parameters fall into three groups, chosen by their path in the `params` tree:
  * `frozen`: paths matching any regex in `config.optimizer.frozen_params`. Their gradients
    are zeroed before clipping and their updates are zero, so they never move (the FCN's
    fixed bilinear upsampler lives in the separate `frozen` collection and never reaches the
    optimiser at all);
  * `bias`: leaves named `bias` (BatchNorm's shift included). They get
    `bias_lr_multiplier` x the learning rate and, unless `bias_weight_decay`, no weight
    decay (the FCN's Caffe recipe: lr_mult 2, decay_mult 0);
  * `weight`: everything else (kernels, BatchNorm scales).

The FCN recipe: SGD, momentum 0.99, constant lr 1e-10 (unnormalised loss), weight decay
5e-4 as L2 on the gradient (Caffe), bias lr x2, no bias decay. torchvision's: SGD momentum
0.9, poly schedule with power 0.9, weight decay 1e-4.
"""

import re
from collections.abc import Callable

import flax
import jax
import ml_collections
import optax

GROUPS = ('weight', 'bias', 'frozen')


def param_path(path: tuple) -> str:
    """'/'-joined names of a key path from `jax.tree_util.tree_map_with_path`."""
    return '/'.join(str(getattr(key, 'key', getattr(key, 'name', key))) for key in path)


def param_groups(params, frozen_patterns=()) -> dict:
    """Tree like `params` whose leaves are the group names of `GROUPS`."""
    patterns = [re.compile(p) for p in frozen_patterns]

    def group(path, _):
        name = param_path(path)
        if any(p.search(name) for p in patterns):
            return 'frozen'
        return 'bias' if name.rsplit('/', 1)[-1] == 'bias' else 'weight'

    return jax.tree_util.tree_map_with_path(group, flax.core.unfreeze(params))


def create_learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """Learning rate per step: optional linear warm-up, then constant, poly or cosine decay.

    Args:
      config: the full config (`optimizer` section and `num_train_steps`).

    Returns:
      An optax schedule.
    """
    opt = config.optimizer
    base = opt.learning_rate
    decay_steps = max(config.num_train_steps - opt.warmup_steps, 1)
    if opt.schedule == 'constant':
        schedule = optax.constant_schedule(base)
    elif opt.schedule == 'poly':
        # torchvision: lr * (1 - step / total) ** 0.9.
        schedule = optax.polynomial_schedule(
            init_value=base, end_value=0.0, power=opt.poly_power, transition_steps=decay_steps
        )
    elif opt.schedule == 'cosine':
        schedule = optax.cosine_decay_schedule(base, decay_steps)
    else:
        raise ValueError(f'Unknown schedule {opt.schedule!r}; use constant, poly or cosine.')
    if opt.warmup_steps > 0:
        warmup = optax.linear_schedule(0.0, base, opt.warmup_steps)
        schedule = optax.join_schedules([warmup, schedule], [opt.warmup_steps])
    return schedule


def _group_optimizer(
    opt: ml_collections.ConfigDict, learning_rate: Callable, weight_decay: float
) -> optax.GradientTransformation:
    if opt.name == 'sgd':
        # Caffe/torchvision weight decay: L2 added to the gradient before momentum.
        return optax.chain(
            optax.add_decayed_weights(weight_decay),
            optax.sgd(learning_rate, momentum=opt.momentum or None, nesterov=opt.nesterov),
        )
    if opt.name == 'adam':
        return optax.chain(optax.add_decayed_weights(weight_decay), optax.adam(learning_rate))
    if opt.name == 'adamw':
        return optax.adamw(learning_rate, weight_decay=weight_decay)
    raise ValueError(f'Unknown optimizer {opt.name!r}; use sgd, adam or adamw.')


def create_optimizer(
    config: ml_collections.ConfigDict, params
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimiser for `params` described by `config.optimizer`.

    Args:
      config: the full config (`optimizer` section and `num_train_steps`).
      params: the `params` collection (or an abstract tree of the same structure).

    Returns:
      (gradient transformation, base learning-rate schedule for logging).
    """
    opt = config.optimizer
    schedule = create_learning_rate_schedule(config)
    groups = param_groups(params, opt.frozen_params)
    bias_lr = opt.bias_lr_multiplier

    def bias_schedule(step):
        return bias_lr * schedule(step)

    bias_decay = opt.weight_decay if opt.bias_weight_decay else 0.0
    tx = optax.multi_transform(
        {
            'weight': _group_optimizer(opt, schedule, opt.weight_decay),
            'bias': _group_optimizer(opt, bias_schedule, bias_decay),
            'frozen': optax.set_to_zero(),
        },
        groups,
    )
    if opt.grad_clip_norm is not None:
        # Frozen gradients are zeroed first so they do not count towards the global norm.
        frozen_mask = jax.tree_util.tree_map(lambda g: g == 'frozen', groups)
        tx = optax.chain(
            optax.masked(optax.set_to_zero(), frozen_mask),
            optax.clip_by_global_norm(opt.grad_clip_norm),
            tx,
        )
    return tx, schedule
