"""Run the fast suite in three throwaway environments built from the public registry alone.

    make test-compat                        # all three
    python tools/check_compat.py newest     # one of them

Each environment is a virtualenv built with uv under ``$TMPDIR/lesskv-compat`` (uv reads neither
pip's configuration nor this machine's wheel folder, so every package comes from PyPI, torch as
the CUDA build a GPU user gets; it runs on a CPU too):

* ``lowest``: every direct dependency at the lowest release pyproject.toml admits
  (``--resolution lowest-direct``): torch and transformers at their lower bounds;
* ``lock``: ``requirements.lock`` exactly, what ``make`` installs;
* ``newest``: the newest release of everything, transformers even past the declared upper bound
  (how a new release is tried before a bound is raised).

Prints the versions each environment tested and one verdict line per environment, exits 1 if any
failed. Record the result in the README's compatibility line and, when ``newest`` passes on
releases newer than ``lesskv.hf.compat.NEWEST_TESTED``, raise that.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UV = ROOT / ".venv" / "bin" / "uv"
PYTHON = "3.11"
EXTRAS = ["--extra", "dev", "--extra", "hf", "--extra", "tasks"]
SHOWN = ["torch", "transformers", "accelerate", "safetensors", "gguf", "lm-eval", "datasets"]
# transformers >= 5.25 requires the `kernels` package, which lesskv never uses (it loads models
# with use_kernels=False) and whose required release a registry may not carry yet: the newest
# environment leaves it out, which also shows that lesskv runs without it.
NEWEST_OVERRIDES = "transformers>=5.2\nkernels ; python_version < '0'\n"


def _log_run(command: list[str], log: Path) -> int:
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(command)}\n")
        out.flush()
        return subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT).returncode


def _requirements(name: str, workdir: Path) -> list[list[str]]:
    """The uv commands that write ``workdir/name-requirements.txt`` for one environment."""
    pins = workdir / f"{name}-requirements.txt"
    if name == "lock":
        return [["cp", str(ROOT / "requirements.lock"), str(pins)]]
    compile_ = [str(UV), "pip", "compile", "--quiet", "pyproject.toml", *EXTRAS]
    compile_ += ["--python-version", PYTHON, "-o", str(pins)]
    if name == "lowest":
        return [[*compile_, "--resolution", "lowest-direct"]]
    overrides = workdir / "newest-overrides.txt"
    overrides.write_text(NEWEST_OVERRIDES)
    return [[*compile_, "--upgrade", "--override", str(overrides)]]


def _versions(python: Path) -> str:
    code = (
        "import importlib.metadata as m, platform\n"
        f"print('python', platform.python_version(), end='')\n"
        f"for p in {SHOWN!r}: print(f', {{p}} {{m.version(p)}}', end='')\n"
    )
    return subprocess.run([str(python), "-c", code], capture_output=True, text=True).stdout


def check(name: str, workdir: Path) -> tuple[bool, str]:
    env = workdir / name
    log = workdir / f"{name}.log"
    log.write_text("")
    python = env / "bin" / "python"
    pins = workdir / f"{name}-requirements.txt"
    install = [str(UV), "pip", "install", "--quiet", "--python", str(python)]
    # The lock leaves torch's CUDA runtime to torch (see the Makefile), so only the lock
    # environment resolves dependencies while installing; the compiled pins are complete.
    deps = [] if name == "lock" else ["--no-deps"]
    steps = [
        [str(UV), "venv", "--quiet", "--clear", "--python", PYTHON, str(env)],
        *_requirements(name, workdir),
        [*install, *deps, "-r", str(pins)],
        [*install, "--no-deps", "-e", "."],
    ]
    for step in steps:
        if _log_run(step, log):
            return False, f"could not build the environment (see {log})"
    versions = _versions(python)
    start = time.monotonic()
    tests = [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow"]
    passed = _log_run(tests, log) == 0
    summary = re.findall(r"^=*\s*(\d+ (?:passed|failed).*?)\s*=*$", log.read_text(), re.M)
    outcome = summary[-1] if summary else f"no summary (see {log})"
    return passed, f"{versions}: {outcome} ({time.monotonic() - start:.0f} s)"


def main(names: list[str]) -> int:
    if not UV.exists():
        sys.exit(f"{UV} is missing: run `make test-compat`, which installs it")
    unknown = set(names) - {"lowest", "lock", "newest"}
    if unknown:
        sys.exit(f"unknown environment(s) {', '.join(sorted(unknown))}: lowest, lock, newest")
    workdir = Path(os.environ.get("TMPDIR", tempfile.gettempdir())) / "lesskv-compat"
    workdir.mkdir(parents=True, exist_ok=True)
    ok = True
    for name in names or ["lowest", "lock", "newest"]:
        passed, detail = check(name, workdir)
        ok &= passed
        print(f"{name:6s} {'PASS' if passed else 'FAIL'}  {detail}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
