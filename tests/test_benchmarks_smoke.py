"""Tiny runs of the benchmark scripts, so they cannot rot (the real runs are in benchmarks/)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_bench_head_smoke(tmp_path):
    import bench_head

    out = tmp_path / "head.json"
    result = bench_head.main(["--preset", "smoke", "--repeats", "2", "--memory", "none",
                              "--methods", "fused,autograd,eager,func", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    # both paths: the op on z, and csm_loss through an EnergyHead (projection included)
    assert [(r["path"], r["method"]) for r in rows] == [
        (p, m) for p in ("z", "loss") for m in ("fused", "autograd", "eager", "func")]
    for r in rows:  # every method verified against the fused op, then timed
        assert r["note"] == "" and r["fwdbwd_s"] > 0
    assert result["machine"]["csm_ext"]["openmp"]


def test_bench_scaling_smoke(tmp_path):
    import bench_scaling

    out = tmp_path / "scaling.json"
    args = ["--dims", "4", "--batch", "3", "--steps", "1", "--hidden", "8", "--context-dim", "2",
            "--head-hidden", "4", "--out", str(out)]
    rows = bench_scaling.main(args + ["--in-process"])
    assert {r["method"] for r in rows} == set(bench_scaling.METHODS)
    assert all(r["status"] == "ok" and r["median_s"] > 0 for r in rows), rows
    assert out.with_suffix(".png").stat().st_size > 0
    # The isolated path (a child process per configuration, memory measured there).
    (row,) = bench_scaling.main(args + ["--methods", "csm-fused"])
    assert row["status"] == "ok" and row["peak_extra_bytes"] >= 0 and row["params"] > 0


def test_bench_scaling_reports_a_budget_stop(tmp_path):
    import bench_scaling

    rows = bench_scaling.main(["--dims", "4,8", "--batch", "2", "--steps", "1", "--hidden", "4",
                               "--methods", "exact-sm", "--time-budget", "0.01",
                               "--out", str(tmp_path / "s.json")])
    assert rows[0]["status"].startswith("stopped: over the time budget")
    assert rows[1]["status"] == "stopped: over budget at a smaller D"


def test_bench_stability_smoke(tmp_path):
    import bench_stability

    out = tmp_path / "stability.json"
    results = bench_stability.main(["--data", "toy:8gaussians", "--steps", "4", "--eval-every",
                                    "2", "--sigmas", "0.1", "--hidden", "16", "--n-eval", "50",
                                    "--out", str(out)])
    curves = results["toy:8gaussians"]
    assert set(curves) == {"csm", "dsm-0.1", "ssm"}
    assert all(len(c) == 3 for c in curves.values())
    assert out.with_suffix(".png").exists()


def test_cli_bench_scaling(tmp_path):
    from csm_ext.cli import main

    out = tmp_path / "cli.json"
    assert main(["bench", "scaling", "--dims", "3", "--batch", "2", "--steps", "1", "--hidden", "4",
                 "--methods", "dsm,csm-fused", "--in-process", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in rows] == ["dsm", "csm-fused"]


def test_bench_normalised_smoke(tmp_path):
    import bench_normalised

    out = tmp_path / "normalised.json"
    res = bench_normalised.main(["--quick", "--sections", "sampling,objectives,rings",
                                 "--out", str(out)])
    saved = json.loads(out.read_text())
    assert len(saved["sampling"]["rows"]) == 3 and all(r["seconds"] > 0
                                                       for r in res["sampling"]["rows"])
    assert {r["objective"] for r in saved["objectives"]} == {"csm", "mle", "hybrid"}
    assert len(saved["rings"]) == 6 and all(r["kl"] == r["kl"] for r in saved["rings"])


def test_bench_logz_smoke(tmp_path):
    import bench_logz

    out = tmp_path / "logz.json"
    bench_logz.main(["--n", "50", "--nodes", "5,9", "--hidden", "8", "--repeats", "2",
                     "--memory", "none", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert {r["method"] for r in rows} == {"fused", "reference"}
    assert len(rows) == 4
