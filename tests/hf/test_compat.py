"""The transformers/torch compatibility helper: the cache argument's name and the version range."""

import warnings
from importlib import metadata

import pytest
from packaging.requirements import Requirement

from helpers import make_tiny_model
from lesskv.errors import LessKVError
from lesskv.hf import compat


class NewStyle:
    def forward(self, input_ids=None, cache=None, **kwargs): ...


class OldStyle:
    def forward(self, input_ids=None, past_key_values=None, **kwargs): ...


def test_cache_argument_follows_the_models_forward_signature():
    marker = object()
    assert compat.cache_argument(NewStyle(), marker) == {"cache": marker}
    assert compat.cache_argument(OldStyle(), marker) == {"past_key_values": marker}
    model = make_tiny_model()
    (name,) = compat.cache_argument(model, None)
    assert name in ("cache", "past_key_values")


def test_the_declared_range_admits_the_installed_versions():
    ranges = compat.declared_ranges()
    assert set(ranges) == {"torch", "transformers"}
    for name, requirement in ranges.items():
        assert requirement.specifier.contains(metadata.version(name), prereleases=True)
        assert "<" in str(requirement.specifier), f"{name} needs a tested upper bound"


@pytest.fixture
def installed(monkeypatch):
    """Pretend the given versions are installed, against a fixed declared range."""

    def pretend(torch: str, transformers: str) -> None:
        versions = {"torch": torch, "transformers": transformers}
        monkeypatch.setattr(compat.metadata, "version", versions.__getitem__)
        monkeypatch.setattr(
            compat,
            "declared_ranges",
            lambda: {
                "torch": Requirement("torch>=2.13,<2.14"),
                "transformers": Requirement("transformers>=5.2,<5.25"),
            },
        )
        compat.check_versions.cache_clear()

    yield pretend
    compat.check_versions.cache_clear()


def test_versions_inside_the_range_pass_silently(installed):
    installed("2.13.0+cpu", "5.24.0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compat.check_versions()


def test_an_older_release_is_refused_in_one_line(installed):
    installed("2.13.0", "5.1.0")
    with pytest.raises(LessKVError, match=r"supports transformers.*found transformers 5\.1\.0"):
        compat.check_versions()


def test_a_newer_release_warns_once(installed):
    installed("2.13.0", "5.30.0")
    with pytest.warns(UserWarning, match=r"transformers 5\.30\.0, newer than tested"):
        compat.check_versions()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compat.check_versions()  # cached: said once per process


def test_the_command_line_names_both_ranges_in_one_line(installed, capsys):
    from lesskv.cli import main

    installed("2.13.0", "5.1.0")
    assert main(["demo"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("lesskv: error: lesskv supports transformers>=5.2,<5.25")
    installed("2.13.0", "5.30.0")
    assert main(["eval", "ppl", "--data", "builtin", "--budget", "0"]) == 2  # warns, then refuses
    warning, error = capsys.readouterr().err.strip().splitlines()
    assert warning.startswith("lesskv: warning:") and "5.30.0" in warning
    assert error.startswith("lesskv: error:") and "budget" in error
