"""What training under DeepSpeed (ZeRO-1/2/3, launched by ``accelerate launch``) needs beyond DDP.

train.py owns batch size, accumulation, clipping and precision (the JSON files in
``configs/accelerate/`` say "auto"); the optimizer is train.py's AdamW. DeepSpeed keeps its own
bf16/fp16 weights with fp32 master copies inside the optimizer, steps inside ``backward`` at
the last micro-step, and saves its optimizer shards in its own format under
``<checkpoint>/deepspeed/``. Every function here is a no-op or absent from the code path
when a run is not launched with DeepSpeed (``zero_stage is None``).
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from omegaconf import DictConfig
from torch import nn

from attention import Constrained
from dit.checkpoint import CheckpointError

DEEPSPEED_DIR, DEEPSPEED_TAG = "deepspeed", "zero"  # <checkpoint>/deepspeed/zero/: DeepSpeed's own files


def configure(accelerator: Accelerator, train_cfg: DictConfig) -> int | None:
    """Fill the launched DeepSpeed config from ``train.*``; return its ZeRO stage (None without DeepSpeed).

    ZeRO-3 must gather its partitioned weights for the consolidated ``model.safetensors`` of
    every checkpoint.
    """
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return None
    # DeepSpeed calls collectives that torch deprecates (one warning per call, every step).
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    config["train_micro_batch_size_per_gpu"] = train_cfg.batch_size
    config["gradient_accumulation_steps"] = train_cfg.grad_accum_steps
    config["train_batch_size"] = train_cfg.batch_size * train_cfg.grad_accum_steps * accelerator.num_processes
    config["gradient_clipping"] = float(train_cfg.grad_clip)
    zero = config.setdefault("zero_optimization", {})
    zero["stage3_gather_16bit_weights_on_model_save"] = True
    return int(zero.get("stage", 0))


def autocast(accelerator: Accelerator, mixed_precision: str, zero_stage: int | None):
    """Mixed-precision context for the forward pass.

    Accelerate does not autocast under DeepSpeed, whose weights are already bf16/fp16;
    autocast makes the fp32 inputs meet them.
    """
    if zero_stage is not None and mixed_precision != "no":
        dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float16
        return torch.autocast(accelerator.device.type, dtype=dtype)
    return accelerator.autocast()


def gathered(params: list[nn.Parameter], zero_stage: int | None):
    """Context in which ZeRO-3's partitioned parameters hold their full values (read only); else a no-op."""
    if zero_stage != 3:
        return contextlib.nullcontext()
    import deepspeed  # only installed where DeepSpeed runs

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def project_masters(model: nn.Module, zero_stage: int) -> None:
    """Apply every constraint of the model's :class:`attention.Constrained` modules to DeepSpeed's fp32 masters.

    DeepSpeed steps its fp32 master copies and copies them into the module after each step,
    so a projection of the module's weights alone would be undone by the next step.
    Projections are element-wise (e.g. a clamp), so ZeRO-3 ranks project only their own
    partitions; ZeRO-1/2 assemble each (small) parameter with one all-reduce: every rank
    must call this.
    """
    from deepspeed.utils import (
        safe_get_full_fp32_param,
        safe_get_local_fp32_param,
        safe_set_full_fp32_param,
        safe_set_local_fp32_param,
    )

    for module in model.modules():
        if not isinstance(module, Constrained):
            continue
        for param, project in module.constraints():
            if zero_stage == 3:
                param.ds_tensor.copy_(project(param.ds_tensor))
                safe_set_local_fp32_param(param, project(safe_get_local_fp32_param(param)))
            else:
                master = safe_get_full_fp32_param(param)
                if master is not None:
                    safe_set_full_fp32_param(param, project(master))


def grad_norm(engine) -> torch.Tensor | None:
    """The global gradient norm DeepSpeed computed (and clipped with) in its step, if it has one."""
    norm = engine.get_global_grad_norm()
    return None if norm is None else torch.as_tensor(float(norm))


def save_state(engine, directory: Path) -> None:
    """All ranks: DeepSpeed's own checkpoint (module + this rank's ZeRO optimizer shard) into ``directory``."""
    engine.save_checkpoint(str(directory), tag=DEEPSPEED_TAG, save_latest=False)


def load_state(engine, checkpoint: Path) -> None:
    """All ranks: restore the module, fp32 masters and optimizer shards of a checkpoint's ``deepspeed/``.

    DeepSpeed's loader unpickles these files: resume only from run directories you trust.
    """
    directory = checkpoint / DEEPSPEED_DIR
    if not (directory / DEEPSPEED_TAG).is_dir():
        raise CheckpointError(f"{checkpoint} has no {DEEPSPEED_DIR}/{DEEPSPEED_TAG}/ (DeepSpeed optimizer state)")
    engine.load_checkpoint(str(directory), tag=DEEPSPEED_TAG, load_module_strict=True, load_optimizer_states=True,
                           load_lr_scheduler_states=False)
