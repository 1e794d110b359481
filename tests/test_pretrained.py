"""Converting a pretrained diffusers Wan2.1 transformer, and the whole text-to-video workflow, on tiny models.

Every component is a real, randomly initialised diffusers / transformers model built from a
config and saved to a temporary folder (tests/wan_fixtures.py): WanTransformer3DModel,
AutoencoderKLWan, UMT5EncoderModel with a word-level tokenizer.
"""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import pytest
import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    WanPipeline,
    WanTransformer3DModel,
)
from omegaconf import OmegaConf
from safetensors.torch import load_file

from attention import build_attention_core, rotary_tables_from_wan
from attention.reference import reference_core_output
from configs.entry import compose_config
from data.latents import LatentDataset
from data.text import TextEncoder, TextEncoderError
from dit.checkpoint import save_checkpoint, save_state_dict
from dit.pretrained import (
    TRANSFORMER_CONFIG,
    ConvertedSelfAttention,
    PretrainedModelError,
    convert_attention,
    converted_processors,
    load_converted,
    load_pretrained_transformer,
    record_grid,
)
from sample import conditions_of
from tests.paths import REPO_ROOT
from tests.runs import TIMEOUT_S, launch, run, run_command
from tests.wan_fixtures import (
    CAPTIONS,
    save_captioned_videos,
    save_tiny_text_encoder,
    save_tiny_wan_pipeline,
    tiny_transformer,
)

MHLA = {"name": "mhla", "layout": [3, 1, 2], "mixing_init": "locality", "normalize": False, "gate": True,
        "feature_map": "relu", "eps": 1e-6}
VARIANTS = [
    {"name": "linear", "feature_map": "relu", "normalize": True, "eps": 1e-6},
    {"name": "hla", "order": 2, "factors": "tied", "rank": 4, "activation": "elu", "normalize": True, "eps": 1e-6},
    MHLA,
]


def latents(grid=(3, 4, 6), batch=2, seed=0):
    """Wan latents (B, 4, T, 2H, 2W) for a token grid (T, H, W) of the tiny transformer's (1, 2, 2) patches."""
    t, h, w = grid
    return torch.randn(batch, 4, t, 2 * h, 2 * w, generator=torch.Generator().manual_seed(seed))


def run_transformer(model, x, seed=1):
    text = torch.randn(x.shape[0], 7, 32, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(x, torch.tensor([500.0] * x.shape[0]), encoder_hidden_states=text, return_dict=False)[0]


def randomize(module):
    """Move the new parameters off their init (zero gates, identity norms) so that a test can see them."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return module


# --------------------------------------------------------------------------- conversion


def test_softmax_conversion_is_the_stock_model():
    stock, converted = tiny_transformer(), tiny_transformer()
    assert convert_attention(converted, {"name": "softmax"}) is converted
    assert isinstance(converted, WanTransformer3DModel) and not converted_processors(converted)
    x = latents()
    torch.testing.assert_close(run_transformer(converted, x), run_transformer(stock, x), rtol=1e-5, atol=1e-6)

    # A converted processor running linvid's softmax core (Wan's projections, norms and RoPE tables
    # through linvid's code path) gives the stock output too.
    for block in converted.blocks:
        core = build_attention_core({"name": "softmax"}, dim=24, num_heads=2)
        block.attn1.set_processor(ConvertedSelfAttention(core))
    converted.register_forward_pre_hook(record_grid, with_kwargs=True)
    torch.testing.assert_close(run_transformer(converted, x), run_transformer(stock, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v["name"])
def test_each_converted_layer_equals_its_oracle_on_its_inputs(variant):
    torch.manual_seed(0)
    model = randomize(convert_attention(tiny_transformer(), variant, grid=(3, 4, 6)))
    captured = []
    attn = model.blocks[1].attn1
    attn.register_forward_hook(lambda module, args, kwargs, out: captured.append((args, kwargs, out)), with_kwargs=True)
    run_transformer(model, latents())
    (args, kwargs, out), = captured
    hidden, rotary = args[0], args[3] if len(args) > 3 else kwargs.get("rotary_emb")
    processor = attn.processor
    heads = lambda x: x.unflatten(2, (attn.heads, -1)).transpose(1, 2)
    q, k, v = heads(attn.norm_q(attn.to_q(hidden))), heads(attn.norm_k(attn.to_k(hidden))), heads(attn.to_v(hidden))
    core = processor.core
    expected = reference_core_output(core, q, k, v, (3, 4, 6), rotary_tables_from_wan(rotary))
    if core.out_norm is not None:
        expected = core.out_norm(expected)
    expected = core.gate(hidden, expected.transpose(1, 2).flatten(2))
    expected = attn.to_out[0](expected)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_hybrid_pattern_puts_each_variant_in_its_block():
    model = tiny_transformer(num_layers=5)
    hybrid = {"name": "hybrid", "pattern": ["mhla", "mhla", "softmax"], "variants": {"mhla": MHLA, "softmax": {"name": "softmax"}}}
    convert_attention(model, hybrid, grid=(3, 4, 6))
    kinds = [getattr(block.attn1.processor, "core", None) for block in model.blocks]
    assert [k.variant if k is not None else "softmax" for k in kinds] == ["mhla", "mhla", "softmax", "mhla", "mhla"]
    assert type(model.blocks[2].attn1.processor).__name__ == "WanAttnProcessor"  # softmax blocks stay stock
    new = {name for name, _ in model.named_parameters() if ".processor." in name}
    assert new and all(name.split(".")[1] in {"0", "1", "3", "4"} for name in new)
    assert model.blocks[0].attn2.processor.__class__.__name__ == "WanAttnProcessor"  # cross-attention untouched


def test_a_grid_the_mhla_layout_cannot_divide_still_runs():
    model = randomize(convert_attention(tiny_transformer(), MHLA, grid=(3, 4, 6)))
    for grid in [(3, 4, 6), (5, 3, 7), (1, 1, 1), (2, 5, 1)]:  # divisible, ragged, smaller than the layout
        out = run_transformer(model, latents(grid, batch=1))
        assert out.shape == latents(grid, batch=1).shape and torch.isfinite(out).all(), grid


def test_save_then_load_gives_the_same_outputs(tmp_path):
    model = randomize(convert_attention(tiny_transformer(), VARIANTS[1]))
    config = OmegaConf.create({"model": {"family": "wan", "reference_grid": [21, 30, 52]}, "attention": VARIANTS[1]})
    architecture = json.dumps({k: v for k, v in dict(model.config).items() if not k.startswith("_")})
    writers = {
        "model.safetensors": lambda p: save_state_dict(model.state_dict(), p),
        "ema.safetensors": lambda p: save_state_dict(model.state_dict(), p),
        "config.yaml": lambda p: OmegaConf.save(config, p),
        "trainer_state.json": lambda p: p.write_text("{}"),
        TRANSFORMER_CONFIG: lambda p: p.write_text(architecture),
    }
    save_checkpoint(tmp_path / "run", 1, writers)
    loaded = load_converted(tmp_path / "run")
    assert isinstance(loaded, WanTransformer3DModel) and sorted(converted_processors(loaded)) == [0, 1]
    x = latents((3, 2, 3))
    torch.testing.assert_close(run_transformer(loaded, x), run_transformer(model, x), rtol=1e-6, atol=1e-6)


def test_wan_pipeline_runs_a_converted_model(tmp_path):
    from diffusers import AutoencoderKLWan

    root = save_tiny_wan_pipeline(tmp_path / "wan")
    model = convert_attention(load_pretrained_transformer(root / "transformer"), MHLA)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, transformer=model,
                       vae=AutoencoderKLWan.from_pretrained(root / "vae"), scheduler=FlowMatchEulerDiscreteScheduler(shift=3))
    embeds = torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(0))
    video = pipe(prompt_embeds=embeds, negative_prompt_embeds=torch.zeros_like(embeds), height=32, width=32,
                 num_frames=5, num_inference_steps=2, guidance_scale=3.0, output_type="np").frames[0]
    assert video.shape == (5, 32, 32, 3) and (video >= 0).all() and (video <= 1).all()


# --------------------------------------------------------------------------- refusals


def test_bad_pretrained_paths_name_model_path_and_what_is_there(tmp_path):
    root = save_tiny_wan_pipeline(tmp_path / "wan")
    cases = [(tmp_path / "nowhere", "is not a local folder"),
             (root, "has no config.json (it looks like a pipeline folder: use its transformer/ subfolder)"),
             (root / "vae", "holds a AutoencoderKLWan, but model=wan needs a diffusers WanTransformer3DModel")]
    for path, message in cases:
        with pytest.raises(PretrainedModelError, match=r"model.path=") as error:
            load_pretrained_transformer(path)
        assert message in str(error.value)
    with pytest.raises(PretrainedModelError, match="converted already"):
        convert_attention(convert_attention(tiny_transformer(), MHLA), MHLA)
    with pytest.raises(TextEncoderError, match="text_encoder.path=.*holds WanTransformer3DModel"):
        TextEncoder(root / "transformer", max_length=8)
    with pytest.raises(TextEncoderError, match="no tokenizer"):
        TextEncoder(save_tiny_text_encoder(tmp_path / "lone"), max_length=8)


# --------------------------------------------------------------------------- the whole workflow


@pytest.fixture(scope="module")
def workflow(tmp_path_factory, env):
    """A tiny Wan pipeline folder, captioned videos and their extraction with the Wan VAE and UMT5."""
    root = tmp_path_factory.mktemp("wan")
    pipeline = save_tiny_wan_pipeline(root / "pipeline")
    manifest = save_captioned_videos(root / "videos", num_frames=9, size=32)
    out = root / "latents"
    extracted = run_command([sys.executable, "-m", "data.extract_latents", "data=videos", f"data.root={root / 'videos'}",
                             f"data.manifest={manifest}", "data.num_frames=9", "data.resolution=32", "vae=wan",
                             f"vae.path={pipeline / 'vae'}", f"text_encoder.path={pipeline / 'text_encoder'}",
                             "text_encoder.max_length=16", "batch_size=2", "shard_size=4", f"out={out}"], env=env)
    return {"root": root, "pipeline": pipeline, "latents": out, "extract_stdout": extracted.stdout}


def wan_train(run_dir, workflow, *overrides, env, check=True):
    return run("train.py", "model=wan", f"model.path={workflow['pipeline'] / 'transformer'}", "attention=hybrid",
               "data=latents", f"data.root={workflow['latents']}", "train.batch_size=2", "train.log_every=1",
               "train.num_val_samples=1", "train.val_steps=2", "train.time_shift=3", f"hydra.run.dir={run_dir}",
               *overrides, env=env, check=check)


def frame_count(path: Path) -> int:
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


def test_text_video_extraction_stores_caption_embeddings(workflow):
    assert "uncaptioned.mp4: empty caption" in workflow["extract_stdout"]
    dataset = LatentDataset(workflow["latents"])
    assert len(dataset) == len(CAPTIONS) and dataset.has_text
    item = dataset[0]
    assert item["latents"].shape == (4, 3, 4, 4) and item["text"].shape == (16, 32)
    encoder = TextEncoder(workflow["pipeline"] / "text_encoder", max_length=16)
    expected, lengths = encoder.encode([CAPTIONS[0]])
    torch.testing.assert_close(item["text"], expected[0])
    assert lengths[0] == len(CAPTIONS[0].split()) + 1 and torch.all(item["text"][lengths[0]:] == 0)
    torch.testing.assert_close(dataset.empty_caption(), encoder.encode([""])[0][0])
    manifest = json.loads((workflow["latents"] / "manifest.json").read_text())
    assert [clip["caption"] for clip in manifest["clips"]] == CAPTIONS
    assert manifest["text_encoder"]["max_length"] == 16


def test_transfer_then_finetune_kill_resume_and_sample_from_prompts(workflow, env, tmp_path):
    transfer = tmp_path / "transfer"
    wan_train(transfer, workflow, "train.stage=transfer", "train.max_steps=2", env=env)
    records = [json.loads(line) for line in (transfer / "metrics.jsonl").read_text().splitlines()]
    assert all({"transfer_loss_block_00", "transfer_loss_block_01"} <= set(r) for r in records)
    transferred = load_file(transfer / "checkpoints" / "step_00000002" / "model.safetensors")
    pretrained = load_pretrained_transformer(workflow["pipeline"] / "transformer").state_dict()
    changed = {k for k in transferred if k in pretrained and not torch.equal(transferred[k], pretrained[k])}
    assert not changed, f"attention transfer changed pretrained weights: {sorted(changed)[:3]}"
    assert any(".processor.core." in k for k in transferred)

    common = ["train.stage=finetune", f"train.init_from={transfer}", "train.max_steps=4", "train.checkpoint_every=1",
              "train.num_val_samples=0"]
    reference = tmp_path / "reference"
    wan_train(reference, workflow, *common, env=env)

    interrupted = tmp_path / "interrupted"
    cmd = [sys.executable, "train.py", "model=wan", f"model.path={workflow['pipeline'] / 'transformer'}",
           "attention=hybrid", "data=latents", f"data.root={workflow['latents']}", "train.batch_size=2",
           "train.time_shift=3", f"hydra.run.dir={interrupted}", *common]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pointer, deadline = interrupted / "checkpoints" / "latest", time.time() + TIMEOUT_S
    while not pointer.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert pointer.read_text().strip() != "step_00000004", "the run finished before it could be killed"
    resumed = wan_train(interrupted, workflow, *common, env=env)
    assert "resumed from" in resumed.stdout
    for name in ("model.safetensors", "ema.safetensors"):
        final = "checkpoints/step_00000004/" + name
        assert (reference / final).read_bytes() == (interrupted / final).read_bytes(), name

    out = tmp_path / "videos"
    sampled = run("sample.py", f"checkpoint={reference}", 'prompts=["a red car moving left","a blue ball"]',
                  "negative_prompt=blurry", "steps=3", "cfg_scale=5", "shift=3", "seed=7", f"out_dir={out}", env=env)
    assert "wrote 2 videos" in sampled.stdout
    assert sorted(p.name for p in out.glob("*.mp4")) == ["grid.mp4", "sample_000.mp4", "sample_001.mp4"]
    assert all(frame_count(p) == 9 for p in out.glob("*.mp4"))
    assert (out / "prompts.txt").read_text() == "sample_000.mp4\ta red car moving left\nsample_001.mp4\ta blue ball\n"
    no_prompts = run("sample.py", f"checkpoint={reference}", env=env, check=False)
    assert no_prompts.returncode != 0 and "generates videos from text: pass prompts=" in no_prompts.stderr
    again = tmp_path / "again"
    run("sample.py", f"checkpoint={reference}", 'prompts=["a red car moving left","a blue ball"]',
        "negative_prompt=blurry", "steps=3", "cfg_scale=5", "shift=3", "seed=7", f"out_dir={again}", env=env)
    assert all((out / n).read_bytes() == (again / n).read_bytes() for n in ("sample_000.mp4", "sample_001.mp4"))

    loaded = load_converted(reference)
    assert isinstance(loaded, WanTransformer3DModel) and sorted(converted_processors(loaded)) == [0, 1]


def test_wan_runs_refuse_what_they_cannot_do(workflow, env, tmp_path):
    failed = wan_train(tmp_path / "x", workflow, f"model.path={workflow['pipeline']}", "train.max_steps=1", env=env,
                       check=False)
    assert failed.returncode != 0 and "model.path=" in failed.stderr and "transformer/ subfolder" in failed.stderr
    with pytest.raises(Exception, match="model.path is not set"):
        compose_config("train", ["model=wan"])
    fvd = wan_train(tmp_path / "fvd", workflow, "train.max_steps=1", "train.fvd_every=1", env=env, check=False)
    assert fvd.returncode != 0 and "train.fvd_every needs class-conditional samples" in fvd.stderr
    classes = wan_train(tmp_path / "classes", workflow, "train.max_steps=1", "data.num_classes=2", env=env, check=False)
    assert classes.returncode != 0 and "set data.num_classes=0" in classes.stderr
    transfer = run("train.py", "train.stage=transfer", f"hydra.run.dir={tmp_path / 'demo'}", env=env, check=False)
    assert transfer.returncode != 0 and "train.stage='transfer' needs a converted pretrained model" in transfer.stderr
    demo_run = compose_config("train", [])
    with pytest.raises(ValueError, match="prompts are for text-to-video runs"):
        conditions_of(compose_config("sample", ["checkpoint=run", 'prompts=["a red car"]']), demo_run, "dit", "cpu")


def test_two_process_ddp_finetune_matches_one_process(workflow, env, tmp_path):
    common = ["model=wan", f"model.path={workflow['pipeline'] / 'transformer'}", "attention=hybrid", "data=latents",
              f"data.root={workflow['latents']}", "train.max_steps=2", "train.num_val_samples=2", "train.val_steps=2",
              "train.trainable=attention"]
    single = tmp_path / "one"
    run("train.py", *common, "train.batch_size=2", f"hydra.run.dir={single}", env=env)
    ddp = tmp_path / "two"
    result = launch("train.py", *common, "train.batch_size=1", f"hydra.run.dir={ddp}", env=env)
    assert "step 2: model and EMA weights identical on all 2 ranks" in result.stdout
    one, two = (load_file(d / "checkpoints" / "step_00000002" / "model.safetensors") for d in (single, ddp))
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-5
    assert len(list((ddp / "samples" / "step_00000002").glob("sample_*.mp4"))) == 2
    # train.trainable=attention: everything outside the self-attention modules kept its pretrained value.
    pretrained = load_pretrained_transformer(workflow["pipeline"] / "transformer").state_dict()
    assert all(torch.equal(one[k], pretrained[k]) for k in pretrained if ".attn1." not in k)
    assert any(not torch.equal(one[k], pretrained[k]) for k in pretrained if ".attn1." in k)
