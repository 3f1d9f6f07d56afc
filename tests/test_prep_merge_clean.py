"""merge / clean on fixtures with missing files, and the four commands' command lines (sd-scripts flags)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from sdtune.cli import main
from sdtune.errors import UserError
from sdtune.prep.clean import clean_caption, clean_metadata, clean_tags
from sdtune.prep.merge import merge_metadata

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def folder(tmp_path) -> Path:
    d = tmp_path / "train"
    (d / "sub").mkdir(parents=True)
    for name in ["a.png", "b.jpg", "c.webp", "d.PNG", "sub/e.png"]:
        Image.new("RGB", (8, 8)).save(d / name, format={"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}[
            name.rsplit(".", 1)[1].lower()])
    (d / "a.caption").write_text("a cat\n")
    (d / "a.txt").write_text("cat, solo\n")
    (d / "b.caption").write_text("  a dog  \n")
    (d / "c.txt").write_text("bird\n")
    (d / "sub" / "e.caption").write_text("an owl\n")
    (d / "notes.md").write_text("not an image")
    return d


def test_merge_counts_missing_files_and_updates_in_place(folder, tmp_path):
    out = tmp_path / "meta.json"
    out.write_text(json.dumps({"a": {"caption": "old", "image_size": [8, 8]}, "zzz": {"tags": "kept"}}))
    before = out.read_text()
    result = merge_metadata(folder, out)
    assert json.loads(out.read_text()) == {
        "a": {"caption": "a cat", "image_size": [8, 8], "tags": "cat, solo"},
        "zzz": {"tags": "kept"},
        "b": {"caption": "a dog"},
        "c": {"tags": "bird"},
        "d": {},
    }
    assert [p.name for p in result.missing_captions] == ["c.webp", "d.PNG"]
    assert [p.name for p in result.missing_tags] == ["b.jpg", "d.PNG"]
    assert (result.captions, result.tags, result.images) == (2, 2, 4)
    assert (tmp_path / "meta.json.bak").read_text() == before


def test_merge_jsonl_full_path_recursive_and_only_tags(folder, tmp_path):
    out = tmp_path / "meta.jsonl"
    merge_metadata(folder, out, tags=False, full_path=True, recursive=True)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines == [
        {"image_path": str(folder / "a.png"), "caption": "a cat"},
        {"image_path": str(folder / "b.jpg"), "caption": "a dog"},
        {"image_path": str(folder / "c.webp")},
        {"image_path": str(folder / "d.PNG")},
        {"image_path": str(folder / "sub" / "e.png"), "caption": "an owl"},
    ]
    with pytest.raises(UserError, match="--full_path"):
        merge_metadata(folder, tmp_path / "x.json", recursive=True)
    Image.new("RGB", (4, 4)).save(folder / "a.jpg")
    with pytest.raises(UserError, match="share the key 'a'"):
        merge_metadata(folder, tmp_path / "x.json")
    assert not (tmp_path / "x.json").exists()


def test_clean_tags_rules():
    assert clean_tags("1girl, long_hair, ^_^, shirt, white_shirt, rating:safe, solo, solo") == \
        "1girl, long hair, ^_^, white shirt, solo"
    # several people: two eye colours, two hair lengths, two hair colours -> all ambiguous, dropped
    assert clean_tags("2girls, long hair, short hair, blue eyes, red eyes, blonde hair, black hair, smile") == \
        "2girls, smile"
    # a single hair length survives next to two hair colours; one person keeps everything
    assert clean_tags("2girls, long hair, blonde hair, black hair, hair ornament") == "2girls, long hair, hair ornament"
    assert clean_tags("1girl, blonde hair, black hair, ponytail, braid") == \
        "1girl, blonde hair, black hair, ponytail, braid"
    assert clean_tags("multiple boys, ponytail, twintails, sleeveless, long sleeves") == "multiple boys"


def test_clean_caption_whole_words():
    assert clean_caption("a personal photo of an anime woman with people") == "a personal photo of an girl with girls"
    assert clean_caption("a young lady and a cartoon woman") == "a girl and a girl"
    assert clean_caption("a ladybug") == "a ladybug"


def test_clean_metadata_in_place_keeps_backup(tmp_path):
    path = tmp_path / "meta.json"
    path.write_text(json.dumps({"a": {"caption": "a woman", "tags": "long_hair"}, "b": {"image_size": [1, 1]}}))
    result = clean_metadata(path, path)
    assert json.loads(path.read_text()) == {"a": {"caption": "a girl", "tags": "long hair"}, "b": {"image_size": [1, 1]}}
    assert result.empty == ["b"] and (result.captions_changed, result.tags_changed) == (1, 1)
    assert json.loads((tmp_path / "meta.json.bak").read_text())["a"]["caption"] == "a woman"


# ---------------------------------------------------------------------------------------------
# command lines


def test_sd_scripts_merge_command_lines(folder, tmp_path, capsys):
    cap = tmp_path / "meta_cap.json"
    assert main(["merge", "--only", "captions", str(folder), str(cap), "--caption_extention", ".caption"]) == 0
    assert json.loads(cap.read_text())["b"] == {"caption": "a dog"}
    dd = tmp_path / "meta_cap_dd.json"
    assert main(["merge", "--only", "tags", str(folder), str(dd), "--in_json", str(cap)]) == 0
    meta = json.loads(dd.read_text())
    assert meta["a"] == {"caption": "a cat", "tags": "cat, solo"} and meta["c"] == {"tags": "bird"}
    assert "2 images have no tag file" in capsys.readouterr().out
    clean = tmp_path / "meta_clean.json"
    assert main(["clean", str(dd), str(clean), str(folder)]) == 0
    assert json.loads(clean.read_text())["a"]["tags"] == "cat, solo"
    assert main(["merge", str(folder), str(tmp_path / "m.txt")]) == 2
    assert ".json or .jsonl" in capsys.readouterr().err


@pytest.mark.slow
def test_entry_scripts_and_help_without_torch(folder, tmp_path):
    out = tmp_path / "meta.json"
    proc = subprocess.run([sys.executable, str(REPO / "finetune" / "merge_dd_tags_to_metadata.py"), str(folder),
                           str(out), "--caption_extension", ".txt"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["a"] == {"tags": "cat, solo"}
    code = ("import sys, contextlib, io\nfrom sdtune.cli import main\n"
            "for c in ['caption', 'tag', 'merge', 'clean']:\n"
            "    with contextlib.redirect_stdout(io.StringIO()):\n"
            "        try: main([c, '--help'])\n"
            "        except SystemExit: pass\n"
            "print(sorted(m for m in ('torch', 'transformers', 'onnxruntime') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "[]", proc.stderr


@pytest.mark.slow
def test_tag_command_with_sd_scripts_flags(tmp_path, capsys):
    from test_prep_tagger import make_wd14, solid

    model = make_wd14(tmp_path / "model")
    data = tmp_path / "data"
    data.mkdir()
    solid(data / "blue.png", (0, 0, 255), (16, 16))
    argv = ["tag", str(data), "--onnx", "--repo_id", str(model), "--batch_size", "4", "--thresh", "0.35",
            "--remove_underscore", "--use_rating_tags", "--undesired_tags", "solo", "--caption_extention", ".tags",
            "--frequency_tags", "--max_data_loader_n_workers", "1"]
    assert main(argv) == 0
    # blue: long_hair 1, solo 0.9 (undesired), (o)_(o) 0.6, ganyu 0.4; rating explicit (1.0) first
    assert (data / "blue.tags").read_text() == "explicit, long hair, (o)_(o), ganyu (genshin impact)\n"
    out = capsys.readouterr().out
    assert "tagged 1 image\n" in out and "long hair" in out.split("tag frequencies:")[1]
    assert main(argv) == 0 and "skipped 1 that already had tags" in capsys.readouterr().out
    assert main(["tag", str(data), "--repo_id", str(model), "--copyright_threshold", "0.5"]) == 2
    assert "--copyright_threshold" in capsys.readouterr().err
