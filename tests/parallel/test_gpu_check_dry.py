"""scripts/gpu_check.sh (the one script for a GPU machine) runs end to end on CPU in its dry mode,
so it is not dead code between GPU sessions: real pretrain_gpt.py runs per backend, the planner
call, the Triton kernel against SDPA under the interpreter, the table and the exit status."""

import json
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_gpu_check_dry_run(tmp_path):
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry", "--json", str(tmp_path / "r.json")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "all checks passed (dry run on CPU" in proc.stdout
    result = json.load(open(tmp_path / "r.json"))
    assert [r["backend"] for r in result["training"]] == ["sdpa", "classic"]
    assert all(r["ok"] and len(r["losses"]) == 4 for r in result["training"])
    assert result["triton"][0]["max_rel_err"] < 1e-4
    lc = result["long_context"]  # the 1.3B shape's longest planned on 80 GiB, the step code run tiny on CPU
    assert lc["longest_planned"] > 1_000_000 and lc["planned_peak"] <= 78 * 2**30
    smoke = lc["cpu_smoke"]
    assert smoke["offload"]["bytes_offloaded"] > 0 and smoke["offload"]["bytes_fetched_on_demand"] == 0
    assert 5 < smoke["loss"] < 7  # about ln(512) = 6.24 at init
