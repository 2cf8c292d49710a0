"""The `visionzoo` command: parse arguments, call a task, print the result.

Each command lives in the module of its kind (`images`: predict, embed, segment, detect, explain; `flow`: flow;
`zoo`: models, info, download, inspect; `train`: finetune, evaluate; `deploy`: export, quantize, prune, benchmark,
serve); what they share (options, exit codes, printing) is in `common`.

Exit codes:
  0  success
  1  error (unknown model or weights, unreadable checkpoint, bad argument, ...)
  2  usage error (unknown option, missing argument)
  3  partial: some inputs failed (each reported on stderr), the rest succeeded
  4  nothing could be processed: every input failed
"""
from __future__ import annotations

import logging
import os
import sys

import typer
from rich.markup import escape

from ..errors import VisionZooError
from . import deploy, flow, images, train, zoo
from .common import EXIT_ERROR, EXIT_NOTHING, EXIT_OK, EXIT_PARTIAL, EXIT_USAGE, err

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Pre-trained vision models: list, download, inspect, predict, embed, segment, detect, explain, "
                       "flow, fine-tune, evaluate, export, quantize, prune, benchmark, serve.")


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log what visionzoo does."),
          offline: bool = typer.Option(False, "--offline", help="Never use the network (same as "
                                       "VISIONZOO_OFFLINE=1): weights must be cached or packaged.")) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s",
                        stream=sys.stderr)
    if offline:
        from ..weights.fetch import ENV_OFFLINE

        os.environ[ENV_OFFLINE] = "1"  # the environment, so worker processes are offline too


for command in (images.predict, images.embed, images.segment, images.detect, images.explain, flow.flow, zoo.models,
                zoo.info, zoo.download, zoo.inspect, train.finetune, train.evaluate, deploy.export, deploy.quantize,
                deploy.prune, deploy.benchmark, deploy.serve):
    app.command(command.__name__)(command)


def main() -> None:
    """Entry point: run the app, turning visionzoo errors into one-line messages.

    Usage errors (exit 2) and `typer.Exit` codes are handled by typer itself.
    """
    # file names that are not valid UTF-8 are printed as the bytes they are, not refused
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="surrogateescape")
    try:
        app()
    except VisionZooError as e:
        err.print(f"[red]error:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)


__all__ = ["EXIT_ERROR", "EXIT_NOTHING", "EXIT_OK", "EXIT_PARTIAL", "EXIT_USAGE", "app", "main"]
