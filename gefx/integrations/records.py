"""Keep G-effects measured over a run, on disk as they are made, and write them out (plain loops,
trainers and ``gefx profile``).

    rec = gefx.integrations.Recorder("runs/ga")   # each record appended to runs/ga/records.jsonl
    for step, (forget, retain) in enumerate(loader):
        with gefx.trace(model, params=opt) as tape:
            ...                                   # forwards, objective, risks
            if step % 5 == 0:
                rec.add(step, gefx.g_effect(tape, objective, risks), objective="ga")
            objective.sum().backward()
        opt.step(); opt.zero_grad()
    rec.save("runs/ga")        # g_effects.csv, g_effects.json, per_instance.json, g_effects.png

The log, ``<folder>/records.jsonl``, has one JSON line per measurement: its step, objective, every
field of its GEffect (tensors with dtype and shape: read back bit for bit), data rows and actual
changes. ``add`` appends the whole line with one write, flushed and fsync'ed before it returns, so
a process killed at any point keeps every record whose ``add`` returned. :func:`read_records`
skips a last line that is torn (no newline: the kill came mid-write) or invalid; an invalid line
before it is an error naming the file and the line. Records are held on the CPU (``add`` detaches
and copies every tensor there: a long GPU run holds no device memory per measurement). Under
torch.distributed only rank 0 reads or writes the log; the other ranks keep records in memory only.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import NamedTuple

import torch

from ..effects import pack, unpack
from ..effects import GEffect

LOG = "records.jsonl"


class Record(NamedTuple):
    """One measurement: the step, the objective's name, its G-effects and, optionally, which rows
    of each data split the risks' instances were (risk name -> row indices) and each risk
    instance's actual change over the step (risk name -> [B]: r_i after minus before)."""
    step: int
    objective: str
    effects: GEffect
    data_rows: dict[str, list[int]] | None = None
    actual_change: dict | None = None


def is_writer() -> bool:
    """Whether this process writes records to disk: rank 0 under torch.distributed, else yes."""
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class Recorder:
    """An ordered list of :class:`Record`, held on the CPU and, with a `folder`, appended to
    ``<folder>/records.jsonl`` as each is added (see the module docstring).

    With ``resume=True`` (the default) an existing log in `folder` is continued: its records are
    loaded and a torn or invalid last line is cut off; ``resume=False`` starts an empty log. Under
    torch.distributed, ranks other than 0 neither read nor write the log (checked at each access).
    """

    def __init__(self, folder=None, resume: bool = True):
        self.folder = None if folder is None else Path(folder)
        self.records: list[Record] = []
        if self._logs():
            self.folder.mkdir(parents=True, exist_ok=True)
            found = resume and self.path.exists()
            self.records, end = _parse(self.path) if found else ([], 0)
            if not found or end < self.path.stat().st_size:
                _rewrite(self.path, self.records)

    @property
    def path(self) -> Path | None:
        """The log's path (None without a folder)."""
        return None if self.folder is None else self.folder / LOG

    def _logs(self) -> bool:
        return self.folder is not None and is_writer()

    def add(self, step: int, effects: GEffect, objective: str = "objective",
            data_rows: dict[str, list[int]] | None = None, actual_change: dict | None = None) -> None:
        """Keep one measurement (its tensors copied to the CPU) and, with a folder, log it at once."""
        rows = None if data_rows is None else {k: [int(i) for i in v] for k, v in data_rows.items()}
        change = None if actual_change is None else {k: torch.as_tensor(v).detach().cpu()
                                                     for k, v in actual_change.items()}
        record = Record(int(step), objective, effects.cpu(), rows, change)
        if self._logs():
            _append(self.path, _line(record))
        self.records.append(record)

    def rewind(self, step: int) -> None:
        """Drop the records of `step` and later ones (measured after a checkpoint taken at that
        global step, and measured again when training resumes from it); the log is rewritten
        atomically."""
        kept = [r for r in self.records if r.step < step]
        if len(kept) < len(self.records) and self._logs():
            _rewrite(self.path, kept)
        self.records = kept

    def rows(self) -> list[dict]:
        """Long format: objective, step, risk, group, value (group "total" for the sum)."""
        return long_rows(self.records)

    def save(self, folder, plots: bool = True) -> Path:
        """The summary files of every record so far (see :func:`save_records`)."""
        return save_records(folder, self.records, plots)


def read_records(folder) -> list[Record]:
    """The records logged in ``<folder>/records.jsonl`` ([] without one), their tensors on the
    CPU; a torn or invalid last line is skipped, an invalid line before it raises ValueError."""
    path = Path(folder) / LOG
    return _parse(path)[0] if path.exists() else []


def _line(r: Record) -> bytes:
    change = None if r.actual_change is None else {k: pack(v) for k, v in r.actual_change.items()}
    return (json.dumps({"step": r.step, "objective": r.objective, "effects": r.effects.state(),
                        "data_rows": r.data_rows, "actual_change": change}) + "\n").encode()


def _record(line: bytes) -> Record:
    d = json.loads(line)
    change = d["actual_change"]
    return Record(d["step"], d["objective"], GEffect.from_state(d["effects"]), d["data_rows"],
                  None if change is None else {k: unpack(v) for k, v in change.items()})


def _parse(path: Path) -> tuple[list[Record], int]:
    """The records of the log at `path` and the length in bytes of the lines they come from (a
    torn or invalid last line excluded)."""
    *lines, tail = path.read_bytes().split(b"\n")  # tail: b"" after a final newline, else torn
    records, end = [], 0
    for k, line in enumerate(lines):
        try:
            records.append(_record(line))
        except (ValueError, KeyError, TypeError, AttributeError, RuntimeError) as exc:
            if k == len(lines) - 1 and not tail:
                break
            raise ValueError(f"{path}: line {k + 1} is not a gefx record ({type(exc).__name__}: {exc}); "
                             "only the last line may be incomplete") from None
        end += len(line) + 1
    return records, end


def _append(path: Path, line: bytes) -> None:
    """`line` at the end of the file in one write, on the disk (fsync) before returning."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        view = memoryview(line)
        while view:  # a regular file takes it in one write; a partial one continues
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _rewrite(path: Path, records: list[Record]) -> None:
    """Replace the log at `path` by `records` atomically (a temporary file, then os.replace)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{LOG}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.writelines(_line(r) for r in records)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def long_rows(records: list[Record]) -> list[dict]:
    """Every record's ``GEffect.rows`` keyed by objective and step (with ``actual_change``, summed
    over the risk's instances, on the "total" rows where recorded): what g_effects.csv holds."""
    out = []
    for r in records:
        for row in r.effects.rows(objective=r.objective, step=r.step):
            if r.actual_change and row["group"] == "total" and row["risk"] in r.actual_change:
                row["actual_change"] = float(r.actual_change[row["risk"]].sum())
            out.append(row)
    return out


def save_records(folder, records: list[Record], plots: bool = True) -> Path:
    """g_effects.csv / .json (as ``gefx profile`` writes them), per_instance.json and, with
    `plots`, g_effects.png (G-effect vs step per group, one panel per objective and risk)."""
    from ..unlearning.report import plot_g_effects, write_g_effects

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    rows = long_rows(records)
    write_g_effects(out, {"source": "gefx.integrations"}, rows)
    per_instance = [{"objective": r.objective, "step": r.step, **r.effects.to_dict()} for r in records]
    (out / "per_instance.json").write_text(json.dumps(per_instance))
    if plots and records:
        objectives = list(dict.fromkeys(r.objective for r in records))
        risks = list(dict.fromkeys(name for r in records for name in r.effects))
        groups = list(dict.fromkeys(g for r in records for g in r.effects.groups))
        plot_g_effects(out, rows, objectives, risks, groups)
    return out
