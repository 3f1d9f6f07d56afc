"""Write constraints.txt (the lock) from the environment this Python runs in.

Run by `make lock`: after `make test-latest` passed against the newest releases, their versions
become the ones `make test` and `make demo` install. torch is left out (each machine installs its
own build first, see the Makefile), and so is sdtune itself.
"""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path

HEADER = """\
# The exact versions the test suite passes with: pip constraints for `make test` / `make demo` / CI.
# torch and its own dependencies are not here: the Makefile installs the chosen torch build first (TORCH_SPEC).
# Regenerate on purpose: `make test-latest` (newest releases), then `make lock` writes this file.
"""
SKIP = {"sdtune", "pip", "setuptools", "wheel"}


def torch_closure() -> set[str]:
    """torch and everything it pulls in: those come with the torch build the machine chose (a CUDA
    build may pin e.g. sympy exactly), so pinning them here could make the install impossible."""
    import re

    seen, todo = set(), ["torch"]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            reqs = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for req in reqs:
            if "extra ==" not in req:
                todo.append(_key(re.split(r"[ ;<>=!~\[(]", req, maxsplit=1)[0]))
    return seen


def _key(name: str) -> str:
    return name.lower().replace("_", "-")


def main() -> int:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "constraints.txt")
    skip = SKIP | torch_closure()
    pins = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name and _key(name) not in skip:
            pins[_key(name)] = f"{name}=={dist.version}"
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(HEADER + "".join(line + "\n" for _key, line in sorted(pins.items())))
    tmp.replace(out)
    print(f"wrote {out}: {len(pins)} pinned packages")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
