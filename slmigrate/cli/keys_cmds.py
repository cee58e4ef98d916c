"""`slmigrate keys new|rotate|status`: encryption keys for the stored payloads."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from slmigrate.cli._app import JsonOpt, WorkspaceOpt, app, console, err_console, open_workspace, print_json

keys_app = typer.Typer(help="Encryption keys for stored payloads (new, rotate, status).", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


@keys_app.command("new")
def new(
    out: Annotated[Optional[Path], typer.Option(
        "--out", help="Write the key to this file (created 0600, never overwritten) instead of printing it.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Create a new random AES-256 key (base64).

    Use it as SLMIGRATE_ENCRYPTION_KEY or with --key-file; keep it in a secrets manager: without it the
    stored payloads cannot be read.

    Example: slmigrate keys new --out ~/.config/slmigrate/key
    && slmigrate --key-file ~/.config/slmigrate/key collect proxy --upstream https://api.openai.com/v1
    """
    from slmigrate.store import crypto

    text = crypto.generate_key()
    key_id = crypto.key_id(crypto.parse_key(text, "the new key"))
    if out is not None:
        crypto.write_key_file(out, text)
    info = {"key_id": key_id, "file": str(out) if out else None, **({} if out else {"key": text})}
    if json_out:
        print_json(info)
    elif out is not None:
        console.print(f"New key {key_id} written to {out} (mode 0600).")
    else:
        print(text)
        err_console.print(f"key id {key_id}; set it as SLMIGRATE_ENCRYPTION_KEY or save it to a --key-file")


@keys_app.command("rotate")
def rotate(
    new_key_file: Annotated[Path, typer.Option("--new-key-file", help="File holding the new key "
                                               "(from `slmigrate keys new --out FILE`).")],
    workspace: WorkspaceOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Re-encrypt every stored payload under a new key, in one transaction.

    The current key comes from SLMIGRATE_ENCRYPTION_KEY or --key-file; unencrypted rows are encrypted too.
    Stop the proxy first, then switch it to the new key.

    Example: slmigrate --key-file old.key keys rotate --new-key-file new.key
    """
    from slmigrate.store import crypto

    new_key = crypto.read_key_file(new_key_file)
    old_key = crypto.configured_key()
    ws = open_workspace(workspace, create=False)
    result = crypto.rotate(ws.store, new_key, old_key)
    if json_out:
        print_json(result)
    else:
        console.print(f"Re-encrypted {result['rotated']:,} calls under key {result['key_id']}. "
                      f"From now on use --key-file {new_key_file} (or put that key in SLMIGRATE_ENCRYPTION_KEY).")


@keys_app.command("status")
def status(workspace: WorkspaceOpt = None, json_out: JsonOpt = False) -> None:
    """Show how many stored calls are encrypted, under which key id, and whether the configured key matches.

    Example: slmigrate keys status --json
    """
    from slmigrate.store import crypto
    from slmigrate.store import PLAIN_CODECS

    ws = open_workspace(workspace, create=False)
    key = crypto.configured_key()
    info = {"rows_by_codec": crypto.codec_counts(ws.store),
            "configured_key_id": None if key is None else crypto.key_id(key)}
    if json_out:
        print_json(info)
        return
    for codec, n in info["rows_by_codec"].items():
        label = "not encrypted" if codec in PLAIN_CODECS else f"encrypted, key {codec.split(':', 1)[1]}"
        console.print(f"{n:,} calls {label}")
    console.print(f"configured key: {info['configured_key_id'] or 'none'}")
