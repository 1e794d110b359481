"""eval.report on two tiny real runs."""

import json

import numpy as np

from configs.entry import compose_config
from eval.report import moving_mean
from eval.report import run as write_report
from tests.runs import train


def test_report_compares_two_real_runs(tmp_path, cache_env):
    for attention in ("softmax", "mhla"):
        train(tmp_path / "sweep" / attention, f"attention={attention}", "train.max_steps=3",
              "train.num_val_samples=0", env=cache_env)
    out = tmp_path / "report"
    report = write_report(compose_config("report", [str(tmp_path / "sweep"), f"out={out}", "val_clips=2"],
                                   positional_key="runs"))
    text = report.read_text()
    rows = [line for line in text.splitlines() if line.startswith(("| mhla", "| softmax"))]
    assert [row.split("|")[2].strip() for row in rows] == ["mhla", "softmax"]
    for name in ("loss_curves.png", "throughput_vs_tokens.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "report.json").read_text())
    assert all(r["steps"] == 3 and r["val_loss"] > 0 and r["peak_memory_gb"] > 0 for r in summary)
    softmax, mhla = sorted(summary, key=lambda r: r["attention"], reverse=True)
    assert softmax["parameters"] < mhla["parameters"]  # MHLA adds its mixing matrices


def test_loss_curves_are_moving_means_of_the_logged_losses():
    losses = np.array([4.0, 2.0, 0.0, 2.0, 4.0])
    assert np.allclose(moving_mean(losses, 2), [3.0, 1.0, 1.0, 3.0])
    assert np.allclose(moving_mean(losses, 20), [2.4])  # a run shorter than the window: one mean of all
