"""The wheel a user installs: built from the checkout, installed into a fresh virtual environment
outside it, and used from there (slow: builds, installs and loads the default model)."""

import os
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

from lesskv.hf.checkpoint import available

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

EXAMPLE = """
import lesskv
model, tokenizer = lesskv.load_model("smollm2-135m")
cache = lesskv.LessCache.from_pretrained("smollm2-135m-h2o-0.1", model)
ids = tokenizer("The history of the city", return_tensors="pt").input_ids
out = model.generate(ids, **lesskv.cache_argument(model, cache), max_new_tokens=8)
print(lesskv.__file__)
print(type(cache.kernels).__name__, cache.memory_bytes()["state"] > 0, out.shape[1] > ids.shape[1])
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    pytest.importorskip("pip", reason="builds the wheel with pip (uv-made environments lack it)")
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out), str(ROOT)],
        check=True,
    )
    (built,) = out.glob("lesskv-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A fresh environment holding only the wheel; the dependencies it declares come from this
    test's own environment, added to its path (installing torch again would take minutes)."""
    env = tmp_path_factory.mktemp("venv")
    venv.create(env, with_pip=False)
    python = env / "bin" / "python"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--no-deps",
            "--quiet",
            str(wheel),
        ],
        check=True,
    )
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # A plain path line: the dependencies' folder, without its .pth files (so not the checkout's
    # editable install of lesskv).
    Path(site, "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return env


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ""}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_the_wheel_holds_the_shipped_kernels_and_task_configs(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert len(available()) == 4  # SmolLM2-135M's and Gemma 3 270M's, H2O and Λ each
    for folder in available():
        for file in ("kernels.safetensors", "lesskv_kernels.json"):
            assert f"lesskv/pretrained/{folder}/{file}" in names
    assert "lesskv/evaluation/task_configs/piqa.yaml" in names
    assert "lesskv/py.typed" in names
    assert not any(name.startswith(("tests/", "docs/", "src/")) for name in names)


def test_the_installed_wheel_generates_with_the_shipped_kernels(installed, tmp_path):
    result = _run(
        [
            str(installed / "bin" / "lesskv"),
            "generate",
            "--method",
            "less",
            "--budget",
            "0.1",
            "--prompt",
            "Once upon a time",
            "--max-new-tokens",
            "8",
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()  # the continuation
    assert "shipped" in result.stderr and "summarising the evicted pairs" in result.stderr


def test_the_readme_example_runs_from_the_installed_wheel(installed, tmp_path):
    result = _run([str(installed / "bin" / "python"), "-c", EXAMPLE], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    location, summary = result.stdout.strip().splitlines()[-2:]
    assert Path(location).is_relative_to(installed)  # the wheel's copy, not the checkout's
    assert summary == "LessKernels True True"
