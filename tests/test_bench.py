"""``vtprune bench`` on tiny CPU models: well-formed JSON, every method × budget row, kept tokens equal to
the budget, measured KV bytes equal to the formula, positive times. No assertion compares timings."""
from __future__ import annotations

import argparse
import json

import pytest

from vtprune.bench.flops import kv_cache_bytes
from vtprune.bench.latency import add_cli, parse_method_args, run_cli, summarize
from vtprune.tiny import tiny_config

FAST = ["--repeats", "2", "--warmup", "1", "--new-tokens", "3", "--threads", "1", "--quiet"]


def bench(argv):
    """Parse like ``vtprune bench ARGS`` and run the subcommand's function in-process."""
    parser = argparse.ArgumentParser(prog="vtprune")
    add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", *argv])
    return args.func(args)


def rows_by_key(payload):
    return {(r["method"], r["budget"]): r for r in payload["result"]["rows"]}


def positive(summary):
    return summary["median"] is not None and summary["median"] > 0 and all(v > 0 for v in summary["values"])


@pytest.fixture(scope="module")
def llava_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    paths = {k: out / f"tmp.{k}" for k in ("json", "png", "md")}
    code = bench(["--tiny", "llava", "--methods", "fastv,cls_topk", "--budgets", "8,4", *FAST,
                  "--json", str(paths["json"]), "--png", str(paths["png"]), "--markdown", str(paths["md"])])
    return code, paths


def test_llava_json_is_complete(llava_run):
    code, paths = llava_run
    assert code == 0
    payload = json.loads(paths["json"].read_text())
    env = payload["environment"]
    for key in ("date", "torch", "transformers", "device", "device_type", "vtprune"):
        assert env[key]
    res = payload["result"]
    assert res["family"] == "llava" and res["visual_tokens_full"] == 16 and res["batch_size"] == 1
    assert res["memory_kind"] in ("cpu_peak_rss_delta", "n/a")
    assert positive(res["vision_alone_s"])
    rows = rows_by_key(payload)
    assert set(rows) == {("none", None), ("fastv", 8), ("fastv", 4), ("cls_topk", 8), ("cls_topk", 4)}
    assert all(r["status"] == "ok" for r in rows.values())
    assert len(rows[("none", None)]["prefill_s"]["values"]) == 2  # --repeats, warm-up excluded


def test_kept_tokens_equal_budget(llava_run):
    rows = rows_by_key(json.loads(llava_run[1]["json"].read_text()))
    assert rows[("none", None)]["visual_tokens_final"] == 16
    for budget in (8, 4):
        fastv, cls = rows[("fastv", budget)], rows[("cls_topk", budget)]
        assert cls["tokens_entering_llm"] == cls["patches_kept"] == cls["visual_tokens_final"] == budget
        assert cls["tokens_layer_averaged"] == budget
        # FastV (K=2 of 4 layers): all 16 enter, `budget` remain from layer 2 on
        assert fastv["tokens_entering_llm"] == 16
        assert fastv["patches_kept"] == fastv["visual_tokens_final"] == budget
        assert fastv["tokens_layer_averaged"] == pytest.approx((2 * 16 + 2 * budget) / 4)


def test_kv_bytes_measured_equal_formula(llava_run):
    payload = json.loads(llava_run[1]["json"].read_text())
    text = payload["result"]["text_tokens"]
    assert text == 1 + 32  # BOS + --prompt-tokens
    cfg = tiny_config("llava")
    for (method, budget), r in rows_by_key(payload).items():
        visual = 16 if budget is None else budget
        assert r["cache_tokens"] == r["expected_cache_tokens"] == text + visual
        expected = kv_cache_bytes(cfg, text + visual, dtype_bytes=4)  # fp32 on CPU
        assert r["kv_bytes_measured"] == r["kv_bytes_formula"] == expected
        assert r["kv_matches_formula"] is True


def test_times_positive(llava_run):
    for r in json.loads(llava_run[1]["json"].read_text())["result"]["rows"]:
        for key in ("prefill_s", "decode_per_token_s", "generate_ttft_s"):
            assert positive(r[key]), (r["method"], key)
        assert r["prefill_s"]["min"] <= r["prefill_s"]["median"] <= r["prefill_s"]["max"]
        assert r["limit_s"] > r["limit_llm_s"] > 0 and r["prefill_over_limit"] > 0
        if r["method"] != "none":
            assert positive(r["method_s"]) and positive(r["pipeline_total_s"])


def test_png_and_markdown_written(llava_run):
    paths = llava_run[1]
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = paths["md"].read_text()
    assert "| method | budget |" in md and "transformers" in md and "| cls_topk | 4 |" in md


def test_table_printed(tmp_path, capsys):
    assert bench(["--tiny", "llava", "--methods", "cls_topk", "--budgets", "4", "--repeats", "1", "--warmup", "0",
                  "--new-tokens", "2", "--threads", "1", "--quiet"]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("method"))
    assert "prefill ms" in header and "limit ms" in header and "KV=formula" in header
    assert any(line.startswith("cls_topk") and line.split()[1] == "4" for line in out.splitlines())


@pytest.mark.parametrize("family, method, budget", [("llava_next", "fastv", 8), ("qwen2_5_vl", "cls_topk", 8)])
def test_other_families(tmp_path, family, method, budget):
    path = tmp_path / "out.json"
    assert bench(["--tiny", family, "--methods", method, "--budgets", str(budget), "--repeats", "1", "--warmup", "0",
                  "--new-tokens", "2", "--threads", "1", "--quiet", "--json", str(path)]) == 0
    rows = rows_by_key(json.loads(path.read_text()))
    r = rows[(method, budget)]
    assert r["status"] == "ok" and r["patches_kept"] == budget
    assert r["kv_matches_formula"] and r["kv_bytes_measured"] < rows[("none", None)]["kv_bytes_measured"]
    assert positive(r["prefill_s"])


def test_method_args_budget_errors_and_adaptive_methods(tmp_path):
    path = tmp_path / "out.json"
    assert bench(["--tiny", "llava", "--methods", "fastv,keep_all", "--budgets", "4,99", "--method-args",
                  "fastv:layer=1", "--repeats", "1", "--warmup", "0", "--new-tokens", "0", "--threads", "1", "--quiet",
                  "--json", str(path)]) == 0
    payload = json.loads(path.read_text())
    rows = rows_by_key(payload)
    assert rows[("fastv", 4)]["args"] == {"layer": 1, "keep": 4}
    assert rows[("fastv", 4)]["tokens_layer_averaged"] == pytest.approx((1 * 16 + 3 * 4) / 4)
    assert rows[("fastv", 99)]["status"] == "error" and "BudgetError" in rows[("fastv", 99)]["error"]
    keep_all = rows[("keep_all", None)]  # takes no keep=: runs once
    assert keep_all["status"] == "ok" and keep_all["visual_tokens_final"] == 16
    assert rows[("none", None)]["decode_per_token_s"]["values"] == []  # --new-tokens 0


def test_random_weights_from_a_config_file(tmp_path):
    cfg_path = tmp_path / "tiny.json"
    cfg_path.write_text(tiny_config("llava").to_json_string())
    path = tmp_path / "out.json"
    assert bench(["--random-weights", str(cfg_path), "--methods", "cls_topk", "--budgets", "4", "--repeats", "1",
                  "--warmup", "0", "--new-tokens", "2", "--threads", "1", "--quiet", "--json", str(path)]) == 0
    payload = json.loads(path.read_text())
    assert "random weights" in payload["model"] and payload["args"]["dtype"] == "float32"
    assert rows_by_key(payload)[("cls_topk", 4)]["kv_matches_formula"]


@pytest.mark.parametrize("argv, message", [
    (["--tiny", "llava", "--methods", "fastvv"], "Unknown method"),
    (["--tiny", "llava", "--methods", "fastv", "--method-args", "fastv-layer=2"], "METHOD:KEY=VALUE"),
    (["--tiny", "llava", "--methods", "fastv", "--method-args", "cls_topk:seed=1"], "not in --methods"),
    (["--tiny", "lava"], "unknown tiny family"),
    (["--random-weights", "lava-1.5-7b"], "unknown preset"),
])
def test_bad_options_exit_2(argv, message, capsys):
    assert bench([*argv, "--quiet"]) == 2
    assert message in capsys.readouterr().err


def test_parse_method_args_and_summary():
    assert parse_method_args(["fastv:layer=3", "occamtoken:tau=0.5,stage2=false,name=x"]) == {
        "fastv": {"layer": 3}, "occamtoken": {"tau": 0.5, "stage2": False, "name": "x"}}
    s = summarize([3.0, 1.0, 2.0, 4.0])
    assert (s["median"], s["min"], s["max"]) == (2.5, 1.0, 4.0) and s["p25"] <= s["median"] <= s["p75"]
    assert summarize([])["median"] is None


def test_wired_into_vtprune_cli():
    from vtprune import cli

    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    if "bench" not in sub.choices:
        pytest.skip("`vtprune bench` is not wired into vtprune.cli yet")
    assert sub.choices["bench"].get_default("func") is run_cli
