"""The curated dataset: what ``curate`` writes and every later stage reads.

Layout in the workspace::

    curated/v0001/dataset/    a Hugging Face ``datasets.Dataset`` saved with save_to_disk
    curated/v0001/report.json the curate report (counts, drops per reason, entities, examples)
    curated/v0001/config.json the resolved curate config
    curated/CURRENT           the name of the newest complete version

One row per kept call. ``request`` / ``response`` / ``metadata`` are JSON strings (a dataset column cannot hold
arbitrary nested JSON of varying shape); ``split`` is train | validation | test, decided by session.
"""

from __future__ import annotations

import itertools
import json
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slmigrate.errors import SlmigrateError
from slmigrate.record import CallRecord
from slmigrate.workspace import Workspace

SPLITS = ("train", "validation", "test")
COLUMNS = ("id", "input_id", "session", "agent", "model", "timestamp", "split", "request", "response",
           "prompt_tokens", "completion_tokens", "outcome", "metadata")
WRITE_BATCH = 2000  # rows per Arrow record batch when writing a version
REPORT_FILE = "report.json"  # in each version folder: the curate report


@dataclass
class CuratedCall(CallRecord):
    split: str = "train"


def _root(ws: Workspace) -> Path:
    return ws.path("curated")


def current_version(ws: Workspace) -> str | None:
    marker = _root(ws) / "CURRENT"
    return marker.read_text().strip() if marker.exists() else None


def version_dir(ws: Workspace, version: str | None = None) -> Path:
    version = version or current_version(ws)
    if version is None:
        raise SlmigrateError(f"no curated data in {ws.root}; run `slmigrate curate` first")
    return _root(ws) / version


def to_row(call: CallRecord, split: str) -> dict[str, Any]:
    return {
        "id": call.id, "input_id": call.input_id, "session": call.session, "agent": call.agent,
        "model": call.model, "timestamp": call.timestamp, "split": split,
        "request": json.dumps(call.request, ensure_ascii=False),
        "response": json.dumps(call.response, ensure_ascii=False),
        "prompt_tokens": call.prompt_tokens, "completion_tokens": call.completion_tokens,
        "outcome": call.outcome, "metadata": json.dumps(call.metadata, ensure_ascii=False),
    }


def from_row(row: dict[str, Any]) -> CuratedCall:
    return CuratedCall(
        request=json.loads(row["request"]), response=json.loads(row["response"]), id=row["id"],
        input_id=row["input_id"], session=row["session"], agent=row["agent"], model=row["model"],
        timestamp=row["timestamp"], prompt_tokens=row["prompt_tokens"],
        completion_tokens=row["completion_tokens"], outcome=row["outcome"],
        metadata=json.loads(row["metadata"] or "{}"), split=row["split"],
    )


def write_curated(ws: Workspace, rows: Iterable[dict[str, Any]],
                  report: dict[str, Any] | Callable[[], dict[str, Any]], config: dict[str, Any]) -> str:
    """Save a new version and only then point CURRENT at it, so a crash never leaves a half-written current.

    ``rows`` may be a generator: they are written WRITE_BATCH at a time, so a million calls never sit in memory
    at once. ``report`` may be a function, called after the last row (when a streamed run knows its counts).
    """
    import datasets
    from datasets.arrow_writer import ArrowWriter

    # Our own commands draw the progress; the library's "Saving the dataset" bars would only clutter stderr.
    datasets.disable_progress_bars()
    root = _root(ws)
    root.mkdir(parents=True, exist_ok=True)
    existing = sorted(p.name for p in root.glob("v[0-9]*") if p.is_dir())
    version = f"v{int(existing[-1][1:]) + 1:04d}" if existing else "v0001"
    target = root / version
    # A run killed mid-write leaves its half-written version behind: nothing reads it, so clear every one.
    for stale in root.glob(".v[0-9]*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".{version}.tmp"
    tmp.mkdir()
    features = datasets.Features({
        c: datasets.Value("float64") if c == "outcome" else
        datasets.Value("int64") if c.endswith("_tokens") else datasets.Value("string")
        for c in COLUMNS
    })
    # Rows go batch by batch straight into the one data file of save_to_disk's layout, and the two small JSON
    # files are written beside it. (save_to_disk would copy the whole file again through memory-mapped pages,
    # which put all 1.5 GB of a million calls in this process's resident memory.)
    folder = tmp / "dataset"
    folder.mkdir()
    data_file = folder / "data-00000-of-00001.arrow"
    written = 0
    with ArrowWriter(features=features, path=str(data_file)) as writer:
        rows = iter(rows)
        while batch := list(itertools.islice(rows, WRITE_BATCH)):
            writer.write_batch({c: [r.get(c) for r in batch] for c in COLUMNS})
            written += len(batch)
        writer.finalize()
    if written:
        _write_layout(folder, datasets.Dataset.from_file(str(data_file)), [data_file.name])
    else:
        data_file.unlink()
        datasets.Dataset.from_dict({c: [] for c in COLUMNS}, features=features).save_to_disk(str(folder))
    report = report() if callable(report) else report
    _write_report(tmp, report)
    (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
    tmp.rename(target)
    (root / "CURRENT").write_text(version + "\n")
    return version


def _write_layout(folder: Path, dataset, files: list[str]) -> None:
    """state.json and dataset_info.json as ``Dataset.save_to_disk`` writes them, for data files already in
    ``folder``; ``load_from_disk`` reads the folder back (every test of a curated version checks it)."""
    state = {"_data_files": [{"filename": f} for f in files], "_fingerprint": dataset._fingerprint,
             "_format_columns": None, "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False,
             "_split": None}
    (folder / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
    dataset.info.write_to_directory(str(folder))


def load_dataset(ws: Workspace, version: str | None = None):
    import datasets

    datasets.disable_progress_bars()
    return datasets.load_from_disk(str(version_dir(ws, version) / "dataset"))


def iter_batches(ws: Workspace, columns: list[str], version: str | None = None) -> Iterator[dict[str, list]]:
    """The dataset's ``columns``, one Arrow record batch (about a thousand rows) at a time, in row order.

    ``datasets`` memory-maps its files: a pass over a million rows leaves every page it touched (1.5 GB there)
    in this process's resident memory, though the kernel may drop them. Plain file reads keep only the current
    batch; the page cache still serves repeated passes. (``save_to_disk`` writes the rows themselves, in order,
    never an indices mapping, so the files listed in state.json are the whole dataset.)
    """
    import pyarrow as pa

    folder = version_dir(ws, version) / "dataset"
    state = json.loads((folder / "state.json").read_text())
    for data_file in state["_data_files"]:
        with pa.OSFile(str(folder / data_file["filename"])) as fh:
            for batch in pa.ipc.open_stream(fh):
                yield {name: batch.column(name).to_pylist() for name in columns}


def load_curated(ws: Workspace, split: str | None = None, version: str | None = None) -> list[CuratedCall]:
    """The curated calls (of one split, or all), in dataset order."""
    ds = load_dataset(ws, version)
    if split is not None:
        if split not in SPLITS:
            raise SlmigrateError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        ds = ds.filter(lambda s: s == split, input_columns="split")
    return [from_row(r) for r in ds]


def load_report(ws: Workspace, version: str | None = None) -> dict[str, Any]:
    return json.loads((version_dir(ws, version) / REPORT_FILE).read_text())


def write_report(ws: Workspace, version: str, report: dict[str, Any]) -> None:
    """Replace a written version's report (curate adds the version's own name to it)."""
    _write_report(version_dir(ws, version), report)


def _write_report(folder: Path, report: dict[str, Any]) -> None:
    (folder / REPORT_FILE).write_text(json.dumps(report, indent=2, ensure_ascii=False, default=str))
