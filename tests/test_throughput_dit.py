"""python -m eval.throughput train|sample on tiny settings: outputs, rows and accounting (no timing asserts)."""

import json

import pytest

from configs.entry import compose_config
from eval import throughput


def benchmark(args: list[str]) -> dict:
    """``python -m eval.throughput <args>`` in-process: the checked config, then the benchmark."""
    return throughput.run(compose_config("throughput", args, positional_key="benchmark"))


@pytest.mark.slow
def test_train_benchmark_writes_tables_for_every_variant(tmp_path):
    out = tmp_path / "train"
    result = benchmark(["train", "model=tiny", "variants=[softmax,mhla]", "frames=2", "sizes=[8]", "channels=3",
                        "steps=1", "warmup=0", "peak_tflops=1", f"out={out}"])
    assert [(p["variant"], p["tokens_per_sample"]) for p in result["points"]] == [("softmax", 8), ("mhla", 8)]  # 2x8x8 in 1x4x4 patches
    for p in result["points"]:
        assert p["tokens_per_s"] == pytest.approx(p["samples_per_s"] * p["tokens_per_sample"])
        assert p["mfu"] == pytest.approx(3 * p["forward_flops_per_sample"] * p["samples_per_s"] / 1e12)
    assert json.loads((out / "train.json").read_text())["device"]["type"] == "cpu"
    assert "| mhla | 8 |" in (out / "train.md").read_text()
    assert (out / "train.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_sample_benchmark_reports_dit_and_vae_time(tmp_path):
    result = benchmark(["sample", "model=tiny", "variants=[linear]", "frames=2", "size=8", "steps=2", "repeats=1",
                        f"out={tmp_path}"])
    (point,) = result["points"]
    assert point["total_s"] == pytest.approx(point["dit_s"] + point["vae_decode_s"])
    assert point["vae"] == "identity" and (tmp_path / "sample.md").is_file()
