"""Before any model loads: every folder the run will write is written to once.

A folder the run cannot write (a read-only mount, an immutable folder, a path whose parent is a
file) would otherwise fail only at the first save — after every step ran, with no way to save the
state either. So each folder is really tried: created if missing (as the run would create it) and
a small temporary file made and removed in it (`data.writable`). Permission bits alone do not tell:
root ignores them, while a read-only file system or an immutable folder refuses root too.

Checked: the output folder (models, states, summary, loss plot), the samples folder when samples
are due, --logging_dir, --console_log_file's folder and the disk caches. A cache folder that already
holds entries is not tried here: a complete cache is read without writing, so it may live on
read-only storage; the caches themselves refuse before encoding when they have something to write
and cannot (`latent_cache.check_writable`, `TextEmbeddingCache`).
"""

from __future__ import annotations

from pathlib import Path

from sdtune.data.latent_cache import CACHE_FOLDER, cache_folder
from sdtune.data.writable import check_cache_folders, write_problem
from sdtune.errors import UserError
from sdtune.train.options import TrainOptions


def output_folders(opts: TrainOptions) -> list[tuple[Path, str, str]]:
    """(folder, what is written there, which option moves it) for every output folder of the run."""
    out = Path(opts.output_dir or ".")
    folders = [(out, "the trained model and the training state", "--output_dir")]
    if opts.sample_prompts and (opts.sample_every_n_steps or opts.sample_every_n_epochs or opts.sample_at_first):
        folders.append((out / "sample", "the sample images", "--output_dir"))
    if opts.logging_dir:
        folders.append((Path(opts.logging_dir), "the logs", "--logging_dir"))
    if opts.console_log_file:
        folders.append((Path(opts.console_log_file).parent, "the console log", "--console_log_file"))
    return folders


def check_outputs(opts: TrainOptions) -> None:
    """Refuse, with one line, a run whose outputs could not be written (called before anything loads).

    Folders made for the check are removed again (the run makes them when it first writes there), so
    a run refused now or by a later check leaves nothing behind."""
    created: list[Path] = []
    try:
        for folder, what, option in output_folders(opts):
            problem = write_problem(folder, created)
            if problem:
                raise UserError(f"cannot write {what} here ({problem}); nothing was trained", where=str(folder),
                                fix=f"Give {option} a folder you can write to.")
    finally:
        for folder in reversed(created):
            try:
                folder.rmdir()
            except OSError:
                pass  # not empty (another process of the run wrote there) or already gone


def check_caches(opts: TrainOptions, plan) -> None:
    """Refuse a disk cache that must be written and cannot be, before the model loads: the latent
    cache's folders, and the text-embedding cache's (`text` in --cache_dir, else in `.sdtune-cache`
    beside the first subset's images), used whenever a disk cache is chosen and the text encoder is
    frozen (`setup.text_embedding_cache`; `sdtune cache` does not fill it)."""
    if opts.cache_latents_to_disk:
        check_cache_folders([cache_folder(s.path, opts.cache_dir) for s in plan.active], "the latent cache")
    if (opts.cache_dir or opts.cache_latents_to_disk) and not opts.train_text_encoder and _captions_cacheable(plan):
        first = plan.subsets[0]
        root = Path(opts.cache_dir) if opts.cache_dir else (first.image_dir or first.metadata_file.parent) / CACHE_FOLDER
        check_cache_folders([root / "text"], "the text-embedding cache")


def _captions_cacheable(plan) -> bool:
    from sdtune.text import CaptionOptions

    return all(CaptionOptions.from_dict(s.caption_options, where=f"subset {i + 1}").cache_compatible
               for i, s in enumerate(plan.subsets))
