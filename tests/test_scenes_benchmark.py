"""`vtprune eval --benchmark scenes` on the shipped demo model, on a few questions."""
import argparse
import json

import pytest

from vtprune.demo import benchmark

pytest.importorskip("matplotlib")


def test_scenes_benchmark_writes_table_json_and_plot(tmp_path, capsys):
    args = argparse.Namespace(methods="random,occamtoken,occamtoken_stage1,occamtoken_stage2", budgets="576,64",
                              questions=10, calibration=8,
                              batch_size=10, out=str(tmp_path / "out"))
    assert benchmark.run_cli(args) == 0
    table = capsys.readouterr().out
    result = json.loads((tmp_path / "out" / "scenes.json").read_text())
    assert (tmp_path / "out" / "scenes.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = {(r["method"], r["budget"]): r for r in result["rows"]}
    assert set(rows) == {("none", 576), ("random", 64), ("occamtoken", 64), ("occamtoken_stage1", 64),
                         ("occamtoken_stage2", 64)}
    assert rows["none", 576]["relative"] == 100.0 and rows["none", 576]["n"] == 10
    assert rows["random", 64]["tokens"] == 64.0  # a fixed budget is kept exactly
    full, stage1, stage2 = rows["occamtoken", 64], rows["occamtoken_stage1", 64], rows["occamtoken_stage2", 64]
    assert full["args"]["layer"] == benchmark.STAGE2_LAYER and full["args"]["lambda2"] > 0
    assert full["args"]["lambda1"] > 0  # the full method: both stages calibrated
    assert stage1["args"]["stage2"] is False and stage1["args"]["lambda1"] > 0
    assert stage2["args"]["lambda1"] == 0.0 and stage2["args"]["lambda2"] > 0
    for row in (full, stage1, stage2):
        assert row["tokens"] < 576 and row["layer_avg_tokens"] < 576
    assert stage1["tokens"] == pytest.approx(stage1["layer_avg_tokens"])  # nothing pruned inside the LLM
    for r in result["rows"]:
        assert r["relative"] == pytest.approx(100 * r["overall"] / rows["none", 576]["overall"])
        assert f"{r['overall']:.1f}" in table
