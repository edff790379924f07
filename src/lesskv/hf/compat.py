"""Everything that differs between the transformers releases lesskv supports, in one place.

transformers 5.24 renamed the model/generate argument that carries the cache from
``past_key_values=`` to ``cache=`` (the old name is deprecated until 5.40). Callers in lesskv
never spell either name: they pass ``**cache_argument(model, cache)``, which reads the name
from the model's own ``forward`` signature rather than from a version number. The same release
began passing the attention layer's keyword arguments on to ``Cache.update(..., kwargs=)``,
which earlier caches refuse: :func:`update_cache` reads that off the cache's own signature too.

:func:`check_versions` compares the installed torch and transformers with the range this
package declares (its own metadata, i.e. ``pyproject.toml``) and with :data:`NEWEST_TESTED`, the
newest releases the last passing ``make test-compat`` ran on: older than the declared range is an
error, newer than the tested releases (or past the declared range) one warning.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from importlib import metadata
from typing import TYPE_CHECKING

from packaging.requirements import Requirement
from packaging.version import Version

from lesskv.errors import LessKVError

if TYPE_CHECKING:
    import torch
    from transformers import Cache

CHECKED = ("torch", "transformers")
# The newest minor releases the last passing `make test-compat` ran on (its "newest" environment);
# raise them with the README's compatibility line.
NEWEST_TESTED = {"torch": Version("2.15"), "transformers": Version("5.25")}


@functools.cache
def _cache_parameter(forward_owner: type) -> str:
    parameters = inspect.signature(forward_owner.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def cache_argument(model: object, cache: object) -> dict[str, object]:
    """``{"cache": cache}`` for models whose forward takes ``cache=`` (transformers >= 5.24),
    ``{"past_key_values": cache}`` before; ``generate`` takes the same name."""
    return {_cache_parameter(type(model)): cache}


@functools.cache
def _takes_keywords(cache_type: type) -> bool:
    parameters = inspect.signature(cache_type.update).parameters.values()
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def update_cache(
    cache: Cache, key: torch.Tensor, value: torch.Tensor, layer_idx: int, kwargs: dict
) -> tuple[torch.Tensor, torch.Tensor]:
    """``cache.update`` as the installed release's own attention layers call it (for adapters
    that replace a layer's forward): with ``kwargs=`` where the cache takes it (>= 5.24)."""
    extra = {"kwargs": kwargs} if _takes_keywords(type(cache)) else {}
    return cache.update(key, value, layer_idx, **extra)


def declared_ranges() -> dict[str, Requirement]:
    """The version ranges lesskv's metadata declares for the packages in :data:`CHECKED`."""
    try:
        requirements = metadata.requires("lesskv") or []
    except metadata.PackageNotFoundError:  # a source tree on sys.path, not installed
        return {}
    found = {}
    for line in requirements:
        requirement = Requirement(line)
        if requirement.name in CHECKED and requirement.marker is None:
            found[requirement.name] = requirement
    return found


def _describe(requirement: Requirement) -> str:
    """``>=5.2,<6``: lower bounds first, as people write ranges."""
    return ",".join(sorted(map(str, requirement.specifier), key=lambda s: not s.startswith(">")))


def _lowest(requirement: Requirement) -> Version | None:
    bounds = [Version(s.version) for s in requirement.specifier if s.operator in (">=", "==")]
    return max(bounds) if bounds else None


def _newer_than_tested(name: str, installed: Version) -> bool:
    tested = NEWEST_TESTED.get(name)
    return tested is not None and installed.release[:2] > tested.release[:2]


@functools.cache
def check_versions() -> None:
    """Refuse releases older than the declared range; warn once about newer, untested ones."""
    for name, requirement in declared_ranges().items():
        installed = Version(metadata.version(name))
        supported = f"{name}{_describe(requirement)}"
        found = f"found {name} {installed}"
        if not requirement.specifier.contains(installed, prereleases=True):
            lowest = _lowest(requirement)
            if lowest is not None and installed.release < lowest.release:
                raise LessKVError(
                    f"lesskv supports {supported}; {found}: upgrade it with pip install "
                    f"'{supported}'"
                )
            warnings.warn(
                f"lesskv supports {supported}; {found}: results may be wrong", stacklevel=2
            )
        elif _newer_than_tested(name, installed):
            warnings.warn(
                f"lesskv is tested with {name} up to {NEWEST_TESTED[name]}; {found}, newer than "
                "tested: results may be wrong",
                stacklevel=2,
            )
