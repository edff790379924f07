"""Methods by name (:data:`REGISTRY`) → what the model runs: per-layer setups for the parallel
form, a cache (or None, transformers' own) for the recurrent form.

A method is a :class:`~lesskv.hf.methods.base.Method`, one file each: ``full`` (the model's
own attention), ``baseline`` (the sparse policy), ``baseline+`` (the policy with extra pairs
weighing as much as LESS's state: the equal-memory comparison), ``merge`` (the policy plus as
many training-free merge slots for the evicted pairs as that memory holds), ``less`` (the
policy plus the learned low-rank state) and ``performer`` (that state with random features,
untrained: the paper's H2O+Performer). Adding one is adding a file: the registry is every
:class:`Method` subclass the package's files define.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace

from torch import nn
from transformers import PreTrainedModel

from lesskv.core.budget import DEFAULT_RANK
from lesskv.core.policies import POLICIES, Policy
from lesskv.errors import LessKVError
from lesskv.hf.attention import LayerSetup, Observer, enable, set_setups, using_setups
from lesskv.hf.cache import LessCache
from lesskv.hf.checkpoint import LessKernels
from lesskv.hf.methods.base import Method
from lesskv.hf.modules import attention_modules, on_layer_device, policy_layers


def _discover() -> dict[str, Method]:
    """Every method the package's files define, by name, in the order tables list them."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
    found, pending = [], [Method]
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if "name" in vars(cls) and cls.__module__.startswith(f"{__name__}."):
            found.append(cls)
    return {cls.name: cls() for cls in sorted(found, key=lambda cls: cls.order)}


# The registry: every method by name, in the order tables list them.
REGISTRY: dict[str, Method] = _discover()
METHODS = tuple(REGISTRY)


def get_method(name: str) -> Method:
    """The method called ``name``, with one readable error for an unknown name."""
    if name not in REGISTRY:
        raise LessKVError(f"unknown method {name!r}: choose from {', '.join(METHODS)}")
    return REGISTRY[name]


def set_method(
    model: PreTrainedModel,
    method: str,
    policy: Policy | None = None,
    kernels: LessKernels | Sequence[nn.Module] | None = None,
    rank: int = DEFAULT_RANK,
) -> None:
    """Switch every layer to ``method`` (a name of :data:`METHODS`), e.g. ``baseline+``
    (policy + pairs as large as a rank-``rank`` state) or ``less`` (policy + ``kernels``: a
    :class:`LessKernels`, as :func:`make_cache` takes, or one kernel module per layer, as
    training holds them).

    The choice holds for the calling thread (or asyncio task) only; other threads using the
    same model keep theirs. :func:`using_method` limits it to a block.
    """
    set_setups(model, layer_setups(model, method, policy, kernels, rank))


@contextmanager
def using_method(model: PreTrainedModel, method: str, **options) -> Iterator[None]:
    """:func:`set_method` for the duration of a block, then back to what was set before."""
    with using_setups(model, layer_setups(model, method, **options)):
        yield


@contextmanager
def observing(
    model: PreTrainedModel,
    observer: Observer,
    layers: Iterable[int] | None = None,
    running: Mapping[nn.Module, LayerSetup] | None = None,
) -> Iterator[None]:
    """Full attention, or the ``running`` setups (a method's, from :func:`layer_setups`), with
    ``observer(module, query, key, value)`` seeing each layer in ``layers`` (all by default)
    on every call: how training and analysis read post-RoPE queries and keys, on clean
    inputs or on those a method gives each layer."""
    modules = attention_modules(enable(model))
    chosen = range(len(modules)) if layers is None else layers
    setups = dict(running or {})
    for i in chosen:
        setups[modules[i]] = replace(setups.get(modules[i], LayerSetup()), observer=observer)
    with using_setups(model, setups):
        yield


def layer_setups(
    model: PreTrainedModel,
    method: str,
    policy: Policy | None = None,
    kernels: LessKernels | Sequence[nn.Module] | None = None,
    rank: int = DEFAULT_RANK,
) -> dict[nn.Module, LayerSetup]:
    """Each attention module's setup for ``method`` (none for ``full``)."""
    chosen = check_method(method, policy, kernels)
    if isinstance(kernels, LessKernels):
        kernels = kernels.layers
    modules = attention_modules(enable(model))
    if chosen.needs_kernels and len(kernels) != len(modules):
        raise LessKVError(f"kernels cover {len(kernels)} layers but the model has {len(modules)}")
    if not chosen.sparse:
        return {}
    return {  # local layers of a mixed model keep their own window: full attention within it
        modules[i]: chosen.layer_setup(
            policy,
            modules[i],
            on_layer_device(kernels[i], modules[i]) if chosen.needs_kernels else None,
            rank,
        )
        for i in policy_layers(model)
    }


@dataclass(frozen=True)
class StepOptions:
    """How a :class:`LessCache` runs its decoding steps (see there): compiled (``None``: unless
    ``LESSKV_COMPILE=0``), and replayed as CUDA graphs."""

    compile: bool | None = None
    cuda_graphs: bool = False


PLAIN_STEPS = StepOptions()


def make_cache(
    model: PreTrainedModel,
    method: str,
    policy: Policy | None = None,
    kernels: LessKernels | None = None,
    rank: int = DEFAULT_RANK,
    step: StepOptions = PLAIN_STEPS,
) -> LessCache | None:
    """The cache ``method`` generates with; ``None`` for ``full`` (transformers' own cache),
    its decoding steps run as ``step`` says."""
    chosen = check_method(method, policy, kernels)
    return chosen.cache(model, policy, kernels, rank, asdict(step))


def check_method(method: str, policy: Policy | None, kernels: object | None) -> Method:
    """The method called ``method``, once it has what it needs: one readable error for an
    unknown name or a missing policy/kernels."""
    chosen = get_method(method)
    if chosen.sparse and policy is None:
        raise LessKVError(f"method {method!r} needs a policy ({', '.join(POLICIES)}) and a budget")
    if chosen.needs_kernels and kernels is None:
        raise LessKVError(f"method {method!r} needs trained kernels (--kernels DIR)")
    return chosen
