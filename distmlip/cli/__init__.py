"""The distmlip command line (also: python -m distmlip).

    distmlip md STRUCTURE --model sevennet-0 --steps 1000 --ensemble nvt --partitions 4 -o run
    distmlip md --restart run --steps 2000
    distmlip run STRUCTURE --model sevennet-0 [--json]
    distmlip relax STRUCTURE --model sevennet-0 --fmax 0.02 --cell -o relaxed.cif
    distmlip partition STRUCTURE --partitions 8 --model sevennet-0 --plot parts.png
    distmlip models | plot DIR | bench ... | demo | serve STRUCTURE --model ... --ipi HOST:PORT

Under ``mpirun -n P distmlip md ...`` every rank runs one part; only rank 0 prints and writes.
A mistake a user can make prints one line (``distmlip md: error: ...``) and exits with status 2;
``--verbose`` prints the traceback too. Under a launcher a bad command line is reported by rank 0
alone (every rank parses the same one); an error while a command runs is reported by the rank it
happened on, prefixed ``[rank R/P]``, so a failure on one rank only is seen.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import traceback
import warnings

from ..runtime.launch import detect_launch
from . import commands, demo, md
from ._common import CLIError, translate
from ._parser import Parser

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    """The ``distmlip`` parser: the subcommands of ``md``, ``commands`` and ``demo``, which import
    no other subcommand's module."""
    parser = Parser(prog="distmlip", description=__doc__.split("\n\n")[0],
                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--version", action="version", version=f"distmlip {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    md.add_parser(sub)
    commands.add_parsers(sub)
    demo.add_parser(sub)
    for p in sub.choices.values():
        p.add_argument("--verbose", "-v", action="store_true", help="print tracebacks of errors")
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("distmlip")
    except PackageNotFoundError:  # pragma: no cover - a source tree on sys.path
        return "unknown"


#: exceptions that carry a message meant for the user (the library's ``arg: expected X, got Y``)
_USER_ERRORS = (CLIError, ValueError, TypeError, OSError, ImportError)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 success, 2 a user error, 1 a failure)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    argv = _attach_negative_values(sys.argv[1:] if argv is None else list(argv))
    warnings.formatwarning = _one_line_warning
    verbose = "--verbose" in argv or "-v" in argv
    prog = "distmlip"
    running = False  # parsing the command line (the same on every rank) or running the command
    try:
        parser = build_parser()
        if argv and argv[0] in ("bench",):  # everything after `bench` belongs to bench/run.py
            return commands.bench(argv[1:])
        args, unknown = parser.parse_known_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        prog = f"distmlip {args.command}"
        if unknown:
            raise CLIError(f"unrecognized arguments: {' '.join(unknown)} (see `{prog} --help`)")
        running = True
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        _say(f"{prog}: interrupted", False)  # every rank gets the signal: rank 0 says it
        return 130
    except CLIError as exc:
        _fail(exc.prog or prog, str(exc), verbose, running)
        return 2
    except _USER_ERRORS as exc:
        _fail(prog, translate(str(exc)) or type(exc).__name__, verbose, running)
        return 2
    except Exception as exc:  # noqa: BLE001 - anything else: one line, the traceback on request
        if getattr(exc, "printed", False) and not verbose:  # a peer's failure, said by the runner
            return 1
        _fail(prog, f"{type(exc).__name__}: {exc}" + ("" if verbose else " (--verbose shows where)"),
              verbose, running)
        return 1


def _attach_negative_values(argv: list[str]) -> list[str]:
    """``--supercell -1x1x1`` -> ``--supercell=-1x1x1``: argparse takes a value starting with a
    dash and a digit for an option (and says "expected one argument"); attached, the flag's own
    check names what is wrong."""
    out = []
    for token in argv:
        if (out and out[-1].startswith("--") and "=" not in out[-1]
                and re.match(r"-[0-9.]", token)):
            out[-1] = f"{out[-1]}={token}"
        else:
            out.append(token)
    return out


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """Warnings as one line (no source line): ``UserWarning: ...``."""
    return f"{category.__name__}: {message}\n"


def _rank_prefix(every_rank: bool) -> str | None:
    """What this process puts before its error line: ``""`` alone, ``"[rank R/P] "`` under a
    launcher when ``every_rank``; ``None``: stay silent (a rank other than 0 while the command line
    is parsed, which every rank does alike)."""
    try:
        launch = detect_launch()
    except Exception:  # noqa: BLE001 - cannot tell: speak
        return ""
    if launch is None or launch.world_size <= 1:
        return ""
    if every_rank:
        return f"[rank {launch.rank}/{launch.world_size}] "
    return "" if launch.rank == 0 else None


def _say(line: str, every_rank: bool) -> None:
    prefix = _rank_prefix(every_rank)
    if prefix is not None:
        print(prefix + line, file=sys.stderr, flush=True)


def _fail(prog: str, message: str, verbose: bool, every_rank: bool) -> None:
    """One line on stderr: ``PROG: error: MESSAGE`` (its first line). Under a launcher an error of
    the running command is printed by every rank it happened on, prefixed with the rank (a launcher
    may kill the others moments later: flushed at once); a command-line error by rank 0 alone."""
    prefix = _rank_prefix(every_rank or verbose)
    if prefix is None:
        return
    if verbose:
        traceback.print_exc()
    first = message.strip().splitlines()[0] if message.strip() else "failed"
    print(f"{prefix}{prog}: error: {first}", file=sys.stderr, flush=True)
