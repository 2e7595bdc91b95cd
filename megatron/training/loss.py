"""The sequence-parallel training loss.

The loss of a step is the mean over every unmasked token of the global batch: all
micro-batches, all SP ranks (each holds a slice of every sample) and all DP ranks.
Each rank backpropagates `sum(per_token * mask) * R / T` where T is the global token
count and R the size of the sequence-data-parallel group; gradient *averaging* over
that group (what DDP and FSDP do) then yields exactly d(global mean)/d(params), so
gradients do not depend on how the sequence or the batch was split.

Nothing here waits for the GPU: T stays a device tensor (one all-reduce at the start of
a step), and an all-masked batch shows up as a non-finite logged loss, checked once per
step where the loss is read anyway.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist

from megatron.core import comm


def masked_loss_sum(per_token_loss: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    return (per_token_loss.float() * loss_mask.float()).sum()


def global_token_count(loss_masks: torch.Tensor | Iterable[torch.Tensor], group=None) -> torch.Tensor:
    """Number of unmasked tokens over all given micro-batch masks and all ranks of `group`
    (a float64 device tensor; no host sync).

    Masks come from the data, so this runs once at the start of a step, before any forward,
    on the masks' device (NCCL reduces only GPU tensors).
    """
    if isinstance(loss_masks, torch.Tensor):
        loss_masks = [loss_masks]
    loss_masks = list(loss_masks)
    count = torch.zeros((), dtype=torch.float64, device=loss_masks[0].device if loss_masks else "cpu")
    for m in loss_masks:
        count += m.double().sum()
    if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
        comm.all_reduce(count, group=group, kind="all_reduce_tokens")
    return count


def loss_for_backward(per_token_loss: torch.Tensor, loss_mask: torch.Tensor,
                      num_global_tokens: torch.Tensor, averaging_group_size: int = 1) -> torch.Tensor:
    """This rank's share of the global mean loss, pre-multiplied for gradient averaging.

    Sum the returned values over the ranks and divide by `averaging_group_size` to get the
    global mean loss; with `averaging_group_size=1` they simply sum to it.
    """
    scale = averaging_group_size / num_global_tokens.to(torch.float32)  # a device scalar: no sync
    return masked_loss_sum(per_token_loss, loss_mask) * scale


def check_tokens(num_global_tokens: float) -> None:
    """Called where the step's loss is read anyway: an all-masked global batch is a data error."""
    if num_global_tokens == 0:
        raise ValueError("the global batch has no unmasked token (loss_mask is all zero; see --eod-mask-loss)")
