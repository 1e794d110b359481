"""Attention diagnostics: ``python -m eval.diagnostics checkpoint=<run>``.

On fixed validation clips at a few flow times, every attention layer and head of a trained
DiT gives its explicit N×N attention weights (:func:`attention.reference.explicit_weights`),
row-normalised as the layer applies them, and from them:

- numerical rank (singular values above ``rank_tolerance`` × the largest) and effective rank
  (exp of the entropy of the normalised singular values; Roy & Vetterli 2007);
- mean row entropy (nats; log N for uniform rows, 0 for one-hot rows);
- for linear, HLA and MHLA: the distance (mean over rows of the total-variation distance) of
  the weights to the softmax weights computed from the same q and k, with the same RoPE;
- for HLA also that distance as the order p of its tied Taylor factors varies (same q, k).

Linear and MHLA rotate their features with RoPE in the numerator only, which makes single
products signed; their diagnostics use the un-rotated kernel φ(q)φ(k)ᵀ (× MHLA's block mixing),
whose rank bound (d; Σ_b min(N_b, d) for MHLA) is the property at stake ("global context
collapse"). Softmax and HLA weights are those of the rotated q, k, as the layers compute them.

Writes ``diagnostics.json``, ``diagnostics.md`` and ``diagnostics.png`` (per-layer rank and
entropy) to ``out`` (default ``<run dir>/diagnostics``); ``eval.report`` shows the summary.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib
import numpy as np
import torch
from omegaconf import DictConfig
from torch import Tensor

from attention import AttentionLayer, apply_rope
from attention.functional import guard_denominator
from attention.reference import explicit_weights
from configs.entry import entry_point
from configs.files import atomic_write_text
from configs.logs import get_logger
from data.training_data import TrainingData
from dit.checkpoint import resolve_checkpoint
from eval.generation import load_sampling_setup

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
from matplotlib.ticker import MaxNLocator  # noqa: E402

logger = get_logger(__name__)

DIAGNOSTICS_DIR = "diagnostics"


# ------------------------------------------------------------------------------- measures of one matrix


def singular_values(weights: Tensor) -> Tensor:
    """(..., N, N) -> (..., N) singular values in float64, descending."""
    return torch.linalg.svdvals(weights.double())


def numerical_rank(weights: Tensor, tolerance: float) -> Tensor:
    """Number of singular values > ``tolerance`` × the largest, per matrix of (..., N, N)."""
    sigma = singular_values(weights)
    return (sigma > tolerance * sigma[..., :1]).sum(-1)


def effective_rank(weights: Tensor) -> Tensor:
    """exp of the entropy of the normalised singular values, per matrix: in [1, N]."""
    sigma = singular_values(weights)
    p = sigma / sigma.sum(-1, keepdim=True).clamp_min(1e-300)
    return torch.exp(-(p * torch.log(p.clamp_min(1e-300))).sum(-1))


def row_entropy(weights: Tensor) -> Tensor:
    """Mean over rows of the Shannon entropy (nats) of rows of non-negative weights summing to 1."""
    w = weights.double().clamp_min(0)
    return -(w * torch.log(w.clamp_min(1e-300))).sum(-1).mean(-1)


def row_distance(weights: Tensor, reference: Tensor) -> Tensor:
    """Mean over rows of the total-variation distance ½·Σ_j |w_ij − r_ij| between row-stochastic matrices."""
    return 0.5 * (weights.double() - reference.double()).abs().sum(-1).mean(-1)


def row_normalised(weights: Tensor, row_sums: Tensor | None = None, eps: float = 1e-6) -> Tensor:
    """Weights divided by their (guarded) row sums: the matrix a layer applies to v, up to its output norm."""
    sums = weights.sum(-1, keepdim=True) if row_sums is None else row_sums
    return weights / guard_denominator(sums, eps)


# ------------------------------------------------------------------------------- weights of a layer


def layer_weights(layer: AttentionLayer, x: Tensor, grid, rope) -> dict[str, Tensor]:
    """Row-stochastic weights (B, h, N, N) of a layer's input x (B, N, C): its own, and softmax's on the same q, k.

    For HLA also ``hla_p<p>``: tied Taylor factors of order p = 1..4 on the same q, k.
    """
    q, k, _ = layer.heads(x)
    core = layer.core
    logits = (_rotate(q, rope) @ _rotate(k, rope).transpose(-1, -2)).double() / math.sqrt(q.shape[-1])
    weights = {"softmax": torch.softmax(logits, dim=-1)}
    if core.variant == "softmax":
        weights["own"] = weights["softmax"]
        return weights
    use_rope = rope if core.variant == "hla" else None  # see the module docstring
    raw, sums = explicit_weights(core, q, k, grid, use_rope)
    weights["own"] = row_normalised(raw, sums, core.eps)
    if core.variant == "hla" and core.factors == "tied":
        q_factor, k_factor = (core.taylor_factor(t).double() for t in (_rotate(q, rope), _rotate(k, rope)))
        scale = math.sqrt(core.order)  # the layer's factors are [1, x/√(p·√d)]: rescale to each order p
        q_factor[..., 1:] *= scale
        k_factor[..., 1:] *= scale
        for p in (1, 2, 3, 4):
            qp, kp = q_factor.clone(), k_factor.clone()
            qp[..., 1:] /= math.sqrt(p)
            kp[..., 1:] /= math.sqrt(p)
            weights[f"hla_p{p}"] = row_normalised((qp @ kp.transpose(-1, -2)) ** p, None, core.eps)
    return weights


def _rotate(x: Tensor, rope) -> Tensor:
    return x if rope is None else apply_rope(x, rope)


# ------------------------------------------------------------------------------- the command


def capture_layer_inputs(model, x_t: Tensor, t: Tensor, y: Tensor | None) -> list[tuple[Tensor, tuple, object]]:
    """Run the model once and return each block's attention input (x, grid, rope), in block order."""
    captured = []
    hooks = [block.attn.register_forward_hook(lambda module, args, out: captured.append(args))
             for block in model.blocks]
    try:
        with torch.no_grad():
            model(x_t, t, y)
    finally:
        for hook in hooks:
            hook.remove()
    return captured


@torch.no_grad()
def diagnose(cfg: DictConfig) -> dict:
    """Every measure of every layer and head of a checkpoint's model on fixed clips and flow times."""
    checkpoint = resolve_checkpoint(cfg.checkpoint)
    model, vae, run_cfg = load_sampling_setup(checkpoint, "cpu", cfg.weights)
    if run_cfg.model.family != "dit":
        raise ValueError("eval.diagnostics measures linvid's own DiT runs (model.family=dit); for converted "
                         "pretrained models use the attention library's explicit_weights on their cores")
    data = TrainingData.of_run(run_cfg)
    dataset = data.dataset(centred=True)
    tokens = math.prod(model.grid)
    if tokens > cfg.max_tokens:
        raise ValueError(f"this run has {tokens} tokens per sample, more than max_tokens={cfg.max_tokens}: explicit "
                         f"N×N weights and their SVDs grow like N²–N³; raise max_tokens if you have the time")
    layers = [block.attn for block in model.blocks]
    per_layer = [{"variant": layer.core.variant, "samples": []} for layer in layers]
    for index in range(min(cfg.num_clips, len(dataset))):
        item = dataset[(index, index)]
        x0 = data.clean_latents({k: v[None] for k, v in item.items() if k in ("latents", "video")}, vae, "cpu")
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(cfg.seed + index))
        y = item["label"][None] if model.num_classes else None
        for t in cfg.times:
            x_t = (1 - t) * x0 + t * noise
            for layer, record, (x, grid, rope) in zip(layers, per_layer,
                                                      capture_layer_inputs(model, x_t, torch.tensor([t]), y)):
                weights = layer_weights(layer, x, grid, rope)
                own = weights["own"][0]  # (h, N, N)
                sample = {"t": t, "clip": index, "rank": numerical_rank(own, cfg.rank_tolerance).tolist(),
                          "effective_rank": effective_rank(own).tolist(), "entropy": row_entropy(own).tolist()}
                if record["variant"] != "softmax":
                    sample["distance_to_softmax"] = row_distance(own, weights["softmax"][0]).tolist()
                for p in (1, 2, 3, 4):
                    if f"hla_p{p}" in weights:
                        sample[f"hla_p{p}_distance"] = row_distance(weights[f"hla_p{p}"][0], weights["softmax"][0]).tolist()
                record["samples"].append(sample)
    result = {"checkpoint": str(checkpoint), "attention": run_cfg.attention.name, "tokens": tokens,
              "heads": layers[0].num_heads, "times": list(cfg.times), "num_clips": min(cfg.num_clips, len(dataset)),
              "rank_tolerance": cfg.rank_tolerance, "weights": cfg.weights, "layers": per_layer}
    result["summary"] = summarise(result)
    return result


def _mean(samples: list[dict], key: str) -> float | None:
    values = [v for s in samples if key in s for v in s[key]]
    return float(np.mean(values)) if values else None


def summarise(result: dict) -> dict:
    """Means over clips, times and heads: per layer, and over all layers."""
    keys = ["rank", "effective_rank", "entropy", "distance_to_softmax"] + [f"hla_p{p}_distance" for p in (1, 2, 3, 4)]
    per_layer = [{"variant": layer["variant"], **{k: _mean(layer["samples"], k) for k in keys}}
                 for layer in result["layers"]]
    overall = {k: (float(np.mean(vals)) if (vals := [row[k] for row in per_layer if row[k] is not None]) else None)
               for k in keys}
    return {"per_layer": per_layer, "overall": overall, "max_entropy": math.log(result["tokens"]),
            "max_rank": result["tokens"]}


def _cell(value, digits=2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def diagnostics_markdown(result: dict) -> str:
    summary = result["summary"]
    rows = [[i, row["variant"], _cell(row["rank"], 1), _cell(row["effective_rank"], 1), _cell(row["entropy"], 3),
             _cell(row["distance_to_softmax"], 3)] for i, row in enumerate(summary["per_layer"])]
    header = "| layer | variant | rank | effective rank | row entropy (nats) | distance to softmax |"
    lines = [f"# Attention diagnostics: {result['attention']}", "",
             f"Checkpoint {result['checkpoint']} ({result['weights']} weights); {result['num_clips']} clips × flow times "
             f"{result['times']}; N = {result['tokens']} tokens, {result['heads']} heads; rank tolerance "
             f"{result['rank_tolerance']:g} × σ_max; maximum rank {summary['max_rank']}, maximum entropy "
             f"log N = {summary['max_entropy']:.3f}.", "", header, "|--:|:--|--:|--:|--:|--:|"]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    hla = [p for p in (1, 2, 3, 4) if summary["overall"].get(f"hla_p{p}_distance") is not None]
    if hla:
        lines += ["", "Distance of tied Taylor HLA weights to softmax on the same q, k, by order p: "
                  + ", ".join(f"p={p}: {summary['overall'][f'hla_p{p}_distance']:.3f}" for p in hla) + "."]
    return "\n".join(lines) + "\n"


def plot_layers(runs: dict[str, dict], path: Path) -> Path:
    """Per-layer rank and row entropy, one line per run (side by side panels)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, summary in runs.items():
        layers = range(len(summary["per_layer"]))
        axes[0].plot(layers, [row["rank"] for row in summary["per_layer"]], marker="o", label=name)
        axes[1].plot(layers, [row["entropy"] for row in summary["per_layer"]], marker="o", label=name)
    axes[0].set(xlabel="layer", ylabel="numerical rank (mean over heads)", title="Attention rank")
    axes[1].set(xlabel="layer", ylabel="row entropy (nats)", title="Attention entropy")
    for ax in axes:
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # layers are whole numbers
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def read_diagnostics(run_dir: Path) -> dict | None:
    """The summary of a run's diagnostics, if they were computed."""
    path = Path(run_dir) / DIAGNOSTICS_DIR / "diagnostics.json"
    return json.loads(path.read_text())["summary"] if path.is_file() else None


def run(cfg: DictConfig) -> dict:
    """Compute, write and return the diagnostics of a checked ``diagnostics`` config."""
    result = diagnose(cfg)
    checkpoint = Path(result["checkpoint"])
    out = Path(cfg.out) if cfg.out else checkpoint.parent.parent / DIAGNOSTICS_DIR
    atomic_write_text(out / "diagnostics.json", json.dumps(result, indent=2) + "\n")
    markdown = diagnostics_markdown(result)
    atomic_write_text(out / "diagnostics.md", markdown)
    plot_layers({result["attention"]: result["summary"]}, out / "diagnostics.png")
    logger.info(markdown + f"\nwrote {out / 'diagnostics.json'}, {out / 'diagnostics.md'}, {out / 'diagnostics.png'}")
    return result


main = entry_point("diagnostics")(run)


if __name__ == "__main__":
    main()
