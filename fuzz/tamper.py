"""Byte-flip matrices: every byte of an input changed in turn (or a seeded sample of positions for a large
input), each variant judged by a caller-supplied verdict and tallied by the class of position it hit."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

MASKS = (0x01, 0x80, 0xFF)  # the low bit, the high bit, every bit of the byte
SAMPLE = 2000


def positions(size: int, limit: int = SAMPLE, seed: int = 0) -> list[int]:
    """Every position of a small input; a seeded sample of `limit` positions of a large one."""
    if size <= limit:
        return list(range(size))
    return sorted(random.Random(seed).sample(range(size), limit))  # noqa: S311 - a sample, not a secret


def flips(data: bytes, masks: tuple[int, ...] = MASKS, limit: int = SAMPLE,
          seed: int = 0) -> Iterator[tuple[int, int, bytes]]:
    """(position, mask, variant) for every chosen position and mask."""
    for index in positions(len(data), limit, seed):
        for mask in masks:
            variant = bytearray(data)
            variant[index] ^= mask
            yield index, mask, bytes(variant)


@dataclass
class Matrix:
    """Outcomes by (class of position, outcome), and the variants whose outcome was not an allowed one."""

    counts: Counter[tuple[str, str]] = field(default_factory=Counter)
    unexpected: list[str] = field(default_factory=list)

    def run(self, data: bytes, classify: Callable[[int, int], tuple[str, frozenset[str]]],
            verdict: Callable[[bytes], str], **kwargs: object) -> Matrix:
        """`classify(position, mask)` names the class and the outcomes allowed there; `verdict(variant)` says
        what the verifier made of the variant."""
        for index, mask, variant in flips(data, **kwargs):  # type: ignore[arg-type]
            kind, allowed = classify(index, mask)
            outcome = verdict(variant)
            self.counts[kind, outcome] += 1
            if outcome not in allowed:
                self.unexpected.append(f"byte {index} ^ {mask:#04x} ({kind}): {outcome}, expected "
                                       f"{' or '.join(sorted(allowed))}")
        return self

    def total(self, outcome: str | None = None) -> int:
        return sum(n for (_, out), n in self.counts.items() if outcome is None or out == outcome)

    def table(self) -> str:
        return "\n".join(f"{kind:32} {outcome:22} {n}" for (kind, outcome), n in sorted(self.counts.items()))
