"""`pretrain_gpt.py` exactly as torchrun runs it, except that rank FAIL_RANK (environment) finds
its data too small after the process group started, while the other ranks are fine and go on
into training (a user error that only one rank sees: node-local files, one rank's slice of the
data). Used by test_jobs.py: the job must end at once, with the message printed once."""

import importlib
import os
import runpy
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from megatron.data.gpt_dataset import DatasetTooSmallError  # noqa: E402

pretrain_module = importlib.import_module("megatron.training.pretrain")
real_provider = pretrain_module.default_data_provider


def provider(cfg, parallel_state, consumed_samples):
    if parallel_state.rank == int(os.environ["FAIL_RANK"]):
        raise DatasetTooSmallError("the data this rank reads is too small (a test: only this rank fails)")
    return real_provider(cfg, parallel_state, consumed_samples)


pretrain_module.default_data_provider = provider
sys.argv = [os.path.join(ROOT, "pretrain_gpt.py"), *sys.argv[1:]]
runpy.run_path(sys.argv[0], run_name="__main__")
