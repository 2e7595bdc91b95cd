"""Training stack: loop, optimizer and schedule, precision, ZeRO engines, logging, checkpoints."""

from megatron.training.pretrain import pretrain

__all__ = ["pretrain"]
