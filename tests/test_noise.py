"""Nothing but sdtune's own lines around a command: bitsandbytes imported only for an 8-bit optimizer
and then quietly, an unreachable hub found once and fast, counts with the right plural, and each
kind of line on its stream (ours on stdout; stderr for the error that ends a run, progress bars and
the libraries)."""

from __future__ import annotations

import http.server
import json
import os
import socket
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from sdtune.console import plural
from sdtune.data import DatasetOptions, build_plan
from sdtune.testing import make_dataset

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _python(run_in_session, code: str, *, env: dict | None = None, timeout: float = 300, path: list[str] = ()):
    """`code` in a fresh Python with this checkout's sdtune, in a session that a timeout kills."""
    environ = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    environ["PYTHONPATH"] = os.pathsep.join([*path, SRC, environ.get("PYTHONPATH", "")])
    environ["HF_HUB_OFFLINE"] = "1"
    environ.update(env or {})
    environ = {k: v for k, v in environ.items() if v is not None}  # None: unset
    return run_in_session([sys.executable, "-c", textwrap.dedent(code)], env=environ, timeout=timeout)


# ---------------------------------------------------------------- bitsandbytes


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_model_file):
    root = tmp_path_factory.mktemp("noise")
    tiny_model_file(root / "tiny.safetensors", "sd1", seed=0)
    make_dataset(root / "data", n=2, seed=0, metadata=root / "meta.json")
    return root


@pytest.mark.slow
def test_the_8bit_library_loads_for_an_8bit_optimizer_only(workspace, tmp_path, run_in_session):
    """Loading a model (convert) leaves bitsandbytes alone; training with AdamW8bit imports it from
    the optimizer, and nothing of it reaches the terminal. The model and save lines are on stdout."""
    ws = workspace
    proc = _python(run_in_session, f"""
        import json, sys, traceback

        importers = []

        class Watch:  # who imports bitsandbytes first (diffusers also just looks it up: not an import)
            def find_spec(self, name, path, target=None):
                stack = traceback.extract_stack()[:-1]
                if name == "bitsandbytes" and not importers and stack[-2].name == "_find_and_load_unlocked":
                    importers.extend(f.filename for f in stack)
                return None

        sys.meta_path.insert(0, Watch())
        from sdtune.cli import main

        convert = main(["convert", "{ws / 'tiny.safetensors'}", "{tmp_path / 'converted'}"])
        after_convert = "bitsandbytes" in sys.modules
        train = main(["train", "--pretrained_model_name_or_path", "{ws / 'tiny.safetensors'}", "--in_json",
                      "{ws / 'meta.json'}", "--train_data_dir", "{ws / 'data'}", "--resolution", "64",
                      "--train_batch_size", "2", "--max_train_steps", "1", "--output_dir", "{tmp_path / 'out'}",
                      "--optimizer_type", "AdamW8bit"])
        sys.stdout.write("RESULT " + json.dumps([convert, after_convert, train, "bitsandbytes" in sys.modules,
                                                 importers, "deepspeed" in sys.modules]) + "\\n")
    """)
    result = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert result, proc.stderr[-3000:]
    convert, after_convert, train, loaded, importers, deepspeed = json.loads(result[0][len("RESULT "):])
    assert convert == 0 and not after_convert
    assert train == 0 and loaded
    # a run without --deepspeed leaves DeepSpeed unloaded (installed here, it would take ~0.5 s and, on
    # a machine without a GPU, print a warning of its own)
    assert not deepspeed
    sdtune_files = [f for f in importers if "/sdtune/" in f]
    assert sdtune_files[-1].endswith("sdtune/train/optim.py"), importers  # not diffusers' model loading
    said = [line for line in proc.stdout.splitlines() if not line.startswith("RESULT ")]
    everything = "\n".join(said) + proc.stderr
    assert "bitsandbytes" not in everything and "kernels" not in everything and "gemm" not in everything
    # streams: sdtune's lines (model, plan, saves) on stdout; stderr has the progress bar only
    assert "model: " in proc.stdout and "saved " in proc.stdout and "wrote " in proc.stdout
    assert "model: " not in proc.stderr and "saved " not in proc.stderr
    assert all(line.startswith(("steps:", "\r", "  ")) or "steps" in line or not line.strip()
               for line in proc.stderr.splitlines()), proc.stderr[-2000:]


CHATTY = '''
import logging, sys, warnings
print("stdout chatter")
sys.stderr.write("stderr chatter\\n")
logging.getLogger("bitsandbytes.backends.cpu.ops").warning(
    "Failed to load CPU gemm_4bit_forward from kernels-community. Please make sure you already `pip install kernels`")
warnings.warn("warning chatter")
'''


def _stand_in(root: Path, optim_body: str) -> Path:
    """A `bitsandbytes` that talks while it imports, like the real one does on CPUs without its
    optional kernel package (the real one prints nothing on this test machine's CPU)."""
    pkg = root / "bitsandbytes"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(CHATTY)
    (pkg / "optim.py").write_text(optim_body)
    return root


BUILD = """
    import torch
    from sdtune.train.optim import build_optimizer
    from sdtune.errors import UserError
    p = torch.nn.Parameter(torch.ones(3))
    try:
        opt = build_optimizer("AdamW8bit", [{"params": [p], "lr": 1e-3}], 1e-3)
        print("BUILT", type(opt).__name__)
    except UserError as exc:
        print("USERERROR", exc.message)
"""


@pytest.mark.slow
def test_8bit_import_chatter_is_kept_off_the_terminal(tmp_path, run_in_session):
    fake = _stand_in(tmp_path, "import torch\nclass AdamW8bit(torch.optim.AdamW):\n    pass\n")
    proc = _python(run_in_session, BUILD, path=[str(fake)], timeout=120)
    assert proc.stdout.splitlines() == ["BUILT AdamW8bit"], proc.stdout + proc.stderr
    assert proc.stderr == ""


@pytest.mark.slow
def test_a_failing_8bit_import_is_one_clear_line(tmp_path, run_in_session):
    fake = _stand_in(tmp_path, "raise RuntimeError('libbitsandbytes_cpu.so: cannot open shared object file')\n")
    proc = _python(run_in_session, BUILD, path=[str(fake)], timeout=120)
    assert proc.stderr == "" and len(proc.stdout.splitlines()) == 1, proc.stdout + proc.stderr
    line = proc.stdout.strip()
    assert line.startswith("USERERROR --optimizer_type: AdamW8bit needs the 'bitsandbytes' package, which is installed but fails")
    assert "cannot open shared object file" in line and "chatter" not in line and "pip install" in line


# ---------------------------------------------------------------- an unreachable hub


class _Hub(http.server.ThreadingHTTPServer):
    """A hub endpoint that answers every request with 503 (a hub that is down) and counts them."""

    daemon_threads = True

    def __init__(self):
        self.requests = 0
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self):
                hub.requests += 1
                self.send_response(503)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_HEAD = _answer

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


def _closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"  # closed when the block ends: connection refused


TIMED = """
    import sys, time
    import diffusers, torch, transformers  # imported before the clock starts
    from sdtune.cli import main
    for argv in {argvs!r}:
        start = time.monotonic()
        code = main(argv)
        print(f"EXIT {{code}} {{time.monotonic() - start:.1f}}")
"""


def _timed(proc) -> list[tuple[int, float]]:
    lines = [l.split()[1:] for l in proc.stdout.splitlines() if l.startswith("EXIT ")]
    assert lines, proc.stdout[-2000:] + proc.stderr[-2000:]
    return [(int(code), float(seconds)) for code, seconds in lines]


@pytest.mark.slow
def test_an_unreachable_hub_is_one_line_in_seconds(tmp_path, run_in_session):
    env = {"HF_HUB_OFFLINE": None, "HF_ENDPOINT": _closed_port(), "HF_HUB_CACHE": str(tmp_path / "empty-cache")}
    proc = _python(run_in_session, TIMED.format(argvs=[["convert", "some-org/some-model", str(tmp_path / "o")]]),
                   env=env)
    [(code, seconds)] = _timed(proc)
    assert code == 2 and seconds < 8, (seconds, proc.stderr[-2000:])  # the libraries' retries took 28-51 s
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: some-org/some-model: "), proc.stderr
    assert "some-org/some-model: it is not in the local Hugging Face cache" in lines[0] and "cannot be reached" in lines[0]
    assert "HF_HUB_OFFLINE=1" in lines[0] and "Retrying" not in proc.stdout


@pytest.mark.slow
def test_a_hub_that_is_down_is_asked_once(tmp_path, run_in_session):
    """The model and the tagger of one process: one request in all, one line each."""
    make_dataset(tmp_path / "images", n=1, seed=0)
    hub = _Hub()
    env = {"HF_HUB_OFFLINE": None, "HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(tmp_path / "empty-cache")}
    argvs = [["convert", "some-org/some-model", str(tmp_path / "o")],
             ["tag", str(tmp_path / "images"), "--repo_id", "some-org/some-tagger", "--model_dir", str(tmp_path / "m")]]
    proc = _python(run_in_session, TIMED.format(argvs=argvs), env=env)
    hub.shutdown()
    assert [code for code, _s in _timed(proc)] == [2, 2] and all(s < 8 for _c, s in _timed(proc)), proc.stderr
    assert hub.requests == 1
    model, tagger = proc.stderr.splitlines()
    assert model.startswith("error: some-org/some-model: ") and "cannot be reached (HTTP 503)" in model
    assert tagger.startswith("error: --repo_id: cannot fetch model.onnx") and "cannot be reached: HTTP 503" in tagger


def _cache_entry(cache: Path, repo: str, model: Path) -> None:
    """`repo` in a Hugging Face hub cache, laid out as huggingface_hub writes it."""
    import shutil

    entry = cache / f"models--{repo.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text(commit)
    shutil.copytree(model, entry / "snapshots" / commit)


@pytest.mark.slow
def test_a_cached_hub_id_loads_without_the_hub(tmp_path, run_in_session, tiny_model_file):
    tiny_model_file(tmp_path / "model", "sd1", seed=0, fmt="diffusers")
    _cache_entry(tmp_path / "cache", "tiny-org/tiny-sd", tmp_path / "model")
    hub = _Hub()
    env = {"HF_HUB_OFFLINE": None, "HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(tmp_path / "cache")}
    proc = _python(run_in_session, TIMED.format(argvs=[["convert", "tiny-org/tiny-sd", str(tmp_path / "o.safetensors")]]),
                   env=env)
    [(code, _seconds)] = _timed(proc)
    assert code == 0, proc.stderr[-2000:]
    assert hub.requests == 1  # one question; then the cache only, no retries
    hub.shutdown()
    assert "hub cannot be reached (HTTP 503); tiny-org/tiny-sd is loaded from the local cache" in proc.stdout
    assert (tmp_path / "o.safetensors").is_file()


# ---------------------------------------------------------------- plurals


@pytest.mark.parametrize("n, noun, want", [
    (0, "image", "0 images"), (1, "image", "1 image"), (2, "image", "2 images"),
    (1, "batch", "1 batch"), (3, "batch", "3 batches"), (2, "process", "2 processes"),
    (1, "entry", "1 entry"), (5, "entry", "5 entries"), (2, "day", "2 days"),
    (2, "tag line", "2 tag lines"), (2, "held-out image", "2 held-out images"), (2, "child", "2 children"),
])
def test_plural(n, noun, want):
    form = "children" if noun == "child" else None
    assert plural(n, noun, form) == want


def test_a_plan_of_one_image_says_so_in_the_singular(tmp_path):
    make_dataset(tmp_path / "data", n=1, seed=0, metadata=tmp_path / "meta.json")
    (tmp_path / "data" / "broken.png").write_bytes(b"not an image")
    meta = json.loads((tmp_path / "meta.json").read_text())
    (tmp_path / "meta.json").write_text(json.dumps({**meta, "broken.png": {"caption": "broken"}}))
    opts = DatasetOptions(in_json=str(tmp_path / "meta.json"), train_data_dir=str(tmp_path / "data"),
                          resolution="64", enable_bucket=True, min_bucket_reso=64, max_bucket_reso=64,
                          bucket_reso_steps=64)
    summary = build_plan(opts, seed=0, warn=lambda _msg: None).summary()
    assert "dataset 0 (--in_json: datasets[0]): batch size 1; 1 bucket, area <= 64x64" in summary
    assert "  subset 0: 1 image x 1 repeat from" in summary
    assert ("1 image, 1 sample per epoch, 1 batch; with 1 process and 1 accumulation step: 1 batch and "
            "1 optimizer step per epoch") in summary
    assert "1 image skipped: " in summary
    assert "(s)" not in summary and "1 images" not in summary and "1 buckets" not in summary
