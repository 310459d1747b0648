"""Regenerate the embedded default dataset from the raw Stack Exchange dumps.

    python -m pipelines.convert_stackexchange --config configs/demo.yaml \
        [--raw-dir ../shared/datasets/raw/stackexchange] [--sites beer,coffee] [--out data/stackexchange]

Defaults come from ``data.stackexchange.raw_dir`` / ``data.stackexchange.sites`` and the folder of
``data.notes``; relative paths resolve against the repository root. Writes, each atomically,
``notes.parquet``, ``behaviors.parquet`` and, last, ``manifest.json`` (per-site stats, size and
sha256 of every raw input file and of both outputs, row counts), then prints a summary per category.
Output is deterministic: the same dumps give byte-identical files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa

from notellm.config import ConfigError, load_config
from notellm.data.schema import EVENT_TYPES
from notellm.data.stackexchange import StackExchangeFormatError, convert_sites
from notellm.io_utils import atomic_write_parquet, atomic_write_text

NOTES_FILE = "notes.parquet"
BEHAVIORS_FILE = "behaviors.parquet"
MANIFEST_FILE = "manifest.json"
ATTRIBUTION = "Stack Exchange data dump, CC BY-SA (2.5/3.0/4.0 by post date); see data/ATTRIBUTION.md"


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _file_entry(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "sha256": sha256_of(path)}


def build_manifest(
    raw_dir_label: str, raw_dir: Path, sites: list[str], per_site: dict[str, dict[str, Any]],
    notes: pa.Table, behaviors: pa.Table, out_dir: Path,
) -> dict[str, Any]:
    """The manifest: inputs (size + sha256 by ``<site>/<file>``), outputs, totals, per-site stats."""
    inputs = {
        f"{site}/{name}": _file_entry(raw_dir / site / name)
        for site in sites for name in per_site[site]["input_files"]
    }
    event_counts = Counter(behaviors["event_type"].to_pylist())
    return {
        "source": ATTRIBUTION,
        "raw_dir": raw_dir_label,
        "sites": sites,
        "inputs": inputs,
        "outputs": {
            NOTES_FILE: {"rows": notes.num_rows, **_file_entry(out_dir / NOTES_FILE)},
            BEHAVIORS_FILE: {"rows": behaviors.num_rows, **_file_entry(out_dir / BEHAVIORS_FILE)},
        },
        "totals": {
            "notes": notes.num_rows,
            "events": {event: event_counts.get(event, 0) for event in EVENT_TYPES},
            "events_total": behaviors.num_rows,
            "users": len(set(behaviors["user_id"].to_pylist())),
        },
        "per_site": per_site,
    }


def summary_table(manifest: dict[str, Any]) -> str:
    """A fixed-width table: one line per category plus a total line."""
    header = f"{'category':<16} {'notes':>7} {'ask':>7} {'answer':>7} {'comment':>8} {'users':>7} {'skipped':>8}"
    lines = [header, "-" * len(header)]
    rows = [(site, s) for site, s in sorted(manifest["per_site"].items())]
    for site, s in rows:
        e = s["events"]
        lines.append(
            f"{site:<16} {s['notes']:>7} {e['ask']:>7} {e['answer']:>7} {e['comment']:>8} "
            f"{s['users']:>7} {sum(s['skipped'].values()):>8}"
        )
    t = manifest["totals"]
    skipped = sum(sum(s["skipped"].values()) for _, s in rows)
    lines.append("-" * len(header))
    lines.append(
        f"{'total':<16} {t['notes']:>7} {t['events']['ask']:>7} {t['events']['answer']:>7} "
        f"{t['events']['comment']:>8} {t['users']:>7} {skipped:>8}"
    )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pipelines.convert_stackexchange", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="pipeline YAML (defaults when omitted)")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--raw-dir", help="folder of <site>/ dump folders (default: data.stackexchange.raw_dir)")
    parser.add_argument("--sites", help="comma-separated site folders (default: data.stackexchange.sites)")
    parser.add_argument("--out", help="output folder (default: the folder of data.notes)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the conversion; returns the process exit code."""
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.override)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    se = cfg.data.stackexchange
    raw_dir_label = args.raw_dir or str(se.raw_dir)
    raw_dir = cfg.resolve_path(Path(raw_dir_label))
    sites = [s.strip() for s in args.sites.split(",") if s.strip()] if args.sites else list(se.sites)
    out_dir = cfg.resolve_path(Path(args.out)) if args.out else cfg.resolve_path(cfg.data.notes).parent

    try:
        notes, behaviors, per_site = convert_sites(raw_dir, sites)
    except (StackExchangeFormatError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    atomic_write_parquet(out_dir / NOTES_FILE, notes)
    atomic_write_parquet(out_dir / BEHAVIORS_FILE, behaviors)
    manifest = build_manifest(raw_dir_label, raw_dir, sites, per_site, notes, behaviors, out_dir)
    atomic_write_text(out_dir / MANIFEST_FILE, json.dumps(manifest, indent=2, sort_keys=True) + "\n")

    print(summary_table(manifest))
    print(f"wrote {out_dir / NOTES_FILE} ({notes.num_rows} rows), {out_dir / BEHAVIORS_FILE} "
          f"({behaviors.num_rows} rows), {out_dir / MANIFEST_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
