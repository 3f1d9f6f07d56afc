"""`sdtune tag`: WD14 / DeepDanbooru tags for a folder of images.

Accepts the flags of sd-scripts' finetune/tag_images_by_wd14_tagger.py. No torch is imported.
"""

from __future__ import annotations

import argparse

from sdtune.console import plural
from sdtune.errors import UserError

_UNSUPPORTED = {
    "copyright_threshold": "threshold", "meta_threshold": "threshold", "model_threshold": "threshold",
    "artist_threshold": "threshold", "use_quality_tags": "flag", "use_quality_tags_as_last_tag": "flag",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from sdtune.prep.wd14 import DEFAULT_REPO

    parser.add_argument("train_data_dir", help="folder with the images")
    m = parser.add_argument_group("model")
    m.add_argument("--repo_id", "--model", dest="repo_id", default=DEFAULT_REPO,
                   help=f"hub id of a SmilingWolf WD tagger, or a local folder (WD14: model.onnx + "
                        f"selected_tags.csv; DeepDanbooru: tags.txt + *.onnx). Default {DEFAULT_REPO}")
    m.add_argument("--model_dir", default=None,
                   help="folder holding the tagger files, or where to download them (default: the hub cache)")
    m.add_argument("--force_download", action="store_true", help="download the model again even if present")
    m.add_argument("--tagger", choices=["auto", "wd14", "deepdanbooru"], default="auto",
                   help="model kind; auto picks DeepDanbooru for a folder with tags.txt and an .onnx file")
    m.add_argument("--onnx", action="store_true", help="accepted for sd-scripts compatibility: sdtune always uses ONNX")
    m.add_argument("--batch_size", type=int, default=1, help="images per model call (fixed-batch models use their own)")
    m.add_argument("--max_data_loader_n_workers", type=int, default=None,
                   help="threads that decode and preprocess images ahead of the model (default: none)")

    t = parser.add_argument_group("thresholds")
    t.add_argument("--thresh", type=float, default=0.35, help="default threshold for every category (0.35)")
    t.add_argument("--general_threshold", type=float, default=None, help="general tags (default: --thresh)")
    t.add_argument("--character_threshold", type=float, default=None, help="character tags (default: --thresh)")
    t.add_argument("--general_mcut", action="store_true",
                   help="choose the general threshold per image with MCut (largest gap) instead")
    t.add_argument("--character_mcut", action="store_true",
                   help="choose the character threshold per image with MCut (never below 0.15)")

    o = parser.add_argument_group("output")
    o.add_argument("--caption_extension", "--caption_extention", dest="caption_extension", default=".txt",
                   help="extension of the tag files written next to the images (.txt)")
    o.add_argument("--output_path", default=None,
                   help="write all tags into this metadata file (.json or .jsonl) instead of per-image files")
    o.add_argument("--recursive", action="store_true", help="also tag images in subfolders")
    o.add_argument("--overwrite", action="store_true", help="re-tag images that already have tags")
    o.add_argument("--append_tags", action="store_true", help="add new tags to existing tag files (no duplicates)")
    o.add_argument("--caption_separator", default=", ", help='separator between tags (", ")')
    o.add_argument("--remove_underscore", action="store_true",
                   help="write long_hair as 'long hair' (emoticons such as ^_^ keep their underscore)")
    o.add_argument("--undesired_tags", default="", help="tags never to write, separated by --caption_separator")
    o.add_argument("--always_first_tags", default=None, help="tags moved to the front when present, in this order")
    o.add_argument("--character_tags_first", action="store_true", help="character tags before general tags")
    o.add_argument("--character_tag_expand", action="store_true",
                   help="write 'name_(series)' as two tags: name, series")
    o.add_argument("--tag_replacement", default=None,
                   help=r'rename tags: "source,target;source2,target2" (\, and \; escape)')
    o.add_argument("--use_rating_tags", action="store_true", help="put the most likely rating tag first")
    o.add_argument("--use_rating_tags_as_last_tag", action="store_true", help="put the most likely rating tag last")
    o.add_argument("--tag_order", choices=["label", "probability"], default="label",
                   help="order within general and character tags: model label order (sd-scripts) or by probability")
    o.add_argument("--frequency_tags", action="store_true", help="print how often each tag was written")

    u = parser.add_argument_group("sd-scripts options that sdtune refuses (only for tag_mapping.json models)")
    for name, kind in _UNSUPPORTED.items():
        if kind == "flag":
            u.add_argument(f"--{name}", action="store_true", help=argparse.SUPPRESS)
        else:
            u.add_argument(f"--{name}", type=float, default=None, help=argparse.SUPPRESS)


def build_options(args: argparse.Namespace):
    from sdtune.prep.tags import TagOptions, parse_tag_replacement, split_tag_list

    for name in _UNSUPPORTED:
        if getattr(args, name) not in (None, False):
            raise UserError("only used by tag_mapping.json models, which sdtune does not run", where=f"--{name}",
                            fix="Remove it; SmilingWolf WD taggers have rating, general and character tags.")
    if args.use_rating_tags and args.use_rating_tags_as_last_tag:
        raise UserError("--use_rating_tags and --use_rating_tags_as_last_tag exclude each other",
                        where="--use_rating_tags_as_last_tag", fix="Keep one.")
    sep = args.caption_separator
    return TagOptions(
        general_threshold=args.thresh if args.general_threshold is None else args.general_threshold,
        character_threshold=args.thresh if args.character_threshold is None else args.character_threshold,
        general_mcut=args.general_mcut,
        character_mcut=args.character_mcut,
        undesired_tags=split_tag_list(args.undesired_tags, sep),
        always_first_tags=split_tag_list(args.always_first_tags, sep),
        character_tags_first=args.character_tags_first,
        character_tag_expand=args.character_tag_expand,
        remove_underscore=args.remove_underscore,
        tag_replacement=parse_tag_replacement(args.tag_replacement),
        rating="first" if args.use_rating_tags else "last" if args.use_rating_tags_as_last_tag else "none",
        order=args.tag_order,
        caption_separator=sep,
    )


def run(args: argparse.Namespace) -> int:
    from sdtune.prep.files import find_images
    from sdtune.prep.tagger import format_frequencies, load_tagger, tag_images

    options = build_options(args)
    if args.thresh < 0:
        raise UserError("threshold must be >= 0", where="--thresh")
    find_images(args.train_data_dir, args.recursive)  # a wrong folder fails before the model loads
    tagger = load_tagger(args.repo_id, kind=args.tagger, model_dir=args.model_dir,
                         force_download=args.force_download, options=options)
    result = tag_images(args.train_data_dir, tagger, options=options, caption_extension=args.caption_extension,
                        output_path=args.output_path, recursive=args.recursive, batch_size=args.batch_size,
                        num_workers=args.max_data_loader_n_workers or 0, overwrite=args.overwrite,
                        append_tags=args.append_tags)
    print(summary("tagged", result.written, result.skipped_existing, result.unreadable, "tags", "--overwrite"))
    if args.frequency_tags:
        print(format_frequencies(result.frequencies))
    return 0


def summary(verb: str, written, skipped, unreadable, what: str, flag: str) -> str:
    text = f"{verb} {plural(len(written), 'image')}"
    if skipped:
        text += f"; skipped {len(skipped)} that already had {what} (use {flag} to redo them)"
    if unreadable:
        names = ", ".join(str(p) for p in unreadable[:5]) + (" ..." if len(unreadable) > 5 else "")
        text += f"; skipped {plural(len(unreadable), 'unreadable image')}: {names}"
        print(f"warning: {plural(len(unreadable), 'image')} could not be read: {names}")
    return text
