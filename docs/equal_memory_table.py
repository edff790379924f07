"""Print the equal-memory table (docs/RESULTS.md §10) from the JSON cells docs/equal_memory.sh
writes under runs/equal/: one row per data set, policy and budget; for each method the
perplexity and, in the header row's order, the bytes one KV head holds."""

from __future__ import annotations

import json
from pathlib import Path

METHODS = ("baseline", "baseline+", "merge", "less")


def main(folder: Path = Path("runs/equal")) -> None:
    print("| cell | full | " + " | ".join(METHODS) + " | best at equal memory |")
    print("|---" * (len(METHODS) + 3) + "|")
    full = {}
    for path in sorted(folder.glob("*.json")):
        rows = {r["method"]: r for r in json.loads(path.read_text())}
        data = path.stem.rsplit("-", 2)[0]
        if "full" in rows:
            full[data] = rows["full"]["ppl"]
    for path in sorted(folder.glob("*.json")):
        rows = {r["method"]: r for r in json.loads(path.read_text())}
        data = path.stem.rsplit("-", 2)[0]
        cells = []
        for method in METHODS:
            row = rows.get(method)
            cells.append("—" if row is None else f"{row['ppl']:.3f} ({row['head_bytes']} B)")
        contenders = [m for m in METHODS[1:] if m in rows]
        best = min(contenders, key=lambda m: rows[m]["ppl"]) if contenders else "—"
        if best != "—" and rows[best]["ppl"] >= rows["baseline"]["ppl"]:
            best = "none beats baseline"
        reference = f"{full[data]:.3f}" if data in full else "—"
        print(f"| {path.stem} | {reference} | " + " | ".join(cells) + f" | {best} |")


if __name__ == "__main__":
    main()
