"""The report's page template: inline CSS only, so the HTML file opens anywhere without a network."""

CSS = """
:root { --ink:#1e293b; --muted:#64748b; --line:#e2e8f0; --bg:#f8fafc; --card:#fff; --accent:#2563eb;
        --good:#047857; --goodbg:#d1fae5; --warn:#b45309; --warnbg:#fef3c7; --bad:#b91c1c; --badbg:#fee2e2; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;
       color:var(--ink); background:var(--bg); }
header.top { background:#0f172a; color:#f8fafc; padding:28px 40px 22px; }
header.top h1 { margin:0 0 4px; font-size:24px; letter-spacing:-0.01em; }
header.top p { margin:0; color:#cbd5e1; }
nav.toc { display:flex; flex-wrap:wrap; gap:6px 14px; padding:10px 40px; background:#fff;
          border-bottom:1px solid var(--line); position:sticky; top:0; z-index:2; font-size:13px; }
nav.toc a { color:var(--accent); text-decoration:none; }
main { max-width:1100px; margin:0 auto; padding:24px 40px 60px; }
section { background:var(--card); border:1px solid var(--line); border-radius:10px; padding:20px 24px;
          margin:0 0 20px; }
section h2 { margin:0 0 6px; font-size:18px; }
section p.lead { margin:0 0 14px; color:var(--muted); }
.kpis { display:grid; grid-template-columns:repeat(auto-fit,minmax(170px,1fr)); gap:12px; margin:4px 0 6px; }
.kpi { border:1px solid var(--line); border-radius:8px; padding:12px 14px; background:var(--bg); }
.kpi .v { font-size:22px; font-weight:650; }
.kpi .k { color:var(--muted); font-size:12px; text-transform:uppercase; letter-spacing:0.04em; }
table { border-collapse:collapse; width:100%; margin:8px 0 4px; font-size:13px; }
th, td { text-align:left; padding:6px 8px; border-bottom:1px solid var(--line); vertical-align:top; }
th { color:var(--muted); font-weight:600; font-size:12px; text-transform:uppercase; letter-spacing:0.03em; }
td.n, th.n { text-align:right; font-variant-numeric:tabular-nums; white-space:nowrap; }
tr:hover td { background:#f1f5f9; }
.pill { display:inline-block; white-space:nowrap; padding:1px 8px; border-radius:999px; font-size:12px;
        font-weight:600; }
.pill.good { background:var(--goodbg); color:var(--good); }
.pill.warn { background:var(--warnbg); color:var(--warn); }
.pill.bad { background:var(--badbg); color:var(--bad); }
.pill.mute { background:#e2e8f0; color:#475569; }
.missing { border:1px dashed #cbd5e1; border-radius:8px; padding:12px 14px; color:var(--muted); background:#f8fafc; }
.missing code, code { background:#eef2ff; color:#3730a3; padding:1px 5px; border-radius:4px; font-size:12.5px; }
figure.chart { margin:10px 0 16px; }
figure.chart svg, figure.chart img { width:100%; height:auto; display:block; }
figure.chart figcaption { color:var(--muted); font-size:12px; margin-top:4px; }
.grid2 { display:grid; grid-template-columns:repeat(auto-fit,minmax(420px,1fr)); gap:16px; align-items:start; }
.reasons { margin:0; padding-left:18px; color:#334155; }
.small { font-size:12px; color:var(--muted); }
details { margin:2px 0; font-size:13px; }
details summary { cursor:pointer; color:var(--accent); }
details pre { white-space:pre-wrap; word-break:break-word; background:var(--bg); border:1px solid var(--line);
              border-radius:6px; padding:8px 10px; font-size:12px; margin:6px 0 10px; }
footer { color:var(--muted); font-size:12px; text-align:center; padding:10px 0 30px; }
@media print { nav.toc { position:static; } section { break-inside:avoid; } }
"""
