"""Batch sampler with Megatron's consumed-samples semantics.

Samples are taken in dataset order in global batches of micro_batch_size * DP; data
parallel rank r gets the r-th micro-batch of each. Resuming with `consumed_samples`
(saved in the checkpoint, counted over all DP ranks) continues with the very next
sample, whatever the DP size of the resumed run: the sequence of samples is a property
of the dataset, not of the parallel layout.
"""

from __future__ import annotations


class MegatronPretrainingSampler:
    """Yields, for this DP rank, lists of `micro_batch_size` sample indices."""

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 data_parallel_rank: int, data_parallel_size: int, drop_last: bool = True) -> None:
        if total_samples <= 0:
            raise ValueError(f"no samples to draw from (total_samples={total_samples})")
        if not 0 <= consumed_samples < total_samples:
            raise ValueError(
                f"consumed_samples={consumed_samples} must be in [0, {total_samples}): the run has used up the "
                "dataset; build it with more samples (raise --train-iters or --train-samples)")
        if micro_batch_size <= 0:
            raise ValueError(f"--micro-batch-size must be positive, got {micro_batch_size}")
        if data_parallel_size <= 0 or not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(f"data parallel rank {data_parallel_rank} not in [0, {data_parallel_size})")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.data_parallel_size = data_parallel_size
        self.drop_last = drop_last

    def __len__(self) -> int:
        return self.total_samples

    def _mine(self, batch: list) -> list:
        start = self.data_parallel_rank * self.micro_batch_size
        return batch[start:start + self.micro_batch_size]

    def __iter__(self):
        step = self.micro_batch_size * self.data_parallel_size
        batch = []
        for idx in range(self.consumed_samples, self.total_samples):
            batch.append(idx)
            if len(batch) == step:
                yield self._mine(batch)
                batch = []
        if batch and not self.drop_last:
            mine = self._mine(batch)
            if mine:
                yield mine


__all__ = ["MegatronPretrainingSampler"]
