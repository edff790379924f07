"""Text sources and token windows, on tiny files and a byte-level tokenizer built in code."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from helpers import BOS, tiny_tokenizer
from lesskv.data import bos_prefix, length_mix, load_texts, source_mix, token_windows
from lesskv.errors import LessKVError

WIKITEXT = Path(__file__).parents[1].parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
needs_wikitext = pytest.mark.skipif(
    not WIKITEXT.is_file(), reason=f"WikiText-2 raw test split not found at {WIKITEXT}"
)


@pytest.fixture(scope="module")
def byte_tokenizer() -> PreTrainedTokenizerFast:
    """One token per UTF-8 byte (byte-level BPE without merges): ASCII text of n characters is
    exactly n tokens, so window contents can be checked against the text itself."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE({ch: i for i, ch in enumerate(alphabet)}, []))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend)


def write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def write_jsonl(path: Path, records: list) -> str:
    return write(path, "\n".join(json.dumps(r) for r in records) + "\n")


# load_texts


def test_builtin_is_pythons_documentation():
    from pydoc_data.topics import topics

    texts = load_texts("builtin")
    assert texts == [topics[key] for key in sorted(topics)]
    # CPython 3.11 ships ~465k characters (about 100k tokens); newer versions ship more.
    assert len(texts) > 50 and sum(map(len, texts)) > 400_000
    assert load_texts("builtin", limit=3) == texts[:3]


@pytest.mark.parametrize("suffix", [".txt", ".raw", ".TXT"])
def test_plain_text_file_is_one_document(tmp_path, suffix):
    text = " = Title = \n\n First line .\n Second line .\n"
    assert load_texts(write(tmp_path / f"doc{suffix}", text)) == [text]


def test_jsonl_one_document_per_line(tmp_path):
    records = [{"text": "alpha", "id": 1}, {"text": "beta", "id": 2}, {"text": "gamma", "id": 3}]
    path = write(tmp_path / "docs.jsonl", "\n".join(json.dumps(r) for r in records) + "\n\n")
    assert load_texts(path) == ["alpha", "beta", "gamma"]
    assert load_texts(path, limit=2) == ["alpha", "beta"]


def test_jsonl_limit_stops_reading(tmp_path):
    path = write(tmp_path / "docs.jsonl", '{"text": "kept"}\nnot json, never read\n')
    assert load_texts(path, limit=1) == ["kept"]


def test_jsonl_field_chooses_the_key(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", [{"article": "one", "summary": "1"}])
    assert load_texts(path, field="summary") == ["1"]


def test_jsonl_missing_field_lists_the_available_keys(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", [{"article": "one", "summary": "1"}])
    with pytest.raises(LessKVError, match=r"no field 'text'.*'article', 'summary'"):
        load_texts(path)


def test_jsonl_bad_line_is_named(tmp_path):
    path = write(tmp_path / "docs.jsonl", '{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(LessKVError, match="line 2 is not valid JSON"):
        load_texts(path)


def test_json_list_of_records(tmp_path):
    path = write(tmp_path / "docs.json", json.dumps([{"body": "x"}, {"body": "y"}]))
    assert load_texts(path, field="body") == ["x", "y"]
    with pytest.raises(LessKVError, match="JSON list of records"):
        load_texts(write(tmp_path / "obj.json", '{"body": "x"}'))


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.txt", "", "holds no text"),
        ("blank.txt", " \n\n \n", "holds no text"),
        ("blank.jsonl", '{"text": " "}\n{"text": ""}\n', "holds no text"),
        ("table.csv", "a,b\n", "unknown file type '.csv'"),
        ("noext", "text", "unknown file type"),
    ],
)
def test_bad_files(tmp_path, name, content, message):
    with pytest.raises(LessKVError, match=message):
        load_texts(write(tmp_path / name, content))


def test_missing_file_directory_and_binary(tmp_path):
    with pytest.raises(LessKVError, match="does not exist"):
        load_texts(str(tmp_path / "missing.txt"))
    (tmp_path / "loop.txt").symlink_to(tmp_path / "loop.txt")
    with pytest.raises(LessKVError, match="loop.txt is a broken or looping symbolic link"):
        load_texts(str(tmp_path / "loop.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(LessKVError, match="folder .*empty holds no .txt, .raw, .jsonl or .json"):
        load_texts(str(tmp_path / "empty"))
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00text")
    with pytest.raises(LessKVError, match="not UTF-8"):
        load_texts(str(tmp_path / "binary.txt"))


def test_a_path_that_cannot_be_probed_is_one_short_line(tmp_path):
    """A name too long for the file system fails even is_dir(): one line, the path cut in
    its middle so the reason still fits."""
    long = tmp_path / ("a" * 5000 + ".txt")
    with pytest.raises(LessKVError) as caught:
        load_texts(str(long))
    message = str(caught.value)
    assert message.startswith(f"cannot read {str(tmp_path)[:20]}") and "...aaa" in message
    assert message.endswith("a.txt: File name too long") and len(message) < 150, message


def test_bad_arguments(tmp_path):
    with pytest.raises(LessKVError, match="limit"):
        load_texts("builtin", limit=0)
    with pytest.raises(LessKVError, match="plain text"):
        load_texts(write(tmp_path / "a.txt", "words"), field="body")


# hf: sources, with a stand-in for the datasets package (no network in tests)


class FakeDataset:
    def __init__(self, rows: dict[str, list]):
        self.rows = rows
        self.column_names = list(rows)

    def __len__(self) -> int:
        return len(next(iter(self.rows.values())))

    def __getitem__(self, items: slice) -> dict[str, list]:
        return {key: values[items] for key, values in self.rows.items()}


@pytest.fixture
def fake_datasets(monkeypatch):
    calls = []

    def load_dataset(name, config=None, *, split):
        calls.append((name, config, split))
        if name == "missing":
            raise FileNotFoundError("Dataset 'missing' doesn't exist on the Hub")
        return FakeDataset({"text": ["a", "", "b", "c"], "label": [0, 1, 0, 1]})

    monkeypatch.setitem(sys.modules, "datasets", SimpleNamespace(load_dataset=load_dataset))
    return calls


@pytest.mark.parametrize(
    ("source", "call"),
    [
        ("hf:wikitext/wikitext-2-raw-v1:test", ("wikitext", "wikitext-2-raw-v1", "test")),
        ("hf:wikitext", ("wikitext", None, "train")),
        ("hf:allenai/c4/en:validation", ("allenai/c4", "en", "validation")),
        ("hf:Salesforce/wikitext/:test", ("Salesforce/wikitext", None, "test")),
    ],
)
def test_hf_source_names(fake_datasets, source, call):
    assert load_texts(source) == ["a", "", "b", "c"]
    assert fake_datasets == [call]


def test_hf_source_limit_and_field(fake_datasets):
    assert load_texts("hf:x", limit=3) == ["a", "", "b"]
    with pytest.raises(LessKVError, match=r"no field 'body'.*'text', 'label'"):
        load_texts("hf:x", field="body")
    with pytest.raises(LessKVError, match="does not hold strings"):
        load_texts("hf:x", field="label")


def test_hf_source_errors(fake_datasets, monkeypatch):
    with pytest.raises(LessKVError, match="cannot load dataset 'hf:missing'"):
        load_texts("hf:missing")
    with pytest.raises(LessKVError, match="bad dataset"):
        load_texts("hf:a/b/c/d")
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    extra = r"^--data hf:wikitext needs the optional package datasets: pip install 'lesskv\[hf\]'$"
    with pytest.raises(LessKVError, match=extra):
        load_texts("hf:wikitext")


# token_windows


def test_windows_are_consecutive_exact_and_drop_the_remainder(byte_tokenizer):
    texts = ["The first document.", "A second one, a bit longer.", "Third"]
    joined = "\n\n".join(texts)  # 54 characters = 54 tokens
    windows = token_windows(byte_tokenizer, texts, 10)
    assert windows.dtype == torch.long and windows.shape == (5, 10)
    assert byte_tokenizer.decode(windows.flatten()) == joined[:50]
    for i, window in enumerate(windows):
        assert byte_tokenizer.decode(window) == joined[10 * i : 10 * (i + 1)]


def test_max_windows_caps_the_count(byte_tokenizer):
    windows = token_windows(byte_tokenizer, ["x" * 100], 8, max_windows=3)
    assert windows.shape == (3, 8)


def test_too_little_text_says_how_many_tokens(byte_tokenizer):
    with pytest.raises(LessKVError, match="only 8 tokens.*window of 64"):
        token_windows(byte_tokenizer, ["hello", "x"], 64)


@pytest.mark.parametrize(("seq_len", "max_windows"), [(1, None), (0, None), (8, 0)])
def test_bad_window_arguments(byte_tokenizer, seq_len, max_windows):
    with pytest.raises(LessKVError, match="at least"):
        token_windows(byte_tokenizer, ["some text here"], seq_len, max_windows=max_windows)


def test_few_windows_tokenise_only_a_prefix(byte_tokenizer):
    texts = load_texts("builtin")
    seen: list[int] = []

    def spy(text, **kwargs):
        seen.append(len(text))
        return byte_tokenizer(text, **kwargs)

    few = token_windows(spy, texts, 128, max_windows=4)
    assert max(seen) < 20_000 < sum(map(len, texts))
    assert torch.equal(few, token_windows(byte_tokenizer, texts[:40], 128)[:4])


@needs_wikitext
def test_wikitext_windows(byte_tokenizer):
    text = WIKITEXT.read_text(encoding="utf-8")
    windows = token_windows(byte_tokenizer, load_texts(str(WIKITEXT)), 1024, max_windows=12)
    assert windows.shape == (12, 1024)
    expected = text.encode()[: 12 * 1024].decode(errors="replace")
    assert byte_tokenizer.decode(windows.flatten()) == expected


@pytest.mark.slow
@needs_wikitext
def test_wikitext_windows_with_the_default_tokenizer():
    from lesskv.hf.loading import load_model

    _, tokenizer = load_model()
    texts = load_texts(str(WIKITEXT))
    every = token_windows(tokenizer, texts, 1024)
    assert every.shape == (296, 1024)  # 303k tokens in the test split
    assert torch.equal(token_windows(tokenizer, texts, 1024, max_windows=12), every[:12])
    decoded = tokenizer.decode(every.flatten())
    assert decoded.startswith(" \n = Robert Boulter = \n")
    assert texts[0].startswith(decoded)  # byte-level BPE: windows are the file's text, in order


def test_a_length_mix_cuts_disjoint_windows_with_equal_tokens_per_length(byte_tokenizer):
    text = "".join(chr(97 + i % 26) for i in range(100))
    short, long = length_mix(byte_tokenizer, [text], [8, 16], windows=4)
    assert short.shape == (4, 8) and long.shape == (2, 16)
    assert byte_tokenizer.decode(torch.cat([short.flatten(), long.flatten()])) == text[:64]


def test_a_length_mix_shrinks_every_length_alike_on_short_text(byte_tokenizer):
    mix = length_mix(byte_tokenizer, ["x" * 50], [8, 16], windows=10)  # wants 160 tokens
    assert [w.shape for w in mix] == [(3, 8), (1, 16)]
    with pytest.raises(LessKVError, match="only 50 tokens.*windows of 32, 64 tokens"):
        length_mix(byte_tokenizer, ["x" * 50], [32, 64], windows=1)


def test_a_folder_is_its_files_documents_in_name_order(tmp_path):
    """A corpus of books as one source: every text and record file directly in the folder,
    in name order; other files, hidden ones and subfolders are not read."""
    write(tmp_path / "b.txt", "book two")
    write(tmp_path / "a.txt", "book one")
    write(tmp_path / "c.jsonl", '{"text": "page"}\n{"text": "another"}\n')
    write(tmp_path / "notes.md", "not read")
    write(tmp_path / ".hidden.txt", "not read")
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub" / "d.txt", "not read")
    (tmp_path / "folder.txt").mkdir()  # a folder named like a text file is still a folder
    assert load_texts(str(tmp_path)) == ["book one", "book two", "page", "another"]
    assert load_texts(str(tmp_path), limit=3) == ["book one", "book two", "page"]


def test_a_field_for_a_folder_of_plain_text_is_refused(tmp_path):
    write(tmp_path / "a.txt", "book")
    with pytest.raises(LessKVError, match="is plain text"):
        load_texts(str(tmp_path), field="body")


def test_sources_share_the_windows_equally_whatever_their_sizes(byte_tokenizer):
    """A small source gets as many windows as a large one; each is cut from its own text."""
    big, small = "a" * 1000, "b" * 100
    short, long = source_mix(byte_tokenizer, [[big], [small]], [8, 16], windows=5)
    assert short.shape == (5, 8) and long.shape == (2, 16)
    assert byte_tokenizer.decode(short.flatten()) == "a" * 24 + "b" * 16
    assert byte_tokenizer.decode(long.flatten()) == "a" * 16 + "b" * 16
    with pytest.raises(LessKVError, match="2 text sources need at least one window each"):
        source_mix(byte_tokenizer, [[big], [small]], [8], windows=1)


def test_spread_windows_come_from_evenly_spaced_places_of_the_whole_text(byte_tokenizer):
    """Two windows of 8 and one of 16 from 1000 tokens: placed in the order of their relative
    places (8 at 1/4, 16 at 1/2, 8 at 3/4) with equal gaps of (1000 - 32) / 3 between them."""
    text = "".join(chr(33 + i % 90) for i in range(1000))
    short, long = length_mix(byte_tokenizer, [text], [8, 16], windows=2, spread=True)
    assert [byte_tokenizer.decode(w) for w in short] == [text[161:169], text[830:838]]
    assert byte_tokenizer.decode(long[0]) == text[492:508]
    mixed = source_mix(byte_tokenizer, [[text], ["b" * 100]], [8], windows=2, spread=True)[0]
    assert byte_tokenizer.decode(mixed[0]) == text[496:504]  # one window: the middle
    assert byte_tokenizer.decode(mixed[1]) == "b" * 8


# BOS


def test_only_a_tokenizer_that_starts_texts_with_bos_gets_it(byte_tokenizer):
    """Read off an encoding: the BOS-adding tiny tokenizer leaves add_bos_token False, and
    a BOS token that is never added (SmolLM2's <|im_start|>) does not count."""
    adds = tiny_tokenizer(adds_bos=True)
    assert bos_prefix(adds) == [BOS] and not adds.add_bos_token
    assert bos_prefix(tiny_tokenizer()) == [] and bos_prefix(byte_tokenizer) == []
    named_only = tiny_tokenizer()
    named_only.bos_token = "<bos>"
    assert named_only.bos_token_id == BOS and bos_prefix(named_only) == []


def test_windows_of_a_bos_tokenizer_are_bos_then_consecutive_text():
    """Each window keeps its length: BOS, then seq_len - 1 tokens of text, in order."""
    tokenizer = tiny_tokenizer(adds_bos=True)
    text = " ".join(["the", "cat", "sat", "on", "a", "mat", "dog", "ran"] * 4)  # 32 tokens
    plain = tokenizer(text, add_special_tokens=False).input_ids
    windows = token_windows(tokenizer, [text], 8)
    assert windows.shape == (4, 8) and windows[:, 0].eq(BOS).all()
    assert windows[:, 1:].flatten().tolist() == plain[:28]
    assert torch.equal(token_windows(tokenizer, [text], 8, max_windows=2), windows[:2])
    short, long = length_mix(tokenizer, [text], [4, 8], windows=4)
    assert short.shape == (4, 4) and long.shape == (2, 8)
    assert short[:, 0].eq(BOS).all() and long[:, 0].eq(BOS).all()
    assert torch.cat([short[:, 1:].flatten(), long[:, 1:].flatten()]).tolist() == plain[:26]
