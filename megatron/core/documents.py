"""The documents packed into a micro-batch: what document-causal attention needs, built once.

Megatron's `--reset-attention-mask` lets a token attend only to earlier tokens of its own
document. Every attention kernel wants that fact in another form: classic/Triton/ring a
`[b, N]` tensor of document ids, SDPA a host list of document lengths (one kernel call
per document), flash-attn's varlen kernel `cu_seqlens` on the GPU and `max_seqlen` as a
Python int. Deriving the host forms from a GPU tensor costs a device-to-host sync, and
doing it in every layer (and again in recompute) stalls the GPU dozens of times per step.

`Documents` holds all forms for the FULL sequences of a micro-batch (natural token order),
derived once: from host document lengths (the data path knows them from the EOD index,
without a sync), or from a tensor of ids with one sync (`from_segment_ids`, for code that
only has ids). Layers pass the same object along; every derived form is cached on it.
"""

from __future__ import annotations

import numpy as np
import torch


class Documents:
    """Document boundaries of `b` full sequences of `N` tokens.

    `lengths[i]` are the document lengths of row i in natural order (they sum to N); a
    document is a run of tokens, and `segment_ids` number the runs 0, 1, ... per row (so
    ids that repeat in separate runs are separate documents, for every backend alike).
    """

    def __init__(self, lengths, device=None, segment_ids: torch.Tensor | None = None) -> None:
        self.lengths = tuple(tuple(int(n) for n in row) for row in lengths)
        totals = {sum(row) for row in self.lengths}
        if len(totals) != 1 or any(n <= 0 for row in self.lengths for n in row):
            raise ValueError(f"document lengths must be positive and sum to the same sequence length in every "
                             f"row, got row totals {sorted(totals)}")
        self.seq_len = totals.pop()
        self.device = torch.device(device) if device is not None else (
            segment_ids.device if segment_ids is not None else torch.device("cpu"))
        self._segment_ids = segment_ids
        self._cache: dict = {}

    @classmethod
    def from_segment_ids(cls, segment_ids: torch.Tensor) -> Documents:
        """From `[b, N]` ids (documents = runs of equal ids). One device-to-host copy."""
        if segment_ids.dim() != 2:
            raise ValueError(f"segment_ids must be [batch, seq], got shape {tuple(segment_ids.shape)}")
        seg = segment_ids.detach()
        starts = seg[:, 1:] != seg[:, :-1]  # [b, N-1]: a new document starts at i+1
        ordinals = torch.cat([torch.zeros_like(seg[:, :1]), starts.cumsum(1)], dim=1)  # [b, N]
        ids = seg.cpu().numpy()
        lengths = [np.diff(np.flatnonzero(np.r_[True, row[1:] != row[:-1], True])) for row in ids]
        return cls(lengths, seg.device, segment_ids=ordinals)

    def host_segment_ids(self) -> np.ndarray:
        """int64 `[b, N]` document ordinals on the host (0, 1, ... per row)."""
        if "host" not in self._cache:
            self._cache["host"] = np.stack([np.repeat(np.arange(len(row)), row) for row in self.lengths])
        return self._cache["host"]

    @property
    def segment_ids(self) -> torch.Tensor:
        """`[b, N]` document ids on the device (natural order)."""
        if self._segment_ids is None:
            self._segment_ids = torch.from_numpy(self.host_segment_ids()).to(self.device, non_blocking=True)
        return self._segment_ids

    @property
    def batch(self) -> int:
        return len(self.lengths)

    @property
    def max_seqlen(self) -> int:
        return max(max(row) for row in self.lengths)

    @property
    def cu_seqlens(self) -> torch.Tensor:
        """int32 `[num_documents + 1]` offsets into the flattened `[b * N]` tokens (flash-attn varlen)."""
        if "cu" not in self._cache:
            flat = np.concatenate([np.asarray(row) for row in self.lengths])
            cu = np.concatenate([[0], np.cumsum(flat)]).astype(np.int32)
            self._cache["cu"] = torch.from_numpy(cu).to(self.device, non_blocking=True)
        return self._cache["cu"]

    def permuted(self, key, perm: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
        """(device ids, host ids) with tokens reordered by `perm` (`ids[:, perm]`), cached under `key`."""
        if key not in self._cache:
            host = self.host_segment_ids()[:, perm.cpu().numpy()]
            self._cache[key] = (torch.from_numpy(np.ascontiguousarray(host)).to(self.device, non_blocking=True),
                                host)
        return self._cache[key]

    def to(self, device) -> Documents:
        device = torch.device(device)
        if device == self.device:
            return self
        seg = self._segment_ids.to(device, non_blocking=True) if self._segment_ids is not None else None
        return Documents(self.lengths, device, segment_ids=seg)

    def __repr__(self) -> str:
        return (f"Documents(batch={self.batch}, seq_len={self.seq_len}, documents={[len(r) for r in self.lengths]}, "
                f"device={self.device})")


def as_documents(segment_ids) -> Documents | None:
    """Documents from what a caller passed as `segment_ids` (None, a Documents, or a `[b, N]` tensor)."""
    if segment_ids is None or isinstance(segment_ids, Documents):
        return segment_ids
    return Documents.from_segment_ids(segment_ids)


__all__ = ["Documents", "as_documents"]
