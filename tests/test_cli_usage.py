"""Usage errors read like click's own, with exit code 2 and no traceback, for every command."""

import subprocess
import sys

import pytest

from slmigrate.cli import app, main


def _command_paths() -> list[list[str]]:
    import typer.main

    root = typer.main.get_command(app)
    paths: list[list[str]] = []

    def walk(group, prefix):
        for name, cmd in sorted(getattr(group, "commands", {}).items()):
            paths.append([*prefix, name])  # a group's own options count too (`curate` runs without a subcommand)
            if getattr(cmd, "commands", None):
                walk(cmd, [*prefix, name])

    walk(root, [])
    return paths


def test_every_command_is_covered():
    names = {" ".join(p) for p in _command_paths()}
    assert {"curate", "cluster", "audit", "calls list", "collect import", "serve"} <= names
    assert len(names) >= 20


@pytest.mark.parametrize("path", _command_paths(), ids=lambda p: " ".join(p))
def test_unknown_option_is_a_usage_error(path, capsys):
    assert main([*path, "--no-such-option-xyz"]) == 2
    err = capsys.readouterr().err
    assert "No such option: --no-such-option-xyz" in err
    assert f"Try 'slmigrate {' '.join(path)} --help'" in err or "--help" in err
    assert "Traceback" not in err


def test_a_mistyped_command_gets_a_suggestion_and_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "slmigrate", "curat"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Did you mean 'curate'?" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    proc = subprocess.run([sys.executable, "-m", "slmigrate", "calls", "list", "--limt", "3"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "--limit" in proc.stderr and "Traceback" not in proc.stderr
