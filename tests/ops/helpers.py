"""Shared helpers for tests of the ops: finding the equations a program is made of."""

import jax
import jax.extend


def jaxpr_eqns(jaxpr, primitives=('conv_general_dilated',)):
    """The equations of a closed jaxpr using `primitives` (None: all), sub-jaxprs included."""
    found = []

    def visit(j):
        for eqn in j.eqns:
            if primitives is None or eqn.primitive.name in primitives:
                found.append(eqn)
            for value in eqn.params.values():
                for sub in value if isinstance(value, list | tuple) else [value]:
                    if isinstance(sub, jax.extend.core.ClosedJaxpr):
                        visit(sub.jaxpr)
                    elif isinstance(sub, jax.extend.core.Jaxpr):
                        visit(sub)

    visit(jaxpr.jaxpr)
    return found
