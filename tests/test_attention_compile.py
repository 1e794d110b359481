"""torch.compile(fullgraph=True) captures every attention layer, forward and backward.

Full-graph capture of forward and backward is checked for every variant and setting
with the cheap ``aot_eager`` backend (Dynamo + AOTAutograd, which also traces the
backward graph): outputs, input gradients and parameter gradients must equal eager
within 1e-5 relative (float32). Inductor's forward is compared against eager for one
representative setting per variant and one uneven MHLA layout.
"""

import math

import pytest
import torch

from attention import build_attention, rope_tables
from attention.compile_marks import assume_constant_result
from attention.mhla import mhla_grid_plan
from attention.symmetric import symmetric_multinomials

GRID = (2, 3, 4)  # N = 24; layouts below divide it or not
DIM, HEADS = 32, 2

SETTINGS = {
    "softmax": {"name": "softmax"},
    "linear": {"name": "linear"},
    "linear-unnormalized": {"name": "linear", "normalize": False, "feature_map": "elu"},
    "hla-tied-p2": {"name": "hla", "order": 2, "rank": 4},
    "hla-tied-p2-unnormalized": {"name": "hla", "order": 2, "rank": 4, "normalize": False},
    "hla-tied-p4": {"name": "hla", "order": 4, "rank": 3},
    "hla-tied-p4-unnormalized": {"name": "hla", "order": 4, "rank": 3, "normalize": False},
    "hla-tied-p2-kronecker": {"name": "hla", "order": 2, "rank": None, "form": "state"},
    "hla-untied-p1": {"name": "hla", "order": 1, "factors": "untied", "rank": 4},
    "hla-untied-p2-unnormalized": {"name": "hla", "order": 2, "factors": "untied", "rank": 4, "normalize": False},
    "hla-untied-p3": {"name": "hla", "order": 3, "factors": "untied", "rank": 3, "activation": "softplus"},
    "hla-untied-p4-value-modulation": {
        "name": "hla", "order": 4, "factors": "untied", "rank": 2, "form": "value_modulation",
    },
    "mhla": {"name": "mhla", "layout": [1, 3, 2]},
    "mhla-normalized-gated": {"name": "mhla", "layout": [2, 1, 2], "normalize": True, "gate": True},
    "mhla-uneven": {"name": "mhla", "layout": [2, 2, 3]},
    "mhla-uneven-normalized": {"name": "mhla", "layout": [1, 2, 3], "normalize": True},
    "mhla-empty-blocks": {"name": "mhla", "layout": [3, 4, 2], "normalize": True, "gate": True},
}
INDUCTOR = ["softmax", "linear", "hla-tied-p2", "mhla", "mhla-uneven"]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def run(fn, layer, x, rope):
    """Output, input gradient and ``layer``'s parameter gradients of one forward + backward of ``fn``."""
    x = x.detach().clone().requires_grad_()
    layer.zero_grad(set_to_none=True)
    out = fn(x, GRID, rope)
    (out.square().sum() + out.sum()).backward()
    return out.detach(), x.grad, {name: p.grad for name, p in layer.named_parameters()}


def assert_same(eager, compiled, rtol=1e-5):
    def close(a, b, what):
        scale = max(a.abs().max().item(), 1e-6)
        assert (a - b).abs().max().item() <= rtol * scale, what

    close(eager[0], compiled[0], "output")
    close(eager[1], compiled[1], "input gradient")
    assert eager[2].keys() == compiled[2].keys()
    for name, grad in eager[2].items():
        assert grad is not None and compiled[2][name] is not None, name
        close(grad, compiled[2][name], name)


def layer_and_inputs(setting: str):
    torch.manual_seed(0)
    layer = build_attention(SETTINGS[setting], dim=DIM, num_heads=HEADS)
    with torch.no_grad():  # move MHLA mixing off its init so every entry matters
        for name, p in layer.named_parameters():
            if name.endswith("mixing"):
                p.uniform_(0.2, 1.0)
    return layer, torch.randn(2, math.prod(GRID), DIM), rope_tables(DIM // HEADS, GRID)


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_fullgraph_forward_and_backward_capture(setting):
    layer, x, rope = layer_and_inputs(setting)
    eager = run(layer, layer, x, rope)
    compiled = run(torch.compile(layer, fullgraph=True, backend="aot_eager"), layer, x, rope)
    assert_same(eager, compiled)


def test_inductor_matches_eager():
    """One representative setting per variant and an uneven MHLA layout, compiled as one graph.

    Forward only: inductor's cold C++ compilation dominates the cost of this file, and the
    backward graphs are captured and checked against eager above (aot_eager).
    """
    cases = [layer_and_inputs(setting) for setting in INDUCTOR]
    layers = torch.nn.ModuleList(layer for layer, _, _ in cases)
    x, rope = cases[0][1], cases[0][2]

    def all_layers(x, grid, rope):
        return torch.stack([layer(x, grid, rope) for layer in layers])

    with torch.no_grad():
        eager = all_layers(x, GRID, rope)
        compiled = torch.compile(all_layers, fullgraph=True, backend="inductor")(x, GRID, rope)
    for setting, expected, actual in zip(INDUCTOR, eager, compiled):
        scale = expected.abs().max().item()
        assert (expected - actual).abs().max().item() <= 1e-5 * scale, setting


def test_graph_break_makes_fullgraph_fail():
    """The check above can fail: a host read in forward is refused under fullgraph=True."""
    layer = build_attention(SETTINGS["linear"], dim=DIM, num_heads=HEADS)

    class HostRead(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self, x, grid, rope):
            out = self.layer(x, grid, rope)
            return out * 2 if bool(out.sum() > 0) else out

    x = torch.randn(1, math.prod(GRID), DIM)
    with pytest.raises(torch._dynamo.exc.TorchDynamoException):
        torch.compile(HostRead(), fullgraph=True, backend="aot_eager")(x, GRID, rope_tables(DIM // HEADS, GRID))


def test_constant_marks_are_the_ones_torch_compiler_sets():
    """attention.compile_marks sets the very marker torch.compiler.assume_constant_result sets
    (without importing Dynamo at import time), on every function that relies on it."""
    reference = vars(torch.compiler.assume_constant_result(lambda: None))
    assert reference and vars(assume_constant_result(lambda: None)) == reference
    for marked in (mhla_grid_plan, symmetric_multinomials):
        assert reference.items() <= vars(marked).items(), marked.__name__
