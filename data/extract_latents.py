"""Encode every clip of a video dataset once with a VAE into sharded safetensors files.

    python -m data.extract_latents data=videos data.root=/videos data.num_frames=17 \
        data.resolution=256 vae=wan vae.path=/models/wan-vae out=/latents/wan-256
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \
        --mixed_precision no --dynamo_backend no -m data.extract_latents ...   # on CPUs
    accelerate launch --multi_gpu --num_processes 8 -m data.extract_latents ...   # on GPUs

Clip i of the dataset (the video ``i`` in sorted order, its clip chosen by
``sample_seed(seed, i)``) goes to row ``i % shard_size`` of shard ``i // shard_size``.
Rank r of W processes encodes the shards k with k % W == r, in batches that never cross a
shard boundary, so the bytes written depend neither on the number of processes nor on
which shards an interrupted run had finished (given the same ``batch_size`` and, on CPU,
the same threads per process: ``cpu_threads``). Each shard is written atomically with its
clips' metadata in the safetensors header; re-running the command skips complete shards.
When every rank is done, rank 0 writes ``skipped_files.txt`` and finally ``manifest.json``.
See ``data/latents.py`` for the directory format and docs/data.md for the whole workflow.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch
from omegaconf import DictConfig
from safetensors import safe_open
from safetensors.torch import save_file

from configs.entry import entry_point
from configs.files import atomic_output_path, atomic_write_text, is_temporary
from configs.logs import get_logger, progress
from configs.processes import end_processes, process_state
from configs.schema import config_path, data_identity
from data.datasets import CONFIG_KEYS, VideoClipDataset, build_video_dataset, frame_size
from data.latents import (
    EMPTY_CAPTION_NAME,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST_NAME,
    SHARD_METADATA_KEY,
    SKIPPED_NAME,
    canonical_json,
    shard_files,
    shard_name,
)
from data.sampler import sample_seed
from data.text import TextEncoder
from data.vae import VideoVAE, build_vae

logger = get_logger(__name__)

_SHOWN_SKIPS = 20
_UMASK = os.umask(0o022)
os.umask(_UMASK)


class ExtractionError(RuntimeError):
    """The extraction cannot start or continue (bad settings, or an out dir of other latents)."""


# --------------------------------------------------------------------------- settings


def clip_fps(dataset: VideoClipDataset) -> float:
    """Frame rate of the extracted clips: target_fps, or the most common source rate / stride."""
    if dataset.target_fps is not None:
        return float(dataset.target_fps)
    rates = [round(entry.info.fps, 3) for entry in dataset.entries]
    common = max(sorted(set(rates)), key=rates.count)
    return round(common / dataset.frame_stride, 3)


def clip_record(dataset: VideoClipDataset, index: int, key_seed: int) -> dict:
    """Source path, frame indices, label (and caption, if any) of video ``index``'s clip for the key seed."""
    entry = dataset.entries[index]
    frames = dataset.frame_indices(index, key_seed)
    record = {"path": str(entry.path), "frames": [int(f) for f in frames], "label": int(entry.label)}
    if entry.caption is not None:
        record["caption"] = entry.caption
    return record


def planned_clip(dataset: VideoClipDataset, index: int, seed: int) -> dict:
    """Clip ``index`` of the extraction: its dataset key is ``(index, sample_seed(seed, index))``."""
    return clip_record(dataset, index, sample_seed(seed, index))


def plan_hash(clips: list[dict]) -> str:
    return hashlib.sha256(canonical_json(clips).encode()).hexdigest()


# --------------------------------------------------------------------------- shards on disk


def read_shard_metadata(path: Path) -> tuple[dict, list[int]] | None:
    """(metadata, latents shape) of a shard file, or None when it cannot be read."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = json.loads((handle.metadata() or {})[SHARD_METADATA_KEY])
            shape = list(handle.get_slice("latents").get_shape())
            labels = list(handle.get_slice("labels").get_shape())
    except Exception:
        return None
    if labels != shape[:1]:
        return None
    return metadata, shape


def write_shard(path: Path, tensors: dict[str, torch.Tensor], metadata: dict) -> None:
    """Write one shard's tensors (``latents``, ``labels``, optional ``text`` / ``text_lengths``) atomically."""
    tensors = {name: tensor.contiguous() for name, tensor in tensors.items()}
    with atomic_output_path(path) as temporary:
        save_file(tensors, str(temporary), metadata={SHARD_METADATA_KEY: canonical_json(metadata)})
        os.chmod(temporary, 0o666 & ~_UMASK)  # safetensors creates 0600 files; shards are shared data


def remove_stale_temporaries(out: Path) -> list[str]:
    """Delete hidden temporary files that an interrupted run left in ``out``."""
    removed = []
    for path in sorted(out.glob(".*")):
        if path.is_file() and is_temporary(path):
            path.unlink(missing_ok=True)
            removed.append(path.name)
    return removed


def scan_shards(out: Path, settings: dict, plans: list[dict], num_shards: int) -> list[int]:
    """Indices of the shards already complete in ``out``.

    Raises ExtractionError when ``out`` holds latents of other settings or other data, so
    that they are never mixed with this extraction's.
    """
    restart = "use a new out= directory, or delete this one to start over"
    done = []
    for path in shard_files(out):
        try:
            shard = int(path.name[len("shard_") : -len(".safetensors")])
        except ValueError:
            continue
        if shard >= num_shards:
            raise ExtractionError(
                f"out={out} holds {path.name}, beyond the {num_shards} shard(s) of this dataset: it holds "
                f"latents of other data or settings; {restart}"
            )
        found = read_shard_metadata(path)
        if found is None:  # not produced by a finished write: encode it again
            logger.warning(f"{path} is unreadable; encoding it again")
            continue
        metadata, shape = found
        if metadata.get("settings") != settings:
            old = metadata.get("settings") or {}
            differing = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            raise ExtractionError(
                f"out={out} holds {path.name} made with other settings (differing: {differing}); "
                f"re-run with the same settings to finish that extraction, or {restart}"
            )
        if metadata.get("plan") != plans[shard]["hash"] or shape[0] != len(plans[shard]["clips"]):
            raise ExtractionError(
                f"out={out} holds {path.name} with other clips than this dataset gives for that shard "
                f"(were videos added, removed or changed since?); {restart}"
            )
        done.append(shard)
    return done


# --------------------------------------------------------------------------- extraction


def _batches(shards: list[int], plans: list[dict], shard_size: int, batch_size: int, seed: int) -> list[list]:
    """Dataset keys in batches of at most ``batch_size`` that never cross a shard boundary."""
    batches = []
    for shard in shards:
        first = shard * shard_size
        indices = list(range(first, first + len(plans[shard]["clips"])))
        for start in range(0, len(indices), batch_size):
            batches.append([(i, sample_seed(seed, i)) for i in indices[start : start + batch_size]])
    return batches


def extract(cfg: DictConfig) -> dict:
    """Run the extraction described by an ``extract_latents`` config; returns the report (rank 0)."""
    out = config_path(cfg, "out")
    batch_size, shard_size, seed = cfg.batch_size, cfg.shard_size, cfg.seed
    if cfg.cpu_threads is not None:
        torch.set_num_threads(cfg.cpu_threads)
    if torch.cuda.is_available():  # the same bytes on every run
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False

    state = process_state()
    rank, world, main = state.process_index, state.num_processes, state.is_main_process
    started = time.perf_counter()

    # VAE and clip shape first: a clip shape the VAE cannot encode fails before probing any file.
    if cfg.data.get("name") not in CONFIG_KEYS:
        raise ExtractionError(
            f"data={cfg.data.get('name')} cannot be extracted: extraction reads video clips, use "
            f"data={' or data='.join(CONFIG_KEYS)}"
        )
    vae: VideoVAE = build_vae(cfg.vae, device=state.device)
    num_frames = cfg.data.get("num_frames")
    if not isinstance(num_frames, int) or isinstance(num_frames, bool):
        raise ExtractionError(f"data.num_frames must be an integer, got {num_frames!r}")
    latent_shape = list(vae.latent_shape(num_frames, *frame_size(cfg.data.get("resolution"))))
    text_path = config_path(cfg.text_encoder, "path")
    text_encoder = None if text_path is None else TextEncoder(text_path, max_length=cfg.text_encoder.max_length,
                                                              device=state.device)
    dataset = build_video_dataset(cfg.data, seed=seed)
    if text_encoder is not None:
        dataset.keep_captioned()
    probe_skipped = list(dataset.skipped)  # read failures are added from the shards at the end

    identity = vae.identity_key()
    num_clips = len(dataset)
    num_shards = -(-num_clips // shard_size)
    settings = {
        "format": FORMAT, "version": FORMAT_VERSION,
        "vae": {"name": identity["name"], "config_hash": identity["config_hash"]},
        "data": data_identity(cfg.data), "seed": seed, "shard_size": shard_size, "num_clips": num_clips,
        "latent_shape": latent_shape,
    }
    if text_encoder is not None:
        text_identity = text_encoder.identity_key()
        settings["text_encoder"] = {k: text_identity[k] for k in ("config_hash", "max_length")}
    plans = []
    for shard in range(num_shards):
        clips = [planned_clip(dataset, i, seed) for i in range(shard * shard_size, min(num_clips, (shard + 1) * shard_size))]
        plans.append({"clips": clips, "hash": plan_hash(clips)})

    # Resume: stale temporaries go, complete shards stay, the old manifest goes if work remains.
    if main:
        out.mkdir(parents=True, exist_ok=True)
        for name in remove_stale_temporaries(out):
            logger.info(f"removed stale temporary file {out / name}")
    state.wait_for_everyone()
    done = set(scan_shards(out, settings, plans, num_shards))
    pending = [k for k in range(num_shards) if k not in done]
    state.wait_for_everyone()  # every rank has scanned before any rank writes
    if main and pending and (out / MANIFEST_NAME).exists():
        (out / MANIFEST_NAME).unlink()  # readers must never see a manifest while shards are missing
    pending_clips = sum(len(plans[k]["clips"]) for k in pending)
    logger.info(f"{num_clips} clips from {dataset.source} -> latents {tuple(latent_shape)} with {vae.name} VAE; "
        f"{num_shards} shard(s) of up to {shard_size} clips in {out}; {len(done)} already complete, "
        f"{len(pending)} to encode ({pending_clips} clips) on {world} process(es)")

    mine = [k for k in pending if k % world == rank]
    encode_started = time.perf_counter()
    _encode_shards(cfg, dataset, vae, text_encoder, out, mine, plans, settings, shard_size, batch_size, seed, world)
    state.wait_for_everyone()
    encode_seconds = time.perf_counter() - encode_started

    report = {}
    if main:
        report = _finish(out, dataset, probe_skipped, identity, text_encoder, settings, plans, latent_shape, cfg)
        report.update(clips_encoded=pending_clips, encode_seconds=encode_seconds,
                      total_seconds=time.perf_counter() - started, shards_reused=len(done), processes=world)
        _print_report(report, out)
    state.wait_for_everyone()
    # Drop everything before tearing down the process group (avoids the gloo abort at exit).
    del vae, dataset, text_encoder
    end_processes(state)
    return report


def _encode_shards(cfg, dataset, vae, text_encoder, out, shards, plans, settings, shard_size, batch_size, seed, world):
    """Encode ``shards`` (this rank's) and write each as soon as its last batch is done.

    With a text encoder, each clip's caption embedding is stored trimmed to the longest
    caption of its shard (``text``, (n, L, D)) with each caption's token count (``text_lengths``).
    """
    batches = _batches(shards, plans, shard_size, batch_size, seed)
    if not batches:
        return
    num_workers = int(cfg.data.get("num_workers") or 0)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=num_workers)
    total = sum(len(b) for b in batches)
    bar = progress(total=total, unit="clip", desc=f"encode (rank 0 of {world})")
    pieces, rows, started = [], [], time.perf_counter()
    for keys, batch in zip(batches, loader):
        shard = keys[0][0] // shard_size
        piece = {"latents": vae.encode(batch["video"].to(vae_device(vae))).cpu(), "labels": batch["label"]}
        if text_encoder is not None:
            captions = [dataset.entries[served].caption for served in batch["index"].tolist()]
            piece["text"], piece["text_lengths"] = text_encoder.encode(captions)
        pieces.append(piece)
        for (index, _), served in zip(keys, batch["index"].tolist()):
            rows.append((index, served))
        bar.update(len(keys))
        if world > 1:
            bar.set_postfix_str(f"all ranks ~{bar.n * world / (time.perf_counter() - started):.1f} clip/s")
        if len(rows) == len(plans[shard]["clips"]):
            tensors = {name: torch.cat([p[name] for p in pieces]) for name in pieces[0]}
            tensors["labels"] = tensors["labels"].to(torch.int64)
            if "text" in tensors:
                tensors["text"] = tensors["text"][:, : int(tensors["text_lengths"].max())]
            clips = []
            for index, served in rows:
                clip = clip_record(dataset, served, sample_seed(seed, index))
                if served != index:  # the video failed to decode now; the dataset served the next one
                    clip["replaces"] = str(dataset.entries[index].path)
                clips.append(clip)
            metadata = {"settings": settings, "shard": shard, "plan": plans[shard]["hash"], "clips": clips}
            write_shard(out / shard_name(shard), tensors, metadata)
            pieces, rows = [], []
    bar.close()


def vae_device(vae: VideoVAE) -> torch.device:
    model = getattr(vae, "model", None)
    return model.device if model is not None else torch.device("cpu")


def _finish(out, dataset, probe_skipped, identity, text_encoder, settings, plans, latent_shape, cfg) -> dict:
    """Rank 0, after every shard is complete: skipped_files.txt, the empty caption's embedding, then manifest.json."""
    shards, clips, read_failures = [], [], []
    for shard in range(len(plans)):
        path = out / shard_name(shard)
        found = read_shard_metadata(path)
        if found is None or found[0].get("plan") != plans[shard]["hash"]:
            raise ExtractionError(f"{path} is missing or incomplete after every process finished")
        metadata, shape = found
        for row, clip in enumerate(metadata["clips"]):
            clips.append({**clip, "shard": shard, "row": row})
            if "replaces" in clip:
                read_failures.append((clip["replaces"], f"read failed during extraction; clip taken from {clip['path']}"))
        shards.append({"file": path.name, "num_clips": shape[0], "bytes": path.stat().st_size})
    skipped = list(probe_skipped) + read_failures
    dataset.skipped = skipped
    dataset.write_skipped_report(out / SKIPPED_NAME)
    labels = sorted({clip["label"] for clip in clips})
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "vae": identity,
        "data": settings["data"],
        "seed": settings["seed"],
        "latent_shape": latent_shape,
        "dtype": "float32",
        "num_clips": len(clips),
        "num_classes": int(cfg.data.get("num_classes") or 0),
        "classes": list(dataset.classes),
        "labels_present": labels,
        "fps": clip_fps(dataset),
        "shard_size": settings["shard_size"],
        "num_shards": len(shards),
        "shards": shards,
        "skipped": [[str(p), str(r)] for p, r in skipped],
        "clips": clips,
    }
    if text_encoder is not None:
        embedding, length = text_encoder.encode([""])
        write_shard(out / EMPTY_CAPTION_NAME, {"text": embedding[:, : int(length.max())], "text_lengths": length},
                    {"caption": ""})
        manifest["text_encoder"] = text_encoder.identity_key()
        manifest["text_dim"] = text_encoder.dim
    atomic_write_text(out / MANIFEST_NAME, manifest_text(manifest))
    return {"num_clips": len(clips), "num_shards": len(shards), "skipped": skipped}


def manifest_text(manifest: dict) -> str:
    """JSON with sorted keys, one key per line and one list entry (clip, shard, skip) per line."""
    lines = []
    for key, value in sorted(manifest.items()):
        if isinstance(value, list) and value and isinstance(value[0], (dict, list)):
            text = "[\n" + ",\n".join("  " + canonical_json(item) for item in value) + "\n ]"
        else:
            text = canonical_json(value)
        lines.append(f" {json.dumps(key)}: {text}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def _print_report(report: dict, out: Path) -> None:
    rate = report["clips_encoded"] / report["encode_seconds"] if report["encode_seconds"] > 0 else 0.0
    logger.info(
        f"done: encoded {report['clips_encoded']} clips in {report['encode_seconds']:.1f} s ({rate:.2f} clips/s on "
        f"{report['processes']} process(es)); {report['shards_reused']} shard(s) were already complete; "
        f"{report['num_clips']} clips in {report['num_shards']} shard(s); total {report['total_seconds']:.1f} s",
    )
    skipped = report["skipped"]
    if skipped:
        logger.info(f"skipped {len(skipped)} file(s) (listed in {out / SKIPPED_NAME}):")
        for path, reason in skipped[:_SHOWN_SKIPS]:
            logger.info(f"  {path}: {reason}")
        if len(skipped) > _SHOWN_SKIPS:
            logger.info(f"  ... and {len(skipped) - _SHOWN_SKIPS} more")
    else:
        logger.info("skipped 0 files")
    logger.info(f"manifest: {out / MANIFEST_NAME}")


main = entry_point("extract_latents")(extract)


if __name__ == "__main__":
    main()
