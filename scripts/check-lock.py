#!/usr/bin/env python3
"""Is the environment what requirements.lock says, and does the lock cover pyproject.toml?

    python scripts/check-lock.py [requirements.lock]

Run by `make venv` after the test extras are installed: an extra that pulled a different
version of a runtime dependency would otherwise go unnoticed, and the tests would not
run on the versions the image ships. Exit 1 with one line per mismatch.
"""

from __future__ import annotations

import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PIN = re.compile(r"^([A-Za-z0-9_.\-]+)==([^\s;\\]+)\s*(;[^\\]*)?")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def main(argv: list[str]) -> int:
    lock = Path(argv[1]) if len(argv) > 1 else ROOT / "requirements.lock"
    pins: dict[str, tuple[str, bool]] = {}
    for line in lock.read_text().splitlines():
        match = PIN.match(line)
        if match:
            pins[_norm(match.group(1))] = (match.group(2), bool(match.group(3)))
    problems: list[str] = []
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    # What the image installs: the dependencies and the `tracing` extra.
    image = [*project["dependencies"], *project["optional-dependencies"].get("tracing", [])]
    for requirement in image:
        name = _norm(re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0])
        if name not in pins:
            problems.append(f"{name}: in pyproject.toml but not in {lock.name}; run `make lock`")
    for name, (version, conditional) in sorted(pins.items()):
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            if not conditional:  # a pin with a marker may not apply to this platform
                problems.append(f"{name}: locked {version}, not installed")
            continue
        if installed != version:
            problems.append(f"{name}: locked {version}, installed {installed}")
    for problem in problems:
        print(f"check-lock: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
