"""Bad records: skipped, counted per reason, reported with examples; ``strict`` fails at the first.

Every loader and the pre-tokenizer share one ``BadRecords`` tally. A record is bad when it cannot
become a valid sample (an unreadable or missing image, a line that is not JSON, a missing field, a
value of the wrong type, empty text). Good records are never dropped because of a bad neighbour.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

# The reasons a record is skipped; each is a key of ``BadRecords.counts``.
BAD_JSON = "bad_json"
MISSING_FIELD = "missing_field"
WRONG_TYPE = "wrong_type"
EMPTY_TEXT = "empty_text"
MISSING_IMAGE = "missing_image"
UNREADABLE_IMAGE = "unreadable_image"
IMAGE_TOO_LARGE = "image_too_large"  # more pixels than ``unimm.data.schema.max_image_pixels()``
OUTSIDE_ROOT = "outside_root"  # a relative image path that leaves the dataset's folder
UNREADABLE_FILE = "unreadable_file"  # a whole data file (a truncated tar, a parquet that does not open)
TOO_LONG = "too_long"
REASONS = (
    BAD_JSON,
    MISSING_FIELD,
    WRONG_TYPE,
    EMPTY_TEXT,
    MISSING_IMAGE,
    UNREADABLE_IMAGE,
    IMAGE_TOO_LARGE,
    OUTSIDE_ROOT,
    UNREADABLE_FILE,
    TOO_LONG,
)


class BadRecordError(ValueError):
    """A record that cannot become a valid sample: why (``reason``), where (``location``), what was wrong."""

    def __init__(self, reason: str, detail: str, location: str = "") -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown bad-record reason {reason!r}; expected one of {REASONS}")
        self.reason = reason
        self.detail = detail
        self.location = location
        super().__init__(self._message())

    def at(self, location: str) -> BadRecordError:
        """The same error with its record's location (``file:line``, ``shard.tar:key``) filled in."""
        return BadRecordError(self.reason, self.detail, location)

    def _message(self) -> str:
        where = f"{self.location}: " if self.location else ""
        return f"{where}{self.reason}: {self.detail}"


@dataclass
class BadRecords:
    """A tally of skipped records: counts per reason and the first ``max_examples`` of each.

    With ``strict=True`` the first bad record raises its ``BadRecordError`` instead of being counted."""

    strict: bool = False
    max_examples: int = 3
    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, error: BadRecordError) -> None:
        if self.strict:
            raise error
        self.counts[error.reason] += 1
        reason_examples = self.examples.setdefault(error.reason, [])
        if len(reason_examples) < self.max_examples:
            reason_examples.append(str(error))

    def update(self, errors: Iterable[BadRecordError]) -> None:
        for error in errors:
            self.add(error)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def report(self) -> str:
        """A human-readable summary: one line per reason with its count, then its examples."""
        if not self.total:
            return "no bad records"
        lines = [f"{self.total} bad record(s) skipped:"]
        for reason, count in sorted(self.counts.items()):
            lines.append(f"  {reason}: {count}")
            lines.extend(f"    e.g. {example}" for example in self.examples.get(reason, []))
        return "\n".join(lines)

    def log(self, what: str) -> None:
        """Log the report at the end of a job or an epoch (a warning when anything was skipped)."""
        if self.total:
            logger.warning("%s: %s", what, self.report())
        else:
            logger.info("%s: no bad records", what)
