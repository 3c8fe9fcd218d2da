"""The ``dsc-export`` command line: thin verbs over the library.

Every verb parses, calls one library function and prints. A user error is one line on stderr
and exit status 1; never a traceback.

- :mod:`.options` the command group and the options several verbs share
- :mod:`.offline` models, export, analyze, split, build, bench, plan, simulate
- :mod:`.deploy`  bundle, serve, run, demo
- :mod:`.format`  progress lines, tables, the progress bar
"""

from __future__ import annotations

import sys

import click

from dsc_export.cli import deploy, offline  # noqa: F401  (they register the verbs)
from dsc_export.cli.format import one_line
from dsc_export.cli.options import cli
from dsc_export.errors import UserError

__all__ = ["cli", "main"]


def main() -> None:
    """Entry point: run the CLI, turning user errors into one line and a non-zero exit."""
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except click.UsageError as exc:  # bad flag or argument: one line, with where to look
        where = exc.ctx.command_path if exc.ctx else "dsc-export"
        click.secho(f"error: {one_line(exc.format_message())} (see '{where} --help')", err=True,
                    fg="red")
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        click.secho(f"error: {one_line(exc.format_message())}", err=True, fg="red")
        sys.exit(exc.exit_code)
    except UserError as exc:
        click.secho(f"error: {one_line(exc)}", err=True, fg="red")
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
