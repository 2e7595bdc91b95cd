"""Start torch.distributed from the launcher's environment, build the SP x DP topology, seed.

Launchers supported: torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT),
srun without torchrun (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; MASTER_ADDR and
MASTER_PORT must be exported by the batch script), and a plain `python pretrain_gpt.py`
(a one-process world on a free local port). Calling it when a process group already
exists reuses it, so several runs can share one set of processes (tests do this).

On CPU each rank uses one intra-op thread unless OMP_NUM_THREADS says otherwise: ranks
are already one per core, and oversubscribing cores makes every collective wait for the
slowest, descheduled rank.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from megatron.config import ConfigError, RunConfig


@dataclass
class RuntimeContext:
    """What `initialize_megatron` set up: the topology object and the device of this rank."""

    parallel_state: object  # megatron.core.parallel_state.ParallelState
    device: torch.device
    local_rank: int


def _env_int(*names: str, default: int | None = None) -> int | None:
    for n in names:
        if os.environ.get(n):
            return int(os.environ[n])
    return default


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for single-host process groups)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def die_with_launcher(launcher_pid: int) -> str:
    """Make this rank die (SIGKILL) when its launcher process `launcher_pid` dies.

    torchrun kills its ranks when it is told to stop; when it is itself SIGKILLed (an OOM kill, a
    scheduler's hard kill, `kill -9`) nothing tells the ranks, and they would train on as orphans to
    the end of the run, holding the GPUs. On Linux the kernel does it: prctl(PR_SET_PDEATHSIG);
    elsewhere a daemon thread polls the parent pid once a second. `launcher_pid` is the parent pid
    read as the process started (pretrain_gpt.py reads it first thing), so a launcher that died
    before this call is noticed too. Returns how ("prctl", "watchdog").
    """
    how = "watchdog"
    if sys.platform.startswith("linux"):
        try:
            import ctypes  # noqa: PLC0415

            pr_set_pdeathsig = 1
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0) == 0:
                how = "prctl"
        except (OSError, AttributeError):
            pass
    if how == "watchdog":
        def watch() -> None:
            while os.getppid() == launcher_pid:
                time.sleep(1.0)
            os.kill(os.getpid(), signal.SIGKILL)

        threading.Thread(target=watch, name="die-with-launcher", daemon=True).start()
    if os.getppid() != launcher_pid:  # the launcher died before the kernel was asked to tell us
        os.kill(os.getpid(), signal.SIGKILL)
    return how


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ


def initialize_distributed(backend: str, timeout_minutes: float = 10.0) -> tuple[int, int, int]:
    """Init (or reuse) the default process group; returns (rank, world_size, local_rank)."""
    local_rank = _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), local_rank
    rank = _env_int("RANK", "SLURM_PROCID", default=0)
    world = _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)
    if backend == "nccl":
        torch.cuda.set_device(cuda_device_index(local_rank))
    timeout = timedelta(minutes=timeout_minutes)
    if world == 1 and not os.environ.get("MASTER_ADDR"):
        init = f"tcp://127.0.0.1:{free_port()}"
    else:
        for var in ("MASTER_ADDR", "MASTER_PORT"):
            if not os.environ.get(var):
                raise ConfigError(
                    f"{var} is not set: launch with torchrun, or export MASTER_ADDR (the first node's "
                    f"host name) and MASTER_PORT (a free port) before srun")
        init = "env://"
    dist.init_process_group(backend=backend, init_method=init, rank=rank, world_size=world, timeout=timeout)
    return rank, world, local_rank


def cuda_device_index(local_rank: int) -> int:
    """The GPU of this rank: `local_rank`, or `local_rank % visible GPUs` when the launcher gives
    each task its own GPU (srun --gpus-per-task / CUDA_VISIBLE_DEVICES of one device)."""
    count = torch.cuda.device_count()
    return local_rank % count if count else local_rank


def enable_tf32() -> None:
    """fp32 matmuls and convolutions on TF32 tensor cores (Ampere and newer): the fp32 parts of a
    bf16 run (tiled-loss statistics, fallbacks) and fp32 runs are ~8x faster, with a 10-bit
    mantissa for the products (fp32 accumulation). Set when a training run starts, not at import,
    so a library user keeps control; NVIDIA_TF32_OVERRIDE=0 in the environment disables it."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def set_cpu_threads() -> int:
    """One intra-op thread per rank on CPU unless OMP_NUM_THREADS is set."""
    n = _env_int("OMP_NUM_THREADS", default=1)
    torch.set_num_threads(n)
    return n


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def initialize_megatron(cfg: RunConfig) -> RuntimeContext:
    """Distributed init + topology + seeds, after the flags were validated."""
    from megatron.core.parallel_state import initialize_model_parallel  # noqa: PLC0415

    backend = cfg.parallel.distributed_backend
    rank, world, local_rank = initialize_distributed(backend, cfg.parallel.distributed_timeout_minutes)
    if world != cfg.world_size:
        raise ConfigError(f"flags were validated for world size {cfg.world_size} but {world} processes "
                           f"started; launch exactly {cfg.world_size} ranks (WORLD_SIZE)")
    if backend == "nccl":
        device = torch.device("cuda", cuda_device_index(local_rank))
        enable_tf32()
    else:
        device = torch.device("cpu")
        set_cpu_threads()
    ps = initialize_model_parallel(sequence_parallel_size=cfg.parallel.sequence_parallel_size,
                                   ring_attention_size=cfg.parallel.ring_attention_size, device_type=device.type)
    # Identical seed everywhere: replicas must be initialised identically (parameters are
    # replicated over SP x DP and FSDP shards each rank's own copy). Dropout streams are
    # re-seeded per rank by the training loop after the model is built.
    set_seed(cfg.train.seed)
    return RuntimeContext(parallel_state=ps, device=device, local_rank=local_rank)
