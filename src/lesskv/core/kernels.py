"""A layer's kernels: the learned state form its :class:`KernelShape` names, built by name.

Every name in :data:`lesskv.core.budget.STATES` (the ``--kernel`` choices) maps to its form
here (:data:`FORMS`), the one place that knows them all: checkpoints, training and the cache
build a layer's kernels through :func:`make_kernels` and use them only through
:class:`~lesskv.core.forms.StateForm`.
"""

from __future__ import annotations

from collections.abc import Callable

from lesskv.core.forms import KernelShape, StateForm
from lesskv.core.forms.lowrank import LayerKernels
from lesskv.core.forms.slots import SlotsForm

__all__ = ["FORMS", "KernelShape", "LayerKernels", "make_kernels"]

# Each state form's name (a --kernel choice, recorded in checkpoints) and its learned module.
FORMS: dict[str, Callable[[KernelShape], StateForm]] = {
    "decay": LayerKernels,
    "paper": LayerKernels,
    "slots": SlotsForm,
}


def make_kernels(shape: KernelShape) -> StateForm:
    """New (untrained) kernels of the form ``shape.state`` names."""
    return FORMS[shape.state](shape)
