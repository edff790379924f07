"""The one exception type users see: the CLI prints its message on one line and exits 2."""

import importlib
import re

_ESCAPES = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # colour, bold...


class LessKVError(ValueError):
    """Bad input (budget, model, data, checkpoint...) explained in one readable sentence."""


def require(module: str, extra: str, purpose: str) -> None:
    """Import an optional dependency early, so its absence is one line naming the pip extra
    that brings it rather than a traceback halfway through a run."""
    try:
        importlib.import_module(module)
    except ImportError:
        raise LessKVError(
            f"{purpose} needs the optional package {module}: pip install 'lesskv[{extra}]'"
        ) from None


def one_line(message: object, limit: int = 240) -> str:
    """``message`` on one line of at most ``limit`` characters: a library's error (torch's
    state-dict mismatch, a pickle's) can span pages, and an error must fit the line that
    reports it. Terminal escapes (torch's bold advice) go: a cut could leave one switched on."""
    text = " ".join(_ESCAPES.sub("", str(message)).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def short_path(path: object, limit: int = 100) -> str:
    """``path`` cut in its middle to at most ``limit`` characters: its start and its file
    name both say which file, and a path of thousands of characters (the error of a name too
    long) must leave the line room for what went wrong."""
    text = str(path)
    if len(text) <= limit:
        return text
    head = (limit - 3) // 2
    return text[:head] + "..." + text[len(text) - (limit - 3 - head) :]
