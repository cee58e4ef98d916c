"""The report's sections, in reading order. Each builder takes the workspace facts and returns one Section.

A builder renders only what exists; when the stage behind it has not run, it says which command fills it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slmigrate import artifacts
from slmigrate.artifacts import ClusterInfo, ClustersFile, EvaluationFile, ProbeFile, SelectionFile
from slmigrate.config import Config
from slmigrate.report import charts
from slmigrate.report.doc import Cell, Chart, Section, esc, md_cell, num, pill
from slmigrate.workspace import Workspace


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _usd(value: float | None) -> str:
    if value is None:
        return "–"
    return f"${value:,.2f}" if value >= 1 else f"${value:,.4f}"


def _count(value: float) -> str:
    for size, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if value >= size:
            return f"{value / size:.1f}{suffix}"
    return f"{value:,.0f}"


def _cost(cluster: dict[str, Any]) -> float:
    return float(cluster.get("cost_usd") or 0)


def _label(cluster: dict[str, Any]) -> str:
    """Id and label: the id ties a row to the map's legend, the label (keywords) says what the task is."""
    cid, label = cluster.get("id"), cluster.get("label")
    return f"{cid} · {label}" if label and label != cid else str(cid)


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value:.0%}"


@dataclass
class Facts:
    """Everything the report reads, loaded once."""

    ws: Workspace
    config: Config
    totals: dict[str, Any]
    by_model: list[dict[str, Any]]
    by_agent: list[dict[str, Any]]
    manifests: dict[str, dict[str, Any] | None]
    curated: dict[str, Any] | None = None
    clusters: ClustersFile | None = None
    cluster_map: bytes | None = None
    selection: SelectionFile | None = None
    adapters: list[dict[str, Any]] = field(default_factory=list)
    evals: EvaluationFile | None = None
    probe: ProbeFile | None = None
    log: dict[str, Any] = field(default_factory=dict)  # slmigrate.headline.log_facts: what the log lacked

    @property
    def agent_names(self) -> str:
        names = [str(a["key"]) for a in self.by_agent if a["key"]]
        if not names:
            return "agent calls"
        return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")

    @classmethod
    def load(cls, ws: Workspace, config: Config) -> "Facts":
        store = ws.store
        row = store.conn.execute(
            "SELECT COUNT(*), COUNT(DISTINCT session), COALESCE(SUM(prompt_tokens),0), "
            "COALESCE(SUM(completion_tokens),0), MIN(timestamp), MAX(timestamp), "
            "COALESCE(SUM(CASE WHEN status != 'ok' THEN 1 ELSE 0 END),0) "
            "FROM calls"
        ).fetchone()
        by_model = [dict(r) for r in store.conn.execute(
            "SELECT model, COUNT(*) AS calls, COALESCE(SUM(prompt_tokens),0) AS prompt_tokens, "
            "COALESCE(SUM(completion_tokens),0) AS completion_tokens FROM calls GROUP BY model ORDER BY calls DESC"
        )]
        for m in by_model:
            m["cost"] = config.prices.cost(m["model"], m["prompt_tokens"], m["completion_tokens"])
        totals = {"calls": row[0], "sessions": row[1], "prompt_tokens": row[2], "completion_tokens": row[3],
                  "first": row[4], "last": row[5], "failed": row[6], "cost": sum(m["cost"] for m in by_model)}
        facts = cls(ws=ws, config=config, totals=totals, by_model=by_model, by_agent=store.group_counts("agent"),
                    manifests={s: ws.manifest(s) for s in ("import", "curate", "cluster", "select", "finetune",
                                                         "evaluate")})
        facts._load_artifacts()
        return facts

    def _load_artifacts(self) -> None:
        from slmigrate.curate import dataset as curated

        ws = self.ws
        if curated.current_version(ws):
            try:
                self.curated = curated.load_report(ws)
            except (OSError, ValueError):
                self.curated = None
        self.clusters = artifacts.clusters_file(ws, required=False)
        stored_map = (self.clusters or {}).get("map")
        if stored_map and ws.resolve(stored_map).exists():  # the file the cluster stage says it drew
            self.cluster_map = ws.resolve(stored_map).read_bytes()
        self.selection = artifacts.selection(ws, required=False)
        adapters = ws.path("adapters")
        for metrics_file in sorted(adapters.glob("*/*/metrics.json")) if adapters.exists() else []:
            metrics = _read_json(metrics_file) or {}
            pngs = sorted(metrics_file.parent.glob("*.png"))
            self.adapters.append({"cluster": metrics_file.parent.parent.name, "model": metrics_file.parent.name,
                                  "metrics": metrics, "png": pngs[0].read_bytes() if pngs else None})
        self.evals = ws.evaluation()
        from slmigrate.headline import log_facts

        self.probe = ws.probe()
        self.log = log_facts(ws)

    def answer(self) -> dict[str, Any] | None:
        from slmigrate.headline import headline

        return headline(self.ws, self.config)

    # --- normalised views over the stage artifacts ---
    def cluster_rows(self) -> list[ClusterInfo]:
        return self.clusters["clusters"] if self.clusters else []

    def cluster_label(self, cid: Any) -> str:
        for c in self.cluster_rows():
            if c["id"] == str(cid):
                return _label(c)
        return str(cid)

    def eval_clusters(self) -> list[dict[str, Any]]:
        return self.evals["clusters"] if self.evals else []


# --- sections ------------------------------------------------------------------------------------------------


def overview(f: Facts) -> Section:
    s = Section("overview", "At a glance",
                "What the agent's LLM calls cost today, and how much of that could move to small models.")
    t = f.totals
    if not t["calls"]:
        s.missing("No calls in the workspace", "slmigrate collect import FILE")
        return s
    known = _tokens_known(f)
    estimated = " (estimated)" if f.log.get("tokens_estimated") else ""
    tiles = [("LLM calls", f"{t['calls']:,}"), ("sessions", f"{t['sessions']:,}"),
             ("tokens (in / out)" + estimated,
              f"{_count(t['prompt_tokens'])} / {_count(t['completion_tokens'])}" if known else "unknown"),
             ("LLM cost of these calls" + estimated, _usd(t["cost"]) if known else "unknown")]
    clusters = f.cluster_rows()
    if clusters:
        tiles.append(("recurring tasks found", str(len(clusters))))
        measured = (f.probe or {}).get("overall") or {}
        for key, label in (("calls_share", "calls"), ("cost_share", "cost")):
            m = measured.get(key) or {}
            if m.get("value") is not None:
                tiles.append((f"measured replaceable ({label}, 95% interval)",
                              f"{_pct(m['value'])} ({_pct(m['low'])}-{_pct(m['high'])})"))
        est = (f.clusters or {}).get("overall") or {}
        if est.get("call_share") is not None:
            tiles.append(("prior estimate (calls)", _pct(est["call_share"])))
        if est.get("cost_share") is not None and known:
            tiles.append(("prior estimate (cost)", _pct(est["cost_share"])))
    measured = ((f.evals or {}).get("plan") or {}).get("measured") or {}
    for key, label in (("calls", "measured migratable (calls)"), ("cost_usd", "measured migratable (cost)")):
        if (measured.get(key) or {}).get("share") is not None:
            tiles.append((label, _pct(measured[key]["share"])))
    s.kpis(tiles)
    answer = f.answer()
    if answer:
        s.para(answer["text"])
    for note in _log_notes(f):
        s.para(note, small=True)
    return s


def _reconcile(f: Facts, clusters: list[dict[str, Any]], un: dict[str, Any]) -> str:
    """How the per-task table adds up to the totals above: tasks + one-off calls + what curation dropped."""
    t = f.totals
    in_tasks = sum(int(c.get("size") or 0) for c in clusters)
    task_cost = sum(_cost(c) for c in clusters)
    one_off, one_off_cost = int(un.get("size") or 0), float(un.get("cost_usd") or 0.0)
    dropped = t["calls"] - in_tasks - one_off
    dropped_cost = t["cost"] - task_cost - one_off_cost
    usd = _usd if _tokens_known(f) else (lambda _v: "cost unknown")
    text = (f"{t['calls']:,} calls ({usd(t['cost'])}) = {in_tasks:,} in tasks ({usd(task_cost)}) + {one_off:,} "
            f"one-off ({usd(one_off_cost)})")
    if dropped:
        reasons = ", ".join(f"{v:,} {k.replace('_', ' ')}" for k, v in
                            ((f.curated or {}).get("dropped") or {}).items() if v)
        text += (f" + {dropped:,} dropped by curation ({usd(max(dropped_cost, 0.0))}"
                 + (f": {reasons}" if reasons else "") + "); dropped calls stay with the LLM and count in no task")
    return text + "."


def _no_model(f: Facts) -> str:
    assumed = f.config.prices.default_model
    return f"(not in the log; priced as {assumed})" if assumed else "(not in the log; default price)"


def _tokens_known(f: Facts) -> bool:
    """Whether any call has token counts: with none, a cost of $0 would be a lie, not a measurement."""
    return f.log.get("without_tokens", 0) < f.totals["calls"]


def _log_notes(f: Facts) -> list[str]:
    """What the log lacked and what stands in for it, so no figure passes for more than it is."""
    t, log = f.totals, f.log
    notes = []
    if log.get("tokens_estimated"):
        notes.append(f"{log['tokens_estimated']:,} of {t['calls']:,} calls had no usage in the log: their tokens "
                     f"were counted with the {log['tokenizer']} tokenizer, so tokens and cost are estimates.")
    if log.get("without_tokens"):
        notes.append(f"{log['without_tokens']:,} calls have no token counts (no usage in the log, and none "
                     "estimated at import; re-import them with bpe-openai installed): their cost is unknown, not $0.")
    if log.get("without_model"):
        assumed = f.config.prices.default_model
        notes.append(f"{log['without_model']:,} calls name no model; " + (
            f"they are priced as {assumed} ([prices] default_model / --assume-model)." if assumed else
            "they are priced at the [prices] default; name the model with `audit --assume-model`."))
    if log.get("without_timestamp") and log["without_timestamp"] >= t["calls"]:
        notes.append("The log has no timestamps, so when these calls happened is unknown.")
    elif t["first"] and t["last"]:
        missing = (f" ({log['without_timestamp']:,} calls without a timestamp are left out)"
                   if log.get("without_timestamp") else "")
        notes.append(f"Calls logged from {t['first'][:19].replace('T', ' ')} to {t['last'][:19].replace('T', ' ')} "
                     f"UTC{missing}; {t['failed']:,} failed.")
    return notes


def calls_and_cost(f: Facts) -> Section:
    s = Section("cost", "Calls, tokens and cost",
                "By model as logged (list prices per million tokens from the [prices] config), then by task.")
    if not f.totals["calls"]:
        s.missing("No calls in the workspace", "slmigrate collect import FILE")
        return s
    s.table(["model", "calls", "prompt tokens", "completion tokens", "cost"],
            [[m["model"] or _no_model(f), num(m["calls"]), num(m["prompt_tokens"]), num(m["completion_tokens"]),
              Cell(_usd(m["cost"]), _usd(m["cost"]), True)] for m in f.by_model])
    clusters = f.cluster_rows()
    if not clusters:
        s.missing("Per-task breakdown", "slmigrate cluster")
        return s
    rows, labels, costs, calls = [], [], [], []
    for c in sorted(clusters, key=lambda c: -_cost(c)):
        prompt, completion = c.get("prompt_tokens") or {}, c.get("completion_tokens") or {}
        labels.append(_label(c))
        costs.append(_cost(c))
        calls.append(int(c.get("size") or 0))
        rows.append([Cell(f"<b>{esc(c.get('id'))}</b> {esc(c.get('label') or '')}",
                          f"**{md_cell(c.get('id'))}** {md_cell(c.get('label') or '')}"),
                     c.get("output_kind") or "", num(calls[-1]),
                     Cell(_pct(c.get("share")), _pct(c.get("share")), True),
                     num(prompt.get("p50"), "{:,.0f}"), num(prompt.get("p95"), "{:,.0f}"),
                     num(completion.get("p95"), "{:,.0f}"), Cell(_usd(costs[-1]), _usd(costs[-1]), True)])
    un = (f.clusters or {}).get("unclustered") or {}
    if un.get("size"):
        rows.append([Cell("<i>unclustered (one-off calls)</i>", "*unclustered (one-off calls)*"), "",
                     num(un["size"]), Cell(_pct(un.get("share")), _pct(un.get("share")), True), "", "", "",
                     Cell(_usd(un.get("cost_usd")), _usd(un.get("cost_usd")), True)])
    s.table(["task (cluster)", "output", "calls", "share", "prompt p50", "prompt p95", "answer p95", "cost"], rows,
            caption="Token columns are per call (p50 = median, p95 = 95th percentile), for context-window needs.")
    s.para(_reconcile(f, clusters, un), small=True)
    s.details([(_label(c), str((c.get("representative") or {}).get("view") or ""))
               for c in clusters if (c.get("representative") or {}).get("view")],
              "What a typical call of each task looks like (its task view: instructions | tools | latest turn | "
              "answer; PII already scrubbed):")
    s.columns_start()
    s.chart(Chart("cost_per_cluster", "LLM cost per task over the logged calls (USD)",
                  svg=charts.barh(labels, costs, xlabel="USD", fmt=_usd)))
    s.chart(Chart("calls_per_cluster", "Calls per task",
                  svg=charts.barh(labels, calls, xlabel="calls", colors=[charts.PALETTE[2]] * len(calls))))
    s.columns_end()
    return s


def curation(f: Facts) -> Section:
    s = Section("curation", "Curation", "What was removed before anything is learned from the calls.")
    rep = f.curated
    if not rep:
        s.missing("Curated dataset", "slmigrate curate")
        return s
    tiles = []
    for key, label in (("calls_in", "calls in"), ("calls_out", "calls kept")):
        if key in rep:
            tiles.append((label, f"{rep[key]:,}"))
    if tiles:
        s.kpis(tiles)
    dropped = {k: v for k, v in (rep.get("dropped") or {}).items() if v}
    entities = rep.get("entities") or {}
    s.columns_start()
    s.table(["dropped because", "calls"], [[k.replace("_", " "), num(v)] for k, v in dropped.items()]
            or [["nothing dropped", num(0)]])
    s.table([f"sensitive values replaced ({rep.get('pii', '?')})", "found"],
            [[k, num(v)] for k, v in sorted(entities.items(), key=lambda kv: -kv[1])] or [["none found", num(0)]])
    s.columns_end()
    return s


def cluster_map(f: Facts) -> Section:
    s = Section("map", "Cluster map", "Each dot is a call, placed by what it asks for; colour is the task it joined.")
    if f.cluster_map is None:
        s.missing("Cluster map", "slmigrate cluster")
        return s
    s.chart(Chart("cluster_map", "2-D projection of the calls' task embeddings, coloured by cluster",
                  png=f.cluster_map))
    s.para("PC 1 and PC 2 are the two principal components: the directions in which the task embeddings vary "
           "most. Distance on the map roughly follows how different two tasks are; the axes have no units.",
           small=True)
    return s


def replaceability(f: Facts) -> Section:
    s = Section("replaceability", "Replaceability: prior, probe and fine-tuned",
                "The prior is a hand-set score from the shape of each task (structured output, short answers, ...). "
                "The probe measures, on held-out calls, how well the nearest train call's answer (or the small model "
                "few-shot) matches the LLM's, with the task's primary metric and a 95% interval (the whisker). "
                "Fine-tuned is the trained small model on the test calls. A task moves when its score reaches the "
                "threshold (dashed line).")
    clusters = f.cluster_rows()
    if not clusters:
        s.missing("Replaceability estimate", "slmigrate cluster")
        return s
    measured = {str(e.get("cluster")): e for e in f.eval_clusters()}
    probed = {str(p.get("cluster")): p for p in (f.probe or {}).get("clusters") or []}
    labels, est, probe, spans, meas, rows, thresholds = [], [], [], [], [], [], []
    for c in clusters:
        score = c.get("replaceability")
        m = measured.get(str(c.get("id")))
        mscore = _finetuned_score(m) if m else None
        p = probed.get(str(c.get("id"))) or {}
        best = p.get("measured") or {}
        labels.append(_label(c))
        est.append(None if score is None else float(score))
        probe.append(best.get("score"))
        spans.append((best["low"], best["high"]) if best else None)
        meas.append(None if mscore is None else float(mscore))
        if p.get("threshold") is not None:
            thresholds.append(p["threshold"])
        interval = f"{best['score']:.2f} ({best['low']:.2f}-{best['high']:.2f}), {_probe_name(best)}, n={best['n']}" \
            if best else "–"
        reasons = c.get("reasons")
        rows.append([labels[-1], num(score, "{:.2f}"), interval, p.get("metric") or "", num(mscore, "{:.2f}"),
                     "; ".join(reasons or [])])
    threshold = thresholds[0] if thresholds and len(set(thresholds)) == 1 else None
    s.chart(Chart("replaceability", "Prior vs probe (95% interval) vs fine-tuned score, per task",
                  svg=charts.grouped_bars(labels, {"prior": est, "probe": probe, "fine-tuned": meas},
                                          xlabel="score (0-1)", threshold=threshold,
                                          intervals={"probe": spans},
                                          colors={"prior": charts.MUTED, "probe": charts.PALETTE[1],
                                                  "fine-tuned": charts.PALETTE[0]})))
    s.table(["task", "prior", "probe (95% interval)", "metric", "fine-tuned", "why (prior)"], rows)
    if thresholds and threshold is None:
        s.para("Thresholds differ by output kind: " + ", ".join(sorted({f"{p['kind']} {p['threshold']:g}"
                                                                        for p in probed.values()})) + ".", small=True)
    if not probed:
        s.missing("Measured replaceability (probe)", "slmigrate probe")
    if not measured:
        s.missing("Fine-tuned scores", "slmigrate finetune && slmigrate evaluate")
    return s


def _probe_name(best: dict[str, Any]) -> str:
    return {"neighbour": "nearest neighbour", "fewshot": "small model few-shot",
            "lora": "budgeted LoRA"}.get(best.get("probe"), "probe")


def _params(n: Any) -> str:
    if not isinstance(n, (int, float)):
        return "?"
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


def candidates(f: Facts) -> Section:
    s = Section("candidates", "Candidate small models", "Per task, the catalogue models that fit the hardware, "
                "licence and context needs, best first, with the reason for each; and why the others were left out.")
    sel = f.selection
    if not sel:
        s.missing("Model selection", "slmigrate select")
        return s
    hw = sel.get("hardware") or {}
    if hw:
        s.para(f"Hardware assumed: {hw.get('policy') or hw.get('device')}; licence policy: "
               f"{sel.get('license_policy', '?')}.", small=True)
    s.para("Score = capability - size penalty. Capability is a weighted mean of published benchmarks chosen by the "
           "task's output: IFEval (following instructions and formats), BFCL (function calling), MMLU (knowledge), "
           "GSM8K (arithmetic reasoning), HumanEval (code). The size penalty takes points per doubling of "
           "parameters above 100M, standing for training and serving cost and latency.", small=True)
    for entry in sel.get("clusters") or []:
        cands = entry.get("candidates") or []
        rows = [[num(c.get("rank")), Cell(f"<b>{esc(c.get('name'))}</b>" if c.get("name") == entry.get("choice")
                                          else esc(c.get("name")), md_cell(c.get("name"))),
                 _params(c.get("params")), c.get("license") or "", c.get("method") or "",
                 num(c.get("train_memory_gib"), "{:.1f}"), num(c.get("score"), "{:.1f}"), c.get("reason") or ""]
                for c in cands]
        caption = f"{f.cluster_label(entry.get('cluster'))} ({entry.get('output_kind')})"
        if rows:
            s.table(["#", "model", "params", "licence", "method", "train GiB", "score", "why"], rows, caption=caption)
        else:
            s.para(f"{caption}: {entry.get('note') or 'no candidate'}")
        rejected = entry.get("rejected") or []
        if rejected:
            shown = "; ".join(f"{r.get('name')}: {r.get('reason')}" for r in rejected[:3])
            more = f" (+{len(rejected) - 3} more)" if len(rejected) > 3 else ""
            s.para(f"Left out ({len(rejected)}): {shown}{more}.", small=True)
    return s


def _loss_points(m: dict[str, Any]) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    """(step, loss) for training and validation, from finetune's history (parallel lists per series)."""
    h = m.get("history") or {}
    if isinstance(h, dict):
        train = list(zip(h.get("steps") or [], h.get("train_loss") or []))
        val = list(zip(h.get("val_steps") or [], h.get("val_loss") or []))
        return train, val
    # A list of log records (the transformers Trainer's log_history shape).
    return ([(r["step"], r["loss"]) for r in h if "loss" in r and "step" in r],
            [(r["step"], r["eval_loss"]) for r in h if "eval_loss" in r and "step" in r])


def training(f: Facts) -> Section:
    s = Section("training", "Fine-tuning", "One adapter per task and model; the loss should fall and the "
                "validation loss should not climb.")
    if not f.adapters:
        s.missing("Fine-tuned adapters", "slmigrate finetune")
        return s
    rows = []
    s.columns_start()
    for a in f.adapters:
        m = a["metrics"]
        train, val = _loss_points(m)
        name = f"loss_{a['cluster']}_{a['model']}".replace("/", "_")
        title = f"{f.cluster_label(a['cluster'])} · {a['model']}"
        if train:
            series = {"train": ([x for x, _ in train], [y for _, y in train])}
            if val:
                series["validation"] = ([x for x, _ in val], [y for _, y in val])
            s.chart(Chart(name, f"Loss by step: {title}",
                          svg=charts.lines(series, xlabel="step", ylabel="loss", title=title)))
        elif a["png"]:
            s.chart(Chart(name, f"Loss curve: {title}", png=a["png"]))
        rows.append([f.cluster_label(a["cluster"]), a["model"], m.get("method") or "", num(m.get("steps")),
                     num(m.get("examples")), num(m.get("final_train_loss"), "{:.3f}"),
                     num(m.get("best_val_loss"), "{:.3f}"), num(m.get("tokens_per_second"), "{:,.0f}"),
                     num(m.get("seconds"), "{:,.0f}s")])
    s.columns_end()
    s.table(["task", "model", "method", "steps", "examples", "last train loss", "best val loss", "tokens/s",
             "time"], rows, caption="Loss is on the answer tokens only; the adapter kept is the one with the best "
                                     "validation loss.")
    return s


def _finetuned_score(e: dict[str, Any]) -> float | None:
    v = (e.get("variants") or {}).get("finetuned") or {}
    return None if v.get("skipped") else v.get("primary")


def evaluation(f: Facts) -> Section:
    s = Section("evaluation", "Evaluation per variant", "On each task's test split (never trained on): the base "
                "small model zero-shot (base), with examples in the prompt (icl), and fine-tuned, scored against "
                "the LLM's recorded answers; the LLM row is what it cost and how fast it was when logged.")
    per = f.eval_clusters()
    if not per:
        s.missing("Evaluation", "slmigrate evaluate")
        return s
    labels, series = [], {}
    for e in per:
        variants = e.get("variants") or {}
        metric_names: list[str] = []
        for v in variants.values():
            for k in (v.get("metrics") or {}):
                if k not in metric_names:
                    metric_names.append(k)
        rows = []
        for vname, v in variants.items():
            if v.get("skipped"):
                rows.append([vname] + [Cell("–", "–", True)] * (len(metric_names) + 3) + [v.get("reason") or ""])
                continue
            metrics, eff = v.get("metrics") or {}, v.get("efficiency") or {}
            rows.append([vname] + [num(metrics.get(k), "{:.3f}") for k in metric_names]
                        + [num(eff.get("latency_p50_ms"), "{:,.0f}"), num(eff.get("tokens_per_s"), "{:,.0f}"),
                           num(eff.get("cost_per_1k_usd"), "${:,.4f}"), ""])
        llm = e.get("llm") or {}
        rows.append([f"LLM ({llm.get('model') or 'logged'})"] + [Cell("reference", "reference")]
                    + [Cell("", "")] * (len(metric_names) - 1)
                    + [num(llm.get("latency_p50_ms"), "{:,.0f}"), Cell("", ""),
                       num(llm.get("cost_per_1k_usd"), "${:,.4f}"), ""])
        decision = e.get("decision") or {}
        verdict = _VERDICT.get(decision.get("outcome") or ("migrate" if decision.get("migrate") else "stay"))
        s.table(["variant"] + metric_names + ["p50 ms", "tokens/s", "$ / 1k calls", "note"], rows,
                caption=f"{f.cluster_label(e.get('cluster'))}: {e.get('test_calls', '?')} test calls, primary "
                        f"metric {e.get('primary_metric')}, threshold {e.get('threshold')}: {verdict} "
                        f"({decision.get('reason', '')})")
        labels.append(f.cluster_label(e.get("cluster")))
        for vname, v in variants.items():
            series.setdefault(vname, []).append(None if v.get("skipped") else v.get("primary"))
    if labels:
        s.chart(Chart("eval_primary", "Primary metric per task and variant (the dashed line is the threshold)",
                      svg=charts.grouped_bars(labels, series, xlabel="primary metric (0-1)",
                                              threshold=_common_threshold(per))))
    return s


_VERDICT = {"migrate": "migrate", "stay": "stays on the LLM", "not_enough_evidence": "not enough evidence"}


def _interval(decision: dict[str, Any] | None) -> Cell:
    """The fine-tuned primary metric with its 95% interval and n: "0.900 (0.596-0.982, n=10)"."""
    d = decision or {}
    if d.get("value") is None or d.get("lower") is None:
        return Cell("", "", True)
    text = f"{d['value']:.3f} ({d['lower']:.3f}-{d['upper']:.3f}, n={d['n']})"
    return Cell(text, text, True)


def _common_threshold(per: list[dict[str, Any]]) -> float | None:
    found = {e.get("threshold") for e in per if e.get("threshold") is not None}
    return found.pop() if len(found) == 1 else None


def _slm_cost_per_1k(e: dict[str, Any] | None) -> float | None:
    v = ((e or {}).get("variants") or {}).get("finetuned") or {}
    return None if v.get("skipped") else (v.get("efficiency") or {}).get("cost_per_1k_usd")


def _days(first: str | None, last: str | None) -> float | None:
    from datetime import datetime

    try:
        a = datetime.fromisoformat(first.replace("Z", "+00:00"))
        b = datetime.fromisoformat(last.replace("Z", "+00:00"))
    except (AttributeError, ValueError):
        return None
    return (b - a).total_seconds() / 86400


def plan(f: Facts) -> Section:
    s = Section("plan", "Migration plan", "Which tasks move to a small model, what that saves, and what stays on "
                "the LLM and why.")
    clusters = f.cluster_rows()
    if not clusters:
        s.missing("Migration plan", "slmigrate cluster")
        return s
    measured = {str(e.get("cluster")): e for e in f.eval_clusters()}
    move = stay = slm = 0.0
    slm_known = True
    rows, stays = [], []
    for c in sorted(clusters, key=lambda c: -_cost(c)):
        cid, label, cost = str(c.get("id")), _label(c), _cost(c)
        m = measured.get(cid)
        outcome = None
        if m is not None and m.get("decision") is not None:
            migrate = bool(m["decision"].get("migrate"))
            basis, why = "measured", m["decision"].get("reason") or ""
            outcome = m["decision"].get("outcome")
        else:
            migrate = bool(c.get("likely_replaceable"))
            basis, why = "estimated", "; ".join(c.get("reasons") or [])
            score = c.get("replaceability")
            if not migrate and isinstance(score, (int, float)):
                why = f"estimated replaceability {score:.2f} is below the bar for training; {why}"
        slm_cost = None
        if migrate:
            move += cost
            per_1k = _slm_cost_per_1k(m)
            if per_1k is None:
                slm_known = False
            else:
                slm_cost = per_1k * int(c.get("size") or c.get("calls") or 0) / 1000
                slm += slm_cost
        else:
            stay += cost
            stays.append(f"{label}: {why or 'not narrow enough for a small model'}")
        shown = ("migrate", "good") if migrate else (
            ("not enough evidence", "warn") if outcome == "not_enough_evidence" else ("stay on LLM", "mute"))
        rows.append([label, pill(*shown),
                     pill(basis, "good" if basis == "measured" else "warn"),
                     _interval((m or {}).get("decision")),
                     Cell(_usd(cost), _usd(cost), True),
                     Cell(_usd(slm_cost), _usd(slm_cost), True) if migrate else Cell("", "", True), why])
    unclustered = float(((f.clusters or {}).get("unclustered") or {}).get("cost_usd") or 0)
    if unclustered > 0:
        stay += unclustered
        stays.append(f"one-off calls that belong to no recurring task ({_usd(unclustered)}): nothing to "
                     "specialise a small model on")
    total = move + stay
    net = move - slm if slm_known else None
    tiles = [("LLM cost that moves", _usd(move)), ("stays on the LLM", _usd(stay)),
             ("share of LLM cost that moves", _pct(move / total if total else None))]
    if net is not None and move:
        tiles.append(("small-model cost for those calls", _usd(slm)))
        tiles.append(("net saving over the logged calls", _usd(net)))
        if f.totals["calls"]:
            tiles.append(("net saving per 1M agent calls", _usd(net / f.totals["calls"] * 1e6)))
        days = _days(f.totals["first"], f.totals["last"])
        if days and days >= 1:
            tiles.append(("projected net saving per month", _usd(net * 30 / days)))
    s.kpis(tiles)
    s.chart(Chart("savings", "Today's LLM cost by where it goes after the migration",
                  svg=charts.stacked_share([("moves to small models", move), ("stays on the LLM", stay)],
                                           title="LLM cost by destination")))
    s.table(["task", "decision", "basis", "fine-tuned score (95% interval)", "LLM cost today", "small-model cost",
             "why"], rows, caption="A task migrates only when the lower bound of its fine-tuned score's 95% "
                                   "interval reaches the threshold.")
    if stays:
        s.para("What stays on the LLM, and why:")
        s.bullets(stays)
    if not measured:
        s.para("Decisions are estimates from the shape of each task until `slmigrate finetune` and "
               "`slmigrate evaluate` have run; the small model's serving cost is measured by evaluate.", small=True)
    elif not slm_known:
        s.para("Some migrating tasks have no measured small-model cost yet, so no net saving is shown.", small=True)
    return s


def live_guard(f: Facts) -> Section:
    """What the router's live guard has seen since the current evaluation: the decision, checked on traffic."""
    from slmigrate.serve.guard import live_record

    s = Section("guard", "Live guard", "The router checks a share of the small models' answers against the LLM "
                "(`slmigrate serve --guard-sample`, 5% by default) and demotes a task to the LLM when the upper "
                "bound of its live agreement falls below the threshold.")
    if not f.eval_clusters():
        s.missing("Live guard", "slmigrate evaluate")  # nothing decided, so nothing served or guarded yet
        return s
    migrated = [str(e.get("cluster")) for e in f.eval_clusters() if (e.get("decision") or {}).get("migrate")]
    record = live_record(f.ws)
    if not migrated and not record:
        s.para("No task is migrated, so nothing is served by a small model or guarded.", small=True)
        return s
    rows = []
    for cid in sorted(set(migrated) | set(record)):
        t = record.get(cid)
        if not t:
            rows.append([f.cluster_label(cid), pill("no live checks yet", "mute"), "", "", "", ""])
            continue
        shown = ("demoted to the LLM", "bad") if t.get("demoted") else ("holding", "good")
        agreement, lower, upper = (t.get(k) for k in ("agreement", "lower", "upper"))
        known = all(isinstance(v, (int, float)) for v in (agreement, lower, upper))
        rows.append([f.cluster_label(cid), pill(*shown), num(t.get("samples")),
                     f"{agreement:.3f}" if known else "", f"{lower:.3f}-{upper:.3f}" if known else "",
                     t.get("reason") or ""])
    s.table(["task", "live status", "answers checked", "agreement with the LLM", "95% interval", "why"], rows,
            caption="Only checks made since the current evaluation count; `slmigrate refine` retrains demoted "
                    "tasks.")
    return s


BUILDERS = (overview, calls_and_cost, curation, cluster_map, replaceability, candidates, training, evaluation,
            plan, live_guard)
