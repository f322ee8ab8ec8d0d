"""CI smoke run of the benchmark: `python -m bench --smoke` drives the real stack (the embedded
server and mlx_lm.server on the default model, mitmdump with the addon, the analysis report)
with one warm turn per arm, so the bench does not rot. Times are printed, never asserted."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

ARMS = ["1-stable", "2-rotating-off", "3-rotating-on", "4-no-cache", "5-mlx_lm.server", "6-restart", "7-direct"]
PROXIED = [a for a in ARMS if a != "7-direct"]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, model_dir):
    out = tmp_path_factory.mktemp("bench") / "results"
    proc = subprocess.run([sys.executable, "-m", "bench", "--smoke", "--model", str(model_dir), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=540)
    print(proc.stdout[-6000:])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def _csv(path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


@pytest.mark.model
def test_every_arm_has_numbers_in_table_and_csv(smoke_run):
    out, stdout = smoke_run
    summary = {r["arm"]: r for r in _csv(out / "summary.csv")}
    assert sorted(summary) == sorted(ARMS)
    for arm in ARMS:
        s = summary[arm]
        assert s["errors"] == "0", (arm, s)
        assert s["requests"] == "2", (arm, s)
        assert float(s["cold_ttft_s"]) > 0, (arm, s)
        if arm != "6-restart":  # its two requests are the prime and the first turn after restart
            assert float(s["warm_ttft_median_s"]) > 0, (arm, s)
        line = next(line for line in stdout.splitlines() if line.startswith(f"| {arm} |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[3] != "n/a", line  # cold TTFT printed


@pytest.mark.model
def test_cache_behaviour_per_arm(smoke_run):
    """Not timing: what each arm is for shows in the tokens the servers report as reused."""
    out, _ = smoke_run
    rows = _csv(out / "requests.csv")
    warm = {r["arm"]: r for r in rows if r["phase"] == "warm"}
    read = {a: int(r["cache_read_input_tokens"] or 0) for a, r in warm.items()}
    # normalization strips the rotating billing block: the warm turn reuses the prefix
    assert read["3-rotating-on"] > 5 * max(read["2-rotating-off"], 1)
    assert read["1-stable"] > 5 * max(read["2-rotating-off"], 1)
    assert read["4-no-cache"] == 0
    restart = next(r for r in rows if r["arm"] == "6-restart" and r["phase"] == "restart")
    assert int(restart["cache_read_input_tokens"]) > 0  # the checkpoint came back from --cache-dir


@pytest.mark.model
def test_captures_ratios_floor_and_report(smoke_run):
    out, _ = smoke_run
    labels = {json.loads(line)["label"] for line in (out / "captures.jsonl").read_text().splitlines() if line}
    assert labels == set(PROXIED)  # every proxied arm went through the addon; the direct arm did not
    ratios = {r["ratio"]: r["value"] for r in _csv(out / "ratios.csv")}
    assert float(ratios["(2)/(3) what normalization buys"]) > 0
    assert float(ratios["(3)/(7) proxy overhead"]) > 0
    floor = _csv(out / "floor.csv")
    assert floor and all(float(f["floor_ms"]) > 0 for f in floor)
    assert list((out / "report").glob("*.png")), "analysis report made no chart"
    meta = json.loads((out / "meta.json").read_text())
    assert meta["arms"] == ARMS and not meta["skipped"]
