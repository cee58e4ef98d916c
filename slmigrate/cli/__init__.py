"""The command line: a thin layer over the library.

Each command parses options, makes one call into ``slmigrate.<stage>``, prints the result (a table, or JSON
with ``--json``) and maps ``SlmigrateError`` to ``Error: ...`` with its exit code. This package is the only
place that imports typer; each command group lives in its own module and registers itself on ``app``.
"""

from __future__ import annotations

import os
import sys

from slmigrate import env
from slmigrate.cli._app import app
from slmigrate.errors import SlmigrateError

# Importing the command modules registers their commands on ``app``.
from slmigrate.cli import workspace_cmds  # noqa: E402,F401  (init, status)

for _optional in ("collect_cmds", "calls_cmds", "curate_cmds", "cluster_cmds", "probe_cmds", "models_cmds",
                  "finetune_cmds", "evaluate_cmds", "serve_cmds", "refine_cmds", "export_cmds", "pipeline_cmds",
                  "keys_cmds", "proxy_cmds", "select_cmds"):
    # Command groups arrive with their stages; a missing one must not break the rest of the CLI.
    try:
        __import__(f"slmigrate.cli.{_optional}")
    except ModuleNotFoundError as exc:
        if exc.name != f"slmigrate.cli.{_optional}":
            raise


def main(argv: list[str] | None = None) -> int:
    env.quiet_libraries()
    # Everything a command writes - the store, curated data, adapters, reports, exports, dead letters - holds
    # logged prompts or what was learnt from them: owner-only (files 0600, folders 0700). Restored on return,
    # for callers that run main() in-process.
    saved_umask = os.umask(0o077)
    try:
        return _main(argv)
    finally:
        os.umask(saved_umask)


def _main(argv: list[str] | None) -> int:
    try:
        # Without standalone mode click returns a `typer.Exit(code)` as the value instead of exiting.
        result = app(args=argv, standalone_mode=False)
        if isinstance(result, int) and not isinstance(result, bool):
            return result
    except (SlmigrateError, ImportError) as caught:
        from rich.markup import escape

        from slmigrate.extras import as_missing_extra

        # A library an optional extra installs (torch, transformers...) is not there: say which extra to install.
        exc = caught if isinstance(caught, SlmigrateError) else as_missing_extra(caught)
        if exc is None:
            raise

        from slmigrate.cli._app import err_console

        # escape: a message may name `pip install 'slmigrate[ray]'`, which rich would read as a markup tag
        err_console.print(f"[bold red]Error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return exc.exit_code
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        return 130
    except SystemExit as exc:  # typer/click exits (e.g. --help, usage errors)
        return exc.code if isinstance(exc.code, int) else 0
    except Exception as exc:  # click usage errors come through here in non-standalone mode
        if isinstance(exc, _click_types("ClickException")):
            exc.show()  # type: ignore[attr-defined]
            return exc.exit_code  # type: ignore[attr-defined]
        if isinstance(exc, _click_types("Exit")):
            return exc.exit_code  # type: ignore[attr-defined]
        if isinstance(exc, _click_types("Abort")):
            print("Aborted.", file=sys.stderr)
            return 1
        raise
    return 0


def _click_types(name: str) -> tuple[type, ...]:
    """click's exception class ``name`` from every click the installed typer may raise: recent typer
    releases vendor their own copy (``typer._click``) whose exceptions are not click's."""
    import importlib

    found = []
    for module in ("click.exceptions", "typer._click.exceptions"):
        try:
            cls = getattr(importlib.import_module(module), name, None)
        except ImportError:
            continue
        if isinstance(cls, type):
            found.append(cls)
    return tuple(found)


def entry() -> None:
    sys.exit(main())
