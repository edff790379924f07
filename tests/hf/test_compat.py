"""The transformers/torch compatibility helper: the cache argument's name and the version range."""

import warnings
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

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


def test_the_newest_tested_releases_lie_inside_the_declared_range():
    for name, requirement in compat.declared_ranges().items():
        assert requirement.specifier.contains(compat.NEWEST_TESTED[name], prereleases=True)


@pytest.fixture
def installed(monkeypatch):
    """Pretend the given versions are installed, against a fixed declared range and tested
    releases."""

    def pretend(torch: str, transformers: str) -> None:
        versions = {"torch": torch, "transformers": transformers}
        monkeypatch.setattr(compat.metadata, "version", versions.__getitem__)
        monkeypatch.setattr(
            compat,
            "declared_ranges",
            lambda: {
                "torch": Requirement("torch>=2.11"),
                "transformers": Requirement("transformers>=5.2,<6"),
            },
        )
        monkeypatch.setattr(
            compat, "NEWEST_TESTED", {"torch": Version("2.15"), "transformers": Version("5.25")}
        )
        compat.check_versions.cache_clear()

    yield pretend
    compat.check_versions.cache_clear()


@pytest.mark.parametrize(
    ("torch", "transformers"), [("2.11.0", "5.2.0"), ("2.13.0+cpu", "5.24.0"), ("2.15.1", "5.25.3")]
)
def test_versions_from_the_lowest_to_the_newest_tested_pass_silently(
    installed, torch, transformers
):
    installed(torch, transformers)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compat.check_versions()


@pytest.mark.parametrize(
    ("torch", "transformers", "found"),
    [
        ("2.13.0", "5.1.0", r"transformers>=5\.2,<6; found transformers 5\.1\.0"),
        ("2.10.1", "5.24.0", r"torch>=2\.11; found torch 2\.10\.1"),
    ],
)
def test_an_older_release_is_refused_in_one_line(installed, torch, transformers, found):
    installed(torch, transformers)
    with pytest.raises(LessKVError, match=rf"^lesskv supports {found}: upgrade it with pip"):
        compat.check_versions()


@pytest.mark.parametrize(
    ("torch", "transformers", "found"),
    [
        ("2.16.0", "5.25.0", r"torch up to 2\.15; found torch 2\.16\.0, newer than tested"),
        ("2.15.0", "5.30.0", r"transformers up to 5\.25; found transformers 5\.30\.0, newer than"),
        ("2.15.0", "6.0.0", r"supports transformers>=5\.2,<6; found transformers 6\.0\.0"),
    ],
)
def test_a_newer_release_warns_once(installed, torch, transformers, found):
    installed(torch, transformers)
    with pytest.warns(UserWarning, match=found):
        compat.check_versions()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compat.check_versions()  # cached: said once per process


def test_the_command_line_names_the_range_in_one_line(installed, capsys):
    from lesskv.cli import main

    installed("2.13.0", "5.1.0")
    assert main(["demo"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("lesskv: error: lesskv supports transformers>=5.2,<6; found")
    installed("2.13.0", "5.30.0")
    lambda_4 = ["--policy", "lambda", "--budget", "4"]  # fewer pairs than its sinks need
    assert main(["eval", "ppl", "--data", "builtin", *lambda_4]) == 2  # warns, then refuses
    warning, error = capsys.readouterr().err.strip().splitlines()
    assert warning.startswith("lesskv: warning:") and "5.30.0" in warning
    assert error.startswith("lesskv: error:") and "budget" in error


class KeywordCache:
    """A cache as transformers >= 5.24 declares one: update takes the layer's keywords."""

    def update(self, key, value, layer_idx, *args, **kwargs):
        return ("keywords", kwargs)


class PlainCache:
    """A cache as earlier releases declare one: update refuses unknown keywords."""

    def update(self, key, value, layer_idx, cache_kwargs=None):
        return ("plain", cache_kwargs)


def test_update_cache_passes_keywords_only_to_caches_that_take_them():
    passed = {"position_ids": 3}
    assert compat.update_cache(KeywordCache(), 0, 0, 1, passed) == ("keywords", {"kwargs": passed})
    assert compat.update_cache(PlainCache(), 0, 0, 1, passed) == ("plain", None)


def test_ci_tests_the_declared_lowest_transformers():
    """`make test` also runs on tools/lowest-end.txt's transformers: it must be the range's
    lower bound, so that raising or lowering the bound moves what CI tests."""
    pins = Path(__file__).resolve().parents[2] / "tools" / "lowest-end.txt"
    pinned = dict(line.split("==") for line in pins.read_text().split())
    lowest = compat._lowest(compat.declared_ranges()["transformers"])
    assert Version(pinned["transformers"]) == lowest
