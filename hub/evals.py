"""Evaluation records: how well each version did, kept beside the registry and never inside the artifact.

Why here: a version is immutable (its files and sha256 never change), but what is learned about it grows:
every `hub eval` appends records (metric, value, n, the data set's sha256, date, base model fingerprint,
settings) to `<registry>/evals/<name>/<version>.jsonl`, one JSON object per line. Each record carries the
artifact's sha256, so records of a removed and re-pushed version never describe the new content, and an id,
so copying records between registries (push and pull) adds each one once. Appends hold a file lock and
write whole lines; a reader ignores a last line without its newline (a write still in progress).
"""
from __future__ import annotations

import json
import os
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from filelock import FileLock

from hub.errors import HubError
from hub.manifest import Manifest

EVALS_DIR = "evals"
METRICS = ("loss", "perplexity", "accuracy", "exact_match", "contains")
LOWER_IS_BETTER = ("loss", "perplexity")
FIELDS = ("id", "sha256", "metric", "value", "n", "dataset", "date", "base_model", "settings")


def records_path(root: Path, manifest: Manifest) -> Path:
    """Where a version's records live (names are checked on push: no part escapes the folder)."""
    return Path(root) / EVALS_DIR / manifest.name / f"{manifest.version}.jsonl"


def new_record(manifest: Manifest, metric: str, value: float, n: int, dataset: dict[str, Any],
               base_model: dict[str, Any], settings: dict[str, Any],
               base_value: float | None = None) -> dict[str, Any]:
    """One record for `manifest`, dated now (UTC) with a fresh id; `base_value`: the bare base's value on the
    same data, when it was evaluated beside the version."""
    record = {"id": uuid.uuid4().hex, "sha256": manifest.sha256, "metric": metric, "value": value, "n": n,
              "dataset": dataset, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "base_model": base_model, "settings": settings}
    return record if base_value is None else {**record, "base_value": base_value}


def _read_all(path: Path) -> list[dict[str, Any]]:
    """Every complete record in `path` (none if it does not exist); a malformed line fails by its number."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    lines = text.split("\n")[:-1]  # the part after the last newline is a write in progress, or nothing
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise HubError(f"{path}: line {number} is not a JSON record ({e.msg})") from None
        if not isinstance(record, dict) or not all(k in record for k in FIELDS):
            raise HubError(f"{path}: line {number} lacks one of the record fields {', '.join(FIELDS)}")
        records.append(record)
    return records


def read(root: Path, manifest: Manifest) -> list[dict[str, Any]]:
    """The version's records, oldest first (only those made for its current content)."""
    return read_file(records_path(root, manifest), manifest)


def read_file(path: Path, manifest: Manifest) -> list[dict[str, Any]]:
    """The records in a records file (e.g. one a remote shipped) made for `manifest`'s content."""
    return [r for r in _read_all(path) if r["sha256"] == manifest.sha256]


def write_file(path: Path, records: list[dict[str, Any]]) -> None:
    """Records as a records file of their own (what a remote ships beside an artifact)."""
    path.write_text(lines(records), encoding="utf-8")


def lines(records: list[dict[str, Any]]) -> str:
    """Records as the text of a records file: one JSON object per line."""
    return "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)


def append(root: Path, manifest: Manifest, records: list[dict[str, Any]]) -> int:
    """Add the records whose id the version does not hold yet; returns how many were added. Safe against
    concurrent appends (a lock per version file) and readers (whole lines, flushed to disk)."""
    path = records_path(root, manifest)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        held = {r["id"] for r in _read_all(path)}
        new = []
        for r in records:  # once each, even if `records` repeats one (a pull merging two sources of them)
            if r["id"] not in held and r["sha256"] == manifest.sha256:
                held.add(r["id"])
                new.append(r)
        if new:
            with open(path, "a", encoding="utf-8") as f:
                f.write(lines(new))
                f.flush()
                os.fsync(f.fileno())
    return len(new)


def copy(source_root: Path, target_root: Path, manifest: Manifest) -> int:
    """Copy a version's records from one registry to another (push, pull); returns how many were new there."""
    return append(target_root, manifest, read(source_root, manifest))


def better(metric: str, a: float, b: float) -> bool:
    """Whether value `a` beats `b` on `metric`."""
    return a < b if metric in LOWER_IS_BETTER else a > b


def latest(root: Path, manifest: Manifest, metric: str, dataset: str | None = None) -> dict[str, Any] | None:
    """The version's newest record of `metric` (on the data set whose sha256 starts with `dataset`)."""
    found = [r for r in read(root, manifest) if r["metric"] == metric
             and (dataset is None or r["dataset"].get("sha256", "").startswith(dataset.lower()))]
    return max(found, key=lambda r: r["date"]) if found else None


def rank(root: Path, manifests: list[Manifest], metric: str,
         dataset: str | None = None) -> list[tuple[Manifest, dict[str, Any] | None]]:
    """The versions best first by their newest `metric` record (those without one last, in the given order).
    Values on different data sets do not compare: without `dataset` the records must share one."""
    if metric not in METRICS:
        raise HubError(f"--sort takes a metric: {', '.join(METRICS)}; got {metric!r}")
    rows = [(m, latest(root, m, metric, dataset)) for m in manifests]
    sets = sorted({r["dataset"].get("sha256", "") for _, r in rows if r is not None})
    if len(sets) > 1:
        shown = ", ".join(s[:12] for s in sets)
        raise HubError(f"{metric} was measured on {len(sets)} data sets ({shown}): choose one with --dataset SHA256")
    sign = 1 if metric in LOWER_IS_BETTER else -1
    recorded = sorted(((m, r) for m, r in rows if r is not None), key=lambda row: sign * row[1]["value"])
    return recorded + [row for row in rows if row[1] is None]


def describe(record: dict[str, Any]) -> str:
    """One line for `hub show` and `hub list --sort`: value, n, data set, base, date."""
    data = record["dataset"]
    unit = "tokens" if record["metric"] in LOWER_IS_BETTER else "rows"
    base = record.get("base_value")
    versus = f", base {base:.4f}" if isinstance(base, (int, float)) else ""
    return (f"{record['metric']} {record['value']:.4f} ({record['n']} {unit}{versus}) on {data.get('file', '?')} "
            f"sha256:{data.get('sha256', '')[:12]}, {record['date']}")


def ranked_rows(ranked: list[tuple[Manifest, dict[str, Any] | None]], metric: str) -> list[list[str]]:
    """`hub list --sort METRIC`: a table of `rank`'s result."""
    rows = [["REF", "TECHNIQUE", metric.upper(), "N", "DATA SHA256", "DATE"]]
    for m, r in ranked:
        cells = [f"{r['value']:.4f}", str(r["n"]), r["dataset"].get("sha256", "")[:12], r["date"]] if r else ["-"] * 4
        rows.append([m.ref, m.technique, *cells])
    return rows
