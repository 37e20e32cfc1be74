"""Helpers shared by the command-line programs (train.py, sample.py, flops.py, scaling.py, data/prepare.py, bench/):
one-line errors (OneLineParser, report_errors), devices, and how figures are printed.

`python -m model.cli docs` writes every generated page and section of docs/ (docs/config.md, the papers' tables
in docs/flops.md); `python -m model.cli config-doc` prints docs/config.md alone. A test checks that each is current.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .config import markdown_reference, read_toml

if TYPE_CHECKING:
    import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "default.toml"  # what `python train.py` runs
YEAR_S = 365.25 * 86400


def human(x: float, unit: str = "FLOPs") -> str:
    """3.144e+23 FLOPs: three decimals in scientific notation, as the papers quote compute."""
    return f"{x:.3e} {unit}"


def duration(seconds: float) -> str:
    """Seconds as the largest unit that keeps the figure readable: s, min, h, days, years."""
    for limit, size, name in ((120, 1, "s"), (7200, 60, "min"), (172800, 3600, "h"), (2 * YEAR_S, 86400, "days")):
        if seconds < limit:
            return f"{seconds / size:.1f} {name}"
    return f"{seconds / YEAR_S:.1f} years"


def fmt(v: float | None, spec: str) -> str:
    """format(v, spec), or a dash as wide as the spec asks where there is no figure."""
    return format(v, spec) if v is not None else format("-", ">" + spec.split(".")[0])


def resolve_device(name: str, flag: str = "device") -> torch.device:
    """"auto" (cuda when available), "cpu", "cuda" or "cuda:N" -> a torch.device; ValueError naming `flag`
    for anything else, or for cuda on a machine without it."""
    import torch  # here, not at the top: the CLIs' --help and argument errors come before torch loads
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"{flag} {name!r} is not a device (auto, cpu, cuda, cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{flag} {name!r}: only cpu and cuda are supported")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{flag} {name!r} but CUDA is not available; use cpu")
    return device


class UsageError(ValueError):
    """Bad command-line input: one line on stderr, exit code 2 (through report_errors)."""


class OneLineParser(argparse.ArgumentParser):
    """argparse with the project's error style: a bad argument raises UsageError, which report_errors prints
    as one line, `prog: error: ...`, with exit code 2 (argparse's own prints the usage too)."""

    def error(self, message):
        raise UsageError(message)


EXPECTED_ERRORS = (ValueError, OSError, MemoryError)  # bad input; missing file, full disk; too little memory
ALLOCATION_FAILURES = ("can't allocate memory", "out of memory", "not enough memory")  # torch's RuntimeErrors


def pop_debug(argv: list[str]) -> tuple[list[str], bool]:
    """(argv without --debug, whether it was given): --debug shows tracebacks instead of one-line errors."""
    return [a for a in argv if a != "--debug"], "--debug" in argv


def report_errors(prog: str, body: Callable[[], int], errors: tuple[type, ...] = EXPECTED_ERRORS,
                  debug: bool = False) -> int:
    """Run a CLI's body and return its exit code; an expected failure (one of `errors`, or torch's failed
    allocation) becomes one line on stderr, `prog: error: ...`, and exit code 2 instead of a traceback.
    Tracebacks stay for real bugs, and for everything with debug (the CLIs' --debug flag)."""
    if debug:
        return body()
    try:
        return body()
    except errors as e:
        message = str(e)
        if isinstance(e, OSError) and e.strerror and e.filename is None:
            message = e.strerror  # the project's own OSErrors name their file in the text: no "[Errno N]"
        elif isinstance(e, MemoryError):
            message = f"out of memory ({e or 'MemoryError'})"
    except RuntimeError as e:
        if not any(s in str(e).lower() for s in ALLOCATION_FAILURES):
            raise
        message = f"out of memory: {str(e).strip().splitlines()[0]} (--debug shows the traceback)"
    message = " ".join(message.split())  # one line, whatever the message holds
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2


def config_doc() -> str:
    """docs/config.md: every key, its type, its value in configs/default.toml and its default."""
    return markdown_reference(read_toml(DEFAULT_CONFIG), DEFAULT_CONFIG.relative_to(ROOT).as_posix()) + "\n"


def papers_doc() -> str:
    from .flops.papers import markdown
    return markdown()


# page -> (section name or None for the whole page, generator); a section sits between its two markers
GENERATED = {"docs/config.md": (None, config_doc), "docs/flops.md": ("papers", papers_doc)}


def markers(section: str) -> tuple[str, str]:
    return (f"<!-- {section}: generated by `python -m model.cli docs`, do not edit -->\n",
            f"<!-- end of {section} -->\n")


def generated(page: str, current: str) -> str:
    """The page as its generator writes it: the whole page, or `current` with its section replaced."""
    section, make = GENERATED[page]
    if section is None:
        return make()
    begin, end = markers(section)
    if current.count(begin) != 1 or current.count(end) != 1 or current.index(begin) > current.index(end):
        raise ValueError(f"{page}: expected one {begin.strip()} ... {end.strip()} pair")
    head, rest = current.split(begin)
    return head + begin + make() + end + rest.split(end, 1)[1]


def write_docs() -> list[Path]:
    """Rewrite every generated page and section; returns the pages that changed."""
    changed = []
    for page in GENERATED:
        path = ROOT / page
        current = path.read_text(encoding="utf-8")
        new = generated(page, current)
        if new != current:
            path.write_text(new, encoding="utf-8")
            changed.append(path)
    return changed


if __name__ == "__main__":
    if sys.argv[1:] == ["config-doc"]:
        sys.stdout.write(config_doc())
    elif sys.argv[1:] == ["docs"]:
        print("\n".join(f"wrote {p.relative_to(ROOT)}" for p in write_docs()) or "docs/ is current")
    else:
        print("usage: python -m model.cli docs | config-doc", file=sys.stderr)
        sys.exit(2)
