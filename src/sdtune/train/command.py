"""`sdtune train` and `fine_tune.py`: sd-scripts' fine_tune.py command line."""

from __future__ import annotations

import argparse

from sdtune.config import add_options, parse_options
from sdtune.errors import UserError
from sdtune.train import sdscripts_flags
from sdtune.train.options import TrainOptions

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config_file", metavar="TOML", help="read options from a TOML file (command line wins); "
                        "NAME without .toml means NAME.toml, as in sd-scripts")
    parser.add_argument("--output_config", action="store_true", default=argparse.SUPPRESS,
                        help="write the options given on the command line to the --config_file TOML (which must not "
                             "exist yet) and exit without training")
    add_options(parser, TrainOptions)
    sdscripts_flags.add_hidden_flags(parser, set(TrainOptions.model_fields) | {"config_file", "output_config"})

def options_from_args(args: argparse.Namespace) -> TrainOptions:
    from sdtune.train.config_output import config_path

    problems = sdscripts_flags.refused(args)
    config_file = getattr(args, "config_file", None)
    if config_file and getattr(args, "output_config", False):
        config_file = None  # the file to write, not one to read
    elif config_file:
        from sdtune.config import flatten_config_file, read_toml

        config_file = config_path(config_file)
        problems += sdscripts_flags.refused_keys(flatten_config_file(read_toml(config_file)), config_file)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UserError(problems[0] + more)
    return parse_options(TrainOptions, args, config_file, exclude=("debug", "command", "config_file", "output_config"))

def with_prepared_data(opts: TrainOptions) -> TrainOptions:
    """The options with what the dataset's preparation recorded (buckets, latent cache), each
    decision said once; decided here, once, so that --dry_run and training agree."""
    import os

    from sdtune.checkpoint.detect import detect_from_header
    from sdtune.data.prepared import apply_prepared
    from sdtune.families import SD1

    # the resolution only matters for datasets without recorded buckets; the detector's warnings are
    # printed once, by the dry run or by loading
    found, _why_not = detect_from_header(opts.pretrained_model_name_or_path, v2=opts.v2 or None,
                                         v_parameterization=opts.v_parameterization or None)
    opts, notes = apply_prepared(opts, default_resolution=(found.family if found else SD1).resolution)
    if os.environ.get("RANK", "0") == "0":  # once under a multi-process launch
        for line in notes:
            print(f"note: {line}")
    return opts

def run(args: argparse.Namespace) -> int:
    opts = options_from_args(args)
    if getattr(args, "output_config", False):  # the options as given, before what the data records
        from sdtune.train.config_output import write_config

        write_config(args, opts)
        return 0
    opts = with_prepared_data(opts)
    if opts.dry_run:
        from sdtune.train.plan import dry_run

        dry_run(opts)
        return 0
    from sdtune.train.trainer import train

    return train(opts).exit_status
