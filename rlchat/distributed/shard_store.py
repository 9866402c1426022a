"""The output directory of ``rlchat generate``: shard files written atomically, the manifest, resume, assembly.

A shard (``shards/part-NNNNN.parquet``) is either complete under its final name or absent -- every file here is
written through :func:`rlchat.core.files.atomic_path` -- so a run killed at any point (SIGKILL included) resumes by
reading the shards that exist (:meth:`ShardStore.existing`) and generating the others. Each shard file is
self-describing: its Parquet metadata holds the run settings, its index, its input hash and its counts. When every
shard exists, :func:`assemble_outputs` streams them, in order, into ``generations.parquet`` (and ``.jsonl``).
The job that fills the store is :mod:`rlchat.distributed.batch_generate`.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rlchat import __version__
from rlchat.core.errors import ConfigError
from rlchat.core.files import TMP_GLOB, atomic_path, atomic_write_json

logger = logging.getLogger(__name__)


MANIFEST_FILE = "manifest.json"


SHARDS_DIR = "shards"


PARQUET_FILE = "generations.parquet"


JSONL_FILE = "generations.jsonl"


META_KEY = b"rlchat_generate"


def _shard_stats(table: pa.Table) -> dict[str, Any]:
    reasons = Counter(table.column("finish_reason").to_pylist())
    return {
        "samples": table.num_rows,
        "prompts": len(set(table.column("row").to_pylist())),
        "prompt_tokens": int(pc.sum(table.column("prompt_tokens")).as_py() or 0),
        "completion_tokens": int(pc.sum(table.column("completion_tokens")).as_py() or 0),
        "finish_reasons": dict(sorted(reasons.items())),
    }


class ShardStore:
    """The output directory: ``shards/part-NNNNN.parquet`` files (each written atomically) and ``manifest.json``.

    Args:
        directory: the ``--output`` directory (created).
    """

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        self.shards_dir = self.dir / SHARDS_DIR
        if self.dir.exists() and not self.dir.is_dir():
            raise ConfigError(f"--output {self.dir}: is a file; expected a directory (new or from an earlier run)")
        self.shards_dir.mkdir(parents=True, exist_ok=True)

    def path(self, index: int) -> Path:
        return self.shards_dir / f"part-{index:05d}.parquet"

    def remove_temporaries(self) -> list[Path]:
        """Delete the temporary files a killed run left behind (never a finished shard)."""
        gone = []
        for d in (self.dir, self.shards_dir):
            for p in d.glob(TMP_GLOB):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
                    gone.append(p)
        return gone

    def existing(self) -> dict[int, dict[str, Any]]:
        """Index -> the metadata of every readable shard file (an unreadable one is reported and ignored)."""
        found: dict[int, dict[str, Any]] = {}
        for p in sorted(self.shards_dir.glob("part-*.parquet")):
            try:
                index = int(p.stem.split("-", 1)[1])
                meta = json.loads((pq.read_schema(p).metadata or {})[META_KEY])
            except Exception as e:  # a foreign or damaged file: regenerate that shard rather than trust it
                logger.warning("%s: not a readable shard (%s: %s); it will be regenerated", p, type(e).__name__, e)
                continue
            if p == self.path(index):
                found[index] = meta
        return found

    def write(self, index: int, table: pa.Table, meta: dict[str, Any]) -> Path:
        """Write shard ``index`` atomically; ``meta`` goes into the file's Parquet metadata."""
        path = self.path(index)
        table = table.replace_schema_metadata({META_KEY: json.dumps(meta, sort_keys=True).encode()})
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp)
        return path

    def existing_stats(self, index: int) -> dict[str, Any]:
        """The counts stored in a written shard's metadata (recomputed from its rows if missing)."""
        meta = json.loads((pq.read_schema(self.path(index)).metadata or {})[META_KEY])
        return meta.get("stats") or _shard_stats(pq.read_table(self.path(index)))

    def read_manifest(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.dir / MANIFEST_FILE).read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        path = self.dir / MANIFEST_FILE
        atomic_write_json(path, manifest, indent=2, ensure_ascii=False)


def _json_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """Settings as they read back from JSON (tuples become lists), so stored and new settings compare equal."""
    return json.loads(json.dumps(settings, sort_keys=True))


def settings_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: earlier value -> this run's value`` for every setting that differs (nested dicts by dotted key)."""

    def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            if isinstance(v, dict) and v:
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    a, b = flat(old), flat(new)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def assemble_outputs(store: ShardStore, num_shards: int, jsonl: bool) -> list[Path]:
    """Concatenate shards ``0..num_shards-1`` into ``generations.parquet`` (and ``.jsonl``), each atomically.

    Streams one shard at a time (one Parquet row group per shard), so memory stays at one shard.

    Returns:
        The files written.
    """
    paths = [store.path(i) for i in range(num_shards)]
    schema = pq.read_schema(paths[0]).remove_metadata()
    out = store.dir / PARQUET_FILE
    written = [out]
    with atomic_path(out) as tmp:
        meta = {b"rlchat": json.dumps({"version": __version__, "shards": num_shards}).encode()}
        with pq.ParquetWriter(tmp, schema.with_metadata(meta)) as writer:
            for p in paths:
                writer.write_table(pq.read_table(p).replace_schema_metadata(meta))
    if jsonl:
        out = store.dir / JSONL_FILE
        written.append(out)
        with atomic_path(out) as tmp, tmp.open("w", encoding="utf-8") as fh:
            for p in paths:
                for row in pq.read_table(p).to_pylist():
                    fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return written
