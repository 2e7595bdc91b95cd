"""A 4-rank gloo job that reports where each rank runs: the smoke test of the emulated hosts.

    torchrun --nnodes 2 --nproc-per-node 2 --rdzv-backend c10d --rdzv-endpoint node1:PORT \
        tests/multinode/toy_allreduce.py OUT.json

Rank 0 writes {"sum": ..., "ranks": [{rank, local_rank, node_rank, hostname, addr}, ...]}
so the test can check the rank layout against the hosts, independently of torchrun's
own bookkeeping (the host name comes from the UTS namespace, the address from the
socket gloo would use). Deliberately does not import the project.
"""

import json
import os
import socket
import sys

import torch
import torch.distributed as dist


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)  # 1 + 2 + ... + world
    me = {"rank": rank, "local_rank": int(os.environ["LOCAL_RANK"]), "node_rank": int(os.environ["GROUP_RANK"]),
          "hostname": socket.gethostname(), "addr": socket.gethostbyname(socket.gethostname())}
    everyone = [None] * world
    dist.all_gather_object(everyone, me)
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"sum": t.item(), "world": world, "ranks": everyone}, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
