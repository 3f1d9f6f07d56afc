"""`sdtune clean`: clean captions and tags in a metadata file (sd-scripts' clean_captions_and_tags.py rules,
applied to whole words and tags; see sdtune.prep.clean)."""

from __future__ import annotations

import argparse

from sdtune.console import plural


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("in_json", help="metadata file to read (.json or .jsonl)")
    parser.add_argument("out_json", help="metadata file to write; may be in_json (a .bak copy is kept)")
    # sd-scripts once took the image folder as a third argument; it still tolerates (and ignores) it.
    parser.add_argument("train_data_dir", nargs="?", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--caption_separator", default=", ", help='separator between tags (", ")')


def run(args: argparse.Namespace) -> int:
    from sdtune.prep.clean import clean_metadata

    if args.train_data_dir is not None:
        print("note: the image folder argument is not needed and was ignored (as in sd-scripts)")
    result = clean_metadata(args.in_json, args.out_json, args.caption_separator)
    print(f"cleaned {plural(result.records, 'record')}: {plural(result.captions_changed, 'caption')} and "
          f"{plural(result.tags_changed, 'tag line')} changed"
          + (f" (previous file kept as {result.backup})" if result.backup else ""))
    if result.empty:
        names = ", ".join(result.empty[:5]) + (" ..." if len(result.empty) > 5 else "")
        have = "has" if len(result.empty) == 1 else "have"
        print(f"warning: {plural(len(result.empty), 'record')} {have} neither caption nor tags: {names}")
    return 0
