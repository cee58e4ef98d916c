"""`slmigrate evaluate`: quality, efficiency and the migrate decision per cluster, and the CI gate."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from slmigrate import artifacts
from slmigrate.cli._app import ConfigOpt, JsonOpt, WorkspaceOpt, app, console, open_workspace, print_json

if TYPE_CHECKING:
    from slmigrate.evaluate.run import EvaluateResult


def _fmt(value, spec: str = ".3f", none: str = "-") -> str:
    return none if value is None else format(value, spec)


@app.command()
def evaluate(
    cluster: Annotated[Optional[list[str]], typer.Option(
        "--cluster", help="Cluster id to evaluate (repeatable); default: every cluster.")] = None,
    variants: Annotated[Optional[str], typer.Option(
        help="Comma-separated variants: base (zero-shot), icl (few-shot from train), finetuned.")] = None,
    limit: Annotated[Optional[int], typer.Option(help="At most N test calls per cluster.", min=1)] = None,
    judge: Annotated[Optional[str], typer.Option(
        help="OpenAI-compatible base URL of an LLM judge for free-text clusters.")] = None,
    judge_model: Annotated[Optional[str], typer.Option(help="The judge's model name.")] = None,
    judge_mode: Annotated[Optional[str], typer.Option(help="rubric (score 1-5) or pairwise (swapped twice).")] = None,
    fail_under: Annotated[Optional[float], typer.Option(
        help="Exit with code 3 when a cluster marked for migration scores below this on its primary metric "
        "(default: [evaluate] fail_under).")] = None,
    model: Annotated[Optional[str], typer.Option(
        help="Base model (catalogue name or folder) when a cluster has no adapter.")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu or cuda.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Calls generated together.", min=1)] = None,
    constrained: Annotated[Optional[bool], typer.Option(
        "--constrained/--free", help="Decode tool calls inside the request's tool schemas (default), or freely. "
        "The router decodes as the evaluation did.")] = None,
    force: Annotated[bool, typer.Option(help="Re-run even when nothing changed since the last evaluation.")] = False,
    config_file: ConfigOpt = None,
    workspace: WorkspaceOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Score the small model (base, few-shot, fine-tuned) against the LLM's answers on each cluster's test
    calls, measure latency, memory and cost, and decide which clusters migrate.

    Exit codes: 0 ok, 1 error, 3 the --fail-under gate failed.

    Example: slmigrate evaluate --variants base,finetuned --limit 50 --fail-under 0.9
    """
    from slmigrate.config import load_config
    from slmigrate.evaluate.run import check_gate, evaluate as run_evaluate

    cfg = load_config(config_file, {"evaluate": {
        "variants": [v.strip() for v in variants.split(",") if v.strip()] if variants else None,
        "limit": limit, "model": model, "device": device, "batch_size": batch_size, "judge_mode": judge_mode,
        "fail_under": fail_under, "constrained": constrained}})
    fail_under = cfg.evaluate.fail_under  # the flag, else [evaluate] fail_under
    ws = open_workspace(workspace, create=False)
    judge_obj = None
    if judge or judge_model:
        from slmigrate.errors import SlmigrateError
        from slmigrate.evaluate.judge import Judge

        if not (judge and judge_model):
            raise SlmigrateError("--judge URL and --judge-model NAME go together; pass both or neither")
        judge_obj = Judge(judge, judge_model, cfg.evaluate.judge_mode)
    from slmigrate.progress import Bars

    with Bars(not json_out) as bars:
        result = run_evaluate(ws, cfg.evaluate, progress=bars, force=force, clusters=cluster, judge=judge_obj,
                              prices=cfg.prices)
    if json_out:
        from slmigrate.evaluate.run import gate

        print_json({**result.to_dict(), "gate": None if fail_under is None else {
            "fail_under": fail_under, "failing": gate(result.to_dict(), fail_under)}})
    else:
        show(result)
    check_gate(result.to_dict(), fail_under)


def _verdict(d: dict) -> str:
    if d.get("migrate"):
        return "[green]migrate[/]"
    if d.get("outcome") == "not_enough_evidence":
        needs = d.get("needs_calls")
        return "[yellow]not enough evidence[/]" + (f" (+{needs} calls)" if needs is not None else "")
    return "[yellow]stay on LLM[/]"


def show(result: EvaluateResult) -> None:
    if result.skipped_unchanged:
        console.print(f"[dim]Nothing changed since run {result.run}; showing it (use --force to re-run).[/]")
    quality = Table(title="quality on held-out test calls (primary metric per variant)", title_justify="left")
    numeric = ("calls", "base", "icl", "finetuned", "95% interval", "threshold", "estimate")
    for col in ("cluster", "kind", "calls", "metric", "base", "icl", "finetuned", "95% interval", "threshold",
                "decision", "estimate"):
        quality.add_column(col, justify="right" if col in numeric else "left")
    for r in result.clusters:
        v = r["variants"]
        d = r["decision"]
        quality.add_row(
            f"{r['cluster']} {r.get('label') or ''}".strip()[:40], r["kind"], str(r["test_calls"]),
            r["primary_metric"], *[_fmt((v.get(x) or {}).get("primary")) for x in ("base", "icl", "finetuned")],
            "-" if d.get("lower") is None else f"{d['lower']:.3f}-{d['upper']:.3f}",
            f"{r['threshold']:.2f}", _verdict(d),
            _fmt((r.get("estimate") or {}).get("score"), ".2f"))
    console.print(quality)
    eff = Table(title="efficiency (small model vs recorded LLM)", title_justify="left")
    for col in ("cluster", "variant", "p50 ms", "p95 ms", "tok/s", "peak MB", "$/1k calls", "LLM $/1k",
                "LLM p50 ms", "cost ratio"):
        eff.add_column(col, justify="left" if col in ("cluster", "variant") else "right")
    for r in result.clusters:
        for name, v in r["variants"].items():
            e = v.get("efficiency")
            if not e:
                continue
            eff.add_row(r["cluster"], name, _fmt(e["latency_p50_ms"], ".0f"), _fmt(e["latency_p95_ms"], ".0f"),
                        _fmt(e["tokens_per_s"], ".1f"), _fmt(e["peak_memory_mb"], ".0f"),
                        _fmt(e["cost_per_1k_usd"], ".4f"), _fmt(r["llm"]["cost_per_1k_usd"], ".4f"),
                        _fmt(r["llm"]["latency_p50_ms"], ".0f"), _fmt(e["llm_to_slm_cost_ratio"], ".1f", "-"))
    console.print(eff)
    for r in result.clusters:
        console.print(f"  {r['cluster']}: {escape(r['decision']['reason'])}", highlight=False)
        lat = r["decision"].get("latency") or {}
        if lat.get("slm_p50_ms") is not None:
            console.print(f"    latency: small model p50 {lat['slm_p50_ms']:,.0f} ms / p95 "
                          f"{lat['slm_p95_ms']:,.0f} ms, LLM p50 "
                          + ("unknown" if lat.get("llm_p50_ms") is None else f"{lat['llm_p50_ms']:,.0f} ms "
                             f"(ratio {lat['ratio']:.2f}"
                             + (f", max {lat['max_ratio']:g})" if lat.get("max_ratio") else ")")), highlight=False)
    for s in result.skipped:
        console.print(f"  [dim]{s['cluster']}: skipped ({s['reason']})[/]")
    plan = result.plan["measured"]
    console.print(
        f"[bold]Migration plan[/]: {len(result.plan['migrating_clusters'])} cluster(s) move to small models: "
        f"{plan['calls']['share']:.0%} of calls, {plan['tokens']['share']:.0%} of tokens, "
        f"{plan['cost_usd']['share']:.0%} of LLM cost (measured)."
    )
    est = result.plan.get("estimate")
    if isinstance(est, dict) and "call_share" in est:
        console.print(f"  up-front estimate from `slmigrate cluster`: {est['call_share']:.0%} of calls, "
                      f"{est.get('cost_share', 0):.0%} of cost in {len(est.get('replaceable_clusters', []))} "
                      "likely-replaceable cluster(s)")
    console.print(f"[dim]results: {artifacts.evaluation_run_file(result.run)} and "
                  f"{artifacts.relative_name(artifacts.EVALUATION)}[/]")
