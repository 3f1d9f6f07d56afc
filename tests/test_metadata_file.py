"""The one metadata reader and writer (`sdtune.metadata`), shared by the preparation commands and training."""

from __future__ import annotations

import json

from sdtune.metadata import read_metadata, write_metadata


def test_a_jsonl_record_is_keyed_by_its_image_path_which_is_not_repeated_inside(tmp_path):
    source = tmp_path / "meta.jsonl"
    source.write_text('{"caption": "a cat", "image_path": "img/b.png", "tags": "cat"}\n\n'
                      '{"image_path": "a.png", "caption": "a dog"}\n', encoding="utf-8")
    meta = read_metadata(source)
    assert list(meta.items()) == [("img/b.png", {"caption": "a cat", "tags": "cat"}), ("a.png", {"caption": "a dog"})]

    # prepare_buckets_latents.py reads JSONL and may write JSON: no stray "image_path" inside a record
    out = tmp_path / "meta_lat.json"
    assert write_metadata(out, meta) is None  # nothing to back up yet
    assert json.loads(out.read_text(encoding="utf-8")) == {"img/b.png": {"caption": "a cat", "tags": "cat"},
                                                           "a.png": {"caption": "a dog"}}


def test_jsonl_is_written_one_record_a_line_with_its_image_path_first_and_the_old_file_kept(tmp_path):
    out = tmp_path / "meta.jsonl"
    out.write_text("old\n", encoding="utf-8")
    backup = write_metadata(out, {"ä.png": {"caption": "süß"}, "b": {}})
    assert out.read_text(encoding="utf-8") == ('{"image_path": "ä.png", "caption": "süß"}\n'
                                               '{"image_path": "b"}\n')
    assert backup == tmp_path / "meta.jsonl.bak" and backup.read_text(encoding="utf-8") == "old\n"
