"""``python -m eval.throughput suite quick=true``: the GPU suite's code on CPU at tiny sizes (no timing asserts)."""

import json

import pytest

from configs.entry import compose_config
from eval import throughput


@pytest.mark.slow
def test_quick_suite_measures_every_section_and_writes_one_report(tmp_path):
    cfg = compose_config("throughput", ["suite", "quick=true", "budget_s=600", f"out={tmp_path}"],
                         positional_key="benchmark")
    result = throughput.run(cfg)
    saved = json.loads((tmp_path / "suite.json").read_text())
    assert saved["quick"] and saved["command"].startswith("python -m eval.throughput suite")
    assert (tmp_path / "suite.png").read_bytes()[:4] == b"\x89PNG"
    markdown = (tmp_path / "suite.md").read_text()
    for heading in ("## Attention cores", "## DiT training step", "## Sampling latency", "## Goals"):
        assert heading in markdown
    sections = result["sections"]
    attention = sections["attention"]["points"]
    # Every planned point is measured or listed as not measured, eager and compiled.
    planned = {(v, n, c) for v in ("softmax", "linear", "hla", "mhla") for n in (64,) for c in (False, True)}
    measured = {(p["variant"], p["n"], p["compiled"]) for p in attention}
    listed = {(s["variant"], s["n"], s["compiled"]) for s in sections["attention"]["skipped"]}
    assert measured | listed >= planned and ("softmax", 64, False) in measured
    assert all(p["info"].get("compiled") == "aot_eager" for p in attention if p["compiled"])
    assert "FlashAttention" in sections["attention"]["sdpa_backend"] or sections["attention"]["sdpa_backend"]
    train = sections["train"]["points"]
    assert {p["tokens_per_sample"] for p in train} == {8}  # model=tiny (1x4x4 patches) on 2x8x8 latents
    assert all(p["tokens_per_s"] == pytest.approx(p["samples_per_s"] * p["tokens_per_sample"]) for p in train)
    assert any(p["model"]["gradient_checkpointing"] for p in train)
    assert sections["sample"]["points"] and all(p["dit_s"] > 0 for p in sections["sample"]["points"])
    assert [g["met"] for g in result["goals"]] == [None] * 4  # the goals are GPU sizes: not measured here
