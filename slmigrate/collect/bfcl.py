"""The Berkeley Function-Calling Leaderboard (BFCL) as a migration cluster with an exact reference.

BFCL gives questions, the functions on offer, and ground-truth calls. Treated as an agent's log whose "LLM"
always answered with the ground truth, it is a narrow function-calling task where evaluate's tool-call metrics
have an exact target: fine-tune on part of it, test on the rest.

Each question becomes an OpenAI chat-completions request (``messages`` + ``tools``) and its first possible
answer becomes the response's ``tool_calls``. BFCL lists the acceptable values per argument; the first one is
taken, and an argument whose first acceptable value is ``""`` (BFCL's "may be omitted") is left out, which is
how an LLM calling the function would most often write it. The files are JSON Lines despite ``.json``.

    python -m slmigrate.collect.bfcl ../shared/data/bfcl --workspace ./bfcl-ws      # then finetune and evaluate
    python -m slmigrate.collect.bfcl ../shared/data/bfcl --workspace ./bfcl-ws --score   # after evaluate

evaluate's ``exact`` compares with that one first answer. ``--score`` re-scores the evaluation's saved
predictions the way BFCL's own AST checker does (:func:`accepts`), which is what leaderboard figures mean: any
listed value counts, strings are compared without case, spaces and ``,./-_*^``, an integer passes for a float,
and an argument may be left out only where its list holds ``""``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
from pathlib import Path
from typing import Any

from slmigrate import artifacts
from slmigrate.errors import SlmigrateError
from slmigrate.record import CallRecord

CATEGORIES = ("simple_python", "multiple")
CLUSTER = "bfcl"
MODEL = "bfcl-ground-truth"
# BFCL writes Python type names; OpenAI tools take JSON Schema.
_TYPES = {"dict": "object", "float": "number", "tuple": "array", "int": "integer", "bool": "boolean",
          "str": "string", "list": "array"}


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        raise SlmigrateError(f"BFCL file {path} is missing; pass the folder holding BFCL_v4_*.json and "
                             "possible_answer/")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def json_schema(schema: Any) -> Any:
    """A BFCL parameter schema as JSON Schema (types renamed; property names are never touched)."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    t = out.get("type")
    if isinstance(t, str):
        if t == "any":
            out.pop("type")
        else:
            out["type"] = _TYPES.get(t, t)
    if isinstance(out.get("properties"), dict):
        out["properties"] = {k: json_schema(v) for k, v in out["properties"].items()}
    if isinstance(out.get("items"), dict):
        out["items"] = json_schema(out["items"])
    out.pop("optional", None)
    return out


def to_tools(functions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"type": "function", "function": {"name": f["name"], "description": f.get("description", ""),
                                              "parameters": json_schema(f.get("parameters") or {})}}
            for f in functions]


def first_answer(ground_truth: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI ``tool_calls`` from BFCL's ``[{name: {arg: [acceptable values]}}]``."""
    calls = []
    for i, item in enumerate(ground_truth):
        (name, options), = item.items()
        args = {}
        for arg, values in options.items():
            if not values or values[0] == "":
                continue  # optional argument, omitted
            args[arg] = values[0]
        calls.append({"id": f"call_{i}", "type": "function",
                      "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}})
    return calls


def load(root: str | Path, categories: tuple[str, ...] = CATEGORIES) -> list[CallRecord]:
    """BFCL questions of ``categories`` as call records whose answers are the ground truth."""
    root = Path(root)
    records = []
    for cat in categories:
        questions = _jsonl(root / f"BFCL_v4_{cat}.json")
        answers = {a["id"]: a["ground_truth"] for a in _jsonl(root / "possible_answer" / f"BFCL_v4_{cat}.json")}
        for q in questions:
            if q["id"] not in answers:
                continue
            turns = q["question"][0]  # single-turn categories: one list of messages
            request = {"model": MODEL, "messages": turns, "tools": to_tools(q["function"])}
            calls = first_answer(answers[q["id"]])
            response = {"model": MODEL, "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
                "role": "assistant", "content": None, "tool_calls": calls}}]}
            records.append(CallRecord(request=request, response=response, input_id=q["id"], session=q["id"],
                                      agent="bfcl", model=MODEL, source="import:bfcl",
                                      timestamp="2025-01-01T00:00:00Z", metadata={"category": cat}).finalise())
    return records


def split_of(key: str, test_share: float, validation_share: float, seed: int) -> str:
    """A stable split from a hash of the id: the same question always lands in the same split."""
    x = int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "test" if x < test_share else "validation" if x < test_share + validation_share else "train"


def prepare(ws: Any, root: str | Path, *, categories: tuple[str, ...] = CATEGORIES, test_share: float = 0.3,
            validation_share: float = 0.1, seed: int = 0, limit: int | None = None) -> dict[str, Any]:
    """Fill ``ws`` as curate and cluster would: calls in the store, a curated dataset with splits, one
    tool-call cluster. ``finetune`` and ``evaluate`` then run on it unchanged."""
    from slmigrate.curate.dataset import to_row, write_curated

    records = load(root, categories)
    if limit:
        # Keep the categories' mix: take an evenly spaced subset rather than the first N.
        step = max(1, len(records) // limit)
        records = records[::step][:limit]
    inserted, _ = ws.store.insert_calls(records)
    splits = {r.id: split_of(r.input_id, test_share, validation_share, seed) for r in records}
    rows = [to_row(r, splits[r.id]) for r in records]
    version = write_curated(ws, rows, {"source": "bfcl", "categories": list(categories)},
                            {"test_share": test_share, "validation_share": validation_share, "seed": seed})
    ws.store.set_clusters({r.id: CLUSTER for r in records})
    counts = {s: sum(v == s for v in splits.values()) for s in ("train", "validation", "test")}
    artifacts.write_clusters(ws, {"clusters": [{
        "id": CLUSTER, "label": "BFCL function calling (" + ", ".join(categories) + ")",
        "output_kind": "tool_call", "size": len(records),
    }]})
    return {"calls": len(records), "inserted": inserted, "curated_version": version, "splits": counts,
            "cluster": CLUSTER}


# --- BFCL's acceptance rule, for --score ---------------------------------------------------------------------

_IGNORED = re.compile(r"[ ,./\-_*^]")


def _text(value: str) -> str:
    return _IGNORED.sub("", value).lower().replace("'", '"')


def _matches(value: Any, option: Any) -> bool:
    """``value`` (from the model) is ``option`` (one listed acceptable value) under BFCL's comparison."""
    if isinstance(option, str):
        return isinstance(value, str) and _text(value) == _text(option)
    if isinstance(option, bool) or isinstance(value, bool):
        return value is option
    if isinstance(option, (int, float)):
        # an integer passes where a float is listed, not the other way round (BFCL checks the declared type)
        return isinstance(value, (int, float)) and (isinstance(option, float) or isinstance(value, int)) \
            and value == option
    if isinstance(option, list):
        return isinstance(value, list) and len(value) == len(option) and all(
            _matches(v, o) for v, o in zip(value, option))
    if isinstance(option, dict):
        # a dict answer lists acceptable values per key, like the arguments themselves
        return isinstance(value, dict) and _arguments_accepted(value, option)
    return value == option


def _arguments_accepted(args: dict[str, Any], options: dict[str, Any]) -> bool:
    for name, listed in options.items():
        listed = listed if isinstance(listed, list) else [listed]
        if name not in args:
            if "" not in listed:
                return False  # left out, but not optional
        elif not any(_matches(args[name], o) for o in listed if o != ""):
            return False
    return all(name in options for name in args)  # nothing BFCL did not ask for


def accepts(tool_calls: list[dict[str, Any]], ground_truth: list[dict[str, Any]]) -> bool:
    """Whether OpenAI ``tool_calls`` answer a single-call BFCL question under its AST checker's rule: the same
    function, every given argument one of the listed values, every argument without ``""`` in its list given."""
    if len(tool_calls) != len(ground_truth):
        return False
    for call, expected in zip(tool_calls, ground_truth):
        (name, options), = expected.items()
        fn = call.get("function") or {}
        if fn.get("name") != name:
            return False
        try:
            args = json.loads(fn.get("arguments") or "{}")
        except (TypeError, ValueError):
            return False
        if not isinstance(args, dict) or not _arguments_accepted(args, options):
            return False
    return True


def score(ws: Any, root: str | Path, categories: tuple[str, ...] = CATEGORIES) -> dict[str, Any]:
    """The workspace's latest evaluation of the BFCL cluster, per variant: evaluate's ``exact`` and BFCL's
    acceptance rule on the same saved predictions, each with its 95% Wilson interval."""
    from slmigrate.stats import wilson

    evaluation = artifacts.evaluation(ws)
    assert evaluation is not None
    run = ws.path("evals", evaluation["run"], "predictions", f"{CLUSTER}.jsonl")
    if not run.exists():
        raise SlmigrateError(f"{run} is missing: run `slmigrate evaluate` on this workspace first")
    truth = {a["id"]: a["ground_truth"] for cat in categories
             for a in _jsonl(Path(root) / "possible_answer" / f"BFCL_v4_{cat}.json")}
    question = {r.id: r.input_id for r in load(root, categories)}
    per: dict[str, dict[str, int]] = {}
    for line in run.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        qid = question.get(row["id"])
        if qid is None or qid not in truth:
            continue
        counts = per.setdefault(row["variant"], {"n": 0, "accepted": 0, "exact": 0})
        counts["n"] += 1
        calls = (row.get("prediction") or {}).get("tool_calls") or []
        counts["accepted"] += accepts(calls, truth[qid])
        counts["exact"] += bool(row.get("exact"))  # evaluate saved each metric beside the prediction
    out = {}
    for variant, c in per.items():
        out[variant] = {"n": c["n"]}
        for key in ("exact", "accepted"):
            lo, hi = wilson(c[key], c["n"])
            out[variant][key] = {"value": round(c[key] / c["n"], 3), "interval": [round(lo, 3), round(hi, 3)],
                                 "count": c[key]}
    return {"run": evaluation["run"], "variants": out}


def main(argv: list[str] | None = None) -> None:
    from slmigrate.workspace import Workspace

    parser = argparse.ArgumentParser(description="Load BFCL into a workspace as one tool-call cluster.")
    parser.add_argument("root", help="folder with BFCL_v4_*.json and possible_answer/")
    parser.add_argument("--workspace", "-w", required=True)
    parser.add_argument("--categories", default=",".join(CATEGORIES))
    parser.add_argument("--test-share", type=float, default=0.3)
    parser.add_argument("--limit", type=int, default=None, help="use at most N questions")
    parser.add_argument("--score", action="store_true",
                        help="instead of loading: score the workspace's latest evaluation with BFCL's rule")
    args = parser.parse_args(argv)
    if args.score:
        print(json.dumps(score(Workspace.open(args.workspace, create=False), args.root,
                               tuple(args.categories.split(",")))))
        return
    info = prepare(Workspace.open(args.workspace), args.root, categories=tuple(args.categories.split(",")),
                   test_share=args.test_share, limit=args.limit)
    print(json.dumps(info))


if __name__ == "__main__":
    main()
