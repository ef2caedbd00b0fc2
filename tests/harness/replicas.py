"""Concurrency for the store tests: run one piece of work as several server replicas would, at the same time."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence


def run_as_replicas(work: Callable[[str], None], labels: Sequence[str] = ("A", "B"), timeout: float = 60) -> None:
    """Run `work(label)` for every label at once, each on its own thread; fail with whatever any of them raised."""
    errors: list[BaseException] = []

    def run(label: str) -> None:
        try:
            work(label)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(label,)) for label in labels]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    assert not errors, errors


def run_at_once(*actions: Callable[[], None], timeout: float = 60) -> None:
    """Run every action at once, each on its own thread; fail with whatever any of them raised."""
    run_as_replicas(lambda label: actions[int(label)](), [str(i) for i in range(len(actions))], timeout)
