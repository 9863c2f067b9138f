"""Shared helpers for tests of the ops: finding the equations a program is made of."""

import jax
import jax.extend


def jaxpr_eqns(jaxpr, primitives=('conv_general_dilated',), platform='cpu'):
    """The equations of a closed jaxpr using `primitives` (None: all), sub-jaxprs included.

    The rewrites choose their platform with `lax.platform_dependent`, a conditional whose
    branches name their platforms; lowering keeps only the branch of the platform lowered
    for. So only that branch is visited, by default the CPU's (the program these tests
    compile); `platform=None` visits every branch.
    """
    found = []

    def visit(j):
        for eqn in j.eqns:
            if primitives is None or eqn.primitive.name in primitives:
                found.append(eqn)
            branch = _platform_branch(eqn, platform)
            if branch is not None:
                visit(branch.jaxpr)
                continue
            for value in eqn.params.values():
                for sub in value if isinstance(value, list | tuple) else [value]:
                    if isinstance(sub, jax.extend.core.ClosedJaxpr):
                        visit(sub.jaxpr)
                    elif isinstance(sub, jax.extend.core.Jaxpr):
                        visit(sub)

    visit(jaxpr.jaxpr)
    return found


def _platform_branch(eqn, platform):
    """The branch of a `platform_dependent` conditional that `platform` runs, else None."""
    platforms = eqn.params.get('branches_platforms') if eqn.primitive.name == 'cond' else None
    if platform is None or not platforms:
        return None
    named = [i for i, names in enumerate(platforms) if names is not None and platform in names]
    default = [i for i, names in enumerate(platforms) if names is None]
    return eqn.params['branches'][(named or default)[0]]


def primitive_names(jaxpr, platform='cpu'):
    """The primitive names of a closed jaxpr's equations as lowered for `platform`, in order."""
    return [eqn.primitive.name for eqn in jaxpr_eqns(jaxpr, None, platform)]
