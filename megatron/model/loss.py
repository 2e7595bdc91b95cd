"""The sequence-parallel training loss.

The loss of a step is the mean over every unmasked token of the global batch: all
micro-batches, all SP ranks (each holds a slice of every sample) and all DP ranks.
Each rank backpropagates `sum(per_token * mask) * R / T` where T is the global token
count and R the size of the sequence-data-parallel group; gradient *averaging* over
that group (what DDP and FSDP do) then yields exactly d(global mean)/d(params), so
gradients do not depend on how the sequence or the batch was split.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist

from megatron.core import comm


def masked_loss_sum(per_token_loss: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    return (per_token_loss.float() * loss_mask.float()).sum()


def global_token_count(loss_masks: torch.Tensor | Iterable[torch.Tensor], group=None) -> torch.Tensor:
    """Number of unmasked tokens over all given micro-batch masks and all ranks of `group`.

    Masks come from the data, so this runs once at the start of a step, before any forward.
    """
    if isinstance(loss_masks, torch.Tensor):
        loss_masks = [loss_masks]
    loss_masks = list(loss_masks)
    # count on the masks' device: NCCL reduces only GPU tensors
    count = torch.zeros((), dtype=torch.float64, device=loss_masks[0].device if loss_masks else "cpu")
    for m in loss_masks:
        count += m.double().sum()
    if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
        comm.all_reduce(count, group=group, kind="all_reduce_tokens")
    if count.item() == 0:
        raise ValueError("the global batch has no unmasked token (loss_mask is all zero)")
    return count


def loss_for_backward(per_token_loss: torch.Tensor, loss_mask: torch.Tensor,
                      num_global_tokens: torch.Tensor, averaging_group_size: int = 1) -> torch.Tensor:
    """This rank's share of the global mean loss, pre-multiplied for gradient averaging.

    Sum the returned values over the ranks and divide by `averaging_group_size` to get the
    global mean loss; with `averaging_group_size=1` they simply sum to it.
    """
    return masked_loss_sum(per_token_loss, loss_mask) * (averaging_group_size / num_global_tokens.item())


def all_reduce_gradients(parameters: Iterable[torch.nn.Parameter], group, *, average: bool = False) -> None:
    """Sum (or average) `.grad` of replicated parameters over `group`, in one flat buffer.

    The training loop uses DDP/FSDP for this; tests and small scripts use this helper.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads or dist.get_world_size(group) == 1:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    comm.all_reduce(flat, group=group, kind="all_reduce_grads")
    if average:
        flat /= dist.get_world_size(group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()
