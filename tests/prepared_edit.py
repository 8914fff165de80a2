"""Editing a prepared folder in tests: keep some records of one split (rewritten as one shard, manifest updated)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tuneline.tasks.data.prepare import load_manifest, open_split
from tuneline.tasks.data.shards import FORMAT, gather_rows, split_entry, write_shard


def keep_records(prepared: Path, split: str, rows: slice) -> None:
    """Split `split` of `prepared` becomes its records `rows` (in stored order), as prepare would write them."""
    manifest = load_manifest(prepared)
    assert manifest.get("format") == FORMAT, "a folder in the shard format"
    source = open_split(prepared, split)
    x, y = gather_rows(source, np.arange(source.count)[rows])
    source.close()
    for shard in manifest["splits"][split]["shards"]:
        for name in shard["files"].values():
            (prepared / name).unlink()
    entry = split_entry([write_shard(prepared, split, 0, x, y, source.layout)])
    manifest["splits"][split] = entry
    manifest["counts"][split] = entry["count"]
    (prepared / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
