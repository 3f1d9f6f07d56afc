"""`sdtune merge`: caption (.caption) and tag (.txt) files into a metadata JSON/JSONL file.

Accepts the command lines of sd-scripts' merge_captions_to_metadata.py and
merge_dd_tags_to_metadata.py (`train_data_dir out_json [--in_json] [--full_path] [--recursive]
[--caption_extension]`). With `--only tags` (what finetune/merge_dd_tags_to_metadata.py passes),
`--caption_extension` names the tag files, as in sd-scripts.
"""

from __future__ import annotations

import argparse

from sdtune.console import plural
from sdtune.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("train_data_dir", help="folder with the images and their caption/tag files")
    parser.add_argument("out_json", help="metadata file to write (.json or .jsonl); updated in place if it exists")
    parser.add_argument("--in_json", default=None, help="metadata file to start from (default: out_json if it exists)")
    parser.add_argument("--only", choices=["captions", "tags"], default=None,
                        help="merge only captions or only tags (default: both, each when its files exist)")
    parser.add_argument("--caption_extension", "--caption_extention", dest="caption_extension", default=None,
                        help="caption file extension (.caption); with --only tags: the tag file extension")
    parser.add_argument("--tags_extension", default=None, help="tag file extension (.txt)")
    parser.add_argument("--full_path", action="store_true", help="key records by image path instead of file stem")
    parser.add_argument("--recursive", action="store_true", help="include subfolders (needs --full_path)")


def extensions(args: argparse.Namespace) -> tuple[str, str]:
    if args.only == "tags":
        if args.caption_extension and args.tags_extension and args.caption_extension != args.tags_extension:
            raise UserError("with --only tags, --caption_extension names the tag files; give one of the two",
                            where="--tags_extension")
        return ".caption", args.tags_extension or args.caption_extension or ".txt"
    return args.caption_extension or ".caption", args.tags_extension or ".txt"


def run(args: argparse.Namespace) -> int:
    from sdtune.prep.merge import merge_metadata

    caption_ext, tags_ext = extensions(args)
    result = merge_metadata(args.train_data_dir, args.out_json, in_json=args.in_json,
                            captions=args.only in (None, "captions"), tags=args.only in (None, "tags"),
                            caption_extension=caption_ext, tags_extension=tags_ext,
                            full_path=args.full_path, recursive=args.recursive)
    parts = [f"merged {plural(result.images, 'image')} into {args.out_json}"]
    if args.only in (None, "captions"):
        parts.append(plural(result.captions, "caption"))
    if args.only in (None, "tags"):
        parts.append(plural(result.tags, "tag line"))
    print(", ".join(parts) + (f" (previous file kept as {result.backup})" if result.backup else ""))
    for what, ext, missing in (("caption", caption_ext, result.missing_captions),
                               ("tag", tags_ext, result.missing_tags)):
        # Both kinds by default: a folder with no tag files at all just has no tags yet.
        if missing and (args.only or len(missing) < result.images):
            names = ", ".join(p.name for p in missing[:5]) + (" ..." if len(missing) > 5 else "")
            have = "has" if len(missing) == 1 else "have"
            print(f"warning: {plural(len(missing), 'image')} {have} no {what} file ({ext}): {names}")
    return 0
