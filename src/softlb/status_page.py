"""The admin status page: one self-contained HTML page for people (SPEC §5, ``GET /_softlb/``).

No external asset and no framework: inline CSS, and a small inline script that polls the
admin API's ``status`` endpoint every 2 seconds, refreshes the figures and works out request
rates from the difference between two polls. Without JavaScript the page reloads itself every
5 seconds instead (and shows no rates).

Below the backends, "Next pick" shows the pool's explanation (:meth:`Pool.explain()
<softlb.pool.Pool.explain>`): the backend the next request would get, the runners-up with their
scores and why, and every backend skipped with the reason.

Every value is HTML-escaped on the server and set with ``textContent`` by the script: a
backend URL is user input. The inline style and script carry a per-response nonce that the
admin API also puts in the page's Content-Security-Policy, so nothing else can run.
"""

from __future__ import annotations

import html
import re
from collections.abc import Mapping, Sequence
from typing import Any, Final

__all__ = ["POLL_SECONDS", "format_duration", "render_status_page", "server_state"]

#: How often the page's script polls the status endpoint.
POLL_SECONDS: Final = 2

_PLACEHOLDER: Final = re.compile(r"\{\{(\w+)\}\}")


def server_state(server: Mapping[str, Any]) -> str:
    """``"draining"``, ``"up"`` or ``"down"`` for a backend as the admin API reports it."""
    if server.get("draining"):
        return "draining"
    return "up" if server.get("healthy") else "down"


def format_duration(seconds: float) -> str:
    """A short human duration: ``"42s"``, ``"5m 3s"``, ``"2h 5m"``, ``"3d 4h"``."""
    total = int(max(seconds, 0))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _n(value: object) -> str:
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else _e(value)


def _errors_text(errors: Mapping[str, int]) -> str:
    return "  ".join(f"{status}: {count:,}" for status, count in sorted(errors.items())) or "none"


def _rows(servers: Sequence[Mapping[str, Any]], prefix: str) -> str:
    if not servers:
        return (
            '<tr><td colspan="7" class="empty">No backends. Add one with '
            f"<code>POST {_e(prefix)}/servers</code> "
            '<code>{"url": "http://HOST:PORT"}</code>.</td></tr>'
        )
    rows = []
    for server in servers:
        state = server_state(server)
        rows.append(
            "<tr>"
            f'<td><span class="pill {state}">{state}</span></td>'
            f'<td class="url">{_e(server.get("url", ""))}</td>'
            f'<td class="num">{_n(server.get("weight", ""))}</td>'
            f'<td class="num">{_n(server.get("active", ""))}</td>'
            f'<td class="num">{_n(server.get("requests", ""))}</td>'
            '<td class="num">–</td>'
            f'<td class="num">{_n(server.get("failures", ""))}</td>'
            "</tr>"
        )
    return "\n".join(rows)


def _health_text(health: Mapping[str, Any] | None) -> str:
    if not health:
        return "Active health checks are off."
    return (
        f"Health checks: <code>GET {_e(health.get('path', '/'))}</code> every "
        f"{_e(health.get('interval', '?'))}s, timeout {_e(health.get('timeout', '?'))}s, "
        f"rise {_e(health.get('rise', '?'))}, fall {_e(health.get('fall', '?'))}."
    )


def _score(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "–"
    if isinstance(value, int) or float(value).is_integer():
        return f"{int(value):,}"
    return f"{value:.4g}"


def _explain_rows(explain: Mapping[str, Any] | None, prefix: str) -> str:
    if not explain:
        return '<tr><td colspan="4" class="empty">No explanation available.</td></tr>'
    candidates: Sequence[Mapping[str, Any]] = explain.get("candidates") or []
    if not candidates:
        return (
            '<tr><td colspan="4" class="empty">Nothing in rotation: '
            "requests get 503 until a backend is back.</td></tr>"
        )
    rows = []
    for cand in candidates:
        mark = '<span class="pill next">next</span>' if cand.get("chosen") else ""
        rows.append(
            "<tr>"
            f"<td>{mark}</td>"
            f'<td class="url">{_e(cand.get("url", ""))}</td>'
            f'<td class="num">{_e(_score(cand.get("score")))}</td>'
            f'<td class="why">{_e(cand.get("why", ""))}</td>'
            "</tr>"
        )
    omitted = explain.get("omitted") or 0
    if omitted:
        rows.append(
            f'<tr><td colspan="4" class="empty">and {_n(omitted)} more: '
            f"<code>GET {_e(prefix)}/explain</code></td></tr>"
        )
    return "\n".join(rows)


def _skipped_text(explain: Mapping[str, Any] | None) -> str:
    skipped: Sequence[Mapping[str, Any]] = (explain or {}).get("skipped") or []
    if not skipped:
        return "Skipped: none, every member is in rotation."
    return "Skipped: " + "; ".join(f"{s.get('url', '')} ({s.get('reason', '')})" for s in skipped)


def _store_text(state: Mapping[str, Any] | None) -> str:
    """The warning shown while the shared state store cannot be reached (SPEC §7), else ""."""
    if not state or not state.get("stale"):
        return ""
    error = state.get("error") or "no answer"
    return (
        f"State is stale: the {state.get('store', 'state')} store cannot be reached ({error}). "
        "Traffic goes on with the last known backends and health; admin changes are refused."
    )


def render_status_page(status: Mapping[str, Any], *, prefix: str, nonce: str) -> str:
    """Return the page for ``status`` (the admin API's ``GET {prefix}/status`` document).

    ``nonce`` must be the one named in the response's Content-Security-Policy.
    """
    servers: Sequence[Mapping[str, Any]] = status.get("servers", [])
    proxy: Mapping[str, Any] = status.get("proxy", {})
    in_rotation = sum(1 for s in servers if server_state(s) == "up")
    in_flight = sum(int(s.get("active", 0)) for s in servers)
    values = {
        "version": _e(status.get("version", "")),
        "algorithm": _e(status.get("algorithm", "")),
        "uptime": _e(format_duration(float(status.get("uptime_seconds", 0)))),
        "rotation": f"{in_rotation} / {len(servers)}",
        "in_flight": _n(in_flight),
        "requests": _n(proxy.get("requests", 0)),
        "retries": _n(proxy.get("retries", 0)),
        "errors": _e(_errors_text(proxy.get("errors", {}))),
        "rows": _rows(servers, prefix),
        "health": _health_text(status.get("health_check")),
        "explain_summary": _e((status.get("explain") or {}).get("summary", "")),
        "explain_rows": _explain_rows(status.get("explain"), prefix),
        "explain_skipped": _e(_skipped_text(status.get("explain"))),
        "store_text": _e(_store_text(status.get("state"))),
        "store_hidden": "" if _store_text(status.get("state")) else " hidden",
        "nonce": _e(nonce),
        "prefix": _e(prefix),
        "poll_ms": str(POLL_SECONDS * 1000),
    }
    # One pass, so that a value holding "{{...}}" (a backend URL may) is never expanded.
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], _TEMPLATE)


_TEMPLATE: Final = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>softlb status</title>
<noscript><meta http-equiv="refresh" content="5"></noscript>
<style nonce="{{nonce}}">
:root {
  --bg: #f6f8fa; --panel: #ffffff; --text: #1f2328; --muted: #656d76; --line: #d0d7de;
  --up: #1a7f37; --up-bg: #dafbe1; --down: #cf222e; --down-bg: #ffebe9;
  --drain: #9a6700; --drain-bg: #fff8c5; --accent: #0969da;
}
@media (prefers-color-scheme: dark) {
  :root {
    --bg: #0d1117; --panel: #161b22; --text: #e6edf3; --muted: #8d96a0; --line: #30363d;
    --up: #3fb950; --up-bg: #12261e; --down: #f85149; --down-bg: #2d1517;
    --drain: #d29922; --drain-bg: #2b2111; --accent: #4493f8;
  }
}
* { box-sizing: border-box; }
body {
  margin: 0; background: var(--bg); color: var(--text);
  font: 14px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
}
header {
  display: flex; align-items: baseline; gap: 12px; padding: 16px 24px;
  background: var(--panel); border-bottom: 1px solid var(--line);
}
header h1 { margin: 0; font-size: 20px; }
.muted { color: var(--muted); }
.live { margin-left: auto; font-size: 12px; color: var(--muted); }
.live::before {
  content: ""; display: inline-block; width: 8px; height: 8px; border-radius: 50%;
  margin-right: 6px; background: var(--muted);
}
.live.ok::before { background: var(--up); }
.live.stale { color: var(--down); }
.live.stale::before { background: var(--down); }
main { max-width: 1100px; margin: 0 auto; padding: 24px; }
.cards {
  display: grid; grid-template-columns: repeat(auto-fill, minmax(150px, 1fr)); gap: 12px;
  margin-bottom: 24px;
}
.card {
  background: var(--panel); border: 1px solid var(--line); border-radius: 8px;
  padding: 12px 14px;
}
.card .label {
  font-size: 12px; color: var(--muted); text-transform: uppercase; letter-spacing: .04em;
}
.card .value { font-size: 22px; font-weight: 600; font-variant-numeric: tabular-nums; }
.card .value.small { font-size: 15px; padding-top: 6px; }
table {
  width: 100%; border-collapse: collapse; background: var(--panel);
  border: 1px solid var(--line); border-radius: 8px; overflow: hidden;
}
th, td { padding: 9px 14px; text-align: left; border-bottom: 1px solid var(--line); }
th {
  font-size: 12px; color: var(--muted); text-transform: uppercase; letter-spacing: .04em;
  font-weight: 600;
}
tr:last-child td { border-bottom: 0; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
td.url {
  font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; word-break: break-all;
}
td.empty { color: var(--muted); text-align: center; padding: 24px; }
.pill {
  display: inline-block; min-width: 72px; text-align: center; padding: 1px 10px;
  border-radius: 999px; font-size: 12px; font-weight: 600;
}
.pill.up { color: var(--up); background: var(--up-bg); }
.pill.down { color: var(--down); background: var(--down-bg); }
.pill.draining { color: var(--drain); background: var(--drain-bg); }
.pill.next { min-width: 0; color: var(--accent); border: 1px solid var(--accent); }
h2 { font-size: 15px; margin: 28px 0 4px; }
h2 + p { margin: 0 0 10px; }
td.why { color: var(--muted); font-size: 13px; }
footer { margin-top: 16px; color: var(--muted); font-size: 13px; }
footer a { color: var(--accent); }
.banner { margin: 0 0 16px; padding: 10px 14px; border-radius: 6px;
  background: var(--down-bg); color: var(--down); border: 1px solid var(--down); }
code { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 12px; }
</style>
</head>
<body>
<header>
  <h1>softlb</h1><span class="muted">version {{version}}</span>
  <span id="live" class="live">snapshot</span>
</header>
<main>
<p id="store" class="banner"{{store_hidden}}>{{store_text}}</p>
<section class="cards">
  <div class="card"><div class="label">In rotation</div>
    <div class="value" id="rotation">{{rotation}}</div></div>
  <div class="card"><div class="label">In flight</div>
    <div class="value" id="in_flight">{{in_flight}}</div></div>
  <div class="card"><div class="label">Requests/s</div>
    <div class="value" id="rate">–</div></div>
  <div class="card"><div class="label">Requests</div>
    <div class="value" id="requests">{{requests}}</div></div>
  <div class="card"><div class="label">Retries</div>
    <div class="value" id="retries">{{retries}}</div></div>
  <div class="card"><div class="label">Proxy errors</div>
    <div class="value small" id="errors">{{errors}}</div></div>
  <div class="card"><div class="label">Algorithm</div>
    <div class="value small" id="algorithm">{{algorithm}}</div></div>
  <div class="card"><div class="label">Uptime</div>
    <div class="value small" id="uptime">{{uptime}}</div></div>
</section>
<table>
  <thead><tr>
    <th>State</th><th>Backend</th><th class="num">Weight</th><th class="num">In flight</th>
    <th class="num">Requests</th><th class="num">Req/s</th><th class="num">Failures</th>
  </tr></thead>
  <tbody id="servers" data-prefix="{{prefix}}">
{{rows}}
  </tbody>
</table>
<section id="explain">
  <h2>Next pick</h2>
  <p class="muted" id="explain_summary">{{explain_summary}}</p>
  <table>
    <thead><tr>
      <th></th><th>Backend</th><th class="num">Score</th><th>Why</th>
    </tr></thead>
    <tbody id="explain_rows">
{{explain_rows}}
    </tbody>
  </table>
  <p class="muted" id="explain_skipped">{{explain_skipped}}</p>
</section>
<footer>
  <p>{{health}}</p>
  <p>JSON: <a href="servers">{{prefix}}/servers</a> · <a href="status">{{prefix}}/status</a>
    · <a href="explain">{{prefix}}/explain</a>
    · Prometheus: <a href="metrics">{{prefix}}/metrics</a></p>
</footer>
</main>
<script nonce="{{nonce}}">
(function () {
  "use strict";
  var POLL_MS = {{poll_ms}};
  var previous = null;
  var live = document.getElementById("live");

  function num(n) { return typeof n === "number" ? n.toLocaleString("en-US") : "–"; }
  function rate(r) {
    return r === null ? "–" : (r < 10 ? r.toFixed(1) : Math.round(r).toLocaleString("en-US"));
  }
  function state(s) { return s.draining ? "draining" : (s.healthy ? "up" : "down"); }
  function duration(sec) {
    var t = Math.max(0, Math.floor(sec)), d = Math.floor(t / 86400),
        h = Math.floor(t % 86400 / 3600), m = Math.floor(t % 3600 / 60), s = t % 60;
    return d ? d + "d " + h + "h" : h ? h + "h " + m + "m" : m ? m + "m " + s + "s" : s + "s";
  }
  function set(id, text) { document.getElementById(id).textContent = text; }
  function cell(row, text, cls) {
    var td = document.createElement("td");
    if (cls) { td.className = cls; }
    td.textContent = text;
    row.appendChild(td);
    return td;
  }

  function score(v) {
    if (typeof v !== "number") { return "–"; }
    return Number.isInteger(v) ? v.toLocaleString("en-US") : String(Number(v.toPrecision(4)));
  }
  function renderExplain(ex, prefix) {
    if (!ex) { return; }
    var rows = document.createDocumentFragment(), candidates = ex.candidates || [];
    candidates.forEach(function (c) {
      var row = document.createElement("tr"), first = cell(row, "");
      if (c.chosen) {
        var pill = document.createElement("span");
        pill.className = "pill next";
        pill.textContent = "next";
        first.appendChild(pill);
      }
      cell(row, c.url, "url");
      cell(row, score(c.score), "num");
      cell(row, c.why || "", "why");
      rows.appendChild(row);
    });
    var note = !candidates.length
      ? "Nothing in rotation: requests get 503 until a backend is back."
      : ex.omitted ? "and " + num(ex.omitted) + " more: GET " + prefix + "/explain" : "";
    if (note) {
      var extra = document.createElement("tr");
      cell(extra, note, "empty").colSpan = 4;
      rows.appendChild(extra);
    }
    document.getElementById("explain_rows").replaceChildren(rows);
    set("explain_summary", ex.summary || "");
    var skipped = (ex.skipped || []).map(function (s) { return s.url + " (" + s.reason + ")"; });
    set("explain_skipped", skipped.length ? "Skipped: " + skipped.join("; ")
      : "Skipped: none, every member is in rotation.");
  }

  function render(data, now) {
    var servers = data.servers || [], proxy = data.proxy || {}, up = 0, flight = 0, total = 0;
    var dt = previous ? (now - previous.at) / 1000 : 0;
    var body = document.getElementById("servers");
    var rows = document.createDocumentFragment();
    var seen = {};
    servers.forEach(function (s) {
      var st = state(s), r = null, before = previous && previous.requests[s.url];
      if (st === "up") { up += 1; }
      flight += s.active || 0;
      total += s.requests || 0;
      seen[s.url] = s.requests;
      if (dt > 0 && typeof before === "number" && s.requests >= before) {
        r = (s.requests - before) / dt;
      }
      var row = document.createElement("tr");
      var pill = document.createElement("span");
      pill.className = "pill " + st;
      pill.textContent = st;
      cell(row, "").appendChild(pill);
      cell(row, s.url, "url");
      cell(row, num(s.weight), "num");
      cell(row, num(s.active), "num");
      cell(row, num(s.requests), "num");
      cell(row, rate(r), "num");
      cell(row, num(s.failures), "num");
      rows.appendChild(row);
    });
    if (!servers.length) {
      var empty = document.createElement("tr");
      cell(empty, "No backends. Add one with POST " + body.dataset.prefix + "/servers.", "empty")
        .colSpan = 7;
      rows.appendChild(empty);
    }
    body.replaceChildren(rows);
    set("rotation", up + " / " + servers.length);
    set("in_flight", num(flight));
    set("requests", num(proxy.requests));
    set("retries", num(proxy.retries));
    var errors = proxy.errors || {}, parts = Object.keys(errors).sort().map(function (k) {
      return k + ": " + num(errors[k]);
    });
    set("errors", parts.length ? parts.join("  ") : "none");
    set("algorithm", data.algorithm || "");
    set("uptime", duration(data.uptime_seconds || 0));
    set("rate", dt > 0 && previous.total <= total ? rate((total - previous.total) / dt) : "–");
    previous = {at: now, requests: seen, total: total};
    renderExplain(data.explain, body.dataset.prefix);
    var store = document.getElementById("store"), st = data.state || {};
    if (st.stale) {
      store.textContent = "State is stale: the " + (st.store || "state") + " store cannot be " +
        "reached (" + (st.error || "no answer") + "). Traffic goes on with the last known " +
        "backends and health; admin changes are refused.";
      store.hidden = false;
    } else {
      store.hidden = true;
    }
  }

  function poll() {
    fetch("status", {cache: "no-store", credentials: "same-origin"})
      .then(function (resp) {
        if (!resp.ok) { throw new Error("HTTP " + resp.status); }
        return resp.json();
      })
      .then(function (data) {
        render(data, Date.now());
        live.className = "live ok";
        live.textContent = "live, every " + POLL_MS / 1000 + " s";
      })
      .catch(function (err) {
        live.className = "live stale";
        live.textContent = "stale: " + err.message;
      })
      .then(function () { window.setTimeout(poll, POLL_MS); });
  }
  poll();
})();
</script>
</body>
</html>
"""
