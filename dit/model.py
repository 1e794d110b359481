"""The video diffusion transformer (DiT with 3D patches and switchable self-attention).

    latents x (B, C, T, H, W) ──3D patch embed──> tokens (B, N, D), N = T/pt · H/ph · W/pw
    timestep t (B,) in [0, 1] ──sinusoid + MLP──┐
    class label y (B,) (optional) ──embedding───┴─> conditioning c (B, D)
    depth × DiTBlock(tokens, c): adaLN-Zero → self-attention (any variant, 3D RoPE) → MLP
    FinalLayer(tokens, c) ──unpatchify──> prediction (B, C, T, H, W)

The model returns the rectified-flow velocity ε − x₀ (see :mod:`dit.flow`). With
``prediction="data"`` the transformer itself predicts the clean clip x̂₀ and the model
returns the velocity it implies, (x_t − x̂₀) / t. In pixel space a patch holds as many
numbers as a small model's width (2·4·4·3 = 96 for the demo): a transformer that must
output the velocity carries the patch's noise through its residual stream, while a clean
clip is much simpler to output (docs/demo.md measures the difference).
Tokens are ordered t-major, n = (t·H' + h)·W' + w, the order :func:`attention.rope_tables`
and MHLA's blocks assume. The token grid is computed from each input, so one model
runs on any clip size its patch size divides; RoPE tables are float32 plain tensors
(cached per grid and device, never buffers), whatever the model dtype.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from attention import QK_NORMS, RotaryTables, build_attention_layers, rope_tables

Grid = tuple[int, int, int]
PREDICTIONS = ("velocity", "data")
DATA_PREDICTION_MIN_TIME = 0.05  # (x_t − x̂₀) / t divides by at least this, so that t → 0 stays finite


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN modulation: x (B, N, D), shift/scale (B, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TimestepEmbedder(nn.Module):
    """t (B,) in [0, 1] -> (B, D): sinusoidal features of 1000·t followed by an MLP."""

    def __init__(self, hidden_size: int, frequency_size: int = 256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def sinusoid(self, t: Tensor) -> Tensor:
        half = self.frequency_size // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        angles = 1000.0 * t.float()[:, None] * freqs[None]
        return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(self.sinusoid(t).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels (B,) long -> (B, D). Index ``num_classes`` is the "no label" entry
    used for classifier-free guidance; labels are replaced by it where ``drop`` is True."""

    def __init__(self, num_classes: int, hidden_size: int):
        super().__init__()
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, y: Tensor, drop: Tensor | None = None) -> Tensor:
        if drop is not None:
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        return self.table(y)


class PatchEmbed3D(nn.Module):
    """(B, C, T, H, W) -> (B, N, D) with non-overlapping (pt, ph, pw) patches."""

    def __init__(self, in_channels: int, hidden_size: int, patch_size: Grid):
        super().__init__()
        self.proj = nn.Conv3d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block around one attention layer."""

    def __init__(self, hidden_size: int, mlp_ratio: float, attention: nn.Module):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = attention
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(hidden_size, mlp_hidden), nn.GELU(approximate="tanh"), nn.Linear(mlp_hidden, hidden_size)
        )
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: Tensor, c: Tensor, grid: Grid, rope: RotaryTables) -> Tensor:
        """x (B, N, C) on the token grid (T, H, W), conditioning c (B, C)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), grid, rope)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """adaLN then a linear map of each token to its patch of output channels."""

    def __init__(self, hidden_size: int, patch_volume: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_volume * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


class VideoDiT(nn.Module):
    """Video DiT over latents of any size the patch size divides.

    Args:
        in_channels: latent channels C.
        input_size: the reference latent clip size (T, H, W), each divisible by the patch
            size: it sets ``grid``/``num_tokens`` (FLOP counts, MHLA ``layout: auto``);
            inputs of other sizes run on their own token grid.
        patch_size: (pt, ph, pw).
        hidden_size, depth, num_heads, mlp_ratio: transformer sizes.
        num_classes: class labels for conditioning (0 = unconditional).
        class_dropout_prob: probability of replacing a label by "no label" during
            training, for classifier-free guidance.
        attention: attention config node (single variant or hybrid), see ``configs/attention``.
        gradient_checkpointing: recompute each block in backward to save memory.
        qk_norm: q/k RMSNorm of the attention layers, "per_head" or "across_heads" (Wan2.1).
        prediction: what the transformer outputs: ``"velocity"`` (ε − x₀) or ``"data"`` (x̂₀,
            turned into the velocity (x_t − x̂₀) / max(t, 0.05)). Either way ``forward``
            returns a velocity, so the loss and the samplers are unchanged.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        input_size: Sequence[int],
        patch_size: Sequence[int],
        hidden_size: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float,
        num_classes: int,
        class_dropout_prob: float,
        attention: Mapping,
        gradient_checkpointing: bool = False,
        qk_norm: str = "per_head",
        prediction: str = "velocity",
    ):
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ValueError(f"model.prediction={prediction!r} is not valid; choose one of {list(PREDICTIONS)}")
        self.prediction = prediction
        input_size, patch_size = tuple(int(s) for s in input_size), tuple(int(p) for p in patch_size)
        if len(input_size) != 3 or len(patch_size) != 3 or any(s % p for s, p in zip(input_size, patch_size)):
            raise ValueError(
                f"model.patch_size={list(patch_size)} must divide the latent clip size (T, H, W)={list(input_size)}; "
                f"change model.patch_size or the clip size (data.num_frames / data.resolution)"
            )
        if num_classes < 0 or not 0.0 <= class_dropout_prob < 1.0:
            raise ValueError("model: num_classes must be ≥ 0 and class_dropout_prob in [0, 1)")
        self.in_channels, self.input_size, self.patch_size = in_channels, input_size, patch_size
        self.grid: Grid = tuple(s // p for s, p in zip(input_size, patch_size))
        self.num_tokens = math.prod(self.grid)
        self.num_classes, self.class_dropout_prob = num_classes, class_dropout_prob
        self.gradient_checkpointing = gradient_checkpointing

        self.x_embedder = PatchEmbed3D(in_channels, hidden_size, patch_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size) if num_classes > 0 else None
        attention_layers = build_attention_layers(
            attention, depth=depth, dim=hidden_size, num_heads=num_heads, grid=self.grid, qk_norm=qk_norm
        )
        self.head_dim = hidden_size // num_heads
        self._rope_cache: dict[tuple[Grid, torch.device], RotaryTables] = {}
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, mlp_ratio, attn) for attn in attention_layers)
        self.final_layer = FinalLayer(hidden_size, math.prod(patch_size), in_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's init: Xavier for the linear maps the DiT owns, zero for adaLN and the output."""
        owned = [self.final_layer.linear, self.t_embedder.mlp[0], self.t_embedder.mlp[2]]
        for block in self.blocks:
            owned += [block.attn.qkv, block.attn.proj, block.mlp[0], block.mlp[2]]
        for linear in owned:
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)
        nn.init.xavier_uniform_(self.x_embedder.proj.weight.view(self.x_embedder.proj.weight.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.table.weight, std=0.02)
        for modulation in [b.adaLN_modulation[-1] for b in self.blocks] + [self.final_layer.adaLN_modulation[-1]]:
            nn.init.zeros_(modulation.weight)
            nn.init.zeros_(modulation.bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    # ------------------------------------------------------------------ forward

    def token_grid(self, x: Tensor) -> Grid:
        """The token grid (T/pt, H/ph, W/pw) of latents x (B, C, T, H, W); ValueError if it does not fit."""
        if x.dim() != 5 or x.shape[1] != self.in_channels or any(s % p for s, p in zip(x.shape[2:], self.patch_size)):
            raise ValueError(
                f"VideoDiT expects latents (B, {self.in_channels}, T, H, W) with (T, H, W) divisible by the patch "
                f"size {list(self.patch_size)}, got {tuple(x.shape)}"
            )
        return tuple(int(s) // p for s, p in zip(x.shape[2:], self.patch_size))

    def rotary_tables(self, grid: Grid, device: torch.device) -> RotaryTables:
        """float32 RoPE tables of a token grid, cached per (grid, device) in a plain dict."""
        key = (grid, torch.device(device))
        if key not in self._rope_cache:
            self._rope_cache[key] = rope_tables(self.head_dim, grid, device=device)
        return self._rope_cache[key]

    def unpatchify(self, tokens: Tensor, grid: Grid | None = None) -> Tensor:
        """(B, N, pt·ph·pw·C) on the token grid (default: the reference grid) -> (B, C, T, H, W)."""
        (gt, gh, gw), (pt, ph, pw) = grid or self.grid, self.patch_size
        x = tokens.view(tokens.shape[0], gt, gh, gw, pt, ph, pw, self.in_channels)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(tokens.shape[0], self.in_channels, gt * pt, gh * ph, gw * pw)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None, drop_labels: Tensor | None = None) -> Tensor:
        """Velocity prediction.

        Args:
            x: noisy latents (B, C, T, H, W), (T, H, W) divisible by the patch size.
            t: flow time (B,) in [0, 1] (0 = data, 1 = noise).
            y: class labels (B,) long in [0, num_classes], where num_classes means "no
                label"; ignored when the model is unconditional.
            drop_labels: (B,) bool, labels to replace by "no label" (classifier-free
                guidance training); the trainer draws it from its own generator.
        Returns:
            (B, C, T, H, W) in x's dtype.
        """
        grid = self.token_grid(x)
        rope = self.rotary_tables(grid, x.device)
        tokens = self.x_embedder(x)
        c = self.t_embedder(t)
        if self.y_embedder is not None:
            if y is None:
                y = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
            c = c + self.y_embedder(y, drop_labels)
        for block in self.blocks:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                tokens = checkpoint(block, tokens, c, grid, rope, use_reentrant=False)
            else:
                tokens = block(tokens, c, grid, rope)
        out = self.unpatchify(self.final_layer(tokens, c), grid)
        if self.prediction == "data":  # out is x̂₀: return the velocity it implies
            out = (x - out) / t.clamp_min(DATA_PREDICTION_MIN_TIME).view(-1, 1, 1, 1, 1).to(out.dtype)
        return out

    def forward_with_cfg(self, x: Tensor, t: Tensor, y: Tensor | None, cfg_scale: float) -> Tensor:
        """Classifier-free guidance: v_uncond + s·(v_cond − v_uncond) in one doubled batch.

        With scale 1, no labels or an unconditional model this is a plain forward.
        """
        if cfg_scale == 1.0 or y is None or self.y_embedder is None:
            return self.forward(x, t, y)
        null = torch.full_like(y, self.num_classes)
        both = self.forward(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
        cond, uncond = both.chunk(2)
        return uncond + cfg_scale * (cond - uncond)

    # ------------------------------------------------------------------ training hooks and accounting

    def macs_per_sample(self, grid: Grid | None = None) -> int:
        """Forward multiply-accumulates for one sample on a token grid (default: the reference grid).

        FLOPs = 2 × MACs.

        Counts every matrix product: patch embedding, timestep MLP, per block adaLN,
        attention (projections + the variant's own core) and MLP, final layer. Label
        embedding lookups, norms and element-wise ops are not counted (DiT convention).
        """
        grid = grid or self.grid
        dim, n = self.t_embedder.mlp[2].weight.shape[0], math.prod(grid)
        patch_in = self.in_channels * math.prod(self.patch_size)
        macs = n * patch_in * dim  # patch embedding
        macs += self.t_embedder.frequency_size * dim + dim * dim  # timestep MLP
        for block in self.blocks:
            mlp_hidden = block.mlp[0].weight.shape[0]
            macs += 6 * dim * dim + block.attn.macs(grid) + 2 * n * dim * mlp_hidden
        macs += 2 * dim * dim + n * dim * patch_in  # final adaLN + linear
        return macs

    def compile_blocks(self, **options) -> None:
        """``torch.compile`` every block in place (parameters and state-dict keys unchanged).

        The blocks hold all the attention and MLP work; embedding, RoPE tables and unpatchify
        stay eager. ``options`` go to ``nn.Module.compile`` (e.g. ``backend="aot_eager"``).
        """
        for block in self.blocks:
            block.compile(**options)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def build_dit(model_cfg: Mapping, attention_cfg: Mapping, *, in_channels: int, input_size: Sequence[int],
              num_classes: int) -> VideoDiT:
    """A VideoDiT from the ``model`` and ``attention`` config nodes and the latent shape."""
    for key, choices in (("qk_norm", QK_NORMS), ("prediction", PREDICTIONS)):
        if key not in model_cfg:
            raise ValueError(f"model.{key} is missing; choose one of {list(choices)}")
    return VideoDiT(
        in_channels=in_channels,
        input_size=input_size,
        patch_size=model_cfg["patch_size"],
        hidden_size=model_cfg["hidden_size"],
        depth=model_cfg["depth"],
        num_heads=model_cfg["num_heads"],
        mlp_ratio=model_cfg["mlp_ratio"],
        num_classes=num_classes,
        class_dropout_prob=model_cfg["class_dropout_prob"],
        attention=attention_cfg,
        gradient_checkpointing=model_cfg["gradient_checkpointing"],
        qk_norm=model_cfg["qk_norm"],
        prediction=model_cfg["prediction"],
    )
