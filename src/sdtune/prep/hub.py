"""Model files from a local folder or a Hugging Face hub repository.

Offline (or with the repository missing), the hub client raises one of several error types
depending on the huggingface_hub version; all of them become one UserError that names the
repository, the files to fetch and the local-folder option to use instead.
"""

from __future__ import annotations

from pathlib import Path

from sdtune.errors import UserError


def looks_like_repo_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "~"))


def download(repo_id: str, files: list[str], *, local_dir: Path | None, force: bool, option: str) -> Path:
    """Fetch `files` of `repo_id`; returns the folder holding them."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as exc:  # pragma: no cover - a dependency of transformers
        raise UserError("huggingface_hub is not installed", fix="Install it, or pass a local folder.") from exc
    from huggingface_hub import is_offline_mode

    from sdtune.checkpoint.hub import hub_unreachable

    # asked once, in seconds: the client would retry an unreachable hub for half a minute per file
    unreachable = None if is_offline_mode() else hub_unreachable()
    folder = None
    for name in files:
        try:
            got = hf_hub_download(repo_id, name, local_dir=str(local_dir) if local_dir else None,
                                  force_download=force and not unreachable, local_files_only=bool(unreachable))
        except Exception as exc:  # noqa: BLE001 - every hub failure means the same thing to the user
            why = ConnectionError(f"not in the local cache, and the hub cannot be reached: {unreachable}")
            raise hub_error(repo_id, files, option, why if unreachable else exc) from exc
        folder = Path(got).parent
    assert folder is not None
    return folder


def hub_error(repo_id: str, files: list[str], option: str, exc: BaseException) -> UserError:
    reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")
    return UserError(
        f"cannot fetch {', '.join(files)} of {repo_id!r} from the Hugging Face hub ({reason})",
        where=option,
        fix=f"Download them from https://huggingface.co/{repo_id} (e.g. `hf download {repo_id}` on a machine "
            f"with internet) into a folder and pass that folder to {option}.",
    )
