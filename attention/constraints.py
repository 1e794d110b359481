"""Parameter constraints: projections applied after every optimizer step.

A module that needs some parameters kept in a set (MHLA's mixing matrix in [0, 1])
mixes in :class:`Constrained` and lists ``(parameter, projection)`` pairs in
:meth:`Constrained.constraints`. The trainer calls :func:`constrain_` on the model after
each optimizer step; optimizers that keep their own copies of the weights (DeepSpeed's
fp32 masters) apply the same projections to those copies via :func:`parameter_constraints`.
Projections are element-wise, so they also apply to a shard of a parameter.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

Projection = Callable[[Tensor], Tensor]


def unit_interval(x: Tensor) -> Tensor:
    """Projection onto [0, 1] (element-wise clamp)."""
    return x.clamp(0.0, 1.0)


class Constrained:
    """Mixin for modules whose parameters must stay in a set; see the module docstring."""

    def constraints(self) -> list[tuple[nn.Parameter, Projection]]:
        """(parameter, projection) pairs; the projection maps any tensor to the nearest allowed one."""
        raise NotImplementedError

    @torch.no_grad()
    def constrain_(self) -> None:
        """Apply every projection in place."""
        for parameter, project in self.constraints():
            parameter.copy_(project(parameter))


def parameter_constraints(model: nn.Module) -> list[tuple[str, nn.Parameter, Projection]]:
    """(qualified name, parameter, projection) of every constraint of every submodule of ``model``."""
    names = {id(p): name for name, p in model.named_parameters(remove_duplicate=False)}
    return [
        (names.get(id(parameter), ""), parameter, project)
        for module in model.modules()
        if isinstance(module, Constrained)
        for parameter, project in module.constraints()
    ]


@torch.no_grad()
def constrain_(model: nn.Module) -> None:
    """Apply the constraints of every :class:`Constrained` submodule of ``model`` in place."""
    for module in model.modules():
        if isinstance(module, Constrained):
            module.constrain_()
