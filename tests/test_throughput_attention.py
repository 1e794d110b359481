"""`python -m eval.throughput attention`: outputs, rows per variant, exponent fit, budget cutoff.

Tiny token counts and in-process measurement keep this fast; no assertion depends on timings.
"""

import json
import time

import pytest
import torch
from hydra.errors import MissingConfigException

from configs.entry import compose_config
from eval import throughput
from eval.attention_benchmark import build_attention_case, token_grid
from eval.attention_report import attention_analysis
from eval.benchmark import fit_exponent, time_calls

TINY = ["tokens=[64,128]", "heads=2", "head_dim=16", "hla_rank=4", "repeats=1", "warmup=0", "isolation=inprocess"]


def benchmark(args: list[str]) -> dict:
    """``python -m eval.throughput <args>`` in-process: the checked config, then the benchmark."""
    return throughput.run(compose_config("throughput", args, positional_key="benchmark"))


def test_writes_json_markdown_png_with_rows_for_every_variant(tmp_path):
    result = benchmark(["attention", *TINY, "hla_form=both", f"out={tmp_path}"])
    labels = ["softmax", "linear", "hla[state]", "hla[value_modulation]", "mhla"]
    assert result["labels"] == labels
    for name in ("attention.json", "attention.md", "attention.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert (tmp_path / "attention.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    saved = json.loads((tmp_path / "attention.json").read_text())
    assert saved["git"]["commit"] and saved["date"] and saved["device"]["name"]
    assert saved["command"].startswith("python -m eval.throughput attention")
    for label in labels:
        rows = [p for p in saved["points"] if p["label"] == label]
        assert sorted(p["n"] for p in rows) == [64, 128], label
        for p in rows:
            for mode in ("forward", "fwd_bwd"):
                assert p[mode]["median_s"] > 0 and len(p[mode]["samples_s"]) == 1
            assert p["flops_forward"] > 0
        assert saved["analysis"]["exponents"][label]["fwd_bwd"]["all"] is not None
    assert set(saved["analysis"]["speedups"]["fwd_bwd"]) == set(labels) - {"softmax"}
    assert saved["analysis"]["hla_forms"]["fwd_bwd"]["faster"] in ("state", "value_modulation")

    markdown = (tmp_path / "attention.md").read_text()
    for heading in ("Forward time", "Forward+backward time", "Peak memory", "Fitted exponent", "HLA forms"):
        assert heading in markdown
    for label in labels:
        assert f"| {label} |" in markdown  # a row in the exponent table

    # from_json rebuilds the report without measuring
    again = benchmark(["attention", f"from_json={tmp_path / 'attention.json'}", f"out={tmp_path / 're'}"])
    assert again["points"] == saved["points"]
    assert (tmp_path / "re" / "attention.md").read_text() == markdown
    assert (tmp_path / "re" / "attention.png").stat().st_size > 0


def test_budget_cutoff_stops_each_variant_after_the_first_point(tmp_path):
    result = benchmark(["attention", *TINY, "tokens=[64,128,256]", "warmup=1", "budget_s=0",
                        "variants=[softmax,mhla]", f"out={tmp_path}"])
    for label in ("softmax", "mhla"):
        rows = [p for p in result["points"] if p["label"] == label]
        assert [p["n"] for p in rows] == [64]
        assert rows[0]["fwd_bwd"]["over_budget"]
        # the over-budget warm-up call is kept as the only sample
        assert len(rows[0]["fwd_bwd"]["samples_s"]) == 1 and rows[0]["fwd_bwd"]["warmup_s"] == []
        assert result["skipped"][label] == [128, 256]
    assert "Stopped by the budget" in (tmp_path / "attention.md").read_text()


def test_time_calls_stops_at_the_budget():
    calls = []

    def slow():
        calls.append(1)
        time.sleep(0.03)

    timing = time_calls(slow, torch.device("cpu"), warmup=1, repeats=5, budget_s=0.01)
    assert len(calls) == 1 and timing["over_budget"] and len(timing["samples_s"]) == 1
    timing = time_calls(lambda: None, torch.device("cpu"), warmup=2, repeats=3, budget_s=10)
    assert not timing["over_budget"] and len(timing["samples_s"]) == 3 and len(timing["warmup_s"]) == 2


@pytest.mark.parametrize("power", [1.0, 2.0, 1.37])
def test_exponent_fit_on_synthetic_times(power):
    ns = [1024, 2048, 4096, 8192, 16384, 32768]
    assert fit_exponent(ns, [3e-9 * n**power for n in ns]) == pytest.approx(power, abs=1e-9)
    assert fit_exponent([4096], [1.0]) is None


def test_analysis_exponent_window_speedups_and_targets():
    ns = [1024, 2048, 4096, 8192, 16384, 32768]

    def point(label, n, t):
        timing = {"median_s": t, "over_budget": False}
        return {"label": label, "n": n, "forward": timing, "fwd_bwd": timing}

    # softmax ∝ N²; mhla ∝ N on 4k-16k but with a fixed overhead at small N
    points = [point("softmax", n, 1e-9 * n**2) for n in ns]
    points += [point("mhla", n, 1e-7 * n + (0.5 if n < 4096 else 0.0)) for n in ns]
    analysis = attention_analysis(points, ["softmax", "mhla"])
    assert analysis["exponents"]["softmax"]["fwd_bwd"]["all"] == pytest.approx(2.0)
    assert analysis["exponents"]["mhla"]["fwd_bwd"]["window"] == pytest.approx(1.0)
    assert analysis["exponents"]["mhla"]["fwd_bwd"]["window_points"] == 3
    assert analysis["exponents"]["mhla"]["fwd_bwd"]["all"] < 1.0
    assert analysis["speedups"]["fwd_bwd"]["mhla"]["16384"] == pytest.approx(16384 / 100)
    targets = {t["what"].split(" ")[0]: t for t in analysis["targets"]}
    assert targets["fwd+bwd"]["met"] is True


def test_token_grid_is_video_like():
    assert token_grid(4096) == (16, 16, 16)
    assert token_grid(16384) == (16, 32, 32)
    assert token_grid(65536) == (16, 64, 64)
    for n in (64, 128, 2048, 8192, 32768, 1000, 97):
        t, h, w = token_grid(n)
        assert t * h * w == n and h <= w


def test_hla_inputs_are_the_layers_tied_taylor_factors():
    case = build_attention_case("hla", 128, heads=2, head_dim=16, hla_rank=4, hla_form="value_modulation")
    assert case.label == "hla[value_modulation]"
    assert case.info["factor_width"] == 5 and case.info["kronecker_rank"] == 25 and case.info["order"] == 2
    q_factor = case.leaves[0]
    assert q_factor.shape == (1, 2, 128, 5) and torch.all(q_factor[..., 0] == 1)
    assert case.flops == 4 * 2 * 128 * 25 * (16 + 1)  # 4·N·R·(d_v+1) per head
    out = case.call()
    assert out.shape == (1, 2, 128, 16) and torch.isfinite(out).all()


def test_mhla_inputs_use_auto_layout_and_positive_features():
    case = build_attention_case("mhla", 4096, heads=1, head_dim=16)
    assert case.info["grid"] == [16, 16, 16] and case.info["blocks"] ** 2 <= 4096
    q, k = case.leaves[0], case.leaves[1]
    assert (q > 0).all() and (k > 0).all()
    assert case.leaves[-1].shape == (case.info["blocks"],) * 2 and case.leaves[-1].requires_grad


@pytest.mark.slow
def test_subprocess_isolation_reports_peak_rss(tmp_path):
    result = benchmark(["attention", *TINY, "isolation=subprocess", "tokens=[64]", "variants=[linear]",
                        f"out={tmp_path}"])
    (point,) = result["points"]
    assert point["peak_memory_bytes"] is not None and point["peak_memory_bytes"] >= 0
    assert "VmHWM" in point["memory_method"]
    assert result["settings"]["isolation"] == "subprocess"


def test_an_unknown_benchmark_is_refused_with_the_valid_ones():
    with pytest.raises(MissingConfigException, match="Available options in 'benchmark'") as err:
        compose_config("throughput", ["flash"], positional_key="benchmark")
    assert all(name in str(err.value) for name in ("attention", "train", "sample"))
    with pytest.raises(ValueError, match="not attention cores"):
        benchmark(["attention", *TINY, "variants=[softmax,flash]"])
