"""Run the decoding and generation tests against the edges of the declared version range.

    make test-compat                      # both environments
    python tools/check_compat.py newest   # one of them

Each environment is a throwaway virtualenv built with uv under ``$TMPDIR/lesskv-compat``:

* ``lowest``: every direct dependency at the lowest release pyproject.toml admits
  (``uv --resolution lowest-direct``), so transformers at its lower bound;
* ``newest``: the newest releases of everything, transformers *past* the declared upper bound,
  which is how a new release is tried before the bound is raised.

torch stays the build installed in ``.venv`` in both (on these machines the only CPU build;
any other release means a multi-GB CUDA download). Prints one verdict line per environment and
exits 1 if any failed; record the result in the README's compatibility line.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UV = ROOT / ".venv" / "bin" / "uv"
FIND_LINKS = Path("/opt/wheels")
TESTS = ["tests/hf", "tests/evaluation/test_bench.py", "tests/core"]
ENVIRONMENTS = {
    "lowest": ["--resolution", "lowest-direct"],
    "newest": ["--upgrade"],
}


def run(command: list[str], log: Path) -> subprocess.CompletedProcess:
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(command)}\n")
        out.flush()
        return subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)


def check(name: str, workdir: Path) -> tuple[bool, str]:
    env = workdir / name
    log = workdir / f"{name}.log"
    log.write_text("")
    python = env / "bin" / "python"
    find_links = ["--find-links", str(FIND_LINKS)] if FIND_LINKS.is_dir() else []
    overrides = workdir / f"{name}-overrides.txt"
    torch = f"torch=={metadata.version('torch')}"
    overrides.write_text(torch + ("\ntransformers>=5\n" if name == "newest" else "\n"))
    pins = workdir / f"{name}-requirements.txt"
    steps = [
        [str(UV), "venv", "--quiet", "--clear", "--python", sys.executable, str(env)],
        [
            str(UV),
            "pip",
            "compile",
            "--quiet",
            "pyproject.toml",
            "--extra",
            "dev",
            *ENVIRONMENTS[name],
            "--override",
            str(overrides),
            *find_links,
            "-o",
            str(pins),
        ],
        [
            str(UV),
            "pip",
            "install",
            "--quiet",
            "--python",
            str(python),
            "-r",
            str(pins),
            *find_links,
        ],
        [str(UV), "pip", "install", "--quiet", "--python", str(python), "--no-deps", "-e", "."],
    ]
    for step in steps:
        if run(step, log).returncode:
            return False, f"could not build the environment (see {log})"
    versions = {
        pkg: subprocess.run(
            [str(python), "-c", f"import importlib.metadata as m; print(m.version('{pkg}'))"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        for pkg in ("torch", "transformers")
    }
    result = run(
        [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow", *TESTS],
        log,
    )
    summary = re.findall(r"^=*\s*(\d+ (?:passed|failed).*?)\s*=*$", log.read_text(), re.M)
    described = ", ".join(f"{pkg} {v}" for pkg, v in versions.items())
    return result.returncode == 0, f"{described}: {summary[-1] if summary else 'no summary'}"


def main(names: list[str]) -> int:
    if not UV.exists():
        sys.exit(f"{UV} is missing: run `make test-compat`, which installs it")
    workdir = Path(os.environ.get("TMPDIR", tempfile.gettempdir())) / "lesskv-compat"
    workdir.mkdir(parents=True, exist_ok=True)
    ok = True
    for name in names or list(ENVIRONMENTS):
        passed, detail = check(name, workdir)
        ok &= passed
        print(f"{name:7s} {'PASS' if passed else 'FAIL'}  {detail}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
