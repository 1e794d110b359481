"""Compare training runs: one markdown report with a table and PNG plots.

    python -m eval.report runs=[multirun/2026-11-22_18-00-00]        # a sweep directory
    python -m eval.report runs=[outputs/tiny-softmax-demo,outputs/tiny-mhla-demo] out=reports/demo
    python -m eval.report multirun/2026-11-22_18-00-00               # shorthand for runs=[...]

For each run (a directory with ``checkpoints/``) the table lists the attention variant,
model, steps, final training loss (mean of the last 10 % of logged steps), a validation
loss computed here with the EMA weights on fixed clips, noise and flow times (identical
for every run, so comparable), FVD if ``<run>/fvd/*.json`` exists, the demo score (eval.demo_score) of demo
runs, tokens/s, peak memory,
parameters and forward FLOPs per sample. Plots: loss curves by step and by training-step time
(moving means of the logged losses), and training throughput against tokens per sample.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from configs.entry import entry_point
from configs.files import atomic_write_text
from configs.logs import get_logger
from data.training_data import TrainingData
from dit.checkpoint import (
    CHECKPOINTS,
    checkpoint_step,
    latest_checkpoint,
    load_dit_for_sampling,
)
from eval.diagnostics import plot_layers, read_diagnostics
from eval.metrics import read_metrics

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

logger = get_logger(__name__)

# Flow times at which the validation loss is averaged (the same for every run).
VALIDATION_TIMES = (0.1, 0.3, 0.5, 0.7, 0.9)


def find_runs(paths: list[Path]) -> list[Path]:
    """Run directories among the given paths and their sub-directories (sweeps), sorted."""
    runs = []
    for path in paths:
        if (path / CHECKPOINTS).is_dir():
            runs.append(path)
        elif path.is_dir():
            runs += sorted(p.parent for p in path.glob(f"**/{CHECKPOINTS}") if p.is_dir())
    if not runs:
        raise FileNotFoundError(f"no run directories (with {CHECKPOINTS}/) under {[str(p) for p in paths]}")
    return sorted(dict.fromkeys(runs))


def final_loss(records: list[dict]) -> float:
    losses = [r["loss"] for r in records if np.isfinite(r.get("loss", np.nan))]
    tail = losses[-max(1, len(losses) // 10):]
    return float(np.mean(tail)) if tail else float("nan")


def loss_at_time(records: list[dict], seconds: float) -> float:
    """Mean training loss over the logged steps in the last 10 % of the first ``seconds`` of training time."""
    window = [r["loss"] for r in records
              if "train_seconds" in r and 0.9 * seconds <= r["train_seconds"] <= seconds and np.isfinite(r["loss"])]
    return float(np.mean(window)) if window else float("nan")


def mean_of_last_half(records: list[dict], key: str) -> float:
    values = [r[key] for r in records if key in r]
    return float(np.mean(values[len(values) // 2:])) if values else float("nan")


@torch.no_grad()
def validation_loss(checkpoint: Path, num_clips: int) -> float:
    """Rectified-flow loss of the EMA weights on the first clips of the run's data (centred clips),
    with noise seeded per clip and flow times fixed to VALIDATION_TIMES."""
    run_cfg = OmegaConf.load(checkpoint / "config.yaml")
    data = TrainingData.of_run(run_cfg)
    vae = data.build_vae()
    model = load_dit_for_sampling(checkpoint, run_cfg, data.latent_shape(vae))
    dataset = data.dataset(centred=True)
    losses = []
    for index in range(min(num_clips, len(dataset))):
        item = dataset[(index, index)]
        x0 = data.clean_latents({k: v[None] for k, v in item.items() if k in ("latents", "video")}, vae, "cpu")[0]
        label = item["label"][None] if model.num_classes else None
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(index))
        for t in VALIDATION_TIMES:
            x_t = (1 - t) * x0 + t * noise
            prediction = model(x_t[None], torch.tensor([t]), label)[0]
            losses.append(torch.mean((prediction - (noise - x0)) ** 2).item())
    return float(np.mean(losses)) if losses else float("nan")


def fvd_result(run_dir: Path) -> str:
    """The newest FVD result of the run (by file time), or a dash."""
    paths = sorted((run_dir / "fvd").glob("*.json"), key=lambda p: p.stat().st_mtime) if (run_dir / "fvd").is_dir() else []
    results = [json.loads(p.read_text()) for p in paths]
    results = [r for r in results if r.get("fvd") is not None]
    if not results:
        return "—"
    return f"{results[-1]['fvd']:.1f} ({results[-1].get('num_clips', '?')} clips)"


def demo_score_result(run_dir: Path, records: list[dict]) -> str:
    """The newest demo score of the run (eval.demo_score's result, else train.score_every's), or a dash."""
    folder = run_dir / "demo_score"
    paths = sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime) if folder.is_dir() else []
    if paths:
        score = json.loads(paths[-1].read_text())
        value, clips = score["class_accuracy"], score["num_clips"]
        if value is None:
            value = score["confident_fraction"]
        return f"{value:.0%} ({clips} clips)"
    logged = [r for r in records if "demo_class_accuracy" in r or "demo_confident_fraction" in r]
    if not logged:
        return "—"
    last = logged[-1]
    return f"{last.get('demo_class_accuracy', last.get('demo_confident_fraction')):.0%} (step {last['step']})"


def summarise(run_dir: Path, val_clips: int) -> dict:
    checkpoint = latest_checkpoint(run_dir)
    cfg = OmegaConf.load(checkpoint / "config.yaml")
    summary = json.loads((run_dir / "model_summary.json").read_text()) if (run_dir / "model_summary.json").is_file() else {}
    records = read_metrics(run_dir)
    return {
        "run": run_dir.name,
        "path": str(run_dir),
        "attention": cfg.attention.name,
        "model": cfg.model.name,
        "seed": cfg.seed,
        "steps": checkpoint_step(checkpoint),
        "final_loss": final_loss(records),
        "val_loss": validation_loss(checkpoint, val_clips) if val_clips and cfg.model.family == "dit" else float("nan"),
        "fvd": fvd_result(run_dir),
        "demo_score": demo_score_result(run_dir, records),
        "tokens_per_s": mean_of_last_half(records, "tokens_per_s"),
        "samples_per_s": mean_of_last_half(records, "samples_per_s"),
        "peak_memory_gb": max((r.get("peak_memory_gb", float("nan")) for r in records), default=float("nan")),
        "parameters": summary.get("parameters"),
        "tokens_per_sample": summary.get("tokens_per_sample"),
        "forward_gflops": summary.get("forward_flops_per_sample", float("nan")) / 1e9,
        "curve": [(r["step"], r.get("train_seconds", float("nan")), r["loss"]) for r in records if "loss" in r],
        "train_seconds": max((r.get("train_seconds", 0.0) for r in records), default=0.0),
        "records": records,
        "diagnostics": read_diagnostics(run_dir),
    }


def markdown_table(rows: list[dict]) -> str:
    header = ("| run | attention | model | steps | final loss | loss at equal time | val loss | FVD | demo score | "
              "tokens/s | samples/s | peak mem (GB) | params (M) | tokens/sample | fwd GFLOPs/sample |")
    lines = [header, "|" + "---|" * 15]
    for r in rows:
        params = f"{r['parameters'] / 1e6:.2f}" if r["parameters"] else "—"
        lines.append(
            f"| {r['run']} | {r['attention']} | {r['model']} | {r['steps']} | {r['final_loss']:.4f} | "
            f"{r['loss_at_equal_time']:.4f} | {r['val_loss']:.4f} | {r['fvd']} | {r['demo_score']} | {r['tokens_per_s']:.0f} | {r['samples_per_s']:.2f} | "
            f"{r['peak_memory_gb']:.2f} | {params} | {r['tokens_per_sample']} | {r['forward_gflops']:.3f} |"
        )
    return "\n".join(lines)


SPREAD_KEYS = ("final_loss", "loss_at_equal_time", "val_loss")


def seed_spread_table(rows: list[dict]) -> str | None:
    """For settings run with several seeds: the spread (max − min) of each quality number, to tell signal from noise."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["attention"], r["model"], r["steps"]), []).append(r)
    repeated = {key: group for key, group in groups.items() if len(group) > 1}
    if not repeated:
        return None
    lines = ["| attention | model | runs (seeds) | " + " | ".join(f"{k} spread" for k in SPREAD_KEYS) + " |",
             "|---|---|---|" + "---|" * len(SPREAD_KEYS)]
    for (attention, model, _), group in repeated.items():
        spreads = [max(r[k] for r in group) - min(r[k] for r in group) for k in SPREAD_KEYS]
        seeds = ", ".join(f"{r['run']} ({r['seed']})" for r in group)
        lines.append(f"| {attention} | {model} | {seeds} | " + " | ".join(f"{v:.4f}" for v in spreads) + " |")
    return "\n".join(lines)


def diagnostics_table(rows: list[dict]) -> str | None:
    """Rank, entropy and distance to softmax of the runs whose diagnostics were computed (eval.diagnostics)."""
    measured = [r for r in rows if r["diagnostics"]]
    if not measured:
        return None
    lines = ["| run | attention | rank (of N) | effective rank | row entropy (of log N) | distance to softmax |",
             "|---|---|---|---|---|---|"]
    for r in measured:
        d = r["diagnostics"]
        overall = d["overall"]
        distance = "—" if overall["distance_to_softmax"] is None else f"{overall['distance_to_softmax']:.3f}"
        lines.append(f"| {r['run']} | {r['attention']} | {overall['rank']:.1f} ({d['max_rank']}) | "
                     f"{overall['effective_rank']:.1f} | {overall['entropy']:.3f} ({d['max_entropy']:.3f}) | {distance} |")
    return "\n".join(lines)


LOSS_CURVE_WINDOW = 20  # logged losses per point of the plotted curves: single batches are too noisy to compare


def moving_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Means of ``window`` consecutive values, shape (len(values) - window + 1,); all of them if fewer."""
    window = min(window, len(values))
    return np.convolve(values, np.ones(window) / window, mode="valid")


def plot(rows: list[dict], out: Path) -> list[Path]:
    loss_png, speed_png = out / "loss_curves.png", out / "throughput_vs_tokens.png"
    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for r in rows:
        if r["curve"]:
            steps, seconds, losses = (np.asarray(column) for column in zip(*r["curve"]))
            smooth = moving_mean(losses, LOSS_CURVE_WINDOW)
            by_step.plot(steps[len(steps) - len(smooth):], smooth, label=r["run"])
            by_time.plot(seconds[len(seconds) - len(smooth):], smooth, label=r["run"])
    by_step.set(xlabel="step", ylabel=f"training loss (mean of {LOSS_CURVE_WINDOW} logged values)",
                title="Loss by step", yscale="log")
    by_time.set(xlabel="training-step time (s)", title="Loss by training time")
    for ax in (by_step, by_time):
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(loss_png, dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    for attention in sorted({r["attention"] for r in rows}):
        points = sorted((r["tokens_per_sample"], r["tokens_per_s"]) for r in rows
                        if r["attention"] == attention and r["tokens_per_sample"])
        if points:
            ax.plot(*zip(*points), marker="o", label=attention)
    ax.set(xlabel="tokens per sample", ylabel="training tokens/s", title="Throughput vs tokens", xscale="log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(speed_png, dpi=120)
    plt.close(fig)
    plots = [loss_png, speed_png]
    diagnosed = {r["run"]: r["diagnostics"] for r in rows if r["diagnostics"]}
    if diagnosed:
        plots.append(plot_layers(diagnosed, out / "attention_rank_entropy.png"))
    return plots


def run(cfg: DictConfig) -> Path:
    """Write ``report.md``, ``report.json`` and the plots for the runs of a checked ``report`` config."""
    paths = [Path(p).expanduser() for p in ([cfg.runs] if isinstance(cfg.runs, str) else cfg.runs)]
    out = Path(cfg.out) if cfg.out else paths[0] / "report"
    out.mkdir(parents=True, exist_ok=True)
    rows = [summarise(run_dir, cfg.val_clips) for run_dir in find_runs(paths)]
    equal_time = min((r["train_seconds"] for r in rows), default=0.0)  # the shortest run's training-step time
    for r in rows:
        r["loss_at_equal_time"] = loss_at_time(r.pop("records"), equal_time)
    plots = plot(rows, out)
    text = "\n\n".join([
        "# Run comparison",
        f"Runs: {', '.join(r['path'] for r in rows)}",
        markdown_table(rows),
        *filter(None, [seed_spread_table(rows), diagnostics_table(rows)]),
        f"Final loss: mean training loss over the last 10 % of logged steps. Loss at equal time: the same over "
        f"the last 10 % of the first {equal_time:.0f} s of training-step time (the shortest run's). "
        f"Validation loss: EMA weights on the "
        f"first {cfg.val_clips} clips of each run's data, per-clip seeded noise, flow times {list(VALIDATION_TIMES)}. "
        f"Throughput: mean over the second half of logged steps, per run as logged (global batch).",
        *[f"![{p.stem}]({p.name})" for p in plots],
    ])
    atomic_write_text(out / "report.md", text + "\n")
    atomic_write_text(out / "report.json",
                      json.dumps([{k: v for k, v in r.items() if k != "curve"} for r in rows], indent=2))
    logger.info(text)
    logger.info(f"\nwrote {out / 'report.md'}")
    return out / "report.md"


main = entry_point("report", positional_key="runs")(run)


if __name__ == "__main__":
    main()
