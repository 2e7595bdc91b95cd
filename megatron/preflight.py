"""What a run checks on this machine before any process group starts, beyond the flags.

`megatron.arguments.parse_args` checks the flags (and reads the tokenizer, to know the
vocabulary). `check_paths` checks the files the run will read and write: it is run by
`pretrain_gpt.main` on every rank before torchrun's ranks start a process group, and once by the
launch scripts (`pretrain_gpt.py --preflight`) before torchrun starts at all. `--dry-run` skips it:
a dry run on a login node validates a configuration for machines whose files it may not see.
"""

from __future__ import annotations

import os
import tempfile

from megatron.config import ConfigError, RunConfig


def check_paths(cfg: RunConfig) -> None:
    """The files a run reads and writes, checked on this machine before any process group starts
    (pretrain_gpt.py runs it on every rank, and once in the launch scripts' --preflight): every
    --data-path prefix is a readable, consistent .bin/.idx pair holding tokens (O(1) reads per
    prefix, megatron.data.checks), and every output path can be written: one under a file, in a
    read-only file system or without permission fails now, naming the flag, not at the first save
    or log line. Raises a UserError."""
    if cfg.data.data_path and not cfg.data.mock_data:
        from megatron.data.checks import check_dataset_prefix  # noqa: PLC0415
        from megatron.data.gpt_dataset import parse_data_prefix  # noqa: PLC0415

        for prefix in parse_data_prefix(list(cfg.data.data_path))[1]:
            check_dataset_prefix(prefix)  # IndexedDatasetError names the file and the problem
    for flag, path, kind in (("--save", cfg.checkpoint.save, "dir"), ("--tensorboard-dir", cfg.log.tensorboard_dir, "dir"),
                             ("--log-json", cfg.log.log_json, "file"),
                             ("--wandb-save-dir", cfg.log.wandb_save_dir, "dir")):
        if path:
            _check_writable(flag, path, kind)


def _check_writable(flag: str, path: str, kind: str) -> None:
    target = os.path.abspath(path)
    if kind == "file":
        if os.path.isdir(target):
            raise ConfigError(f"{flag} {path} is a directory; pass a file path (e.g. {os.path.join(path, 'log.jsonl')})")
        folder = os.path.dirname(target)
    else:
        if os.path.exists(target) and not os.path.isdir(target):
            raise ConfigError(f"{flag} {path} is a file, not a directory; pass a directory path")
        folder = target
    existing = folder
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ConfigError(f"{flag} {path}: {existing} is a file, so no directory can be made under it; pass a path "
                          "in a directory")
    append = kind == "file" and os.path.isfile(target)  # an existing log file: open it as the run will
    probe = target if append else existing
    try:  # create and remove a probe: unlike os.access, this sees read-only mounts, even as root
        if append:
            open(target, "a").close()
        else:
            os.rmdir(tempfile.mkdtemp(prefix=".write-test-", dir=existing))
    except OSError as e:
        raise ConfigError(f"{flag} {path}: cannot write to {probe} ({e.strerror or e}); pass a writable "
                          "location") from e


__all__ = ["check_paths"]
