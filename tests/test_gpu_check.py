"""scripts/gpu_check.py at toy sizes on CPU: the GPU check is run on a lent GPU only now and then, so CI runs
every stage of it here to keep it from rotting (bench smoke, chunked head vs full logits, sample + align)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_runs_every_stage_at_toy_sizes(tmp_path):
    proc = subprocess.run(
        [sys.executable, "scripts/gpu_check.py", "--device", "cpu", "--toy", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    assert res["bench"]["rc"] == 0, (tmp_path / "bench.log").read_text()[-2000:]
    kinds = {r["kind"] for r in json.loads((tmp_path / "bench" / "run_all.json").read_text())["rows"]}
    assert kinds == {"dpo", "sample", "ablation"}
    head = res["head"]
    assert head["ok"] and head["max_abs_diff_logp_sum"] < 1e-3, head  # toy sizes: bf16 rounding only
    eng = res["engines"]
    assert eng["sample"]["rc"] == 0 and eng["plain"]["rc"] == 0, (tmp_path / "engines.log").read_text()[-2000:]
    assert len(eng["plain"]["losses"]) == 2 and eng["plain"]["model_loads"] is True
    # the instrumented worker saw the run: no engine, and every score through the chunked head
    assert eng["plain"]["engine"] == "NO" and eng["plain"]["chunks"] > 0 and eng["plain"]["full_logits"] == 0
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| engines: plain | ok |" in table and "MISMATCH" not in table
