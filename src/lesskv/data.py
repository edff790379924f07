"""Text sources (built-in, local files, Hugging Face datasets) and cutting them into token windows.

A source is a string so the CLI can pass it through unchanged:

* ``"builtin"``: CPython's own documentation topics (``pydoc_data``), so defaults work offline;
* a ``.txt``/``.raw`` file (one document) or ``.jsonl``/``.json`` records (one document each);
* a folder: the documents of each such file in it, in name order (a corpus of books);
* ``"hf:NAME[/CONFIG][:SPLIT]"``: a Hugging Face dataset (needs ``datasets`` and a network).

Windows follow the tokenizer's own convention for the start of a text: where it puts BOS
before every text by default (Llama, Gemma, Mistral), each window of ``seq_len`` tokens is BOS
followed by ``seq_len - 1`` text tokens, so the model reads text as it was trained to (Gemma 3
without BOS scores nearly twice the perplexity), windows keep the length asked (memory and
budgets unchanged), and the BOS itself is never a prediction target (it is the first token,
which nothing predicts). Tokenizers that add no BOS (GPT-2, Qwen, SmolLM2) get plain text.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from lesskv.errors import LessKVError, require, short_path

BUILTIN = "builtin"
DEFAULT_FIELD = "text"
DEFAULT_SPLIT = "train"
_SEPARATOR = "\n\n"
_TEXT_SUFFIXES = (".txt", ".raw")
_RECORD_SUFFIXES = (".jsonl", ".json")
# Tokens at the end of a text prefix that may still change once the following text is added
# (a word or whitespace run cut in half); prefixes are tokenised this far past what is needed.
_PREFIX_SLACK_TOKENS = 256
_CHARS_PER_TOKEN_GUESS = 8


def load_texts(source: str, *, field: str | None = None, limit: int | None = None) -> list[str]:
    """Return the documents of ``source`` (at most ``limit``); ``field`` names the text key of
    record sources (default ``"text"``)."""
    if limit is not None and limit < 1:
        raise LessKVError(f"limit must be at least 1 document, got {limit}")
    if source == BUILTIN:
        _refuse_field(field, source)
        texts = _builtin_texts()
    elif source.startswith("hf:"):
        texts = _hf_texts(source, field or DEFAULT_FIELD, limit)
    else:
        texts = _file_texts(Path(source).expanduser(), field, limit)
    texts = texts[:limit]
    if not any(text.strip() for text in texts):
        raise LessKVError(f"text source {source!r} holds no text (every document is blank)")
    return texts


def bos_prefix(tokenizer: Any) -> list[int]:
    """``[BOS]`` when ``tokenizer`` starts every text with its BOS token by default, else
    ``[]``. Read off an encoding rather than ``tokenizer.add_bos_token``, which a tokenizer
    whose post-processor adds BOS may leave False."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    default = tokenizer("a", verbose=False)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False, verbose=False)["input_ids"]
    return [bos] if default[:1] == [bos] and plain[:1] != [bos] else []


def token_windows(
    tokenizer: Any, texts: list[str], seq_len: int, *, max_windows: int | None = None
) -> torch.Tensor:
    """Cut the documents, joined by blank lines, into consecutive non-overlapping windows of
    exactly ``seq_len`` tokens (the remainder is dropped), each starting with BOS where the
    tokenizer adds one (:func:`bos_prefix`, then ``seq_len - 1`` text tokens).

    Returns a ``(N, seq_len)`` long tensor. With ``max_windows`` only a prefix of the text is
    tokenised, so asking for a few windows of a huge corpus stays cheap.
    """
    if seq_len < 2:
        raise LessKVError(
            f"seq_len must be at least 2 tokens (one to read, one to predict), got {seq_len}"
        )
    if max_windows is not None and max_windows < 1:
        raise LessKVError(f"max_windows must be at least 1, got {max_windows}")
    prefix = bos_prefix(tokenizer)
    text_len = seq_len - len(prefix)
    needed = None if max_windows is None else max_windows * text_len
    ids = _token_prefix(tokenizer, texts, needed)
    count = len(ids) // text_len if max_windows is None else min(len(ids) // text_len, max_windows)
    if count == 0:
        raise LessKVError(
            f"the text has only {len(ids)} tokens, not enough for one window of {seq_len}; "
            "use a shorter window or more text"
        )
    return _windows(prefix, ids[: count * text_len], count)


def length_mix(
    tokenizer: Any, texts: list[str], seq_lens: Sequence[int], windows: int, spread: bool = False
) -> list[torch.Tensor]:
    """The training mix of several window lengths: ``windows`` windows of the shortest length
    and as many tokens of each other length (fewer, longer windows; at least one each), no two
    sharing a text token, each starting with BOS as :func:`token_windows`' do. They are cut one
    after another from the start of the joined documents, or with ``spread`` from evenly spaced
    places through all of it (the whole text is tokenised), so a corpus of many books gives
    windows of every book, each length spread alike. Returns one ``(N, T)`` tensor per
    length; with too little text every count shrinks alike."""
    if min(seq_lens) < 2 or windows < 1:
        raise LessKVError(f"need window lengths >= 2 and >= 1 window, got {seq_lens}, {windows}")
    prefix = bos_prefix(tokenizer)
    text_lens = [t - len(prefix) for t in seq_lens]
    shortest = min(seq_lens)
    counts = [max(1, windows * shortest // t) for t in seq_lens]
    needed = sum(c * t for c, t in zip(counts, text_lens, strict=True))
    ids = _token_prefix(tokenizer, texts, None if spread else needed)
    if len(ids) < needed:
        share = len(ids) / needed
        counts = [int(c * share) for c in counts]
    if min(counts) == 0:
        raise LessKVError(
            f"the text has only {len(ids)} tokens, not enough for a mix of windows of "
            f"{', '.join(map(str, seq_lens))} tokens; use shorter windows or more text"
        )
    if spread:
        return _spread_windows(prefix, ids, counts, text_lens)
    mix, start = [], 0
    for count, t in zip(counts, text_lens, strict=True):
        mix.append(_windows(prefix, ids[start : start + count * t], count))
        start += count * t
    return mix


def _spread_windows(
    prefix: list[int], ids: list[int], counts: list[int], text_lens: list[int]
) -> list[torch.Tensor]:
    """``counts[l]`` windows of ``text_lens[l]`` tokens from evenly spaced places of ``ids``:
    the windows of every length in the order of their relative place (window i of a length
    at (i + ½) / count), with equal gaps of unused text between consecutive ones."""
    order = sorted(
        ((i + 0.5) / count, length, i) for length, count in enumerate(counts) for i in range(count)
    )
    used = sum(c * t for c, t in zip(counts, text_lens, strict=True))
    gap = (len(ids) - used) / len(order)
    rows: list[list[list[int]]] = [[] for _ in counts]
    start = 0
    for k, (_, length, _) in enumerate(order):
        at = start + int(gap * (k + 0.5))
        rows[length].append(ids[at : at + text_lens[length]])
        start += text_lens[length]
    return [
        _windows(prefix, [token for row in chosen for token in row], len(chosen)) for chosen in rows
    ]


def source_mix(
    tokenizer: Any,
    sources: Sequence[list[str]],
    seq_lens: Sequence[int],
    windows: int,
    spread: bool = False,
) -> list[torch.Tensor]:
    """:func:`length_mix` over several sources that share the training tokens equally: each
    gets ``windows / len(sources)`` windows of the shortest length (the first ones one more
    where it does not divide) and as many tokens of each longer length, cut from its own
    documents (``spread`` through all of them), so a corpus of long books and one of short web
    pages both shape the state whatever their sizes. Returns one ``(N, T)`` tensor per
    length, source after source."""
    if windows < len(sources):
        raise LessKVError(
            f"{len(sources)} text sources need at least one window each, got {windows} windows"
        )
    shares = [windows // len(sources) + (i < windows % len(sources)) for i in range(len(sources))]
    mixes = [
        length_mix(tokenizer, texts, seq_lens, n, spread)
        for texts, n in zip(sources, shares, strict=True)
    ]
    return [torch.cat(parts) for parts in zip(*mixes, strict=True)]


def _windows(prefix: list[int], ids: list[int], count: int) -> torch.Tensor:
    """``ids`` as ``count`` equal rows, each after ``prefix``."""
    rows = torch.tensor(ids, dtype=torch.long).view(count, -1)
    return torch.cat([torch.tensor(prefix, dtype=torch.long).expand(count, -1), rows], 1)


def _token_prefix(tokenizer: Any, texts: list[str], needed: int | None) -> list[int]:
    """Token ids of the joined text, or of a prefix of it that grows by doubling until it
    yields ``needed`` tokens plus a slack; the caller uses at most ``needed``, so the tail
    tokens that the cut may have changed are never used."""
    chars = None if needed is None else (needed + _PREFIX_SLACK_TOKENS) * _CHARS_PER_TOKEN_GUESS
    while True:
        text, complete = _joined_prefix(texts, chars)
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        if complete or len(ids) >= needed + _PREFIX_SLACK_TOKENS:
            return ids
        chars *= 2


def _joined_prefix(texts: list[str], chars: int | None) -> tuple[str, bool]:
    """The first ``chars`` characters of the joined documents, and whether that is all of it."""
    if chars is None:
        return _SEPARATOR.join(texts), True
    parts: list[str] = []
    size = 0
    for i, text in enumerate(texts):
        if size > chars:
            break
        piece = _SEPARATOR + text if i else text
        parts.append(piece)
        size += len(piece)
    joined = "".join(parts)
    return joined[:chars], len(parts) == len(texts) and size <= chars


def _builtin_texts() -> list[str]:
    """One document per topic of the documentation that CPython ships for ``help()``."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise LessKVError(
            "this Python lacks pydoc_data, the source of the 'builtin' texts; give a text file"
        ) from None
    return [topics[key] for key in sorted(topics)]


def _file_texts(path: Path, field: str | None, limit: int | None) -> list[str]:
    try:
        is_dir, exists, is_link = path.is_dir(), path.exists(), path.is_symlink()
    except OSError as exc:  # a name too long, a folder this user may not search...
        raise LessKVError(f"cannot read {short_path(path)}: {exc.strerror or exc}") from None
    if is_dir:
        return _folder_texts(path, field, limit)
    if not exists:
        if is_link:  # it names something, but leads nowhere (or back to itself)
            raise LessKVError(f"text file {short_path(path)} is a broken or looping symbolic link")
        raise LessKVError(
            f"text file {short_path(path)} does not exist (or use 'builtin' or 'hf:NAME')"
        )
    suffix = path.suffix.lower()
    if suffix not in _TEXT_SUFFIXES + _RECORD_SUFFIXES:
        raise LessKVError(
            f"cannot read {short_path(path)}: unknown file type {suffix or '(none)'!r}; "
            "use .txt, .raw, .jsonl or .json"
        )
    if suffix in _TEXT_SUFFIXES:
        _refuse_field(field, short_path(path))
        return ["".join(_lines(path))]
    field = field or DEFAULT_FIELD
    if suffix == ".json":
        return _json_texts(path, field, limit)
    return _jsonl_texts(path, field, limit)


def _folder_texts(path: Path, field: str | None, limit: int | None) -> list[str]:
    """The documents of every text or record file directly in ``path``, in name order (hidden
    files, subfolders and other file types are not read)."""
    suffixes = _TEXT_SUFFIXES + _RECORD_SUFFIXES
    try:
        files = sorted(
            f
            for f in path.iterdir()
            if f.suffix.lower() in suffixes and not f.name.startswith(".") and not f.is_dir()
        )
    except OSError as exc:  # a folder this user may not list
        raise LessKVError(f"cannot read folder {short_path(path)}: {exc.strerror or exc}") from None
    if not files:
        raise LessKVError(
            f"folder {short_path(path)} holds no .txt, .raw, .jsonl or .json file to read"
        )
    if field is not None and all(f.suffix.lower() in _TEXT_SUFFIXES for f in files):
        _refuse_field(field, short_path(path))
    texts: list[str] = []
    for file in files:
        if limit is not None and len(texts) >= limit:
            break
        plain = file.suffix.lower() in _TEXT_SUFFIXES
        texts += _file_texts(
            file, None if plain else field, None if limit is None else limit - len(texts)
        )
    return texts


def _lines(path: Path) -> Iterator[str]:
    """The file's lines, read lazily so a ``limit`` stops early; read errors become readable."""
    try:
        with path.open(encoding="utf-8") as handle:
            yield from handle
    except UnicodeDecodeError:
        raise LessKVError(f"cannot read {short_path(path)}: it is not UTF-8 text") from None
    except OSError as exc:
        raise LessKVError(f"cannot read {short_path(path)}: {exc.strerror or exc}") from None


def _jsonl_texts(path: Path, field: str, limit: int | None) -> list[str]:
    """One record per non-blank line."""

    def records() -> Iterator[tuple[str, Any]]:
        for number, line in enumerate(_lines(path), start=1):
            if line.strip():
                try:
                    yield f"{short_path(path)} line {number}", json.loads(line)
                except json.JSONDecodeError as exc:
                    raise LessKVError(
                        f"{short_path(path)} line {number} is not valid JSON: {exc.msg}"
                    ) from None

    return _record_texts(records(), field, limit)


def _json_texts(path: Path, field: str, limit: int | None) -> list[str]:
    """A JSON list of records (objects holding ``field``)."""
    try:
        data = json.loads("".join(_lines(path)))
    except json.JSONDecodeError as exc:
        raise LessKVError(
            f"{short_path(path)} is not valid JSON: {exc.msg} (line {exc.lineno})"
        ) from None
    if not isinstance(data, list):
        raise LessKVError(
            f"{short_path(path)} must hold a JSON list of records, found {type(data).__name__}"
        )
    return _record_texts(
        ((f"{short_path(path)} record {i}", r) for i, r in enumerate(data)), field, limit
    )


def _record_texts(records: Iterable[tuple[str, Any]], field: str, limit: int | None) -> list[str]:
    texts: list[str] = []
    for where, record in records:
        if not isinstance(record, dict):
            raise LessKVError(f"{where} is not a JSON object with a {field!r} field")
        if field not in record:
            keys = ", ".join(map(repr, record)) or "none"
            raise LessKVError(f"{where} has no field {field!r}; its fields: {keys} (pick one)")
        if not isinstance(record[field], str):
            raise LessKVError(f"{where}: field {field!r} is not a string")
        texts.append(record[field])
        if len(texts) == limit:
            break
    return texts


def _hf_texts(source: str, field: str, limit: int | None) -> list[str]:
    """``hf:NAME[/CONFIG][:SPLIT]``; an owner-qualified name takes three parts,
    ``hf:OWNER/NAME/CONFIG`` (``hf:OWNER/NAME/`` for none)."""
    spec, _, split = source[3:].partition(":")
    parts = spec.split("/")
    if len(parts) > 3 or not all(parts[:-1]) or not spec:
        raise LessKVError(f"bad dataset {source!r}: write hf:NAME[/CONFIG][:SPLIT]")
    name = "/".join(parts[:2]) if len(parts) == 3 else parts[0]
    config = parts[-1] if len(parts) > 1 and parts[-1] else None
    require("datasets", "hf", f"--data {source}")
    import datasets

    try:
        dataset = datasets.load_dataset(name, config, split=split or DEFAULT_SPLIT)
    except (OSError, ValueError) as exc:
        raise LessKVError(
            f"cannot load dataset {source!r} ({type(exc).__name__}); check the name, config and "
            "split, and that you are online"
        ) from exc
    if field not in dataset.column_names:
        raise LessKVError(
            f"dataset {source!r} has no field {field!r}; its fields: "
            f"{', '.join(map(repr, dataset.column_names))} (pick one)"
        )
    texts = list(dataset[: limit or len(dataset)][field])
    if not all(isinstance(text, str) for text in texts):
        raise LessKVError(f"dataset {source!r}: field {field!r} does not hold strings")
    return texts


def _refuse_field(field: str | None, source: str) -> None:
    if field is not None:
        raise LessKVError(
            f"{source!r} is plain text; field={field!r} applies only to "
            ".jsonl, .json and hf: sources"
        )
