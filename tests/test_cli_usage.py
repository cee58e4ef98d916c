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


@pytest.mark.slow
def test_cluster_with_the_real_embedder_keeps_the_terminal_quiet(tmp_path):
    """Loading MiniLM pulls in transformers, which pulled in bitsandbytes: every `cluster` printed two lines about
    a CPU kernel it could not fetch from the hub, and transformers drew its own "Loading weights" bar."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    log = tmp_path / "calls.jsonl"
    subprocess.run([sys.executable, str(root / "examples" / "agent_log.py"), "--out", str(log), "--calls", "120",
                    "--seed", "5"], check=True, capture_output=True)
    cli = [sys.executable, "-m", "slmigrate", "--workspace", str(tmp_path / "ws")]
    for args in (["collect", "import", str(log)], ["curate", "--pii", "off"], ["cluster"]):
        proc = subprocess.run([*cli, *args], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        noise = [line for line in proc.stderr.splitlines()
                 if any(w in line for w in ("Warning", "warn(", "kernels-community", "Loading weights", "it/s]"))]
        assert not noise, f"{' '.join(args)} printed library noise: {noise}"


def test_each_short_flag_means_one_thing_everywhere():
    """`-c` meant --config in seven commands and --cluster in two: a user's habit would pick the wrong one."""
    import typer.main

    root = typer.main.get_command(app)
    meaning: dict[str, set[str]] = {}

    def walk(cmd):
        for param in getattr(cmd, "params", []):
            longs = [o for o in param.opts if o.startswith("--")]
            for short in (o for o in param.opts + param.secondary_opts if len(o) == 2 and o[0] == "-"):
                meaning.setdefault(short, set()).update(longs)
        for sub in getattr(cmd, "commands", {}).values():
            walk(sub)

    walk(root)
    assert meaning, "no short flags found: the walk is broken"
    assert {k: v for k, v in meaning.items() if len(v) > 1} == {}


def test_cli_start_up_and_the_proxy_import_no_heavy_library():
    """`slmigrate --help`, `collect` and the proxy must start in well under a second: torch, transformers,
    presidio and the rest load inside the stages that use them."""
    script = (
        "import sys\n"
        "from slmigrate.cli import main\n"
        "main(['--help']); main(['collect', 'proxy', '--help'])\n"
        "import slmigrate.collect.proxy.app\n"
        "heavy = ('torch', 'transformers', 'presidio_analyzer', 'spacy', 'sentence_transformers', 'datasets',\n"
        "         'sklearn', 'matplotlib', 'peft')\n"
        "print('LOADED', [m for m in heavy if m in sys.modules])\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "LOADED []" in proc.stdout, proc.stdout[-500:]
