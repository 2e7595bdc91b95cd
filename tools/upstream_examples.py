"""Expand Megatron-DeepSpeed's example launch scripts into the exact `pretrain_gpt.py` argv and DeepSpeed JSON.

    python tools/upstream_examples.py --repo PATH/TO/Megatron-DeepSpeed --commit SHA --out tests/upstream/examples

Each script (and the JSON template it fills in) is read with `git show COMMIT:PATH` into a scratch
directory laid out like the upstream tree, and run by bash itself, unchanged. The commands it needs from a
cluster are stand-ins on PATH: the launcher (`deepspeed`, `torchrun`) records its arguments instead of
starting anything, `nvidia-smi`/`ds_ssh` report one node of 8 GPUs, `ssh` finds no earlier checkpoint,
`date` is fixed, and `wget`/`python` fail loudly (the data and vocabulary files the scripts look for are
empty placeholders, so nothing is downloaded or preprocessed). What bash passed to pretrain_gpt.py is
therefore exactly what a user's job would run, and the JSON is the file the script generated.
Output: one JSON file per example, naming its source path and commit. Test data for tests/upstream.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile

UPSTREAM_REPO = "microsoft/Megatron-DeepSpeed"
GPUS_PER_NODE = 8

# name -> (script path, files the script reads, directories it expects, what it needs that is refused here)
EXAMPLES = {
    "ds_pretrain_gpt_1.3B_seq_parallel_32k": (
        "examples_deepspeed/sequence_parallel/ds_pretrain_gpt_1.3B_seq_parallel_32k.sh",
        ["examples_deepspeed/sequence_parallel/ds_config_gpt_TEMPLATE.json"], [], None),
    "ds_pretrain_gpt_30B_seq_parallel_32k": (
        "examples_deepspeed/sequence_parallel/ds_pretrain_gpt_30B_seq_parallel_32k.sh",
        ["examples_deepspeed/sequence_parallel/ds_config_gpt_TEMPLATE.json"], [], None),
    "ds_pretrain_gpt_6.7B_fpdt_32k": (
        "examples_deepspeed/sequence_parallel/ds_pretrain_gpt_6.7B_fpdt_32k.sh",
        ["examples_deepspeed/sequence_parallel/ds_config_gpt_TEMPLATE.json"], [], None),
    "ds_pretrain_gpt_125M": (
        "examples_deepspeed/rebase/ds_pretrain_gpt_125M.sh",
        ["examples_deepspeed/rebase/ds_config_gpt_TEMPLATE.json"], [], "tensor parallel 2 x pipeline parallel 2"),
    "pretrain_llama2_distributed": (
        "examples_deepspeed/pretrain_llama2_distributed.sh", [], ["tmp"], "tensor parallel 2 x pipeline parallel 2"),
    "run_deepspeed_example": (
        "examples_deepspeed/run_deepspeed_example.sh", [], [], None),
}

_PLACEHOLDER_FILES = ["gpt2-vocab.json", "gpt2-merges.txt", "BookCorpusDataset_text_document.bin",
                      "BookCorpusDataset_text_document.idx"]

_STUBS = {
    # the launchers: record argv (NUL-separated) and start nothing
    "deepspeed": 'printf "%s\\0" deepspeed "$@" > "$EXPAND_OUT/argv"\n',
    "torchrun": 'printf "%s\\0" torchrun "$@" > "$EXPAND_OUT/argv"\n',
    "nvidia-smi": f'for i in $(seq {GPUS_PER_NODE}); do echo "NVIDIA H100 80GB HBM3"; done\n',
    # ds_ssh runs its command on every host (one here) and prints two lines of its own
    "ds_ssh": 'echo "[ds_ssh] hosts: worker-0"; echo "[ds_ssh] done"; eval "$@"\n',
    "ssh": "exit 1\n",  # no worker holds an earlier checkpoint
    "date": 'echo "2024.01.01_00.00.00"\n',
    "wget": 'echo "wget called: a placeholder file is missing" >&2; exit 3\n',
    "python": 'echo "python called: a placeholder file is missing" >&2; exit 3\n',
}


def git_show(repo: str, commit: str, path: str) -> str:
    return subprocess.run(["git", "-C", repo, "show", f"{commit}:{path}"], check=True, capture_output=True,
                          text=True).stdout


def expand(repo: str, commit: str, name: str) -> dict:
    script, extra_files, dirs, refused = EXAMPLES[name]
    with tempfile.TemporaryDirectory(prefix="mds-expand-") as root:
        tree, bin_dir, out = (os.path.join(root, d) for d in ("tree", "bin", "out"))
        for d in (tree, bin_dir, out):
            os.makedirs(d)
        for path in [script, *extra_files]:
            dest = os.path.join(tree, path)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with open(dest, "w") as f:
                f.write(git_show(repo, commit, path))
        cwd = os.path.join(tree, os.path.dirname(script))
        for d in dirs:
            os.makedirs(os.path.join(cwd, d), exist_ok=True)
        for p in _PLACEHOLDER_FILES:
            open(os.path.join(cwd, p), "w").close()
        for stub, body in _STUBS.items():
            with open(os.path.join(bin_dir, stub), "w") as f:
                f.write("#!/bin/bash\n" + body)
            os.chmod(os.path.join(bin_dir, stub), 0o755)
        env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": root, "HOSTNAME": "host", "USER": "user",
               "EXPAND_OUT": out, "LANG": "C"}
        proc = subprocess.run(["bash", os.path.basename(script)], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=60)
        if proc.returncode != 0 or not os.path.exists(os.path.join(out, "argv")):
            raise RuntimeError(f"{script} failed ({proc.returncode}): {proc.stderr[-2000:]}")
        with open(os.path.join(out, "argv")) as f:
            full = f.read().split("\0")[:-1]
        entry = next(i for i, a in enumerate(full) if a.endswith("pretrain_gpt.py"))
        launcher, argv = full[:entry], full[entry + 1:]
        entry_script = os.path.normpath(full[entry]).replace(tree, "<upstream checkout>")
        if any(root in a for a in launcher + argv):
            raise RuntimeError(f"{script}: the argv names the scratch directory: {full}")
        ds_path = _flag_value(argv, "--deepspeed_config")
        ds_config = None
        if ds_path is not None:
            with open(os.path.join(cwd, ds_path)) as f:
                ds_config = json.load(f)
    return {
        "source": {"repo": UPSTREAM_REPO, "commit": commit, "path": script, "reads": extra_files},
        "expanded_by": "tools/upstream_examples.py",
        "environment": f"one node of {GPUS_PER_NODE} GPUs (the launcher starts {GPUS_PER_NODE} ranks)",
        "launcher": launcher,
        "entry_script": entry_script,
        "argv": argv,
        "command": shlex.join(["pretrain_gpt.py", *argv]),
        "ds_config": ds_config,
        "refused_here": refused,
    }


def _flag_value(argv: list, flag: str):
    for i, a in enumerate(argv):
        if a == flag:
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repo", required=True, help="git directory of Megatron-DeepSpeed")
    p.add_argument("--commit", default="HEAD")
    p.add_argument("--out", required=True, help="directory for the <example>.json files")
    a = p.parse_args(argv)
    commit = subprocess.run(["git", "-C", a.repo, "rev-parse", f"{a.commit}^{{commit}}"], check=True,
                            capture_output=True, text=True).stdout.strip()
    os.makedirs(a.out, exist_ok=True)
    for name in EXAMPLES:
        with open(os.path.join(a.out, f"{name}.json"), "w") as f:
            json.dump(expand(a.repo, commit, name), f, indent=1)
            f.write("\n")
        print(f"{name}: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
