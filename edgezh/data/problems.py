"""Malformed records: collected while reading, then either fail the build (listing them) or counted as skips."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field

from edgezh.errors import UserError

SHOWN = 10


@dataclass
class Problems:
    """Every problem with where it is (``file:line``), a reason slug and what exactly was wrong."""

    on_error: str  # "fail" or "skip"
    items: list[tuple[str, str, str, str]] = field(default_factory=list)  # the first SHOWN: (source, origin, reason, detail)
    counts: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    total: int = 0

    def add(self, source: str, origin: str, reason: str, detail: str) -> None:
        """Count a problem; only the first few are kept whole (a 1M-line file with bad lines stays small)."""
        self.counts[source][reason] += 1
        self.total += 1
        if len(self.items) < SHOWN:
            self.items.append((source, origin, reason, detail))

    def skipped(self, source: str) -> dict[str, int]:
        return dict(sorted(self.counts.get(source, Counter()).items()))

    def check(self, stage: str = "reading the data") -> None:
        """With ``on_error: fail``, any problem so far is a UserError listing the first few and the count."""
        if self.on_error != "fail" or not self.total:
            return
        total = self.total
        lines = [f"{total} malformed record(s) while {stage} (data.on_error: fail; set it to skip to drop and count them):"]
        lines += [f"  {origin}: {detail} ({reason})" for _source, origin, reason, detail in self.items[:SHOWN]]
        if total > SHOWN:
            by_reason = sum(self.counts.values(), Counter())
            lines.append(f"  … and {total - SHOWN} more ({', '.join(f'{r}: {n}' for r, n in sorted(by_reason.items()))})")
        raise UserError("\n".join(lines))
