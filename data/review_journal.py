"""The decisions of a round's review: ``review.jsonl`` in the round folder, appended one JSON line per
decision and fsynced before the decision counts as made.

A line is ``{"sample": ID, "decision": "picked" | "rejected" | "undecided", "time": UNIX_SECONDS}``;
its sequence number is its line number. A sample's decision is its last line, so deciding a sample
again (or undoing, which records the decision it had before) keeps the latest. Nothing is ever
rewritten in place: a crash (a killed server, a full disk) can only leave the last line cut short,
and that torn line, never acknowledged to the page, is dropped when the journal is opened again
("reconcile"). Every other line must parse: the journal is written by the review server alone.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from layerdiff.files import fsync_directory

JOURNAL_NAME = "review.jsonl"
PICKED, REJECTED, UNDECIDED = "picked", "rejected", "undecided"
DECISIONS = (PICKED, REJECTED, UNDECIDED)


@dataclass(frozen=True)
class Decision:
    """One line of the journal: ``sequence`` is its line number (from 1)."""

    sequence: int
    sample: str
    decision: str
    time: float

    def to_json(self) -> dict:
        return {"sequence": self.sequence, "sample": self.sample, "decision": self.decision, "time": self.time}


class DecisionJournal:
    """A round's decisions, read from ``path`` and, when ``writable``, open for appending.

    ``sample_ids`` are the round's samples: a line naming another sample means the journal belongs
    to another round, and is an error. ``record`` is safe to call from several threads at once:
    the server's requests are written one after the other, each fsynced before it returns.
    """

    def __init__(self, path: str | os.PathLike, sample_ids: Iterable[str], *, writable: bool = True) -> None:
        self.path = Path(path)
        self.known = set(sample_ids)
        self.events: list[Decision] = []
        self.latest: dict[str, str] = {}
        self.torn_bytes = 0  # of a last line a crash cut short; dropped
        self._lock = threading.Lock()
        self._file = None
        self._read(writable)
        if writable:
            created = not self.path.exists()
            self._file = open(self.path, "ab")
            if created:
                fsync_directory(self.path.parent)

    def _read(self, writable: bool) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        complete = data.rfind(b"\n") + 1
        self.torn_bytes = len(data) - complete
        if self.torn_bytes and writable:  # later lines must not be glued to the torn one
            with open(self.path, "r+b") as handle:
                handle.truncate(complete)
                os.fsync(handle.fileno())
        for number, line in enumerate(data[:complete].split(b"\n")[:-1], start=1):
            self._apply(self._parse(number, line))

    def _parse(self, number: int, line: bytes) -> Decision:
        where = f"{self.path}:{number}"
        fix = ("the journal is written by `python -m data round review` alone; restore it from a backup, or delete "
               "this line (that decision is then lost)")
        try:
            entry = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{where}: not a JSON line ({error}); {fix}") from None
        if not isinstance(entry, dict) or not {"sample", "decision", "time"} <= entry.keys():
            raise ValueError(f"{where}: expected an object with sample, decision and time, got {line[:200]!r}; {fix}")
        if entry["decision"] not in DECISIONS:
            raise ValueError(f"{where}: unknown decision {entry['decision']!r} (one of {', '.join(DECISIONS)}); {fix}")
        if entry["sample"] not in self.known:
            raise ValueError(f"{where}: sample {entry['sample']!r} is not in this round's round.json: the journal "
                             "belongs to another round; move it back to its own round folder")
        return Decision(number, entry["sample"], entry["decision"], float(entry["time"]))

    def _apply(self, event: Decision) -> None:
        self.events.append(event)
        self.latest[event.sample] = event.decision

    def record(self, sample: str, decision: str) -> Decision:
        """Append one decision, flushed and fsynced, and return it."""
        if self._file is None:
            raise ValueError(f"{self.path} was opened for reading only")
        if sample not in self.known:
            raise KeyError(sample)
        if decision not in DECISIONS:
            raise ValueError(f"unknown decision {decision!r}: one of {', '.join(DECISIONS)}")
        with self._lock:
            event = Decision(len(self.events) + 1, sample, decision, round(time.time(), 3))
            line = {"sample": sample, "decision": decision, "time": event.time}
            self._file.write(json.dumps(line, ensure_ascii=False).encode("utf-8") + b"\n")
            self._file.flush()
            os.fsync(self._file.fileno())
            self._apply(event)
        return event

    def after(self, sequence: int) -> list[Decision]:
        """The decisions recorded after the one numbered ``sequence``, in order."""
        with self._lock:
            return self.events[max(sequence, 0):]

    def snapshot(self) -> tuple[dict[str, str], int]:
        """Every sample's latest decision and the sequence number it is as of (one consistent view)."""
        with self._lock:
            return dict(self.latest), len(self.events)

    def decision_of(self, sample: str) -> str:
        return self.latest.get(sample, UNDECIDED)

    def counts(self) -> Counter:
        """Samples per decision (``undecided`` includes samples never decided)."""
        counts = Counter({decision: 0 for decision in DECISIONS})
        counts.update(self.latest.values())
        counts[UNDECIDED] = len(self.known) - counts[PICKED] - counts[REJECTED]
        return counts

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
