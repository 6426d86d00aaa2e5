"""What every check returns, and the small readers they share."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

Status = Literal["ok", "warn", "fail", "skipped"]
STATUSES: tuple[Status, ...] = ("ok", "warn", "fail", "skipped")


@dataclass(frozen=True)
class Result:
    area: str
    name: str
    status: Status
    evidence: str
    fix: str = ""

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def under(root: Path, path: str | Path) -> Path:
    """`path` (absolute, as on the host) inside `root`: the real one when root is /."""
    return root / str(path).lstrip("/")


def read(root: Path, path: str | Path) -> str | None:
    """A /proc or /sys file's text, stripped; None when it is absent. Permission errors
    propagate, so the runner can say the check was skipped for want of privilege."""
    try:
        return under(root, path).read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
        return None


def bracketed(text: str) -> str:
    """The active choice of a sysfs selector: 'always [madvise] never' -> 'madvise'."""
    for word in text.split():
        if word.startswith("[") and word.endswith("]"):
            return word[1:-1]
    return text.strip()


def mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB"
