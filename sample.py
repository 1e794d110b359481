"""Generate videos from a checkpoint.

    python sample.py checkpoint=outputs/tiny-mhla-demo            # a run dir: its latest checkpoint
    python sample.py checkpoint=<run>/checkpoints/step_00000300 num_samples=16 labels=[0,1,2,3] \
        cfg_scale=4 steps=50 seed=1 out_dir=videos/
    python sample.py checkpoint=runs/wan-mhla prompts=["a red car","a blue ball"] \
        negative_prompt="blurry" cfg_scale=5 steps=50 shift=3      # a text-to-video run (model=wan)

Loads the run's saved config and EMA weights, samples with the rectified-flow Euler
sampler and classifier-free guidance (class labels, or prompts encoded with the run's local
text encoder), decodes with the run's VAE, and writes one mp4 per sample plus ``grid.mp4``.
Under ``accelerate launch`` the samples are split across processes. The same seed gives
the same video bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from accelerate.utils import gather_object
from omegaconf import DictConfig

from configs.entry import entry_point
from configs.files import atomic_write_text
from configs.logs import get_logger
from configs.processes import end_processes, process_state
from data.text import TextEncoder
from data.training_data import TrainingData
from data.video import write_grid_mp4, write_mp4
from dit.checkpoint import resolve_checkpoint
from dit.families import model_family, take
from eval.demo_score import headline, is_demo_run, load_demo_classifier, score_videos
from eval.generation import cycle_labels, generation_seed, load_sampling_setup

logger = get_logger(__name__)


def read_prompts(cfg: DictConfig) -> list[str]:
    """The prompts of ``prompts=[...]`` or ``prompts_file=<txt>`` (one per line), each ``videos_per_prompt`` times."""
    if cfg.prompts and cfg.prompts_file:
        raise ValueError("give prompts=[...] or prompts_file=<file>, not both")
    if cfg.prompts_file:
        path = Path(cfg.prompts_file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"prompts_file={path} does not exist")
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    else:
        prompts = list(cfg.prompts or [])
    if not prompts:
        raise ValueError("this run generates videos from text: pass prompts=[\"a red car\",...] or "
                         "prompts_file=<a text file, one prompt per line>")
    return [prompt for prompt in prompts for _ in range(cfg.videos_per_prompt)]


def conditions_of(cfg: DictConfig, run_cfg: DictConfig, family_name: str, device):
    """(what each sample is conditioned on, its file name, the guidance's negative conditioning, prompts)."""
    if family_name != "wan":
        if cfg.prompts or cfg.prompts_file:
            raise ValueError("prompts are for text-to-video runs (model=wan); this run is class-conditional: "
                             "use labels=[...] and num_samples=")
        labels = cycle_labels(cfg.labels, cfg.num_samples, run_cfg.data.num_classes)
        names = [f"sample_{i:03d}" + (f"_class{labels[i]}" if labels else "") for i in range(cfg.num_samples)]
        return labels, names, None, None
    prompts = read_prompts(cfg)
    made_by = TrainingData.of_run(run_cfg).text_encoder_identity()
    encoder = TextEncoder(cfg.text_encoder or made_by["path"], max_length=made_by["max_length"], device=device)
    text, _ = encoder.encode(prompts)
    negative, _ = encoder.encode([cfg.negative_prompt])
    return text, [f"sample_{i:03d}" for i in range(len(prompts))], negative[0], prompts


@entry_point("sample")
def main(cfg: DictConfig) -> None:
    state = process_state()
    checkpoint = resolve_checkpoint(cfg.checkpoint)
    model, vae, run_cfg = load_sampling_setup(checkpoint, state.device, cfg.weights)
    family = model_family(run_cfg)
    if run_cfg.train.compile:
        family.compile(model)
    conditions, names, negative, prompts = conditions_of(cfg, run_cfg, family.name, state.device)
    if negative is not None:
        family.empty_caption = negative  # the unconditional side of guidance
    out_dir = Path(cfg.out_dir) if cfg.out_dir else checkpoint / "samples"
    data = TrainingData.of_run(run_cfg)
    fps = cfg.fps or data.fps()

    mine = list(range(state.process_index, len(names), state.num_processes))
    videos = family.generate(
        model, vae.decode, take(conditions, mine),
        seeds=[generation_seed(cfg.seed, i) for i in mine], latent_shape=data.latent_shape(vae), steps=cfg.steps,
        cfg_scale=cfg.cfg_scale, shift=cfg.shift or run_cfg.train.time_shift, batch_size=cfg.batch_size,
        device=state.device,
    )
    pieces = list(zip(mine, videos))
    if state.num_processes > 1:
        pieces = gather_object(pieces)
    if state.is_main_process:
        ordered = [video for _, video in sorted(pieces, key=lambda item: item[0])]
        for name, video in zip(names, ordered):
            write_mp4(out_dir / f"{name}.mp4", video, fps)
        write_grid_mp4(out_dir / "grid.mp4", ordered, fps)
        if prompts:
            atomic_write_text(out_dir / "prompts.txt", "".join(f"{n}.mp4\t{p}\n" for n, p in zip(names, prompts)))
        logger.info(f"wrote {len(ordered)} videos and grid.mp4 to {out_dir} (checkpoint {checkpoint}, {cfg.weights} "
                    f"weights, {state.num_processes} process{'es' if state.num_processes > 1 else ''})")
        if is_demo_run(run_cfg):  # how recognisable the shapes are (eval.demo_score)
            classifier, record = load_demo_classifier(run_cfg.data)
            score = score_videos(np.stack(ordered), conditions, classifier, record)
            atomic_write_text(out_dir / "demo_score.json", json.dumps(score, indent=2) + "\n")
            logger.info(headline(score))
    state.wait_for_everyone()
    end_processes(state)


if __name__ == "__main__":
    main()
