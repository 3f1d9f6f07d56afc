"""Predicted peak accelerator memory of a training run, before anything is loaded (no torch).

The U-Net is rebuilt on paper from its Diffusers config (the family's shipped one): every
parameter's shape, and every module in forward order with the channels and latent positions it
works at. From that, in bytes:

* weights, gradients and optimizer state from the parameter shapes and the precision options;
* activations kept for the backward pass: per module, the tensors autograd saves (counted by
  hand from the operations, per channel and position: see `_RESNET`, `_TRANSFORMER`), by
  resolution and batch; with gradient checkpointing only the modules' inputs, and during the
  backward pass one module's activations at a time while it is recomputed;
* the backward pass simulated module by module in reverse: activations freed, parameter
  gradients and the gradients of skip connections created;
* the optimizer step: gradients, state and the step's own temporary tensors;
* the frozen VAE and text encoder where they stay on the accelerator, an EMA copy.

`bench/memory.py` counts the same step on a real-size U-Net tensor by tensor; the predictions are
within 10 % of every count there (docs/benchmarks.md). What no count sees: the CUDA context and
the allocator's caching and fragmentation, given separately as `overhead`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

GIB = 1024 ** 3
# The CUDA context (~0.4 GiB with torch's kernels loaded) plus the caching allocator's slack, which
# grows with the tensor peak; an estimate, not a measurement.
CONTEXT_BYTES = int(0.45 * GIB)
ALLOCATOR_SLACK = 0.06

# Saved bytes per channel and latent position, counted from the operations (CUDA autocast rules
# for bf16: norms output float32, matrix products and convolutions cast their inputs to bf16).
# ResnetBlock2D, per input and per output channel: norm input, norm output (SiLU's input), the
# convolution's input (in bf16 a cast copy) -> fp32 3 x 4, bf16 2 + 4 + 2.
_RESNET = {"fp32": 12, "bf16": 8}
# Transformer2DModel with one BasicTransformerBlock, per channel: group norm input, projection
# input, the block input; self-attention: norm input, q/k/v inputs (three bf16 casts), q, k, v,
# attention output and its reshaped copy; cross-attention: norm input, q input, q, output, copy;
# feed-forward: norm input, projection input, the 8x-wide GEGLU projection, GELU output and the
# product (4x wide each); the output projection's input.
_TRANSFORMER = {"fp32": 136, "bf16": 72}
# Optimizer state in bytes per parameter (AdamW: two moments; 8-bit: two uint8 moments).
_MOMENTS = {"adamw": 2, "adam": 2, "adamw8bit": 2, "pagedadamw8bit": 2, "lion": 1, "lion8bit": 1,
            "sgdnesterov": 1, "sgdnesterov8bit": 1, "prodigy": 4, "adafactor": 0}
_EIGHT_BIT = {"adamw8bit", "pagedadamw8bit", "lion8bit", "sgdnesterov8bit", "pagedlion8bit"}
# --full_bf16's chunked step, per element of the chunk being stepped, above its bf16 weight, gradient
# and state: the float32 weight, gradient and moments, the optimizer's own temporaries and the
# stochastic rounding's noise and sum. Counted tensor by tensor on one parameter (tests/test_memory_plan.py
# counts them again): AdamW's multi-tensor path 16, 8-bit AdamW 12; Adafactor 14 for a vector, and
# for a weight of more dimensions 12 plus 8 per element of its factored row (one per last-axis run).
_CHUNK_BYTES = {"adamw": 16, "adam": 16, "adamw8bit": 12, "pagedadamw8bit": 12, "adafactor": 14}


def _chunk_bytes(key: str, shape: tuple[int, ...]) -> int:
    n = math.prod(shape)
    if key == "adafactor" and len(shape) >= 2:
        return 12 * n + 8 * n // shape[-1]
    return _CHUNK_BYTES.get(key, 16) * n


@dataclass(frozen=True)
class RunShape:
    """What decides the memory of a run (option names as the command line's)."""

    family: str = "sd1"  # "sd1" | "sd2" (the U-Net's config); "sd2-v" has the same shapes as "sd2"
    resolution: int | tuple[int, int] = 512  # the largest bucket, in pixels (width, height)
    batch_size: int = 1
    mixed_precision: str = "no"
    full_bf16: bool = False
    full_fp16: bool = False
    gradient_checkpointing: bool = False
    optimizer: str = "AdamW"
    attention: str = "sdpa"  # "sdpa" / "xformers" (memory-efficient kernels) or "math" (the full matrix)
    train_text_encoder: bool = False
    vae_on_device: bool = True  # images encoded every step (no latent cache) or validation images
    text_encoder_on_device: bool = True  # captions encoded every step (no text-embedding cache)
    frozen_in_compute_dtype: bool = True  # frozen parts on the accelerator: one copy, in the compute dtype
    vae_float32: bool = False  # --no_half_vae: the VAE computes (and sits on the accelerator) in float32
    use_ema: bool = False  # an EMA of the U-Net on the accelerator (float32)
    fused_backward: bool = False  # each parameter stepped, and its gradient freed, as soon as it is complete


@dataclass
class Module:
    kind: str  # "resnet" | "transformer" | "down" | "up" | "head" | "stem"
    params: list[tuple[int, ...]]
    channels_in: int
    channels_out: int
    positions: int  # latent positions per sample where it works
    checkpointed: bool = False
    skip_of: int | None = None  # a down-path module whose output this one concatenates
    heads: int = 8
    # where diffusers registers its parameters: (section, block, kind), sections in the order
    # stem, down blocks, up blocks, mid block, head; in a block attentions, resnets, then the sampler
    registered: tuple[int, int, int] = (0, 0, 0)


@dataclass
class Prediction:
    parts: dict[str, int] = field(default_factory=dict)
    phases: dict[str, int] = field(default_factory=dict)

    @property
    def peak(self) -> int:
        return max(self.phases.values())


# ---------------------------------------------------------------- the U-Net on paper


def _conv(cin: int, cout: int, k: int = 3) -> list[tuple[int, ...]]:
    return [(cout, cin, k, k), (cout,)]


def _linear(cin: int, cout: int, bias: bool = True) -> list[tuple[int, ...]]:
    return [(cout, cin), (cout,)] if bias else [(cout, cin)]


def _norm(c: int) -> list[tuple[int, ...]]:
    return [(c,), (c,)]


def _resnet(cin: int, cout: int, temb: int) -> list[tuple[int, ...]]:
    shapes = _norm(cin) + _conv(cin, cout) + _linear(temb, cout) + _norm(cout) + _conv(cout, cout)
    return shapes + (_conv(cin, cout, 1) if cin != cout else [])


def _transformer(c: int, context: int, linear_proj: bool) -> list[tuple[int, ...]]:
    proj = _linear(c, c) if linear_proj else _conv(c, c, 1)
    block = (_norm(c) + _linear(c, c, False) * 3 + _linear(c, c)  # self-attention
             + _norm(c) + _linear(c, c, False) + _linear(context, c, False) * 2 + _linear(c, c)  # cross
             + _norm(c) + _linear(c, 8 * c) + _linear(4 * c, c))  # GEGLU feed-forward
    return _norm(c) + proj + block + proj


def unet_modules(config: dict, height: int, width: int) -> list[Module]:
    """The U-Net's modules in forward order, from a Diffusers UNet2DConditionModel config."""
    chans = list(config["block_out_channels"])
    layers = config["layers_per_block"]
    context = config["cross_attention_dim"]
    linear_proj = bool(config.get("use_linear_projection"))
    head_dim = config.get("attention_head_dim") or 8
    temb = chans[0] * 4
    pos = (height // 8) * (width // 8)
    heads_of = list(head_dim) if isinstance(head_dim, list) else [head_dim] * len(chans)  # diffusers' naming
    mods = [Module("stem", _conv(config["in_channels"], chans[0]) + _linear(chans[0], temb) + _linear(temb, temb),
                   config["in_channels"], chans[0], pos)]
    skips = [0]  # indices of modules whose outputs the up path concatenates
    for level, block in enumerate(config["down_block_types"]):
        cin = chans[max(level - 1, 0)]
        cout = chans[level]
        npos = pos // 4 ** level
        for j in range(layers):
            mods.append(Module("resnet", _resnet(cin if j == 0 else cout, cout, temb), cin if j == 0 else cout, cout, npos,
                               registered=(1, level, 1)))
            if "CrossAttn" in block:
                mods.append(Module("transformer", _transformer(cout, context, linear_proj), cout, cout, npos,
                                   heads=heads_of[level], registered=(1, level, 0)))
            skips.append(len(mods) - 1)
        if level < len(chans) - 1:
            mods.append(Module("down", _conv(cout, cout), cout, cout, npos, registered=(1, level, 2)))
            skips.append(len(mods) - 1)
    mid = chans[-1]
    mpos = pos // 4 ** (len(chans) - 1)
    mods += [Module("resnet", _resnet(mid, mid, temb), mid, mid, mpos, registered=(3, 0, 1)),
             Module("transformer", _transformer(mid, context, linear_proj), mid, mid, mpos, heads=heads_of[-1],
                    registered=(3, 0, 0)),
             Module("resnet", _resnet(mid, mid, temb), mid, mid, mpos, registered=(3, 0, 1))]
    rev = chans[::-1]
    prev = rev[0]
    for i, block in enumerate(config["up_block_types"]):
        cout = rev[i]
        cskip_in = rev[min(i + 1, len(chans) - 1)]
        level = len(chans) - 1 - i
        npos = pos // 4 ** level
        for j in range(layers + 1):
            skip = cskip_in if j == layers else cout
            cin = (prev if j == 0 else cout) + skip
            mods.append(Module("resnet", _resnet(cin, cout, temb), cin, cout, npos, skip_of=skips.pop(),
                               registered=(2, i, 1)))
            if "CrossAttn" in block:
                mods.append(Module("transformer", _transformer(cout, context, linear_proj), cout, cout, npos,
                                   heads=heads_of[level], registered=(2, i, 0)))
        if i < len(chans) - 1:
            mods.append(Module("up", _conv(cout, cout), cout, cout, npos * 4, registered=(2, i, 2)))
        prev = cout
    mods.append(Module("head", _norm(chans[0]) + _conv(chans[0], config["out_channels"]), chans[0],
                       config["out_channels"], pos, registered=(4, 0, 0)))
    return mods


def load_unet_config(family: str) -> dict:
    from sdtune.families import get_family

    return json.loads((get_family(family).asset_dir / "unet" / "config.json").read_text())


def parameter_count(shapes: list[tuple[int, ...]]) -> int:
    return sum(math.prod(s) for s in shapes)


# ---------------------------------------------------------------- the step, predicted


_VAE_PARAMS = 83_653_863
_TEXT_ENCODER_PARAMS = {"sd1": 123_060_480, "sd2": 340_387_840}


def _dtype_bytes(shape: RunShape) -> tuple[int, int, str]:
    """(bytes per weight, per activation, activation table key)."""
    half_weights = shape.full_bf16 or shape.full_fp16
    half_acts = half_weights or shape.mixed_precision in ("bf16", "fp16")
    return (2 if half_weights else 4), (2 if half_acts else 4), ("bf16" if half_acts else "fp32")


def _state_bytes(name: str, shapes: list[tuple[int, ...]], weight_bytes: int) -> int:
    key = name.lower()
    if key == "adafactor":  # factored second moments (float32) for matrices, a full one for vectors
        # (in the weights' dtype: --full_bf16 rounds state shaped like its weight back to bf16)
        return sum(4 * (math.prod(s[:-1]) + math.prod(s[:-2]) * s[-1]) if len(s) >= 2 else weight_bytes * math.prod(s)
                   for s in shapes)
    moments = _MOMENTS.get(key, 2)
    if key in _EIGHT_BIT:  # bitsandbytes: 8-bit blocks of 256 with a float32 scale; small tensors in 32
        # bits (--full_bf16 rounds those back to bf16, as every state shaped like its weight)
        return sum(moments * (n + 4 * math.ceil(n / 256)) if n >= 4096 else moments * weight_bytes * n
                   for n in (math.prod(s) for s in shapes))
    # full-precision moments take the weights' dtype (bf16 under --full_bf16)
    return sum(moments * weight_bytes * math.prod(s) for s in shapes)


def _step_transient(shape: RunShape, shapes: list[tuple[int, ...]]) -> int:
    """The float32 optimizer step's own temporaries, beyond weights, gradients and state."""
    key = shape.optimizer.lower()
    if key == "adafactor":  # per tensor: grad^2 and the factored estimate, then the negated update
        return 8 * max(math.prod(s) for s in shapes)
    if key in _EIGHT_BIT:  # in-place kernels
        return 0
    # torch's multi-tensor path makes one full-size temporary (the denominator) per group
    return 4 * sum(math.prod(s) for s in shapes)


def bf16_chunks(shapes: list[tuple[int, ...]], limit: int) -> list[list[tuple[int, ...]]]:
    """The chunks of --full_bf16's step, as optim._chunks groups parameters in their order."""
    chunks: list[list[tuple[int, ...]]] = [[]]
    size = 0
    for s in shapes:
        n = math.prod(s)
        if size and size + n > limit:
            chunks.append([])
            size = 0
        chunks[-1].append(s)
        size += n
    return [c for c in chunks if c]


def _chunked_step(shape: RunShape, shapes: list[tuple[int, ...]], chunk_elements: int) -> int:
    """The most --full_bf16's step holds beyond weights and state: the bf16 gradients not yet stepped
    (each chunk's are freed as it is rounded back) plus the float32 transient of the chunk stepped."""
    from sdtune.train.optim import OPTIMIZERS, SEPARABLE_OPTIMIZERS

    key = shape.optimizer.lower()
    spec = OPTIMIZERS.get(key)
    if (spec.cls if spec else shape.optimizer.rpartition(".")[2]) not in SEPARABLE_OPTIMIZERS:
        chunk_elements = parameter_count(shapes)  # a step coupling the parameters is upcast and stepped whole
    remaining = 2 * parameter_count(shapes)
    peak = 0
    for chunk in bf16_chunks(shapes, chunk_elements):
        peak = max(peak, remaining + sum(_chunk_bytes(key, s) for s in chunk))
        remaining -= 2 * parameter_count(chunk)
    return peak


def _activations(m: Module, shape: RunShape, act: int, key: str) -> int:
    b = shape.batch_size
    if m.kind == "resnet":
        saved = _RESNET[key] * (m.channels_in + m.channels_out) * m.positions
    elif m.kind == "transformer":
        saved = _TRANSFORMER[key] * m.channels_out * m.positions
        if shape.attention == "math":  # the attention probabilities of self-attention are kept
            saved += m.heads * m.positions ** 2 * act
    elif m.kind == "head":
        saved = _RESNET[key] * m.channels_in * m.positions
    elif m.kind in ("down", "up"):
        saved = act * m.channels_in * m.positions
    else:
        saved = act * m.channels_in * m.positions
    return saved * b


def _weight_casts(m: Module, shape: RunShape) -> int:
    """bf16/fp16 copies of float32 matrix and convolution weights that autocast makes and autograd keeps."""
    if shape.mixed_precision not in ("bf16", "fp16") or shape.full_bf16 or shape.full_fp16:
        return 0
    return 2 * sum(math.prod(s) for s in m.params if len(s) >= 2)


def plan_unet_step(shape: RunShape, config: dict | None = None, *, bf16_chunk: int | None = None) -> dict[str, int]:
    """Predicted bytes of one U-Net training step: {"weights", "gradients", "state", "forward",
    "backward", "step", "peak"} (the phases include everything alive during them). `bf16_chunk`:
    --full_bf16's chunk size in elements (default: the one the step uses)."""
    from sdtune.train.optim import BF16_CHUNK_ELEMENTS

    config = config or load_unet_config(shape.family)
    width, height = (shape.resolution, shape.resolution) if isinstance(shape.resolution, int) else shape.resolution
    mods = unet_modules(config, height, width)
    wb, act, key = _dtype_bytes(shape)
    shapes = [s for m in mods for s in m.params]
    n = parameter_count(shapes)
    weights, grads = wb * n, wb * n
    state = _state_bytes(shape.optimizer, shapes, wb)
    ckpt = shape.gradient_checkpointing
    full = [_activations(m, shape, act, key) for m in mods]
    casts = [_weight_casts(m, shape) for m in mods]
    checkpointable = [ckpt and m.kind in ("resnet", "transformer") for m in mods]
    kept = [act * m.channels_in * m.positions * shape.batch_size if c else f + w
            for m, f, w, c in zip(mods, full, casts, checkpointable)]
    # autocast keeps its weight casts until the forward pass ends, checkpointed modules' too
    forward = weights + state + sum(kept) + sum(w for w, c in zip(casts, checkpointable) if c)
    # backward, module by module in reverse: its activations (recomputed when checkpointed), its
    # parameters' gradients, the gradients flowing through it and those waiting at skip connections
    backward = 0
    done_grads = 0
    fused = shape.fused_backward
    pending: dict[int, int] = {}
    for i in range(len(mods) - 1, -1, -1):
        m = mods[i]
        own = full[i] + casts[i] if checkpointable[i] else 0
        module_grads = wb * parameter_count(m.params)
        flow = act * (m.channels_in + m.channels_out) * m.positions * shape.batch_size
        live = weights + state + sum(kept[:i + 1]) + own + done_grads + module_grads + flow + sum(pending.values())
        backward = max(backward, live)
        if not fused:  # fused: stepped and freed at once
            done_grads += module_grads
        pending.pop(i, None)
        if m.skip_of is not None:
            src = mods[m.skip_of]
            pending[m.skip_of] = act * src.channels_out * src.positions * shape.batch_size
    if shape.full_bf16:  # in diffusers' parameter order: gradients are freed chunk by chunk
        ordered = [s for m in sorted(mods, key=lambda m: m.registered) for s in m.params]
        step = weights + state + _chunked_step(shape, ordered, bf16_chunk or BF16_CHUNK_ELEMENTS)
    else:
        step = weights + grads + state + _step_transient(shape, shapes)
    if fused:  # the steps happen inside the backward pass, one parameter at a time
        largest = max(shapes, key=math.prod)
        backward += (_chunk_bytes(shape.optimizer.lower(), largest) if shape.full_bf16
                     else _step_transient(shape, [largest]))
        step = 0
    out = {"weights": weights, "gradients": grads, "state": state, "activations": sum(kept),
           "forward": forward, "backward": backward, "step": step}
    out["peak"] = max(forward, backward, step)
    return out


# ---------------------------------------------------------------- the whole run


@dataclass
class RunMemory:
    shape: RunShape
    unet: dict[str, int]
    extras: dict[str, int]  # frozen VAE / text encoder, trained text encoder, EMA

    @property
    def peak(self) -> int:
        """Tensor bytes at the peak (what bench/memory.py counts), frozen parts included."""
        return self.unet["peak"] + sum(self.extras.values())

    @property
    def total(self) -> int:
        """The peak plus the CUDA context and the allocator's slack: what the card must have."""
        return int(self.peak * (1 + ALLOCATOR_SLACK)) + CONTEXT_BYTES

    @property
    def phase(self) -> str:
        return max(("forward", "backward", "step"), key=lambda k: self.unet[k])


def predict_run(shape: RunShape, config: dict | None = None) -> RunMemory:
    frozen_bytes = 2 if shape.frozen_in_compute_dtype and shape.mixed_precision in ("bf16", "fp16") else 4
    family = "sd2" if shape.family.startswith("sd2") else "sd1"
    extras: dict[str, int] = {}
    if shape.vae_on_device:
        extras["VAE (frozen)"] = (4 if shape.vae_float32 else frozen_bytes) * _VAE_PARAMS
    te = _TEXT_ENCODER_PARAMS[family]
    if shape.train_text_encoder:
        wb = 2 if shape.full_bf16 or shape.full_fp16 else 4
        extras["text encoder (trained)"] = te * (2 * wb) + _state_bytes(shape.optimizer, [(te,)], wb)
    elif shape.text_encoder_on_device:
        extras["text encoder (frozen)"] = frozen_bytes * te
    unet = plan_unet_step(shape, config)
    if shape.use_ema:
        extras["EMA of the U-Net"] = 4 * unet["weights"] // (2 if shape.full_bf16 or shape.full_fp16 else 4)
    return RunMemory(shape, unet, extras)


def _changes(shape: RunShape, fused_available: bool) -> list[tuple[str, dict]]:
    """Memory-saving changes, cheapest first (what they cost: nothing, speed, precision, the batch)."""
    out: list[tuple[str, dict]] = []
    if shape.vae_on_device:
        out.append(("--cache_latents", {"vae_on_device": False}))
    if not shape.gradient_checkpointing:
        out.append(("--gradient_checkpointing", {"gradient_checkpointing": True}))
    if shape.optimizer.lower() in ("adamw", "adam"):
        out.append(("--optimizer_type AdamW8bit", {"optimizer": "AdamW8bit"}))
    if fused_available and not shape.fused_backward and shape.optimizer.lower() in ("adamw", "adamw8bit", "adafactor"):
        out.append(("--fused_backward_pass", {"fused_backward": True}))
    if not (shape.full_bf16 or shape.full_fp16):
        flag = "--full_bf16" if shape.mixed_precision == "bf16" else "--mixed_precision bf16 --full_bf16"
        out.append((flag, {"mixed_precision": "bf16", "full_bf16": True}))
    return out


def cheapest_fit(shape: RunShape, budget: int, config: dict | None = None,
                 fused_available: bool = False) -> tuple[list[str], RunMemory] | None:
    """The fewest changes (among equals, the cheapest by `_changes`' order) whose run fits in
    `budget` bytes; failing all, every change and the largest batch that fits. None when nothing fits."""
    from dataclasses import replace
    from itertools import combinations

    changes = _changes(shape, fused_available)
    subsets = [c for k in range(1, len(changes) + 1) for c in combinations(range(len(changes)), k)]
    for subset in sorted(subsets, key=lambda c: (len(c), sum(c))):
        update = {key: value for i in subset for key, value in changes[i][1].items()}
        run = predict_run(replace(shape, **update), config)
        if run.total <= budget:
            return [changes[i][0] for i in subset], run
    everything = replace(shape, **{k: v for _flag, update in changes for k, v in update.items()})
    batch = everything.batch_size
    while batch > 1:
        batch //= 2
        run = predict_run(replace(everything, batch_size=batch), config)
        if run.total <= budget:
            return [*(flag for flag, _u in changes), f"--train_batch_size {batch}"], run
    return None


def describe(run: RunMemory, vram_gib: float | None = None, fused_available: bool = False) -> list[str]:
    """The lines --dry_run prints."""
    s, u = run.shape, run.unet
    w, h = (s.resolution, s.resolution) if isinstance(s.resolution, int) else s.resolution
    wdt = "bf16" if s.full_bf16 else "fp16" if s.full_fp16 else "fp32"
    prec = {"no": "float32", "bf16": "bf16 mixed precision", "fp16": "fp16 mixed precision"}[s.mixed_precision]
    lines = [f"memory (predicted, on the accelerator): largest batch {s.batch_size} x {w}x{h}, {prec}, "
             f"{s.optimizer}{', gradient checkpointing' if s.gradient_checkpointing else ''}",
             f"  U-Net: weights {_g(u['weights'])} ({wdt}), gradients {_g(u['gradients'])}, optimizer state "
             f"{_g(u['state'])}, activations {_g(u['activations'])} at the end of the forward pass"]
    if run.extras:
        lines.append("  also: " + ", ".join(f"{k} {_g(v)}" for k, v in run.extras.items()))
    where = {"forward": "forward pass", "backward": "backward pass", "step": "optimizer step"}[run.phase]
    lines.append(f"  peak {_g(run.peak)} of tensors (in the {where}); about {_g(run.total)} with the CUDA context "
                 "and the allocator's slack")
    if vram_gib is None:
        return lines
    budget = int(vram_gib * GIB)
    if run.total <= budget:
        lines.append(f"  fits in {vram_gib:g} GiB ({_g(budget - run.total)} to spare)")
        return lines
    found = cheapest_fit(s, budget, fused_available=fused_available)
    if found is None:
        lines.append(f"  does not fit in {vram_gib:g} GiB, not even with every memory option and batch size 1")
    else:
        flags, fitting = found
        lines.append(f"  does not fit in {vram_gib:g} GiB; the cheapest change that fits: {' '.join(flags)} "
                     f"(about {_g(fitting.total)})")
    return lines


def _g(n: int) -> str:
    return f"{n / GIB:.2f} GiB"


def shape_from_options(opts, family_assets: str, plan=None) -> RunShape:
    """The RunShape of `sdtune train` options (TrainOptions) with the dataset plan's largest batch."""
    resolution: int | tuple[int, int] = 512 if family_assets == "sd1" else 768
    batch = opts.train_batch_size
    if plan is not None and plan.samples:
        d, bucket = max(plan.groups(), key=lambda k: k[1][0] * k[1][1] * plan.datasets[k[0]].batch_size)
        resolution, batch = (bucket[0], bucket[1]), plan.datasets[d].batch_size
    text_cached = bool(opts.cache_dir or opts.cache_latents_to_disk) and not opts.train_text_encoder
    return RunShape(family=family_assets, resolution=resolution, batch_size=batch,
                    mixed_precision=opts.mixed_precision, full_bf16=opts.full_bf16, full_fp16=opts.full_fp16,
                    gradient_checkpointing=opts.gradient_checkpointing, optimizer=opts.effective_optimizer,
                    train_text_encoder=opts.train_text_encoder, vae_on_device=not opts.caches_latents,
                    text_encoder_on_device=not text_cached, use_ema=opts.ema and not opts.ema_cpu,
                    vae_float32=opts.no_half_vae,
                    fused_backward=bool(getattr(opts, "fused_backward_pass", False)))
