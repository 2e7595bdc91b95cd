"""Activation offload: what a layer saves for backward waits in host memory, not on the device.

With full recompute a layer saves only its input, `[N/P, b, h]`; at millions of tokens
those inputs are most of a rank's activation memory (32 layers x 4 GiB for Llama-3-8B
at 4M tokens on SP 8). `ActivationOffloader` moves them out and back:

* forward: the saved-tensor pack hook of layer i starts a device-to-host copy into pinned
  memory on a side stream (`d2h`) and returns a handle. The device tensor is released
  to the caching allocator with `record_stream(d2h)`, so its memory is reused only once
  the copy is done; the compute stream never waits for the copy, except that at most
  `max_in_flight` layers may have copies outstanding (bounded device memory when PCIe is
  slower than compute).
* backward: the unpack hook of layer i (called when its recompute starts) waits for its
  host-to-device copy, then starts layer i-1's copy on another side stream (`h2d`), so
  the next layer's input arrives while this layer recomputes and runs backward: one
  layer in flight, as DeepSpeed's and torchao's offload do. A sequence-tiled layer
  (`deferred`) asks for it later, from a hook on its QKV gradient: once its attention
  backward, the peak of the layer, is done, so the copy never adds to that peak.
* the last layer's input is not offloaded (`skip_last`): its backward starts right after
  the loss, before a copy could come back.

The same bookkeeping runs on every device. On CUDA the copies are asynchronous (streams
and events); on CPU they are plain copies into tensors that no memory tracker sees (the
"host"), so tests count exactly the bytes that leave the compute device and see the
device memory that offload frees; under FakeTensorMode (full-scale estimation) only the
metadata is kept. `stats()` reports bytes offloaded and restored, and host bytes live and
at peak.

Only tensors that the layer itself created or received as its first argument are
offloaded: parameters and tensors shared by every layer (RoPE's cos/sin, passed as
`keep`) stay where they are.
"""

from __future__ import annotations

import contextlib
import weakref

import torch
from torch.utils._python_dispatch import _disable_current_modes


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor  # noqa: PLC0415

    return isinstance(t, FakeTensor)


def _storage_key(t: torch.Tensor):
    try:
        return t.untyped_storage()._cdata  # the storage's identity (fake tensors have no data pointer)
    except (RuntimeError, NotImplementedError):
        return None


class _Packed:
    """One offloaded tensor: its host copy (or only its metadata) and, once fetched, the device copy."""

    __slots__ = ("layer", "shape", "dtype", "device", "nbytes", "host", "d2h_done", "device_copy", "h2d_done",
                 "unpacked", "key", "uses", "storage", "__weakref__")

    def __init__(self, layer: int, t: torch.Tensor) -> None:
        self.layer, self.shape, self.dtype, self.device = layer, t.shape, t.dtype, t.device
        self.nbytes = t.numel() * t.element_size()
        self.host = None
        self.d2h_done = None
        self.device_copy = None
        self.h2d_done = None
        self.unpacked = False
        self.uses = 1  # saved-tensor slots holding this handle that are not unpacked yet


class _Resident:
    """A saved tensor that stays on the device, tagged with its layer (its unpack prefetches)."""

    __slots__ = ("layer", "tensor")

    def __init__(self, layer: int, tensor: torch.Tensor) -> None:
        self.layer, self.tensor = layer, tensor


class ActivationOffloader:
    """Saved-tensor hooks that keep layers' saved activations in host memory (see the module doc).

    `layer_hooks(index, keep)` is the context to run layer `index`'s forward in (layers are
    numbered in forward order; backward visits them in reverse, and unpacking layer i
    prefetches layer i-1).
    """

    def __init__(self, device: torch.device, *, num_layers: int | None = None, skip_last: bool = True,
                 max_in_flight: int = 2, pin_memory: bool | None = None) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.num_layers = num_layers
        self.skip_last = skip_last
        self.max_in_flight = max_in_flight
        self.pin_memory = self.cuda if pin_memory is None else pin_memory
        self._d2h = self._h2d = None
        self._layers: dict[int, list] = {}  # layer -> weakrefs to its handles, in pack order
        self._pending_d2h: list = []  # (layer, event) of copies not known to be done, oldest first
        # layers whose backward asks for the previous layer's tensors itself (`prefetch`), later than
        # their unpack: after their attention backward, the moment of their peak, is over
        self.deferred: set[int] = set()
        self.reset_stats()

    # --- statistics -----------------------------------------------------------------------

    def reset_stats(self) -> None:
        self.bytes_offloaded = 0  # device -> host
        self.bytes_prefetched = 0  # host -> device ahead of need
        self.bytes_fetched_on_demand = 0  # host -> device when unpacked before a prefetch
        self.tensors_offloaded = 0
        self.host_bytes = getattr(self, "host_bytes", 0)  # live host copies survive a reset
        self.host_peak = self.host_bytes

    def stats(self) -> dict:
        return {"bytes_offloaded": self.bytes_offloaded, "bytes_prefetched": self.bytes_prefetched,
                "bytes_fetched_on_demand": self.bytes_fetched_on_demand,
                "tensors_offloaded": self.tensors_offloaded, "host_bytes": self.host_bytes,
                "host_peak": self.host_peak}

    def _host_alloc(self, nbytes: int) -> None:
        self.host_bytes += nbytes
        self.host_peak = max(self.host_peak, self.host_bytes)

    def _host_free(self, nbytes: int) -> None:
        self.host_bytes -= nbytes

    # --- hooks ----------------------------------------------------------------------------

    def offloads(self, index: int) -> bool:
        return not (self.skip_last and self.num_layers is not None and index == self.num_layers - 1)

    def layer_hooks(self, index: int, keep=()):
        """Context for layer `index`'s forward: its saved tensors go to host memory."""
        if not torch.is_grad_enabled():
            return contextlib.nullcontext()
        kept = {_storage_key(t) for t in keep if isinstance(t, torch.Tensor)}
        kept.discard(None)
        self._layers[index] = []
        offload = self.offloads(index)
        return torch.autograd.graph.saved_tensors_hooks(lambda t: self._pack(index, t, kept, offload), self._unpack)

    def _pack(self, index: int, t: torch.Tensor, kept: set, offload: bool):
        if not offload or isinstance(t, torch.nn.Parameter) or (t.is_leaf and t.requires_grad) \
                or t.device != self.device or _storage_key(t) in kept or t.numel() == 0:
            return _Resident(index, t)  # stays; unpacking it still prefetches the layer before
        storage = t.untyped_storage()
        key = (t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        for ref in self._layers[index]:  # the same tensor saved twice (by two ops): one copy
            other = ref()
            # the very same storage object, alive (an address may be reused once a storage is freed)
            if other is not None and other.key == key and not other.unpacked and other.storage() is storage:
                other.uses += 1
                return other
        h = _Packed(index, t)
        h.key = key
        h.storage = weakref.ref(storage)
        if _is_fake(t):  # full-scale estimation: nothing to copy
            pass
        elif self.cuda:
            self._copy_to_host_async(h, t)
        else:
            with _disable_current_modes():  # the host copy is not device memory
                h.host = t.detach().clone()
        self._host_alloc(h.nbytes)
        weakref.finalize(h, self._host_free, h.nbytes)
        self.bytes_offloaded += h.nbytes
        self.tensors_offloaded += 1
        self._layers[index].append(weakref.ref(h))
        return h

    def _unpack(self, h):
        if isinstance(h, _Resident):
            if h.layer not in self.deferred:
                self._prefetch(h.layer - 1)
            return h.tensor
        if h.device_copy is None:
            self._fetch(h)
            self.bytes_fetched_on_demand += h.nbytes
        out = h.device_copy
        if self.cuda:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(h.h2d_done)
            out.record_stream(stream)  # allocated on the h2d stream, used (and freed) on this one
        h.uses -= 1
        if h.uses <= 0:
            h.device_copy = h.h2d_done = None  # the callers' references are the only ones left
            h.unpacked = True
        if h.layer not in self.deferred:
            self._prefetch(h.layer - 1)
        return out

    # --- copies ---------------------------------------------------------------------------

    def _streams(self):
        if self._d2h is None:
            self._d2h = torch.cuda.Stream(self.device)
            self._h2d = torch.cuda.Stream(self.device)
        return self._d2h, self._h2d

    def _copy_to_host_async(self, h: _Packed, t: torch.Tensor) -> None:
        d2h, _ = self._streams()
        compute = torch.cuda.current_stream(self.device)
        # bound the copies in flight: the compute stream waits (on the GPU, not the host) for
        # the oldest layer's copy once `max_in_flight` layers have copies outstanding
        layers = {layer for layer, _ in self._pending_d2h}
        if len(layers) >= self.max_in_flight and h.layer not in layers:
            oldest = self._pending_d2h[0][0]
            for _, event in [p for p in self._pending_d2h if p[0] == oldest]:
                compute.wait_event(event)
            self._pending_d2h = [p for p in self._pending_d2h if p[0] != oldest]
        d2h.wait_stream(compute)  # t is written by work queued on the compute stream
        with torch.cuda.stream(d2h):
            h.host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=self.pin_memory)
            h.host.copy_(t, non_blocking=True)
            h.d2h_done = d2h.record_event()
        t.record_stream(d2h)  # its memory is reused only after the copy
        self._pending_d2h.append((h.layer, h.d2h_done))

    def _fetch(self, h: _Packed) -> None:
        if h.host is None:  # fake tensors: a new (fake) device tensor of the same shape
            h.device_copy = torch.empty(h.shape, dtype=h.dtype, device=h.device)
            return
        if not self.cuda:
            h.device_copy = torch.empty(h.shape, dtype=h.dtype, device=h.device)  # seen by memory trackers
            h.device_copy.copy_(h.host)
            return
        _, h2d = self._streams()
        with torch.cuda.stream(h2d):
            h2d.wait_event(h.d2h_done)
            h.device_copy = torch.empty(h.shape, dtype=h.dtype, device=h.device)
            h.device_copy.copy_(h.host, non_blocking=True)
            h.h2d_done = h2d.record_event()

    def prefetch(self, index: int) -> None:
        """Start bringing back layer `index`'s tensors now (called from a backward hook of layer index+1)."""
        self._prefetch(index)

    def _prefetch(self, index: int) -> None:
        """Start bringing back layer `index`'s tensors (the next layer backward will need)."""
        for ref in self._layers.get(index, ()):
            h = ref()
            if h is not None and h.device_copy is None and not h.unpacked:
                self._fetch(h)
                self.bytes_prefetched += h.nbytes
