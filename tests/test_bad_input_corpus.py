"""The standing corpus of bad input: every case gets one line (or a counted skip), the right exit
status, and leaves every file saved before it as it was.

A module fixture trains once and saves a model and a state into `ws/out`; every refused case points
its run at that same folder, so a refused run that wrote anything there would change a hash. The
cases run in this process (`sdtune.cli.main`), most of them stop before a model loads.

Each row: (id, build, exit status, what the one line must contain). `build(ws, d)` makes the bad
input in the case's own folder `d` and returns the command line. Status 0 rows are counted skips:
the run goes on (as a --dry_run, or into `d`) and its output must count the skipped input; a status
0 row without a count is input that looks wrong and is valid (an empty caption file is an empty
caption, as an empty string in the metadata is).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import struct
import warnings
import zlib
from pathlib import Path

import pytest
from PIL import Image

from sdtune.cli import main
from sdtune.testing import make_dataset

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

_ERROR = re.compile(r"^(sdtune( \w+)?: )?error: ")  # ours, or argparse's


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tiny_model_file):
    root = tmp_path_factory.mktemp("corpus")
    tiny_model_file(root / "model.safetensors", "sd1", seed=0)
    make_dataset(root / "data", n=2, seed=0, metadata=root / "meta.json")
    assert main(_train(root, "--save_state")) == 0
    assert (root / "out" / "N.safetensors").is_file() and (root / "out" / "N-state" / "optimizer.bin").is_file()
    return root


def _train(ws: Path, *extra: str, model: Path | None = None, out: Path | None = None) -> list[str]:
    return ["train", "--pretrained_model_name_or_path", str(model or ws / "model.safetensors"),
            "--in_json", str(ws / "meta.json"), "--train_data_dir", str(ws / "data"),
            "--output_dir", str(out or ws / "out"), "--output_name", "N", "--resolution", "64",
            "--train_batch_size", "1", "--max_train_steps", "1", "--learning_rate", "1e-3", "--seed", "1",
            "--max_data_loader_n_workers", "0", *extra]


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------
# Builders of bad input


def _write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def _truncated(src: Path, dst: Path, fraction: float = 0.5) -> Path:
    data = src.read_bytes()
    return _write(dst, data[:int(len(data) * fraction)])


def _unrelated_net(path: Path) -> Path:
    import torch
    from safetensors.torch import save_file

    save_file({"fc1.weight": torch.zeros(4, 3), "fc1.bias": torch.zeros(4)}, str(path))
    return path


def _png_claiming(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims `width` x `height` (with a valid CRC) and holds no pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return _write(path, b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def _dataset_with(ws: Path, d: Path, name: str, make) -> Path:
    """A copy of the workspace's images and metadata in `d`, plus one more image made by `make(path)`."""
    shutil.copytree(ws / "data", d / "data")
    make(d / "data" / name)
    meta = json.loads((ws / "meta.json").read_text())
    meta[Path(name).stem] = {"caption": "a bad image"}
    _write(d / "meta.json", json.dumps(meta))
    return d


def _with_dataset(ws: Path, d: Path, name: str, make, *extra: str) -> list[str]:
    _dataset_with(ws, d, name, make)
    args = _train(ws, *extra)
    args[args.index("--in_json") + 1] = str(d / "meta.json")
    args[args.index("--train_data_dir") + 1] = str(d / "data")
    return args


def _with_meta(ws: Path, d: Path, content: str | bytes, name: str = "meta.json", *extra: str) -> list[str]:
    _write(d / name, content)
    args = _train(ws, *extra)
    args[args.index("--in_json") + 1] = str(d / name)
    return args


def _meta_entries(ws: Path, **changes) -> str:
    meta = json.loads((ws / "meta.json").read_text())
    meta.update(changes)
    return json.dumps(meta)


def _with_toml(ws: Path, d: Path, body: str, *extra: str) -> list[str]:
    toml = body.replace("IMG", str(ws / "data").replace("\\", "/")).replace("META", str(ws / "meta.json"))
    _write(d / "data.toml", toml)
    args = _train(ws, "--dataset_config", str(d / "data.toml"), *extra)
    for flag in ("--in_json", "--train_data_dir"):
        i = args.index(flag)
        del args[i:i + 2]
    return args


_SUBSET = '[[datasets]]\n[[datasets.subsets]]\nimage_dir = "IMG"\nmetadata_file = "META"\n'


def _with_config_file(ws: Path, d: Path, body: str) -> list[str]:
    _write(d / "cfg.toml", body)
    return _train(ws, "--config_file", str(d / "cfg.toml"))


def _state_copy(ws: Path, d: Path) -> Path:
    shutil.copytree(ws / "out" / "N-state", d / "S")
    return d / "S"


def _resume_damaged(ws: Path, d: Path, name: str) -> list[str]:
    state = _state_copy(ws, d)
    _truncated(state / name, state / name, 0.6)
    return _train(ws, "--max_train_steps", "2", "--resume", str(state))


def _merge_with_caption(d: Path, data: bytes) -> list[str]:
    make_dataset(d / "imgs", n=2, seed=1)
    first = min((d / "imgs").glob("*.caption"))
    first.write_bytes(data)
    return ["merge", str(d / "imgs"), str(d / "merged.json")]


def _readonly_output(ws: Path, d: Path) -> list[str]:
    from _unwritable import read_only

    (d / "ro").mkdir()
    _readonly_output.context = read_only(d / "ro")
    _readonly_output.context.__enter__()
    return _train(ws, out=d / "ro" / "out")


# (id, build(ws, d) -> argv, exit status, what the one line contains (a string, or several), or for
# status 0 what the count of skips names)
CASES = [
    # models
    ("model-missing", lambda ws, d: _train(ws, model=d / "none.safetensors"), 2, "none.safetensors"),
    ("model-truncated-safetensors",
     lambda ws, d: _train(ws, model=_truncated(ws / "model.safetensors", d / "cut.safetensors")), 2, "cut.safetensors"),
    ("model-safetensors-garbage-header",
     lambda ws, d: _train(ws, model=_write(d / "g.safetensors", struct.pack("<Q", 1 << 40) + b"{}")), 2,
     "g.safetensors"),
    ("model-ckpt-not-a-zip-or-pickle",
     lambda ws, d: _train(ws, model=_write(d / "text.ckpt", "this is not a checkpoint\n")), 2, "text.ckpt"),
    ("model-ckpt-empty", lambda ws, d: _train(ws, model=_write(d / "empty.ckpt", b"")), 2, "empty.ckpt"),
    ("model-unrelated-net", lambda ws, d: _train(ws, model=_unrelated_net(d / "mlp.safetensors")), 2,
     "mlp.safetensors"),
    ("model-empty-diffusers-folder", lambda ws, d: (d / "empty_model").mkdir() or _train(ws, model=d / "empty_model"),
     2, "empty_model"),
    ("model-unknown-suffix", lambda ws, d: _train(ws, model=_write(d / "model.txt", "weights\n")), 2, "model.txt"),
    ("model-convert-garbage-over-a-saved-model",
     lambda ws, d: ["convert", str(_write(d / "junk.ckpt", b"\x80\x04junk")), str(ws / "out" / "N.safetensors"), "--overwrite"], 2,
     "junk.ckpt"),
    ("vae-missing", lambda ws, d: _train(ws, "--vae", str(d / "novae.safetensors")), 2, "novae.safetensors"),
    ("vae-unrelated-net", lambda ws, d: _train(ws, "--vae", str(_unrelated_net(d / "mlpvae.safetensors"))), 2,
     "mlpvae.safetensors"),
    ("vae-truncated",
     lambda ws, d: _train(ws, "--vae", str(_truncated(ws / "model.safetensors", d / "cutvae.safetensors"))), 2,
     "cutvae.safetensors"),
    # images: skipped and counted, or refused under --strict
    ("image-zero-bytes", lambda ws, d: _with_dataset(ws, d, "zero.png", lambda p: _write(p, b""), "--dry_run"), 0,
     "1 image"),
    ("image-not-an-image", lambda ws, d: _with_dataset(ws, d, "text.png", lambda p: _write(p, "hello\n"), "--dry_run"),
     0, "1 image"),
    ("image-huge-dimensions",
     lambda ws, d: _with_dataset(ws, d, "huge.png", lambda p: _png_claiming(p, 200_000, 200_000), "--dry_run"), 0,
     "1 image"),
    ("image-too-small-for-a-bucket",
     lambda ws, d: _with_dataset(ws, d, "tiny.png", lambda p: Image.new("RGB", (4, 4)).save(p), "--dry_run",
                                 "--enable_bucket", "--bucket_no_upscale", "--min_bucket_reso", "8",
                                 "--bucket_reso_steps", "8"), 0, "1 image"),
    ("image-zero-bytes-strict",
     lambda ws, d: _with_dataset(ws, d, "zero.png", lambda p: _write(p, b""), "--dry_run", "--strict"), 2, "zero.png"),
    # captions
    ("caption-not-utf8", lambda ws, d: _merge_with_caption(d, b"caf\xe9 \xff\xfe"), 2, ".caption"),
    ("caption-not-a-string",
     lambda ws, d: _with_meta(ws, d, _meta_entries(ws, img_000={"caption": 5})), 2,
     ("'caption' of 'img_000'", "Write it as a string")),
    ("caption-file-empty", lambda ws, d: _merge_with_caption(d, b""), 0, None),
    # metadata
    ("metadata-missing", lambda ws, d: _train(ws)[:3] + ["--in_json", str(d / "gone.json")] + _train(ws)[5:], 2,
     "gone.json"),
    ("metadata-invalid-json", lambda ws, d: _with_meta(ws, d, '{"a": {'), 2, "meta.json"),
    ("metadata-top-level-list", lambda ws, d: _with_meta(ws, d, "[1, 2]"), 2, "list"),
    ("metadata-entry-not-an-object", lambda ws, d: _with_meta(ws, d, _meta_entries(ws, extra="a caption")), 2,
     "extra"),
    ("metadata-key-matches-no-image",
     lambda ws, d: _with_meta(ws, d, _meta_entries(ws, no_such_image={"caption": "x"})), 2, "no_such_image"),
    ("metadata-not-utf8", lambda ws, d: _with_meta(ws, d, b'{"a": {"caption": "caf\xe9"}}'), 2,
     ("meta.json", "Re-save it as UTF-8")),
    ("metadata-jsonl-bad-line", lambda ws, d: _with_meta(ws, d, '{"image_path": "x.png"}\n{oops\n', "meta.jsonl"), 2,
     ("meta.jsonl", "line 2", "Fix that line")),
    ("metadata-bad-image-size",
     lambda ws, d: _with_meta(ws, d, json.dumps({k: {**v, "image_size": [0, -3]} for k, v in
                                                 json.loads((ws / "meta.json").read_text()).items()})), 2, "image_size"),
    ("metadata-empty-object", lambda ws, d: _with_meta(ws, d, "{}"), 2, ("meta.json", "sdtune merge")),
    # dataset TOML
    ("toml-syntax-error", lambda ws, d: _with_toml(ws, d, "[[datasets]\nresolution = 64\n"), 2, "data.toml"),
    ("toml-unknown-key", lambda ws, d: _with_toml(ws, d, _SUBSET + "num_repeatz = 2\n"), 2, "num_repeatz"),
    ("toml-wrong-type", lambda ws, d: _with_toml(ws, d, _SUBSET + 'num_repeats = "three"\n'), 2, "num_repeats"),
    ("toml-negative-repeats", lambda ws, d: _with_toml(ws, d, _SUBSET + "num_repeats = -1\n"), 2, "num_repeats"),
    ("toml-no-metadata-file",
     lambda ws, d: _with_toml(ws, d, '[[datasets]]\n[[datasets.subsets]]\nimage_dir = "IMG"\n'), 2, "metadata_file"),
    ("toml-image-dir-missing",
     lambda ws, d: _with_toml(ws, d, _SUBSET.replace('"IMG"', f'"{d}/no_images"')), 2, "no_images"),
    ("toml-datasets-not-a-list", lambda ws, d: _with_toml(ws, d, 'datasets = "all"\n'), 2, "datasets"),
    ("toml-bad-resolution", lambda ws, d: _with_toml(ws, d, _SUBSET.replace("[[datasets.subsets]]",
                                                                            'resolution = "big"\n[[datasets.subsets]]')),
     2, "resolution"),
    ("toml-file-missing", lambda ws, d: _with_toml(ws, d, _SUBSET)[:-2] + ["--dataset_config", str(d / "none.toml")], 2,
     "none.toml"),
    ("config-file-syntax-error", lambda ws, d: _with_config_file(ws, d, "learning_rate = = 1\n"), 2, "cfg.toml"),
    ("config-file-unknown-key", lambda ws, d: _with_config_file(ws, d, "learning_rat = 1e-4\n"), 2, "learning_rat"),
    ("config-file-wrong-type", lambda ws, d: _with_config_file(ws, d, 'gradient_accumulation_steps = "many"\n'), 2,
     "gradient_accumulation_steps"),
    # options
    ("option-negative-learning-rate", lambda ws, d: _train(ws, "--learning_rate", "-1e-5"), 2, "--learning_rate"),
    ("option-zero-learning-rate", lambda ws, d: _train(ws, "--learning_rate", "0"), 2, "--learning_rate"),
    ("option-zero-max-train-steps", lambda ws, d: _train(ws, "--max_train_steps", "0"), 2, "--max_train_steps"),
    ("option-resolution-not-multiple-of-8", lambda ws, d: _train(ws, "--resolution", "100"), 2, "resolution"),
    ("option-resolution-not-a-number", lambda ws, d: _train(ws, "--resolution", "big"), 2, "resolution"),
    ("option-unknown-optimizer", lambda ws, d: _train(ws, "--optimizer_type", "NoSuchOptimizer"), 2, "NoSuchOptimizer"),
    ("option-bad-mixed-precision", lambda ws, d: _train(ws, "--mixed_precision", "fp7"), 2, "--mixed_precision"),
    ("option-unknown-flag", lambda ws, d: _train(ws, "--learning_rat", "1e-4"), 2, "--learning_rate"),
    ("option-conflicting-full-fp16-bf16", lambda ws, d: _train(ws, "--full_fp16", "--full_bf16"), 2, "full_"),
    ("option-zero-batch-size", lambda ws, d: _train(ws, "--train_batch_size", "0"), 2, "--train_batch_size"),
    ("option-bad-optimizer-args", lambda ws, d: _train(ws, "--optimizer_args", "weight_decay"), 2, "weight_decay"),
    ("option-timesteps-reversed", lambda ws, d: _train(ws, "--min_timestep", "500", "--max_timestep", "100"), 2,
     "timestep"),
    ("option-unknown-save-format", lambda ws, d: _train(ws, "--save_model_as", "onnx"), 2, "--save_model_as"),
    # state folders given to --resume
    ("state-missing", lambda ws, d: _train(ws, "--max_train_steps", "2", "--resume", str(d / "nostate")), 2, "does not exist"),
    ("state-not-a-state", lambda ws, d: (d / "plain").mkdir() or _train(ws, "--max_train_steps", "2", "--resume",
                                                                          str(d / "plain")), 2, "plain"),
    ("state-truncated-optimizer", lambda ws, d: _resume_damaged(ws, d, "optimizer.bin"), 2, "optimizer.bin"),
    ("state-truncated-model", lambda ws, d: _resume_damaged(ws, d, "model.safetensors"), 2, "model.safetensors"),
    ("state-corrupt-record",
     lambda ws, d: _write(_state_copy(ws, d) / "train_state.json", "{oops") and
     _train(ws, "--max_train_steps", "2", "--resume", str(d / "S")), 2, "train_state.json"),
    ("state-options-differ",
     lambda ws, d: _train(ws, "--max_train_steps", "2", "--resume", str(_state_copy(ws, d)), "--learning_rate", "2e-3"),
     2, "learning_rate"),
    ("state-nothing-left", lambda ws, d: _train(ws, "--resume", str(_state_copy(ws, d))), 2, "nothing is left"),
    # output locations
    ("output-dir-is-a-file", lambda ws, d: _train(ws, out=_write(d / "afile", "x")), 2, "afile"),
    ("output-dir-below-a-file", lambda ws, d: _train(ws, out=_write(d / "afile", "x") / "out"), 2, "afile"),
    ("output-dir-read-only", _readonly_output, 2, "--output_dir"),
    ("logging-dir-below-a-file",
     lambda ws, d: _train(ws, "--logging_dir", str(_write(d / "afile", "x") / "logs")), 2, "--logging_dir"),
    ("output-config-exists",
     lambda ws, d: _train(ws, "--output_config", "--config_file", str(_write(d / "kept.toml", "seed = 3\n"))), 2,
     "kept.toml"),
]


def test_the_corpus_is_broad():
    ids = [c[0] for c in CASES]
    assert len(set(ids)) == len(ids) >= 40
    for kind in ("model", "vae", "image", "caption", "metadata", "toml", "option", "state", "output"):
        assert any(i.startswith(kind) for i in ids), kind


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(ws, tmp_path, capsys, case):
    _name, build, status, needle = case
    before = _hashes(ws)
    d = tmp_path / "case"
    d.mkdir()
    capsys.readouterr()
    try:
        argv = build(ws, d)
        # a library's warning would print lines of its own around the one line
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                code = main(argv)
            except SystemExit as exc:  # argparse's own errors
                code = exc.code
    finally:
        context = getattr(build, "context", None)
        if context is not None:
            build.context = None
            context.__exit__(None, None, None)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    assert not [str(w.message) for w in caught if not issubclass(w.category, DeprecationWarning)]
    errors = [line for line in captured.err.splitlines() if _ERROR.match(line)]
    if status == 0:
        assert code == 0 and not errors, captured.err
        if needle:  # a skip, counted in the run's summary; else input that is valid after all
            assert re.search(rf"\b{needle}s? skipped", captured.out + captured.err), captured.out + captured.err
    else:
        assert code == status, captured.err
        assert len(errors) == 1, captured.err
        for part in (needle,) if isinstance(needle, str) else needle:
            assert part in errors[0], errors[0]
    assert _hashes(ws) == before  # nothing saved before, input or output, changed
