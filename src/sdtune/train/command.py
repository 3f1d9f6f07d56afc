"""`sdtune train` and `fine_tune.py`: sd-scripts' fine_tune.py command line."""

from __future__ import annotations

import argparse

from sdtune.config import Field, add_options, parse_options
from sdtune.errors import UserError
from sdtune.train import sdscripts_flags
from sdtune.train.options import BaseTrainOptions


class InterimDataOptions(BaseTrainOptions):
    # INTERIM until sdtune.data lands: the legacy --in_json/--train_data_dir form only.
    in_json: str | None = Field(None, "metadata JSON (sd-scripts format)", group="Dataset", metavar="FILE")
    train_data_dir: str | None = Field(None, "folder of the images named in --in_json", group="Dataset", metavar="DIR")
    resolution: str = Field("512", "training resolution, 'N' or 'W,H'", group="Dataset")
    train_batch_size: int = Field(1, "images per batch and process", group="Dataset", ge=1)


TrainOptions = InterimDataOptions


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config_file", metavar="TOML", help="read options from a TOML file (command line wins)")
    add_options(parser, TrainOptions)
    sdscripts_flags.add_hidden_flags(parser, set(TrainOptions.model_fields))


def options_from_args(args: argparse.Namespace) -> TrainOptions:
    problems = sdscripts_flags.refused(args)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UserError(problems[0] + more)
    opts = parse_options(TrainOptions, args, getattr(args, "config_file", None), exclude=("debug", "command", "config_file"))
    if not opts.in_json:
        raise UserError("no dataset given", where="--in_json", fix="Pass --in_json meta.json --train_data_dir DIR.")
    return opts


def run(args: argparse.Namespace) -> int:
    opts = options_from_args(args)
    if opts.dry_run:
        print(opts.model_dump_json(indent=2, exclude_defaults=True))
        return 0
    from sdtune.train.loop import train

    train(opts)
    return 0
