"""Fréchet Video Distance (FVD) with one pinned, recorded protocol (docs/evaluation.md).

The package, along its seams:

* :mod:`eval.fvd.i3d` — the Kinetics-400 I3D network (PyTorch port);
* :mod:`eval.fvd.weights` — fetching, verifying and loading its pretrained weights;
* :mod:`eval.fvd.protocol` — what makes two numbers comparable (:class:`Protocol`);
* :mod:`eval.fvd.stats` — Fréchet distance and streaming feature statistics;
* :mod:`eval.fvd.features` — videos -> I3D features -> statistics, across processes, cached;
* :mod:`eval.fvd.sources` — real and generated clips: folders, a run's training split, latents, a model;
* :mod:`eval.fvd.command` — the ``python -m eval.fvd`` entry point.
"""

from eval.fvd.features import (
    cached_stats,
    compute_fvd,
    preprocess_videos,
    stream_stats,
    video_features,
)
from eval.fvd.protocol import FVDError, Protocol, checkpoint_protocol
from eval.fvd.sources import (
    fvd_of_model,
    generated_stats,
    list_videos,
    read_clip,
    training_real_stats,
)
from eval.fvd.stats import FeatureStats, frechet_distance, frechet_distance_from_stats
from eval.fvd.weights import check_weights, fetch_weights, is_pretrained, load_i3d

__all__ = [
    "FVDError", "FeatureStats", "Protocol", "cached_stats", "check_weights", "checkpoint_protocol", "compute_fvd",
    "fetch_weights", "frechet_distance", "frechet_distance_from_stats", "fvd_of_model", "generated_stats",
    "is_pretrained", "list_videos", "load_i3d", "preprocess_videos", "read_clip", "stream_stats",
    "training_real_stats", "video_features",
]
