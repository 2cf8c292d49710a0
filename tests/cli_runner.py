"""Run the command line in-process, as the tests do."""
from __future__ import annotations

import sys


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    old = sys.argv
    sys.argv = ["visionzoo", *map(str, args)]
    try:
        from visionzoo import cli

        cli.main()
        code = 0
    except SystemExit as e:
        code = e.code or 0
    finally:
        sys.argv = old
    captured = capsys.readouterr()
    return code, captured.out, captured.err
