"""Run pretrain_gpt.main() for several flag sets in ONE torchrun job (the two-host SP cases).

    torchrun --nnodes 2 --nproc-per-node 2 ... tests/multinode/run_configs.py CONFIGS.json

CONFIGS.json is a list of argv lists. Starting a 2 x 2-rank job costs ~25 CPU-seconds on 2
cores; every case shares one start (pretrain_gpt.main reuses the process group).
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import pretrain_gpt  # noqa: E402


def main(path: str) -> int:
    import torch.distributed as dist

    # One process group for every run: pretrain_gpt.main reuses an existing group and only
    # destroys one it created, and re-creating the group in the same torchrun job would read
    # the first group's stale addresses from torchrun's store.
    dist.init_process_group("gloo")
    try:
        for argv in json.loads(Path(path).read_text()):
            code = pretrain_gpt.main(argv)
            if code:
                return code
        return 0
    finally:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
