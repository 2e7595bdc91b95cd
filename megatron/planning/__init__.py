"""Planning a run before it starts: the per-rank plan of `--dry-run`, the memory estimator
(`tools/estimate_memory.py`), FLOP counts for MFU, and the exact tensor-byte tracker that
validates the estimator against real steps."""
