"""Where the rewrites run: on XLA:CPU only, chosen when a program is lowered.

Every rewrite in this package was measured on XLA:CPU, and only there (`docs/performance.md`);
on GPUs and TPUs the plain Flax/XLA op runs, as with `plain_ops`, until a measurement on
that platform shows the rewrite faster. A traced program does not know its platform: JAX
lowers the same trace for 'cpu', 'cuda' or 'tpu' (even for a TPU it does not have, see
`fcn_unet_jax/aot.py`). So the choice is `lax.platform_dependent`, a conditional on the
platform that lowering resolves: a program lowered for one platform holds only that
platform's branch, and a CPU program is the one the rewrite alone would give.

Where the choice sits matters for compile time. Automatic differentiation linearises a
conditional branch by branch, so a `platform_dependent` around a differentiated function
traces and lowers both branches' derivatives (seconds for a deep network's train step).
Inside a custom VJP's rules it is not differentiated: the forward rule and the backward
rule each choose once. Ops with a hand-written gradient choose inside their own rules;
`cpu_rewrite` gives the same to a rewrite that has none.
"""

from collections.abc import Callable

import jax

Array = jax.Array


def on_cpu(cpu: Callable, default: Callable, *args):
    """`cpu(*args)` in a program lowered for CPU, `default(*args)` for any other platform.

    Call it where it is not differentiated (a custom VJP's rules, or the primal function
    of one); both functions must return the same shapes and dtypes.
    """
    return jax.lax.platform_dependent(*args, cpu=cpu, default=default)


def vjp_of(function: Callable) -> Callable:
    """`(*args, cotangent) -> the cotangents of args`: JAX's own VJP of `function`.

    In a backward rule this recomputes the forward pass from its inputs; for the linear
    functions rewritten here nothing of it is used, and XLA drops it as dead code.
    """

    def vjp(*args_and_cotangent):
        *args, cotangent = args_and_cotangent
        return jax.vjp(function, *args)[1](cotangent)

    return vjp


def cpu_rewrite(tuned: Callable, plain: Callable) -> Callable:
    """`tuned` on CPU and `plain` elsewhere, forward and backward, with no doubled tracing.

    For a rewrite without a hand-written gradient (an exact reformulation such as a matrix
    product and `depth_to_space` for an up-convolution). The result is a custom VJP whose
    rules choose the platform: the forward pass runs `tuned` or `plain`, the backward pass
    JAX's VJP of the same function. The residuals are the inputs, as for JAX's own VJP of a
    linear function, so a CPU program computes what differentiating `tuned` computes.

    Args:
      tuned: the rewrite, a function of arrays only (close over static settings).
      plain: the plain Flax/XLA function of the same arrays, with the same result.

    Returns:
      A function of the same arrays.
    """

    @jax.custom_vjp
    def rewritten(*args):
        return on_cpu(tuned, plain, *args)

    def forward(*args):
        # `tuned` as it runs when differentiated: ops inside it with a custom VJP of their
        # own run their forward rules, as they did before this wrapper (Winograd's
        # training transform, say, rather than its inference one).
        def differentiated(*args):
            return jax.vjp(tuned, *args)[0]

        return on_cpu(differentiated, plain, *args), args

    def backward(args, cotangent):
        return on_cpu(vjp_of(tuned), vjp_of(plain), *args, cotangent)

    rewritten.defvjp(forward, backward)
    return rewritten
