"""`--mock-data`: deterministic synthetic samples, no files.

`MockGPTDataset` yields documents that are runs of consecutive token ids from a random
start, each ended by EOD, so a model can learn them and loss curves fall. Sample `idx`
of a split depends only on (seed, split, idx). It has the interface the SP batch builder
reads (`get_slice`, `eods_before`, `seq_length`), so every data flag works with it.
"""

from __future__ import annotations

import numpy as np

_SPLIT_IDS = {"train": 0, "valid": 1, "test": 2}


class MockGPTDataset:
    """`num_samples` synthetic samples of seq_length + 1 tokens (ids < vocab_size, EOD = eod)."""

    def __init__(self, name: str, num_samples: int, seq_length: int, vocab_size: int, eod: int, seed: int) -> None:
        self.name, self.num_samples, self.seq_length = name, int(num_samples), int(seq_length)
        self.vocab_size, self.eod, self.seed = int(vocab_size), int(eod), int(seed)

    def __len__(self) -> int:
        return self.num_samples

    def _sample(self, idx: int) -> np.ndarray:
        if not 0 <= idx < self.num_samples:
            raise IndexError(f"sample {idx} out of range for mock {self.name} dataset of {self.num_samples}")
        rng = np.random.default_rng([self.seed, _SPLIT_IDS[self.name], idx])
        n, out, filled = self.seq_length + 1, np.empty(self.seq_length + 1, dtype=np.int64), 0
        while filled < n:
            length = int(rng.integers(1, max(2, self.seq_length // 2)))
            doc = (int(rng.integers(self.vocab_size)) + np.arange(length, dtype=np.int64)) % self.vocab_size
            doc = np.append(doc, self.eod)[: n - filled]
            out[filled:filled + len(doc)] = doc
            filled += len(doc)
        return out

    def get_slice(self, idx: int, start: int, stop: int) -> np.ndarray:
        return self._sample(int(idx))[start:stop]

    def eods_before(self, idx: int, pos: int, eod: int):
        where = np.flatnonzero(self._sample(int(idx))[:max(pos, 0)] == eod)
        return (len(where), int(where[-1])) if len(where) else (0, -1)

    def eod_positions(self, idx: int, stop: int, eod: int) -> np.ndarray:
        return np.flatnonzero(self._sample(int(idx))[:max(stop, 0)] == eod).astype(np.int64)

    def __getitem__(self, idx: int) -> dict:
        return {"text": self._sample(int(idx))}


__all__ = ["MockGPTDataset"]
