"""`sdtune caption`: BLIP captions next to images. Accepts sd-scripts' finetune/make_captions.py flags."""

from __future__ import annotations

import argparse

from sdtune.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from sdtune.prep.blip import DEFAULT_MODEL

    parser.add_argument("train_data_dir", help="folder with the images")
    parser.add_argument("--model_id", default=DEFAULT_MODEL,
                        help=f"BLIP captioning model: hub id or local folder (default {DEFAULT_MODEL})")
    parser.add_argument("--caption_weights", default=None,
                        help="sd-scripts' BLIP .pth weights: not supported, use --model_id")
    parser.add_argument("--caption_extension", "--caption_extention", dest="caption_extension", default=".caption",
                        help="extension of the caption files (.caption)")
    parser.add_argument("--batch_size", type=int, default=1, help="images per generate call (1)")
    parser.add_argument("--max_data_loader_n_workers", type=int, default=None,
                        help="threads that read images ahead of the model (default: none)")
    parser.add_argument("--beam_search", action="store_true", help="beam search instead of nucleus sampling")
    parser.add_argument("--num_beams", type=int, default=1, help="beams for --beam_search (1)")
    parser.add_argument("--top_p", type=float, default=0.9, help="nucleus sampling probability mass (0.9)")
    parser.add_argument("--max_length", type=int, default=75, help="maximum caption length in tokens, prompt included (75)")
    parser.add_argument("--min_length", type=int, default=5, help="minimum caption length in tokens (5)")
    parser.add_argument("--repetition_penalty", type=float, default=None,
                        help="default 1.1 when sampling, 1.0 with beam search (as sd-scripts)")
    parser.add_argument("--prompt", default="a picture of ",
                        help='text the caption starts from, removed from the output ("a picture of "; "" for none)')
    parser.add_argument("--seed", type=int, default=42, help="sampling seed (42)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--recursive", action="store_true", help="also caption images in subfolders")
    parser.add_argument("--overwrite", action="store_true", help="re-caption images that already have a caption file")


def build_options(args: argparse.Namespace):
    from sdtune.prep.blip import BlipOptions

    if args.caption_weights:
        raise UserError("sd-scripts' vendored BLIP weights (.pth) are not supported", where="--caption_weights",
                        fix="Use --model_id with a transformers BLIP model (default Salesforce/blip-image-captioning-large).")
    if (args.max_data_loader_n_workers or 0) < 0:
        raise UserError("must be 0 or more", where="--max_data_loader_n_workers")
    if args.num_beams > 1 and not args.beam_search:
        raise UserError("--num_beams only acts with --beam_search", where="--num_beams",
                        fix="Add --beam_search, or drop --num_beams.")
    return BlipOptions(beam_search=args.beam_search, num_beams=args.num_beams, top_p=args.top_p,
                          max_length=args.max_length, min_length=args.min_length,
                          repetition_penalty=args.repetition_penalty, prompt=args.prompt, seed=args.seed)


def run(args: argparse.Namespace) -> int:
    from sdtune.prep.blip import caption_images, load_captioner
    from sdtune.prep.tag_command import summary

    from sdtune.prep.files import find_images

    options = build_options(args)
    find_images(args.train_data_dir, args.recursive)  # a wrong folder fails before the model loads
    captioner = load_captioner(args.model_id, device=args.device)
    result = caption_images(args.train_data_dir, captioner, options=options, caption_extension=args.caption_extension,
                            recursive=args.recursive, batch_size=args.batch_size,
                            num_workers=args.max_data_loader_n_workers or 0, overwrite=args.overwrite)
    print(summary("captioned", result.written, result.skipped_existing, result.unreadable, "captions", "--overwrite"))
    return 0
