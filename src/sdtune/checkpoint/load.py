"""Loading a model from an original-layout single file, a Diffusers folder, or a Hub id.

Single files and local Diffusers folders are loaded without a second copy: the models are built
on the meta device (no memory, no random init) and their parameters are *assigned* the tensors read
from the file, which for safetensors are memory-mapped. Dtypes are kept as stored (pass `dtype` to
cast), so a load -> save round trip is bit-exact, fp16 and mixed-dtype files included.

Component configs come from the family's shipped Diffusers configs (or `config=DIR`); the widths,
depths and block layout are read from the tensor shapes, so tiny test models and real ones share
one path. What shapes cannot tell (attention heads, norm groups) comes from the `sdtune.configs`
entry our own saves carry, else from the shipped config, else from SD's conventions (64-wide heads).
"""

from __future__ import annotations

import json
from pathlib import Path

from sdtune.errors import UserError
from sdtune.families import Family

from . import text_encoder as te
from . import unet as un
from . import vae as va
from .convert import from_original
from .detect import Detection, detect_diffusers, detect_single_file, view_of
from .header import is_hub_id, read_diffusers_configs
from .hub import cache_only
from .io import read_state_dict

CONFIGS_KEY = "sdtune.configs"  # safetensors metadata / .ckpt top-level entry: our component configs
PASSTHROUGH_FILE = "passthrough.safetensors"  # in a Diffusers folder: tensors diffusers has no place for


def load_model(path_or_id, *, v2: bool | None = None, v_parameterization: bool | None = None,
               use_ema_weights: bool = False, config: str | Path | None = None, dtype=None, verbose: bool = True):
    """An `SDModel` from a single file, a Diffusers folder or a Hugging Face Hub id."""
    path = Path(path_or_id)
    if path.is_file():
        model, found = _load_single_file(path, v2, v_parameterization, use_ema_weights, config, dtype)
    elif path.is_dir():
        if use_ema_weights:
            raise UserError("--use_ema_weights needs a single-file checkpoint with model_ema.* tensors; a Diffusers "
                            "folder has none", where=str(path), fix="Drop --use_ema_weights.")
        model, found = _load_diffusers_folder(path, v2, v_parameterization, dtype)
    elif is_hub_id(str(path_or_id)):
        if use_ema_weights:
            raise UserError("--use_ema_weights is for single-file checkpoints", where=str(path_or_id))
        model, found = _load_hub(str(path_or_id), v2, v_parameterization, dtype)
    else:
        raise UserError("model not found", where=str(path_or_id),
                        fix="Give a .safetensors/.ckpt file, a Diffusers folder, or a Hugging Face id (owner/name).")
    if verbose:
        from sdtune.console import note  # the level and log file of --console_log_* apply

        note(f"model: {model.source}: {model.family.title} ({model.detection})")
        for line in found.warnings:
            note(f"warning: {line}")
    return model


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _base_configs(family: Family, config: str | Path | None) -> dict[str, dict]:
    root = Path(config) if config else family.asset_dir
    out = {}
    for comp in ("unet", "vae", "text_encoder"):
        file = root / comp / "config.json"
        if not file.is_file():
            raise UserError(f"no {comp}/config.json", where=str(root), fix="Pass a Diffusers-format folder as config.")
        out[comp] = _json(file)
    return out


def _fill_unknowns(cfg: dict, base: dict, family: Family, notes: list[str]) -> None:
    """Heads and group counts for widths that differ from the shipped config (shapes cannot tell)."""
    chans = cfg["unet"]["block_out_channels"]
    if chans != base["unet"]["block_out_channels"]:
        heads = [max(1, c // 64) for c in chans] if family.v2 else cfg["unet"]["attention_head_dim"]
        cfg["unet"]["attention_head_dim"] = heads
        cfg["unet"]["norm_num_groups"] = _groups(chans)
        notes.append(f"non-standard U-Net widths {chans}: assumed heads {heads}, {cfg['unet']['norm_num_groups']} norm groups")
    if cfg["vae"]["block_out_channels"] != base["vae"]["block_out_channels"]:
        cfg["vae"]["norm_num_groups"] = _groups(cfg["vae"]["block_out_channels"])
    width = cfg["text_encoder"]["hidden_size"]
    if width != base["text_encoder"]["hidden_size"]:
        cfg["text_encoder"]["num_attention_heads"] = max(1, width // 64)


def _groups(chans) -> int:
    return next(g for g in (32, 16, 8, 4, 2, 1) if all(c % g == 0 for c in chans))


def _build(cfg: dict[str, dict]):
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tcfg = {k: v for k, v in cfg["text_encoder"].items() if k not in ("architectures", "model_type", "transformers_version")}
    with init_empty_weights():  # parameters on meta: no memory, no random init
        unet = UNet2DConditionModel.from_config({k: v for k, v in cfg["unet"].items()})
        vae = AutoencoderKL.from_config(cfg["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**tcfg))
    return unet, vae, text_encoder


def _assign(module, sd: dict, dtype, where: str) -> None:
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    try:
        module.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as exc:
        raise UserError(f"tensors do not fit the {type(module).__name__}: {str(exc)[:400]}", where=where,
                        fix="The file's architecture differs from SD 1.x/2.x, or the config is wrong.") from None
    module.eval()


def _tokenizer_and_scheduler(family: Family, root: Path | None):
    from transformers import CLIPTokenizer

    tok_dir = root / "tokenizer" if root is not None and (root / "tokenizer").is_dir() else family.asset_dir / "tokenizer"
    sched = root / "scheduler" / "scheduler_config.json" if root is not None else None
    sched_cfg = _json(sched if sched is not None and sched.is_file() else family.asset_dir / "scheduler" / "scheduler_config.json")
    sched_cfg["prediction_type"] = family.prediction_type
    return CLIPTokenizer.from_pretrained(tok_dir), sched_cfg


# --------------------------------------------------------------------------------------------- single file


def _load_single_file(path: Path, v2, v_param, use_ema, config, dtype):
    from sdtune.model import SDModel

    sd, extras = read_state_dict(path)
    metadata = {k: v for k, v in extras.items() if isinstance(v, str)}
    found = detect_single_file(view_of(sd, metadata), v2=v2, v_parameterization=v_param, where=str(path))
    cfg, notes = _single_file_configs(sd, metadata, found.family, config, path)
    if found.probe:
        found = _probe(sd, cfg["unet"], found, str(path))
        cfg, notes = _single_file_configs(sd, metadata, found.family, config, path)
    family = found.family
    openclip = family.text_encoder_layout == "openclip"
    unet, vae, text_encoder = _build(cfg)
    unet_sd, vae_sd, text_sd, passthrough = from_original(
        sd, unet_keys=list(unet.state_dict()), vae_keys=list(vae.state_dict()), text_keys=list(text_encoder.state_dict()),
        unet_config=cfg["unet"], vae_config=cfg["vae"], openclip=openclip, use_ema=use_ema, where=str(path))
    for module, part in ((unet, unet_sd), (vae, vae_sd), (text_encoder, text_sd)):
        _assign(module, part, dtype, str(path))
    tokenizer, sched_cfg = _tokenizer_and_scheduler(family, Path(config) if config else None)
    dropped = sum(1 for k in sd if k.startswith("model_ema."))
    if dropped:
        notes.append(f"{'used' if use_ema else 'ignored'} {dropped} EMA tensors (model_ema.*; not written to outputs)")
    del sd
    model = SDModel(family, unet, vae, text_encoder, tokenizer, sched_cfg, passthrough=passthrough, source=str(path),
                    detection="; ".join([found.reason, *notes]))
    return model, found


def _single_file_configs(sd, metadata, family: Family, config, path: Path) -> tuple[dict[str, dict], list[str]]:
    """The component configs of a single file: the family's (or `config`'s), widths read from the tensors."""
    base = _base_configs(family, config)
    stored = metadata.get(CONFIGS_KEY)
    cfg = {k: dict(v) for k, v in base.items()}
    if stored and not config:
        for comp, values in json.loads(stored).items():
            cfg.setdefault(comp, {}).update(values)
    openclip = family.text_encoder_layout == "openclip"
    notes: list[str] = []
    try:
        cfg["unet"] = un.derive_config(sd, cfg["unet"])
        cfg["vae"] = va.derive_config(sd, cfg["vae"])
        known = cfg["text_encoder"]["num_hidden_layers"] if (stored or config or
                                                             _width(sd, openclip) == base["text_encoder"]["hidden_size"]) else None
        cfg["text_encoder"] = te.derive_config(sd, cfg["text_encoder"], openclip, known)
    except (KeyError, IndexError, ValueError, ZeroDivisionError) as exc:
        raise UserError(f"not a Stable Diffusion 1.x/2.x checkpoint in the original layout (looking for {exc})",
                        where=str(path), fix="Check the file; a Diffusers model is a folder, an SDXL model is not supported.") from None
    if not stored and not config:
        _fill_unknowns(cfg, base, family, notes)
    return cfg, notes


def _probe(sd, unet_config: dict, found: Detection, where: str) -> Detection:
    """The forward probe on a throwaway float32 U-Net (half-precision attention can overflow on 768-v models)."""
    import torch
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    from . import probe

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(unet_config)
    part = {k: sd[un.PREFIX + un.to_original_key(k, unet_config)] for k in unet.state_dict()}
    _assign(unet, part, torch.float32, where)
    offset = probe.run_probe(unet)
    return found.with_prediction(probe.is_v_prediction(offset), probe.describe(offset))


def _width(sd, openclip: bool) -> int | None:
    name = te.OPENCLIP_PREFIX + "token_embedding.weight" if openclip else \
        te.CLIP_PREFIX + "text_model.embeddings.token_embedding.weight"
    t = sd.get(name)
    return int(t.shape[1]) if t is not None else None


# --------------------------------------------------------------------------------------------- Diffusers


_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model.bin",
                 "pytorch_model.bin", "diffusion_pytorch_model.fp16.safetensors", "model.fp16.safetensors")


def _read_component(folder: Path) -> dict:
    for name in _WEIGHT_FILES:
        if (folder / name).is_file():
            return read_state_dict(folder / name)[0]
    for index in sorted(folder.glob("*.index.json")):
        files = sorted(set(_json(index)["weight_map"].values()))
        sd: dict = {}
        for f in files:
            sd.update(read_state_dict(folder / f)[0])
        return sd
    raise UserError("no weights file (diffusion_pytorch_model.safetensors / model.safetensors / *.bin)", where=str(folder),
                    fix="The Diffusers folder is incomplete; download or save it again.")


def _load_diffusers_folder(path: Path, v2, v_param, dtype):
    from sdtune.model import SDModel

    unet_cfg, text_cfg, sched_cfg = read_diffusers_configs(path)
    found = detect_diffusers(unet_cfg, text_cfg, sched_cfg, v2=v2, v_parameterization=v_param, where=str(path))
    family = found.family
    cfg = {"unet": unet_cfg, "vae": _json(path / "vae" / "config.json"), "text_encoder": text_cfg}
    unet, vae, text_encoder = _build(cfg)
    for comp, module in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder)):
        sd = _read_component(path / comp)
        if comp == "text_encoder":  # files from transformers < 5.6 say text_model.*; the model may not
            wanted = {te.hf_key(k): k for k in module.state_dict()}
            sd = {wanted.get(te.hf_key(k), k): v for k, v in sd.items() if te.hf_key(k) != "embeddings.position_ids"}
        _assign(module, sd, dtype, str(path / comp))
    passthrough = {}
    if (path / PASSTHROUGH_FILE).is_file():
        passthrough = {k: v.clone() for k, v in read_state_dict(path / PASSTHROUGH_FILE)[0].items()}
    tokenizer, sched_cfg = _tokenizer_and_scheduler(family, path)
    model = SDModel(family, unet, vae, text_encoder, tokenizer, sched_cfg, passthrough=passthrough, source=str(path),
                    detection=found.reason)
    return model, found


def _load_hub(repo: str, v2, v_param, dtype):
    """A Hub id through diffusers' / transformers' own `from_pretrained` (cache or download)."""
    import warnings

    local = {"local_files_only": cache_only(repo, where=repo)}  # fast when the hub cannot be reached
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from sdtune.model import SDModel
    try:
        with warnings.catch_warnings():
            # diffusers passes huggingface_hub a deprecated argument: a warning for them, not our users
            warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
            unet = UNet2DConditionModel.from_pretrained(repo, subfolder="unet", torch_dtype=dtype, **local)
            vae = AutoencoderKL.from_pretrained(repo, subfolder="vae", torch_dtype=dtype, **local)
            text_encoder = CLIPTextModel.from_pretrained(repo, subfolder="text_encoder", dtype=dtype, **local)
            tokenizer = CLIPTokenizer.from_pretrained(repo, subfolder="tokenizer", **local)
            sched = dict(DDPMScheduler.load_config(repo, subfolder="scheduler", **local))
    except Exception as exc:  # hub errors come as OSError, ValueError, HTTP and offline errors
        raise UserError(
            f"could not load {repo!r} from the Hugging Face Hub or its cache ({type(exc).__name__}: {str(exc)[:160]})",
            where=repo,
            fix=f"Download it where the network is available, e.g. `hf download {repo} --local-dir models/"
                f"{repo.split('/')[-1]}` (or `huggingface-cli download`), copy that folder here and pass its path.") from None
    found = detect_diffusers(dict(unet.config), text_encoder.config.to_dict(), sched, v2=v2, v_parameterization=v_param,
                             where=repo)
    sched["prediction_type"] = found.family.prediction_type
    for m in (unet, vae, text_encoder):
        m.eval()
    return SDModel(found.family, unet, vae, text_encoder, tokenizer, sched, source=repo, detection=found.reason), found


# --------------------------------------------------------------------------------------------- separate VAE


def load_vae(path_or_id, *, like, dtype=None, where: str = "--vae"):
    """An `AutoencoderKL` from a VAE file, a Diffusers VAE folder, a model folder with `vae/`, a whole
    checkpoint (its `first_stage_model.*`) or a Hub id, to use in place of `like` (the model's own VAE).

    Files in the original layout take their widths from the tensor shapes and the rest of the config
    (scaling factor, norm groups) from `like`; Diffusers folders bring their own config. The VAE must
    make the latents the U-Net takes: same latent channels and the same 8x downsampling.
    """
    path = Path(path_or_id)
    label = f"{where} {path_or_id}"
    if path.is_file():
        vae = _vae_from_file(path, dict(like.config), dtype, label)
    elif path.is_dir():
        vae = _vae_from_folder(path, dtype, label)
    elif is_hub_id(str(path_or_id)):
        vae = _vae_from_hub(str(path_or_id), dtype, label)
    else:
        raise UserError("VAE not found", where=label,
                        fix="Give a .safetensors/.ckpt VAE file, a Diffusers VAE or model folder, or a Hugging Face id.")
    _check_vae_fits(vae, like, label)
    return vae.requires_grad_(False).eval()


def _vae_from_file(path: Path, base: dict, dtype, label: str):
    from diffusers import AutoencoderKL

    sd, _extras = read_state_dict(path)
    found = va.original_layout(sd)
    if found is None:
        raise UserError(f"not a VAE: no encoder/decoder tensors (first keys: {sorted(sd)[:3]})", where=label,
                        fix="Give a VAE file such as vae-ft-mse-840000-ema-pruned.safetensors, or a whole checkpoint.")
    original, layout = found
    base = {k: v for k, v in base.items() if not k.startswith("_")}
    try:
        cfg = va.derive_config({va.PREFIX + k: v for k, v in original.items()}, base)
    except (KeyError, IndexError, ValueError) as exc:
        raise UserError(f"not a Stable Diffusion VAE ({layout}; looking for {exc})", where=label,
                        fix="Give an SD 1.x/2.x VAE (KL-f8) file.") from None
    if cfg["block_out_channels"] != base["block_out_channels"]:
        cfg["norm_num_groups"] = _groups(cfg["block_out_channels"])
    from accelerate import init_empty_weights

    with init_empty_weights():
        vae = AutoencoderKL.from_config(cfg)
    wanted, missing = {}, []
    for k in vae.state_dict():
        v = original.get(va.to_original_key(k, cfg))
        if v is None:
            missing.append(va.to_original_key(k, cfg))
            continue
        wanted[k] = v[:, :, 0, 0] if va.is_attention_matrix(k) and v.ndim == 4 else v
    if missing:
        raise UserError(f"{len(missing)} VAE tensors are missing ({layout}), e.g. {missing[:3]}", where=label,
                        fix="The file is incomplete or not an SD 1.x/2.x VAE.")
    _assign(vae, wanted, dtype, label)
    return vae


def _vae_from_folder(path: Path, dtype, label: str):
    from diffusers import AutoencoderKL

    folder = path / "vae" if (path / "vae" / "config.json").is_file() else path
    if not (folder / "config.json").is_file():
        raise UserError("not a Diffusers VAE folder (no config.json, no vae/config.json)", where=label,
                        fix="Point at a folder holding the VAE's config.json and weights, or at a model folder with vae/.")
    cfg = _json(folder / "config.json")
    if cfg.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise UserError(f"not a VAE folder: its config is for {cfg['_class_name']}", where=label,
                        fix="Point at the vae/ folder or at the model folder above it.")
    from accelerate import init_empty_weights

    try:
        with init_empty_weights():
            vae = AutoencoderKL.from_config(cfg)
    except (TypeError, ValueError, KeyError) as exc:
        raise UserError(f"the VAE config cannot be used ({exc})", where=str(folder / "config.json")) from None
    sd = {va.modern_key(k): v for k, v in _read_component(folder).items()}
    # 1x1 convolutions in old diffusers files; linear layers today
    sd = {k: v[:, :, 0, 0] if va.is_attention_matrix(k) and v.ndim == 4 else v for k, v in sd.items()}
    _assign(vae, sd, dtype, label)
    return vae


def _vae_from_hub(repo: str, dtype, label: str):
    import warnings

    from diffusers import AutoencoderKL

    errors = []
    local = cache_only(repo, where=label, what="the VAE")
    for sub in (None, "vae"):  # a VAE repository, else a model repository's vae/ (as sd-scripts tries)
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")  # diffusers' own call
                return AutoencoderKL.from_pretrained(repo, subfolder=sub, torch_dtype=dtype,
                                                     local_files_only=local).eval()
        except Exception as exc:  # hub errors come as OSError, ValueError, HTTP and offline errors
            errors.append(f"{type(exc).__name__}: {str(exc)[:120]}")
    raise UserError(f"could not load the VAE {repo!r} from the Hugging Face Hub or its cache ({errors[-1]})", where=label,
                    fix=f"Download it where the network is available (`hf download {repo} --local-dir vae`), "
                        "copy that folder here and pass its path.")


def _check_vae_fits(vae, like, label: str) -> None:
    mine, theirs = dict(vae.config), dict(like.config)
    if mine["latent_channels"] != theirs["latent_channels"]:
        raise UserError(f"the VAE makes {mine['latent_channels']}-channel latents; the model's U-Net takes "
                        f"{theirs['latent_channels']}", where=label, fix="Use a VAE made for Stable Diffusion 1.x/2.x.")
    if len(mine["block_out_channels"]) != len(theirs["block_out_channels"]):
        factor = 2 ** (len(mine["block_out_channels"]) - 1)
        raise UserError(f"the VAE scales images down {factor}x (Stable Diffusion's VAEs: 8x)", where=label,
                        fix="Use a VAE made for Stable Diffusion 1.x/2.x.")
    if mine["in_channels"] != 3 or mine["out_channels"] != 3:
        raise UserError(f"the VAE encodes {mine['in_channels']}-channel images (RGB: 3)", where=label,
                        fix="Use a VAE made for Stable Diffusion 1.x/2.x.")
