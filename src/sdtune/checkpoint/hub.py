"""Whether a Hugging Face Hub id can be loaded, asked before the libraries try.

diffusers and transformers retry an unreachable hub for half a minute or more, file by file, before
they give up or fall back to the cache. sdtune asks once per process instead, with one request
that gets a few seconds: a reachable hub lets the libraries download or update as usual; an
unreachable one means the local cache only (`local_files_only`), and an id that is not cached is
one line saying so. HF_HUB_OFFLINE=1 (or TRANSFORMERS_OFFLINE=1) skips the request.
"""

from __future__ import annotations

import functools
import threading

from sdtune.errors import UserError

PROBE_SECONDS = 3.0


def cache_only(repo: str, where: str, what: str = "") -> bool:
    """True when `repo` must be loaded from the local cache (offline, or the hub does not answer);
    False when the hub answers. UserError when it is needed and neither has it; `what` ("the VAE")
    names the repository in it."""
    from huggingface_hub import constants, is_offline_mode

    # the error line starts with `where`; name the repository again only when `where` does not
    named = f"{what} {repo!r}" if what else ("it" if where == repo else repo)
    local_model = (f"Give the path of a local model (e.g. one fetched elsewhere with `hf download {repo} "
                   f"--local-dir models/{repo.split('/')[-1]}`)")
    if is_offline_mode():
        if not is_cached(repo):
            raise UserError(f"{named} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and "
                            "HF_HUB_OFFLINE is set", where=where,
                            fix=f"{local_model}, or unset HF_HUB_OFFLINE to download it.")
        return True
    reason = hub_unreachable()
    if reason is None:
        return False
    if is_cached(repo):
        from sdtune.console import note

        note(f"note: the Hugging Face hub cannot be reached ({reason}); {repo} is loaded from the local cache")
        return True
    raise UserError(f"{named} is not in the local Hugging Face cache and the hub ({constants.ENDPOINT}) cannot "
                    f"be reached ({reason})", where=where,
                    fix=f"{local_model}, or set HF_HUB_OFFLINE=1 to use only models already in the cache.")


def is_cached(repo: str) -> bool:
    """A snapshot of `repo` is in the hub cache (HF_HUB_CACHE); its files are checked as it loads."""
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(repo, local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached, or a cache entry the loader will not read either
        return False
    return True


@functools.cache
def hub_unreachable() -> str | None:
    """None when the hub answers; else why not. One HEAD request per process, through the hub
    client's own session (its proxies and certificates), given PROBE_SECONDS in all: a thread bounds
    it, since a name lookup with no network can outlast any socket timeout."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    answer: list[str | None] = []

    def probe() -> None:
        try:
            response = get_session().head(constants.ENDPOINT, timeout=PROBE_SECONDS)
            answer.append(f"HTTP {response.status_code}" if response.status_code >= 500 else None)
        except Exception as exc:  # noqa: BLE001 - each way of failing means the same here
            text = str(exc).splitlines()[0] if str(exc) else ""
            answer.append(f"{type(exc).__name__}: {text}".rstrip(": "))

    thread = threading.Thread(target=probe, name="sdtune-hub-probe", daemon=True)
    thread.start()
    thread.join(PROBE_SECONDS + 0.5)
    return answer[0] if answer else f"no answer in {PROBE_SECONDS:g} s"
