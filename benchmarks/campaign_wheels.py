"""Install, offline, the wheels of a folder that this interpreter does not already have.

    python benchmarks/campaign_wheels.py DIR TARGET

For a GPU machine with no network (benchmarks/gpu_campaign.sh --pipeline-wheels / --peer-wheels): DIR holds
wheels fetched elsewhere (`pip download ...`), TARGET is a folder to put first on PYTHONPATH. A wheel
whose distribution is already installed here (torch, numpy, triton: whatever `pip download` fetched
as a dependency) is left out, so the machine's own CUDA build of torch is the one imported; the rest is
installed with `pip install --no-index --no-deps --target TARGET`. A source archive (.tar.gz, .zip) is
named and left out: build it into a wheel beforehand (`pip wheel --no-deps NAME`). Standard library only.
Exit status: pip's (0 when there was nothing to install).
"""
from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path


def installed(dist: str) -> str | None:
    """The installed version of distribution `dist` (a wheel file name's first field), or None."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    src, target = Path(argv[0]), Path(argv[1])
    if not src.is_dir():
        print(f"campaign_wheels: {src} is not a folder of wheels", file=sys.stderr)
        return 2
    todo = []
    for f in sorted(src.iterdir()):
        if f.suffix != ".whl":
            print(f"  left out (not a wheel; build one with `pip wheel --no-deps`): {f.name}")
            continue
        dist = f.name.split("-")[0]
        have = installed(dist)
        if have is not None:
            print(f"  already installed: {dist} {have} (left out: {f.name})")
        else:
            todo.append(f)
    if not todo:
        print(f"nothing to install from {src}")
        return 0
    print(f"installing {len(todo)} wheels into {target}: {', '.join(f.name.split('-')[0] for f in todo)}", flush=True)
    return subprocess.call([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile",
                            "--disable-pip-version-check", "--target", str(target), *map(str, todo)])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
