"""The argument parser every subcommand uses: a bad argument is reported in one line."""

from __future__ import annotations

import argparse

from ._common import CLIError

__all__ = ["Parser"]


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line (no usage block)."""

    def error(self, message):
        raise CLIError(f"{message} (see `{self.prog} --help`)", self.prog)
