"""Generate videos from a checkpoint.

    python sample.py checkpoint=outputs/tiny-mhla-demo            # a run dir: its latest checkpoint
    python sample.py checkpoint=<run>/checkpoints/step_00000300 num_samples=16 labels=[0,1,2,3] \
        cfg_scale=4 steps=50 seed=1 out_dir=videos/

Loads the run's saved config and EMA weights, samples with the rectified-flow Euler
sampler and classifier-free guidance, decodes with the run's VAE, and writes one mp4
per sample plus ``grid.mp4``. Under ``accelerate launch`` the samples are split across
processes. The same seed gives the same video bytes.
"""

from __future__ import annotations

from pathlib import Path

from accelerate.utils import gather_object
from omegaconf import DictConfig

from configs.entry import entry_point
from configs.logs import get_logger
from configs.processes import end_processes, process_state
from data.video import write_grid_mp4, write_mp4
from dit.checkpoint import resolve_checkpoint
from dit.sampling import generate_videos
from eval.generation import cycle_labels, generation_seed, load_sampling_setup

logger = get_logger(__name__)


@entry_point("sample")
def main(cfg: DictConfig) -> None:
    state = process_state()
    checkpoint = resolve_checkpoint(cfg.checkpoint)
    model, vae, run_cfg = load_sampling_setup(checkpoint, state.device, cfg.weights)
    labels = cycle_labels(cfg.labels, cfg.num_samples, run_cfg.data.num_classes)
    out_dir = Path(cfg.out_dir) if cfg.out_dir else checkpoint / "samples"
    fps = cfg.fps or run_cfg.data.get("fps") or 8

    mine = list(range(state.process_index, cfg.num_samples, state.num_processes))
    videos = generate_videos(
        model, vae.decode, seeds=[generation_seed(cfg.seed, i) for i in mine],
        labels=[labels[i] for i in mine] if labels else None, steps=cfg.steps, cfg_scale=cfg.cfg_scale,
        shift=run_cfg.train.time_shift, batch_size=cfg.batch_size, device=state.device,
    )
    pieces = list(zip(mine, videos))
    if state.num_processes > 1:
        pieces = gather_object(pieces)
    if state.is_main_process:
        ordered = [video for _, video in sorted(pieces, key=lambda item: item[0])]
        for i, video in enumerate(ordered):
            suffix = f"_class{labels[i]}" if labels else ""
            write_mp4(out_dir / f"sample_{i:03d}{suffix}.mp4", video, fps)
        write_grid_mp4(out_dir / "grid.mp4", ordered, fps)
        logger.info(f"wrote {len(ordered)} videos and grid.mp4 to {out_dir} (checkpoint {checkpoint}, {cfg.weights} "
                    f"weights, {state.num_processes} process{'es' if state.num_processes > 1 else ''})")
    state.wait_for_everyone()
    end_processes(state)


if __name__ == "__main__":
    main()
