"""Output helpers shared by the benchmark scripts: one JSON file (the figures) and one markdown file (the
table people read) per run, both named after the benchmark.

Example::

    rows = [{"size": 1000, "method": "exact", "p50_ms": 0.41}]
    print(markdown_table(rows))
    json_path, md_path = write_results("retrieval", rows, Path("bench/results"), meta={"queries": 200})
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


def format_cell(value: Any) -> str:
    """A table cell: floats to about 3 significant digits, nothing for None, `|` escaped."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        magnitude = abs(value)
        if not math.isfinite(value):
            return str(value)
        if magnitude >= 100:
            return f"{value:.0f}"
        if magnitude >= 10:
            return f"{value:.1f}"
        if magnitude >= 1:
            return f"{value:.2f}"
        if magnitude >= 0.001:
            return f"{value:.3f}"
        return "0" if value == 0 else f"{value:.2g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A GitHub markdown table of ``rows``; columns default to every key, in order of first appearance."""
    if columns is None:
        columns = list(dict.fromkeys(key for row in rows for key in row))
    if not columns:
        return ""
    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    lines += ["| " + " | ".join(format_cell(row.get(column)) for column in columns) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    """Where the figures were measured: they only compare within one run on one machine."""
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def write_results(
    name: str,
    rows: Sequence[Mapping[str, Any]],
    out_dir: Path | str,
    *,
    meta: Mapping[str, Any] | None = None,
    notes: Sequence[str] = (),
    columns: Sequence[str] | None = None,
) -> tuple[Path, Path]:
    """Write ``<out_dir>/<name>.json`` (rows, meta, machine, time) and ``<out_dir>/<name>.md`` (the table,
    then ``notes`` as lines); returns both paths. Later runs overwrite earlier ones."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    created = datetime.now(UTC).isoformat(timespec="seconds")
    document = {
        "name": name,
        "created": created,
        "machine": machine(),
        "meta": dict(meta or {}),
        "rows": [dict(row) for row in rows],
    }
    json_path = out / f"{name}.json"
    json_path.write_text(json.dumps(document, indent=2, default=str) + "\n", encoding="utf-8")
    parts = [f"# {name}", "", f"Measured {created}.", ""]
    if meta:
        parts += [", ".join(f"{key}: {value}" for key, value in meta.items()), ""]
    parts += [markdown_table(rows, columns), ""]
    if notes:
        parts += [*notes, ""]
    md_path = out / f"{name}.md"
    md_path.write_text("\n".join(parts), encoding="utf-8")
    return json_path, md_path
