"""eval.demo_score: the demo shape classifier, the score of generated videos, and where it is used
(`python -m eval.demo_score`, train.score_every, sample.py, eval.report)."""

import json
import shutil
import sys

import numpy as np
import pytest
import torch

from configs.entry import compose_config
from data.demo import GENERATOR_VERSION, SHAPE_NAMES, render_clip
from data.video import write_mp4
from dit.families import model_family
from eval.demo_score import (
    EXTRA_HELD_OUT_PER_CLASS,
    DemoScoreError,
    build_demo_classifier,
    cache_key,
    classify_videos,
    demo_spec,
    headline,
    is_demo_run,
    load_demo_classifier,
    score_model,
    score_videos,
)
from eval.generation import load_sampling_setup
from eval.metrics import read_metrics
from eval.report import run as write_report
from tests.runs import TINY, run, run_command, train

SCORE_KEYS = ("class_accuracy", "confident_fraction", "reject_fraction", "real_accuracy")
DEMO_METRICS = ("demo_class_accuracy", "demo_confident_fraction", "demo_reject_fraction")


def demo_data(root, *overrides):
    """The checked ``data=demo`` node of train.py's config, its clips under ``root``."""
    return compose_config("train", [f"data.root={root}", *overrides]).data


def assert_fraction(value, what):
    assert isinstance(value, float) and 0.0 <= value <= 1.0, f"{what}={value!r}"


# ------------------------------------------------------------------------------ the classifier, in-process


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The classifier of the default size (4 classes, 16 frames of 32²) for 64 demo clips, built once and cached."""
    tmp = tmp_path_factory.mktemp("demo_score")
    data_cfg = demo_data(tmp / "demo", "data.num_videos=64")
    classifier, record = load_demo_classifier(data_cfg, cache_dir=tmp / "cache")
    return classifier, record, data_cfg, tmp / "cache"


def test_classifier_recognises_held_out_real_clips(built):
    classifier, record, data_cfg, cache_dir = built
    assert not record["cached"]
    assert record["classes"] == [*SHAPE_NAMES[:4], "no shape"]
    assert record["held_out_demo_files"] == 16 and record["held_out_clips"] == 16 + 4 * EXTRA_HELD_OUT_PER_CLASS
    assert record["real_accuracy"] >= 0.95 and record["real_accuracy_demo_files"] >= 0.95
    assert record["negatives_rejected"] >= 0.9

    # Fresh clips from a seed neither the demo files nor the build use, with their labels.
    rng = np.random.default_rng(987654)
    labels = [i % 4 for i in range(24)]
    clips = np.stack([render_clip(SHAPE_NAMES[y], 16, 32, rng) for y in labels])
    scores = score_videos(clips, labels, classifier, record)
    assert scores["class_accuracy"] >= 0.95 and scores["confident_fraction"] >= 0.75, scores
    assert scores["reject_fraction"] <= 0.05 and scores["num_clips"] == 24
    assert scores["real_accuracy"] == record["real_accuracy"]
    assert sum(scores["predicted_counts"]) == 24 and len(scores["predicted_counts"]) == 5
    json.dumps(scores)  # plain values only
    assert "class accuracy" in headline(scores) and "24 generated clips" in headline(scores)

    # A second call loads the cached files: the same weights bit for bit, no rebuild.
    again, cached = load_demo_classifier(data_cfg, cache_dir=cache_dir)
    assert cached["cached"] and cached["real_accuracy"] == record["real_accuracy"]
    state, loaded = classifier.state_dict(), again.state_dict()
    assert state.keys() == loaded.keys()
    for key, value in state.items():
        assert torch.equal(value, loaded[key]), key
    assert not again.training
    # Weights then the record that marks completion, and no temporary files left behind.
    assert sorted(p.suffix for p in cache_dir.iterdir()) == [".json", ".safetensors"]
    # A classifier cached for another drawing of the shapes is never reused: the key holds the generator version.
    spec = demo_spec(data_cfg)
    assert spec["generator_version"] == GENERATOR_VERSION
    assert cache_key(spec) != cache_key({**spec, "generator_version": GENERATOR_VERSION - 1})


def test_noise_and_blotches_score_at_most_chance(built):
    classifier, record, _, _ = built
    rng = np.random.default_rng(0)
    n = 32
    labels = [i % 4 for i in range(n)]
    uniform = rng.integers(0, 256, (n, 16, 32, 32, 3), dtype=np.uint8)
    gaussian = np.clip(rng.normal(128, 60, (n, 16, 32, 32, 3)), 0, 255).astype(np.uint8)
    # Coloured 4×4 blotches on the dark background: what an untrained demo DiT draws.
    cells = (rng.random((n, 16, 8, 8, 1)) < 0.2) * rng.integers(1, 256, (n, 16, 8, 8, 3))
    blotches = np.where(cells > 0, cells, np.array([18, 18, 28])).repeat(4, 2).repeat(4, 3).astype(np.uint8)
    for name, videos in (("uniform", uniform), ("gaussian", gaussian), ("blotches", blotches)):
        scores = score_videos(videos, labels, classifier, record)
        assert scores["class_accuracy"] <= 0.3, (name, scores)  # chance is 0.25; rejected clips count as wrong
        assert scores["confident_fraction"] <= 0.1, (name, scores)
    probs = classify_videos(classifier, uniform)
    assert probs.shape == (n, 5) and torch.allclose(probs.sum(1), torch.ones(n))


def test_unconditional_scores_and_bad_input(built):
    classifier, record, _, _ = built
    rng = np.random.default_rng(1)
    videos = np.stack([render_clip(SHAPE_NAMES[i], 16, 32, rng) for i in (0, 1, 2)])
    scores = score_videos(videos, None, classifier, record)
    assert scores["class_accuracy"] is None and scores["num_clips"] == 3
    assert_fraction(scores["confident_fraction"], "confident_fraction")
    assert "confident" in headline(scores) and "class accuracy" not in headline(scores)

    with pytest.raises(ValueError, match="3 videos but 2 labels"):
        score_videos(videos, [0, 1], classifier, record)
    with pytest.raises(ValueError, match="uint8"):
        score_videos(videos.astype(np.float32), None, classifier, record)
    with pytest.raises(ValueError, match=r"uint8 \(N, T, H, W, 3\)"):
        score_videos(videos[0], None, classifier, record)  # one clip without the batch axis
    with pytest.raises(ValueError, match="no videos"):
        score_videos(videos[:0], None, classifier, record)


def test_build_is_deterministic(tmp_path):
    data_cfg = demo_data(tmp_path / "demo", "data.num_videos=8", "data.num_frames=4", "data.resolution=16")
    small = {"epochs": 1, "extra_train_per_class": 4, "extra_held_out_per_class": 2}
    first, record_a = build_demo_classifier(data_cfg, **small)
    second, record_b = build_demo_classifier(data_cfg, **small)
    for key, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[key]), key
    record_a.pop("build_seconds"), record_b.pop("build_seconds")
    assert record_a == record_b
    # 8 files = 2 rounds of 4 classes, fewer than 4 rounds: the last round is held out.
    assert record_a["held_out_demo_files"] == 4 and record_a["held_out_clips"] == 4 + 4 * 2
    assert record_a["train_clips"] == 4 + 4 * 4 and record_a["epochs"] == 1


def test_data_other_than_demo_is_refused(tmp_path):
    run_cfg = compose_config("train", ["data=videos", f"data.root={tmp_path}"])
    assert not is_demo_run(run_cfg) and is_demo_run(compose_config("train", [f"data.root={tmp_path}"]))
    for call in (lambda: demo_spec(run_cfg.data), lambda: load_demo_classifier(run_cfg.data, cache_dir=tmp_path)):
        with pytest.raises(DemoScoreError, match="needs data=demo") as excinfo:
            call()
        assert isinstance(excinfo.value, ValueError) and "this run used data='videos'" in str(excinfo.value)
    assert not list(tmp_path.iterdir())  # nothing built, nothing cached


# ------------------------------------------------------------------------------ the commands, on one tiny run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, env):
    """A TINY demo run of 4 steps that logs the demo score every 2 steps (2 clips each)."""
    run_dir = tmp_path_factory.mktemp("demo_run") / "run"
    result = train(run_dir, "train.max_steps=4", "train.num_val_samples=0", "train.score_every=2",
                   "train.score_num_samples=2", env=env)
    return run_dir, result


def score_command(run_dir, *overrides, env, check=True):
    return run_command([sys.executable, "-m", "eval.demo_score", run_dir, *overrides], env=env, check=check)


@pytest.fixture(scope="module")
def scored(tiny_run, env):
    """`python -m eval.demo_score <run dir> num_samples=4 steps=2` on the tiny run: (its result file, the result)."""
    run_dir, _ = tiny_run
    result = score_command(run_dir, "num_samples=4", "steps=2", env=env)
    out = run_dir / "demo_score" / "score_step00000004.json"
    assert out.is_file(), result.stdout + result.stderr
    assert "demo score:" in result.stdout + result.stderr
    return out, json.loads(out.read_text())


def test_training_logs_the_demo_score(tiny_run):
    run_dir, result = tiny_run
    assert "demo score:" in result.stdout + result.stderr
    logged = [r for r in read_metrics(run_dir) if any(key in r for key in DEMO_METRICS)]
    assert [r["step"] for r in logged] == [2, 4], logged
    for record in logged:
        for key in DEMO_METRICS:
            assert_fraction(record[key], key)
            assert record[key] * 2 == round(record[key] * 2), record  # 2 clips: a multiple of 1/2


def test_score_every_refuses_data_other_than_demo(tmp_path, env):
    videos = tmp_path / "videos"
    rng = np.random.default_rng(0)
    for i in range(2):
        write_mp4(videos / f"clip{i}.mp4", rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8), fps=8)
    tiny_videos = [o for o in TINY if not o.startswith("data.")]
    result = run("train.py", *tiny_videos, "data=videos", f"data.root={videos}", "data.num_frames=4",
                 "data.resolution=16", "data.num_workers=0", "train.max_steps=2", "train.score_every=2",
                 f"hydra.run.dir={tmp_path / 'run'}", env=env, check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "train.score_every" in output and "data=videos" in output, output
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_command_scores_the_latest_checkpoint(tiny_run, scored, env):
    run_dir, _ = tiny_run
    out, score = scored
    for key in SCORE_KEYS:
        assert_fraction(score[key], key)
    assert score["num_clips"] == 4 and sum(score["predicted_counts"]) == 4
    assert score["real_accuracy"] >= 0.9  # 4-frame 16² clips are still easy to tell apart
    assert score["checkpoint"]["step"] == 4 and score["checkpoint"]["weights"] == "ema"
    assert score["checkpoint"]["path"] == str((run_dir / "checkpoints" / "step_00000004").resolve())
    assert score["sampling"]["num_samples"] == 4 and score["sampling"]["steps"] == 2
    assert score["classifier"]["cached"]  # train.score_every built it into the same cache
    assert score["classifier"]["real_accuracy"] == score["real_accuracy"]

    # Same checkpoint, same seeds: same videos, same score; and the real-versus-generated picture.
    first = out.read_text()
    png = run_dir / "frames.png"
    score_command(run_dir, "num_samples=4", "steps=2", f"frames_png={png}", env=env)
    again = json.loads(out.read_text())
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert {k: again[k] for k in (*SCORE_KEYS, "predicted_counts", "num_clips")} == \
        {k: score[k] for k in (*SCORE_KEYS, "predicted_counts", "num_clips")}, first


def test_command_names_an_unknown_key(tiny_run, env):
    run_dir, _ = tiny_run
    result = score_command(run_dir, "num_sample=4", env=env, check=False)
    assert result.returncode != 0
    assert "num_sample" in result.stderr + result.stdout
    assert "Key 'num_sample' is not in struct" in result.stderr + result.stdout


def test_sample_writes_the_demo_score(tiny_run, tmp_path, env):
    run_dir, _ = tiny_run
    out = tmp_path / "videos"
    result = run("sample.py", f"checkpoint={run_dir}", "num_samples=2", "steps=2", f"out_dir={out}", env=env)
    assert "demo score:" in result.stdout + result.stderr
    assert sorted(p.name for p in out.glob("*.mp4")) == ["grid.mp4", "sample_000_class0.mp4", "sample_001_class1.mp4"]
    score = json.loads((out / "demo_score.json").read_text())
    assert score["num_clips"] == 2 and sum(score["predicted_counts"]) == 2
    for key in SCORE_KEYS:
        assert_fraction(score[key], key)


def report_row(run_dir, out):
    """The report's table as {column: value} for the one run."""
    report = write_report(compose_config("report", [str(run_dir), f"out={out}", "val_clips=0"], positional_key="runs"))
    lines = [line for line in report.read_text().splitlines() if line.startswith("|")]
    header, row = ([cell.strip() for cell in line.strip("|").split("|")] for line in (lines[0], lines[2]))
    assert len(lines) == 3 and len(header) == len(row), lines
    summary = json.loads((out / "report.json").read_text())
    return dict(zip(header, row)), summary[0]


def test_report_shows_the_demo_score(tiny_run, scored, tmp_path):
    run_dir, _ = tiny_run
    _, score = scored
    # The command's result file comes first ...
    row, summary = report_row(run_dir, tmp_path / "report")
    expected = f"{score['class_accuracy']:.0%} (4 clips)"
    assert row["demo score"] == expected and summary["demo_score"] == expected
    # ... else the score train.score_every logged last.
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("demo_score"))
    last = [r for r in read_metrics(copy) if "demo_class_accuracy" in r][-1]
    row, _ = report_row(copy, tmp_path / "report_copy")
    assert row["demo score"] == f"{last['demo_class_accuracy']:.0%} (step 4)"



# ------------------------------------------------------------------------------ training raises the score


def test_a_short_training_run_raises_the_score_above_the_untrained_models(tmp_path, env):
    """The TINY demo run, 200 steps under the default schedule: its generated clips score higher than
    those of the same model untrained (same classifier, seeds and sampler), which draws no shape.
    Width 64 and 2x2 patches: a TINY clip's shapes are 8 to 11 pixels across, and 4x4 tokens of a
    32-wide model draw only blurred blobs in 200 steps (class probability 0.016)."""
    run_dir = tmp_path / "run"
    train(run_dir, "train.max_steps=200", "train.num_val_samples=0", "train.checkpoint_every=200",
          "model.patch_size=[1,2,2]", "model.hidden_size=64", "model.num_heads=4", env=env)
    trained, vae, run_cfg = load_sampling_setup(run_dir, "cpu")
    classifier, record = load_demo_classifier(run_cfg.data)
    torch.manual_seed(0)
    untrained = model_family(run_cfg).build((trained.in_channels, *trained.input_size)).eval()
    settings = {"num_samples": 16, "steps": 25, "cfg_scale": 4.0, "seed": 0, "batch_size": 16, "device": "cpu"}
    before = score_model(untrained, vae.decode, run_cfg, classifier=classifier, record=record, **settings)
    after = score_model(trained, vae.decode, run_cfg, classifier=classifier, record=record, **settings)
    assert before["reject_fraction"] == 1.0 and before["class_accuracy"] == 0.0, before  # a blank clip
    assert after["class_probability"] > 2 * before["class_probability"] + 0.05, (before, after)
    assert after["reject_fraction"] < before["reject_fraction"], (before, after)
