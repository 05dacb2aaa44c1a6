"""The admin status page: one self-contained HTML page for people (SPEC §5, ``GET /_softlb/``).

No external asset and no framework: inline CSS, and a small inline script that polls the
admin API's ``status`` endpoint every 2 seconds, refreshes the figures and works out request
rates from the difference between two polls. Without JavaScript the page reloads itself every
5 seconds instead (and shows no rates).

Per backend the page shows its state, weight, requests in flight and rates, its latency
(peak-EWMA, and the median times to first and last byte), its answers by status class, its
failures, its last health check and, when it is out of rotation, since when and why. Two
controls per backend call ``PATCH {prefix}/servers`` with ``fetch()`` from the same origin:
drain/undrain, and a weight field. The browser sends the credentials it logged in with (Basic
auth) by itself. The cards on top add the queue of requests waiting for a backend below its
``max_connections``.

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
import time
from collections.abc import Mapping, Sequence
from typing import Any, Final

from softlb.backend import MAX_WEIGHT

__all__ = [
    "POLL_SECONDS",
    "format_duration",
    "format_seconds",
    "render_status_page",
    "server_state",
]

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


def format_seconds(seconds: object) -> str:
    """A latency for people: ``"850 µs"``, ``"12.3 ms"``, ``"1.25 s"``; ``"–"`` if unknown."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        return "–"
    if seconds < 0.001:
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 1:
        return f"{seconds * 1000:.3g} ms"
    return f"{seconds:.3g} s"


def _clock(epoch: float) -> str:
    return time.strftime("%H:%M:%S UTC", time.gmtime(epoch))


def _check_text(health: Mapping[str, Any] | None, now: float) -> str:
    """ "pass 3s ago (HTTP 200)", or "" before the first probe / without health checks."""
    if not health or not isinstance(health.get("checked_at"), (int, float)):
        return ""
    result = "pass" if health.get("check_ok") else "fail"
    detail = health.get("check_detail") or ""
    age = format_duration(now - float(health["checked_at"]))
    return f"{result} {age} ago" + (f" ({detail})" if detail else "")


def _down_text(server: Mapping[str, Any], now: float, skipped: Mapping[str, str]) -> str:
    """ "down since 19:04:03 UTC (1m 5s): HTTP 500" for a backend out of rotation, else ""."""
    if server_state(server) != "down":
        return ""
    health = server.get("health") or {}
    since = health.get("down_since")
    reason = health.get("down_reason") or skipped.get(str(server.get("url", ""))) or ""
    if isinstance(since, (int, float)):
        text = f"down since {_clock(since)} ({format_duration(now - since)})"
    else:
        text = "down"
    return text + (f": {reason}" if reason else "")


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _n(value: object) -> str:
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else _e(value)


def _errors_text(errors: Mapping[str, int]) -> str:
    return "  ".join(f"{status}: {count:,}" for status, count in sorted(errors.items())) or "none"


#: Columns of the backends table (the empty-table row spans them all).
_COLUMNS: Final = 14


def _answers(server: Mapping[str, Any]) -> list[str]:
    responses: Mapping[str, Any] = server.get("responses") or {}
    return [_n(responses.get(kind, 0)) for kind in ("2xx", "3xx", "4xx", "5xx")]


def _rows(servers: Sequence[Mapping[str, Any]], prefix: str, now: float, explain: Any) -> str:
    if not servers:
        return (
            f'<tr><td colspan="{_COLUMNS}" class="empty">No backends. Add one with '
            f"<code>POST {_e(prefix)}/servers</code> "
            '<code>{"url": "http://HOST:PORT"}</code>.</td></tr>'
        )
    skipped = {
        str(s.get("url", "")): str(s.get("reason", ""))
        for s in ((explain or {}).get("skipped") or [])
    }
    rows = []
    for server in servers:
        state = server_state(server)
        url = _e(server.get("url", ""))
        weight = server.get("weight", "")
        draining = bool(server.get("draining"))
        first, last = server.get("first_byte_p50"), server.get("last_byte_p50")
        check = _check_text(server.get("health"), now)
        down = _down_text(server, now, skipped)
        answers = "".join(f'<td class="num">{count}</td>' for count in _answers(server))
        rows.append(
            f'<tr data-url="{url}">'
            f'<td><span class="pill {state}">{state}</span></td>'
            f'<td class="url">{url}</td>'
            f'<td class="num"><input class="weight" type="number" min="1" max="{MAX_WEIGHT}" '
            f'value="{_e(weight)}" aria-label="weight of {url}" data-url="{url}">'
            f'<button type="button" data-action="weight" data-url="{url}">Set</button></td>'
            f'<td class="num">{_n(server.get("active", ""))}</td>'
            f'<td class="num">{_n(server.get("requests", ""))}</td>'
            '<td class="num">–</td>'
            f'<td class="num">{_e(format_seconds(server.get("latency_seconds")))}'
            f'<span class="sub">p50 {_e(format_seconds(first))} / '
            f"{_e(format_seconds(last))}</span></td>"
            f"{answers}"
            f'<td class="num">{_n(server.get("failures", ""))}</td>'
            f'<td class="health"><span class="check">{_e(check) or "–"}</span>'
            f'<span class="down">{_e(down)}</span></td>'
            f'<td><button type="button" data-action="drain" data-url="{url}" '
            f'data-draining="{"false" if draining else "true"}">'
            f"{'Undrain' if draining else 'Drain'}</button></td>"
            "</tr>"
        )
    return "\n".join(rows)


def _queue_text(queue: Mapping[str, Any] | None) -> str:
    """The queue card's small print: the oldest wait and the counters."""
    queue = queue or {}
    return (
        f"oldest {format_seconds(queue.get('oldest_wait', 0))} · "
        f"{_n(queue.get('queued', 0))} queued · {_n(queue.get('timed_out', 0))} timed out"
    )


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
    now = status.get("time")
    if isinstance(now, bool) or not isinstance(now, (int, float)):
        now = time.time()
    queue: Mapping[str, Any] = status.get("queue") or {}
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
        "rows": _rows(servers, prefix, float(now), status.get("explain")),
        "queue": _n(queue.get("waiting", 0)),
        "queue_text": _e(_queue_text(queue)),
        "columns": str(_COLUMNS),
        "max_weight": str(MAX_WEIGHT),
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
main { max-width: 1500px; margin: 0 auto; padding: 24px; }
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
.card .sub { font-size: 11px; }
table {
  width: 100%; border-collapse: collapse; background: var(--panel);
  border: 1px solid var(--line); border-radius: 8px; overflow: hidden;
}
th, td { padding: 8px 10px; text-align: left; border-bottom: 1px solid var(--line); }
th {
  font-size: 12px; color: var(--muted); text-transform: uppercase; letter-spacing: .04em;
  font-weight: 600;
}
tr:last-child td { border-bottom: 0; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
td.url {
  font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; white-space: nowrap;
}
td.num { white-space: nowrap; }
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
td .sub { display: block; font-size: 11px; color: var(--muted); white-space: nowrap; }
td.health { font-size: 12px; max-width: 260px; }
td.health .check, td.health .down { display: block; }
td.health .down { color: var(--down); font-weight: 600; }
input.weight {
  width: 64px; padding: 2px 4px; font: inherit; text-align: right; color: var(--text);
  background: var(--bg); border: 1px solid var(--line); border-radius: 4px;
}
button {
  margin-left: 4px; padding: 2px 8px; font: inherit; font-size: 12px; cursor: pointer;
  color: var(--accent); background: var(--panel); border: 1px solid var(--line); border-radius: 4px;
}
button:disabled { cursor: wait; opacity: .6; }
#action { min-height: 21px; margin: 8px 0 0; font-size: 13px; }
#action.error { color: var(--down); }
.tablewrap { overflow-x: auto; }
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
  <div class="card"><div class="label">Queue</div>
    <div class="value" id="queue">{{queue}}</div>
    <div class="sub muted" id="queue_text">{{queue_text}}</div></div>
  <div class="card"><div class="label">Algorithm</div>
    <div class="value small" id="algorithm">{{algorithm}}</div></div>
  <div class="card"><div class="label">Uptime</div>
    <div class="value small" id="uptime">{{uptime}}</div></div>
</section>
<div class="tablewrap">
<table>
  <thead><tr>
    <th>State</th><th>Backend</th><th class="num">Weight</th><th class="num">In flight</th>
    <th class="num">Requests</th><th class="num">Req/s</th>
    <th class="num" title="peak-EWMA; p50 to first / last byte">Latency</th>
    <th class="num">2xx</th><th class="num">3xx</th><th class="num">4xx</th><th class="num">5xx</th>
    <th class="num">Failures</th><th>Health check</th><th></th>
  </tr></thead>
  <tbody id="servers" data-prefix="{{prefix}}" data-columns="{{columns}}"
    data-max-weight="{{max_weight}}">
{{rows}}
  </tbody>
</table>
</div>
<p id="action" class="muted" role="status"></p>
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
  // Absolute URLs without the user:password a person may have typed in the address bar:
  // fetch() refuses a URL resolved against one. The browser still sends the credentials the
  // page was loaded with (its Basic auth cache covers this path).
  var here = location.origin + location.pathname;
  function api(name) { return new URL(name, here).href; }

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
  function secs(v) {
    if (typeof v !== "number") { return "–"; }
    if (v < 0.001) { return Math.round(v * 1e6) + " µs"; }
    if (v < 1) { return String(Number((v * 1000).toPrecision(3))) + " ms"; }
    return String(Number(v.toPrecision(3))) + " s";
  }
  function clock(epoch) { return new Date(epoch * 1000).toISOString().slice(11, 19) + " UTC"; }
  function checkText(h, now) {
    if (!h || typeof h.checked_at !== "number") { return "–"; }
    return (h.check_ok ? "pass " : "fail ") + duration(now - h.checked_at) + " ago" +
      (h.check_detail ? " (" + h.check_detail + ")" : "");
  }
  function downText(s, now, skipped) {
    if (state(s) !== "down") { return ""; }
    var h = s.health || {}, why = h.down_reason || skipped[s.url] || "";
    var text = typeof h.down_since === "number"
      ? "down since " + clock(h.down_since) + " (" + duration(now - h.down_since) + ")" : "down";
    return text + (why ? ": " + why : "");
  }
  function button(td, label, action, url) {
    var b = document.createElement("button");
    b.type = "button";
    b.textContent = label;
    b.dataset.action = action;
    b.dataset.url = url;
    td.appendChild(b);
    return b;
  }
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

  function render(data, at) {
    var servers = data.servers || [], proxy = data.proxy || {}, up = 0, flight = 0, total = 0;
    var dt = previous ? (at - previous.at) / 1000 : 0;
    var now = typeof data.time === "number" ? data.time : at / 1000, skipped = {};
    ((data.explain || {}).skipped || []).forEach(function (k) { skipped[k.url] = k.reason; });
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
      row.dataset.url = s.url;
      var pill = document.createElement("span");
      pill.className = "pill " + st;
      pill.textContent = st;
      cell(row, "").appendChild(pill);
      cell(row, s.url, "url");
      var weightCell = cell(row, "", "num"), input = document.createElement("input");
      input.className = "weight";
      input.type = "number";
      input.min = "1";
      input.max = body.dataset.maxWeight;
      input.value = String(s.weight);
      input.dataset.url = s.url;
      input.setAttribute("aria-label", "weight of " + s.url);
      weightCell.appendChild(input);
      button(weightCell, "Set", "weight", s.url);
      cell(row, num(s.active), "num");
      cell(row, num(s.requests), "num");
      cell(row, rate(r), "num");
      var lat = cell(row, secs(s.latency_seconds), "num"), sub = document.createElement("span");
      sub.className = "sub";
      sub.textContent = "p50 " + secs(s.first_byte_p50) + " / " + secs(s.last_byte_p50);
      lat.appendChild(sub);
      ["2xx", "3xx", "4xx", "5xx"].forEach(function (k) {
        cell(row, num((s.responses || {})[k] || 0), "num");
      });
      cell(row, num(s.failures), "num");
      var health = cell(row, "", "health"), check = document.createElement("span"),
          down = document.createElement("span");
      check.className = "check";
      check.textContent = checkText(s.health, now);
      down.className = "down";
      down.textContent = downText(s, now, skipped);
      health.appendChild(check);
      health.appendChild(down);
      button(cell(row, ""), s.draining ? "Undrain" : "Drain", "drain", s.url)
        .dataset.draining = s.draining ? "false" : "true";
      rows.appendChild(row);
    });
    if (!servers.length) {
      var empty = document.createElement("tr");
      cell(empty, "No backends. Add one with POST " + body.dataset.prefix + "/servers.", "empty")
        .colSpan = Number(body.dataset.columns);
      rows.appendChild(empty);
    }
    // Keep a weight being typed in across the refresh.
    var focused = document.activeElement, typing = null;
    if (focused && focused.classList && focused.classList.contains("weight")) {
      typing = {url: focused.dataset.url, value: focused.value};
    }
    body.replaceChildren(rows);
    if (typing) {
      body.querySelectorAll("input.weight").forEach(function (el) {
        if (el.dataset.url === typing.url) { el.value = typing.value; el.focus(); }
      });
    }
    var queue = data.queue || {};
    set("queue", num(queue.waiting || 0));
    set("queue_text", "oldest " + secs(queue.oldest_wait || 0) + " · " + num(queue.queued || 0) +
      " queued · " + num(queue.timed_out || 0) + " timed out");
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
    previous = {at: at, requests: seen, total: total};
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

  function refresh() {
    return fetch(api("status"), {cache: "no-store", credentials: "same-origin"})
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
      });
  }
  function poll() {
    refresh().then(function () { window.setTimeout(poll, POLL_MS); });
  }

  // The controls: PATCH {prefix}/servers from this origin, with the page's credentials.
  var note = document.getElementById("action");
  function patch(change, done) {
    note.className = "muted";
    note.textContent = "sending…";
    fetch(api("servers"), {
      method: "PATCH",
      cache: "no-store",
      credentials: "same-origin",
      headers: {"Content-Type": "application/json"},
      body: JSON.stringify(change)
    })
      .then(function (resp) {
        return resp.json().then(function (doc) {
          if (!resp.ok) { throw new Error(doc.error || "HTTP " + resp.status); }
          return doc;
        });
      })
      .then(function (doc) {
        note.textContent = doc.url + ": " + (doc.draining ? "draining" : "in rotation when " +
          "healthy") + ", weight " + doc.weight;
      })
      .catch(function (err) {
        note.className = "error";
        note.textContent = change.url + ": " + err.message;
      })
      .then(function () { done(); return refresh(); });
  }
  document.getElementById("servers").addEventListener("click", function (ev) {
    var b = ev.target.closest("button[data-action]");
    if (!b) { return; }
    var change = {url: b.dataset.url};
    if (b.dataset.action === "drain") {
      change.draining = b.dataset.draining === "true";
    } else {
      var input = b.parentNode.querySelector("input.weight");
      var w = Number(input.value);
      if (!Number.isInteger(w) || w < Number(input.min) || w > Number(input.max)) {
        note.className = "error";
        note.textContent = "weight must be a whole number from " + input.min + " to " + input.max;
        return;
      }
      change.weight = w;
    }
    b.disabled = true;
    patch(change, function () { b.disabled = false; });
  });
  document.getElementById("servers").addEventListener("keydown", function (ev) {
    if (ev.key === "Enter" && ev.target.classList.contains("weight")) {
      ev.target.parentNode.querySelector("button[data-action=weight]").click();
    }
  });
  poll();
})();
</script>
</body>
</html>
"""
