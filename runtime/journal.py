"""The report as it grows: ``OUTPUT/report.jsonl`` gets the run's configuration, then one line per repaired image
*before* its PNG is written, so that a run stopped at any point (a kill, a crash) can be finished with ``--resume``:
an image whose line is there and whose PNG holds exactly the bytes the line names is done; any other is repaired
again. A PNG that no line vouches for is never taken as done (nor replaced without ``--overwrite``).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

JOURNAL = "report.jsonl"


def _canonical(config: dict) -> dict:
    return json.loads(json.dumps(config))       # tuples to lists, as the journal reads them back


class Journal:
    """Appends the repaired rows of a run to ``OUTPUT/report.jsonl`` (after the lines of the run it resumes, with
    ``append``)."""

    def __init__(self, output_dir: Path, config: dict, append: bool) -> None:
        path = Path(output_dir) / JOURNAL
        path.parent.mkdir(parents=True, exist_ok=True)
        if append and path.exists():
            data = path.read_bytes()
            whole = data[:data.rfind(b"\n") + 1]
            if whole != data:                      # a line cut short by the kill: its image is repaired again
                path.write_bytes(whole)
        self.file = open(path, "a" if append and path.exists() else "w")
        if self.file.tell() == 0:
            self._append({"config": _canonical(config)})

    def _append(self, entry: dict) -> None:
        self.file.write(json.dumps(entry) + "\n")
        self.file.flush()

    def record(self, row: dict, png: bytes) -> None:
        """Note ``row`` (its "file" and "output" set) as done, before ``png`` is written."""
        self._append({"row": row, "png_sha256": hashlib.sha256(png).hexdigest()})

    def close(self) -> None:
        self.file.close()


def done_rows(output_dir: Path, config: dict) -> dict[str, dict]:
    """file -> report row of each image an earlier run of this ``config`` finished (its PNG intact); {} where
    there is no journal; ValueError where it was written with other settings."""
    path = Path(output_dir) / JOURNAL
    if not path.exists():
        return {}
    entries = []
    for line in path.read_text().splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:             # a line cut short by the kill: the ones before it stand
            break
    config = _canonical(config)
    if not entries or entries[0].get("config") != config:
        before = entries[0].get("config", {}) if entries else {}
        changed = sorted(k for k in set(before) | set(config) if before.get(k) != config.get(k))
        raise ValueError(f"{path} is from a run with other settings ({', '.join(changed) or 'unreadable'}): resume "
                         "with the same options, or pass --overwrite to start again")
    done = {}
    for entry in entries[1:]:
        row, png = entry["row"], Path(output_dir) / entry["row"]["output"]
        if png.is_file() and hashlib.sha256(png.read_bytes()).hexdigest() == entry["png_sha256"]:
            done[row["file"]] = row
    return done
