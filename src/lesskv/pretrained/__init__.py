"""Kernels shipped with lesskv for the built-in default model, so LESS works untrained."""

from __future__ import annotations

from pathlib import Path

from lesskv.errors import LessKVError
from lesskv.models import DEFAULT_MODEL
from lesskv.policies import Policy

HERE = Path(__file__).parent


def available() -> list[str]:
    """Folder names ``MODEL-POLICY-BUDGET`` of the shipped kernel sets."""
    return sorted(p.name for p in HERE.iterdir() if (p / "lesskv_kernels.json").is_file())


def shipped_kernels(model_name: str, policy: Policy) -> Path:
    """The shipped folder matching the model, policy and budget, or a clear error."""
    if model_name.lower() not in (DEFAULT_MODEL, "smollm2-135m-instruct"):
        raise LessKVError(f"no kernels ship for {model_name}: pass --kernels DIR (lesskv train)")
    name = f"{DEFAULT_MODEL}-{policy.name}-{policy.budget}"
    path = HERE / name
    if not (path / "lesskv_kernels.json").is_file():
        raise LessKVError(
            f"no shipped kernels for {policy.name} at budget {policy.budget} "
            f"(shipped: {', '.join(available()) or 'none'}); pass --kernels DIR"
        )
    return path
