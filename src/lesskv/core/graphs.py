"""A cache layer's decoding step replayed as a CUDA graph (``LessCache(cuda_graphs=True)``).

On a GPU a decoding step is a few dozen tiny kernels whose launch costs more than their work
(issue #28: ~0.3 ms per layer and step on an H200, against ~0.1 ms for reading the layer's
weights). :func:`lesskv.core.decoding.layer_step` writes only into the layer's buffers, in
place, and decides nothing in Python from their contents, so after one ordinary step it can
be captured once and replayed every step: the new query, key and value are copied into the
graph's own input tensors, and the outputs come back in the graph's output tensors.

A graph is bound to the storage it was captured with: when the cache's buffers move
(beam-search reordering allocates new ones, another batch size), the next step runs
ordinarily again and the one after captures anew.
"""

from __future__ import annotations

import torch

from lesskv.core.decoding import Evicted, compiled_layer_step
from lesskv.errors import LessKVError

# One memory pool per device, shared by every layer's graph: layers replay one after another
# and each keeps its outputs referenced, so their graphs can share the rest of the pool.
_POOLS: dict[torch.device, tuple] = {}


def require_cuda(device: torch.device) -> None:
    """CUDA graphs exist on CUDA devices only: one line before any work elsewhere."""
    if device.type != "cuda":
        raise LessKVError(
            f"cuda_graphs=True (--cuda-graphs) needs the model on a CUDA device; it is on "
            f"{device.type}: leave graphs off there (compiled steps still apply)"
        )


class CapturedStep:
    """One layer's decoding step: run as it is the first time (which compiles it and
    initialises the libraries it calls), captured the second time, replayed from then on."""

    def __init__(self) -> None:
        self.storage: tuple | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: tuple[torch.Tensor, ...] = ()
        self.outputs: tuple[torch.Tensor, torch.Tensor, Evicted] | None = None

    def __call__(self, *args, enabled: bool = True) -> tuple[torch.Tensor, torch.Tensor, Evicted]:
        """``args``: :func:`~lesskv.core.decoding.layer_step`'s."""
        _, _, _, query, key, value, slots, _, less = args
        persistent = (*slots, *(less[1] if less is not None else ()))
        storage = tuple((t.data_ptr(), t.shape) for t in persistent) + tuple(
            (t.shape, t.stride(), t.dtype) for t in (query, key, value)
        )
        if storage != self.storage:  # new buffers: one ordinary step first
            self.storage, self.graph, self.outputs = storage, None, None
            return self._warm(query.device, *args, enabled=enabled)
        if self.graph is None:
            self._capture(query.device, *args, enabled=enabled)
        for static, fresh in zip(self.inputs, (query, key, value), strict=True):
            static.copy_(fresh)
        self.graph.replay()
        return self.outputs

    def _warm(self, device: torch.device, *args, enabled: bool):
        """The step on a side stream, as CUDA's capture rules ask of what is captured later."""
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            result = compiled_layer_step(*args, enabled=enabled)
        torch.cuda.current_stream(device).wait_stream(side)
        return result

    def _capture(self, device: torch.device, *args, enabled: bool) -> None:
        """Record the step on graph inputs of its own (capturing does not run it)."""
        policy, split, window, query, key, value, slots, scale, less = args
        self.inputs = (query.clone(), key.clone(), value.clone())
        with torch.cuda.device(device):
            if device not in _POOLS:
                _POOLS[device] = torch.cuda.graph_pool_handle()
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=_POOLS[device]):
                self.outputs = compiled_layer_step(
                    policy, split, window, *self.inputs, slots, scale, less, enabled=enabled
                )
