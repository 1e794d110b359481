"""Attention diagnostics: measures on hand-built matrices, and the command on tiny checkpoints of every variant."""

import json
import math

import pytest
import torch

from configs.entry import compose_config
from eval.diagnostics import (
    effective_rank,
    numerical_rank,
    row_distance,
    row_entropy,
    run,
)
from tests import runs as scripts
from tests.runs import TINY

N = 12


def test_identity_is_full_rank_with_zero_entropy():
    eye = torch.eye(N)
    assert numerical_rank(eye, 1e-5) == N and effective_rank(eye) == pytest.approx(N)
    assert row_entropy(eye) == pytest.approx(0.0)


def test_uniform_rows_are_rank_one_with_maximal_entropy():
    uniform = torch.full((N, N), 1.0 / N)
    assert numerical_rank(uniform, 1e-5) == 1 and effective_rank(uniform) == pytest.approx(1.0)
    assert row_entropy(uniform) == pytest.approx(math.log(N))


@pytest.mark.parametrize("blocks", [2, 3, 4])
def test_block_diagonal_rank_is_the_number_of_blocks(blocks):
    size = N // blocks
    weights = torch.block_diag(*[torch.full((size, size), 1.0 / size)] * blocks)
    assert numerical_rank(weights, 1e-5) == blocks and effective_rank(weights) == pytest.approx(blocks)
    assert row_entropy(weights) == pytest.approx(math.log(size))
    assert row_distance(weights, torch.eye(N)) == pytest.approx(1 - 1 / size)
    assert row_distance(weights, weights) == 0


def test_batched_measures_keep_the_leading_dimensions():
    stack = torch.stack([torch.eye(N), torch.full((N, N), 1.0 / N)])
    assert numerical_rank(stack, 1e-5).tolist() == [N, 1]
    assert row_entropy(stack).shape == (2,)


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory, env):
    root = tmp_path_factory.mktemp("diagnostics")
    variants = ("softmax", "linear", "hla", "mhla", "hybrid")
    scripts.run("train.py", "-m", f"attention={','.join(variants)}", *TINY, "train.max_steps=1", "train.num_val_samples=0",
        f"hydra.sweep.dir={root}", env=env)  # one process for the five runs
    runs = {path.name.split("+")[0]: path for path in root.iterdir() if path.is_dir()}  # named by the overrides
    return {variant: runs[f"attention-{variant}"] for variant in variants}


@pytest.mark.parametrize("variant", ["softmax", "linear", "hla", "mhla", "hybrid"])
def test_the_command_on_a_tiny_checkpoint_of_each_variant(tiny_runs, variant, cache_env):
    run_dir = tiny_runs[variant]
    result = run(compose_config("diagnostics", [f"checkpoint={run_dir}", "num_clips=1", "times=[0.5]"]))
    layers = result["summary"]["per_layer"]
    expected = {"hybrid": ["mhla", "mhla"]}.get(variant, [variant, variant])
    assert [layer["variant"] for layer in layers] == expected
    for layer in layers:
        assert 1 <= layer["rank"] <= result["tokens"] and 1 <= layer["effective_rank"] <= layer["rank"] + 1e-9
        assert 0 <= layer["entropy"] <= math.log(result["tokens"]) + 1e-9
        assert (layer["distance_to_softmax"] is None) == (layer["variant"] == "softmax")
    if variant == "softmax":
        assert layers[0]["distance_to_softmax"] is None
    if variant == "hla":
        distances = [result["summary"]["overall"][f"hla_p{p}_distance"] for p in (1, 2, 3, 4)]
        assert all(d is not None for d in distances)
    out = run_dir / "diagnostics"
    saved = json.loads((out / "diagnostics.json").read_text())
    assert saved["summary"] == result["summary"] and (out / "diagnostics.png").read_bytes()[:4] == b"\x89PNG"
    assert f"# Attention diagnostics: {variant}" in (out / "diagnostics.md").read_text()
