"""Live and peak tensor memory on any device, including the CPU.

On a GPU, `torch.cuda.max_memory_allocated` answers "how much did this step need"; on the
CPU there is no such counter, and the process RSS mixes in the interpreter, libraries and
the allocator's caching. This tracker counts the storages that tensor operations create
while it is active: each new storage adds its size when it appears and subtracts it when
its last reference dies (torch keeps one Python object per storage, so a weakref
finalizer fires exactly then). Tensors that existed before (parameters, say) are the
baseline and are not counted unless registered with `track_existing`.

It sees every tensor an operator returns, forward and backward (autograd runs the
backward on the calling thread for CPU tensors), not scratch buffers private to a kernel.
That is the same notion as the CUDA caching allocator's "allocated" bytes, so estimates
validated here carry over.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class MemoryTracker(TorchDispatchMode):
    """Use as a context manager; read `.peak` and `.live` (bytes) afterwards or inside.

    `UntypedStorage.resize_` is watched too while the tracker is active (it is no operator a
    dispatch mode sees): FSDP2 frees a gathered parameter by resizing its storage to 0 and
    gathers it again by resizing it back, the storage object staying alive all along.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}  # id(storage) -> bytes counted for it now

    @property
    def _seen(self):
        return self._sizes

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)

    def _add(self, storage, key: int, nbytes: int) -> None:
        self._sizes[key] = nbytes
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key)

    def _track(self, t: torch.Tensor) -> None:
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # e.g. sparse or meta tensors
            return
        key = id(storage)
        nbytes = storage.nbytes()
        if key in self._sizes or nbytes == 0 or t.device.type == "meta":
            return
        self._add(storage, key, nbytes)

    def _resized(self, storage) -> None:
        key, nbytes = id(storage), storage.nbytes()
        if key in self._sizes:  # (a fake tensor's storage reports the meta device: still counted)
            self.live += nbytes - self._sizes[key]
            self._sizes[key] = nbytes
            self.peak = max(self.peak, self.live)
        elif nbytes and storage.device.type != "meta":
            self._add(storage, key, nbytes)

    def __enter__(self):
        original = self._original_resize = torch.UntypedStorage.resize_
        tracker = self

        def resize_(storage, size):
            out = original(storage, size)
            tracker._resized(storage)
            return out

        torch.UntypedStorage.resize_ = resize_
        return super().__enter__()

    def __exit__(self, *exc):
        torch.UntypedStorage.resize_ = self._original_resize
        return super().__exit__(*exc)

    def track_existing(self, tensors) -> None:
        """Count already existing tensors (e.g. parameters) as live memory from now on."""
        for t in tensors:
            self._track(t)

    def reset_peak(self) -> None:
        self.peak = self.live

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        # views and in-place results share an input's storage: not an allocation (and an
        # untracked baseline tensor must not start counting because a view of it appeared)
        inputs = {_storage_key(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and _storage_key(t) not in inputs:
                self._track(t)
        return out


def _storage_key(t: torch.Tensor):
    try:
        return id(t.untyped_storage())
    except (RuntimeError, NotImplementedError):
        return None


class DebugMemoryTracker(MemoryTracker):
    """MemoryTracker that also remembers, at the peak, which operator made each live storage."""

    def __init__(self) -> None:
        super().__init__()
        self._made: dict[int, tuple[int, str]] = {}
        self.at_peak: list[tuple[int, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self._current = str(func)
        return super().__torch_dispatch__(func, types, args, kwargs)

    def _track(self, t):
        before = self.peak
        super()._track(t)
        try:
            key = id(t.untyped_storage())
        except (RuntimeError, NotImplementedError):
            return
        if key in self._seen and key not in self._made:
            nbytes = t.untyped_storage().nbytes()
            where = getattr(self, "_current", "?")
            if nbytes >= 2 ** 26:  # where in the project's code the big ones come from
                import traceback  # noqa: PLC0415

                frames = [f for f in traceback.extract_stack() if "/megatron/" in f.filename
                          and "memory_tracker" not in f.filename]
                where += " @ " + " < ".join(f"{f.filename.split('/megatron/')[-1]}:{f.lineno}"
                                            for f in reversed(frames[-3:]))
            self._made[key] = (nbytes, where)
        if self.peak > before:
            self.at_peak = sorted(((self._sizes[k], op) for k, (_, op) in self._made.items() if k in self._sizes),
                                  reverse=True)

    def _free(self, key):
        super()._free(key)
        self._made.pop(key, None)
