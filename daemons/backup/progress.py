"""A byte-count progress bar on stderr (tqdm), drawn only on a terminal: a backup run
from cron or a test writes nothing but its summary."""

from __future__ import annotations

import sys
from types import TracebackType

from tqdm import tqdm

from daemons.backup.archive import Progress


class Bar:
    def __init__(self, desc: str) -> None:
        self.desc = desc
        self.bar: tqdm[None] | None = None

    def __enter__(self) -> Bar:
        return self

    def start(self, total: int) -> Progress:
        self.bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=self.desc, file=sys.stderr,
                        disable=not sys.stderr.isatty(), leave=False)
        bar = self.bar

        def update(n: int) -> None:
            bar.update(n)
        return update

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self.bar is not None:
            self.bar.close()
