"""`render`: one self-contained HTML page of a run's trace (no network, no server, no plotting library).

Each traced sample's response tokens are coloured by alignment (blue along the aggregate gradient, red
against it) or, with the toggle, by magnitude; hovering a token shows its numbers; the summary table of
`analyze` heads the page. Every traced token is one `<span class="tok">` carrying `data-alignment`,
`data-magnitude`, `data-type` and `data-loss`; response tokens that were not traced (llada_sft traces only
the masked ones) are plain grey text.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from llada_trm.training.grad_trace.analysis import HEADLINE, _cell, analyze, load_trace, summary_rows

PAGE_FILE = "grad_trace.html"

STYLE = """
body { font: 14px/1.5 system-ui, sans-serif; margin: 24px; color: #222; }
h1 { font-size: 20px; margin: 0 0 4px; } h2 { font-size: 16px; margin: 24px 0 8px; }
.meta { color: #555; margin-bottom: 12px; }
table { border-collapse: collapse; font-size: 12px; } td, th { padding: 2px 8px; text-align: right; }
td:first-child, th:first-child { text-align: left; } tr:nth-child(even) { background: #f4f4f4; }
.sample { border: 1px solid #ddd; border-radius: 6px; padding: 8px 12px; margin: 8px 0; }
.sample .head { color: #666; font-size: 12px; } .prompt { color: #888; white-space: pre-wrap; font-size: 12px; }
.text { white-space: pre-wrap; font-family: ui-monospace, monospace; font-size: 13px; line-height: 1.9; }
.tok { background: var(--a); border-radius: 2px; cursor: default; }
body.magnitude .tok { background: var(--m); }
.tok:hover { outline: 2px solid #000; }
.ctx { color: #aaa; } .sep { color: #bbb; margin: 0 1px; }
.masked { text-decoration: underline dotted #333; text-underline-offset: 4px; }
.legend span { display: inline-block; width: 28px; height: 12px; vertical-align: middle; }
#info { position: fixed; right: 16px; top: 16px; background: #fff; border: 1px solid #999; padding: 6px 10px;
        font-size: 12px; white-space: pre; min-width: 220px; box-shadow: 0 2px 6px rgba(0,0,0,.2); }
button { margin: 8px 8px 8px 0; }
"""

SCRIPT = """
const info = document.getElementById('info');
function show(el) { info.textContent = el.title; }
document.querySelectorAll('.tok').forEach(el => el.addEventListener('mouseenter', () => show(el)));
function toggle() {
  document.body.classList.toggle('magnitude');
  const byMagnitude = document.body.classList.contains('magnitude');
  document.getElementById('toggle').textContent = byMagnitude ? 'colour by alignment' : 'colour by magnitude';
  document.getElementById('legend-a').hidden = byMagnitude;
  document.getElementById('legend-m').hidden = !byMagnitude;
}
document.getElementById('toggle').addEventListener('click', toggle);
if (location.hash === '#magnitude') toggle();  // open grad_trace.html#magnitude to start coloured by magnitude
"""


def _quantile(values: list[float], q: float) -> float:
    xs = sorted(values)
    return xs[min(len(xs) - 1, int(q * (len(xs) - 1)))] if xs else 0.0


def alignment_colour(value: float | None, scale: float) -> str:
    """Diverging: red (opposing) - white - blue (aligned), saturating at +-scale."""
    if value is None:
        return "#e0e0e0"
    x = max(-1.0, min(1.0, value / scale)) if scale > 0 else 0.0
    if x < 0:
        return f"rgb(255,{int(255 + 165 * x)},{int(255 + 165 * x)})"
    return f"rgb({int(255 - 185 * x)},{int(255 - 130 * x)},255)"  # light enough to read black text on


def magnitude_colour(value: float | None, scale: float) -> str:
    """Sequential: white - orange, saturating at scale."""
    if value is None:
        return "#e0e0e0"
    x = max(0.0, min(1.0, value / scale)) if scale > 0 else 0.0
    return f"rgb(255,{int(255 - 120 * x)},{int(255 - 255 * x)})"


def _tooltip(token: dict) -> str:
    lines = [f"token {token['token']!r} ({token['token_type']})", f"position {token['position']}, chunk {token['chunk']}"
             + ("" if token.get("chunk_masked") is None else (", masked" if token["chunk_masked"] else ", unmasked")),
             f"alignment {_cell(token.get('alignment'), '{:.4f}')}", f"magnitude {_cell(token.get('grad_norm'), '{:.4g}')}",
             f"raw magnitude {_cell(token.get('raw_grad_norm'), '{:.4g}')}", f"loss {_cell(token.get('loss'), '{:.4f}')}",
             f"loss weight {_cell(token.get('loss_weight'), '{:.4g}')}"]
    if token.get("step_alignments"):
        lines.append("per step: " + " ".join(_cell(a, "{:+.3f}") for a in token["step_alignments"]))
    return "\n".join(lines)


def _visible(text: str) -> str:
    """Token text as shown: newlines as a return mark followed by the line break."""
    return html.escape(text).replace("\n", "\u21b5\n")


def _token_span(token: dict, a_scale: float, m_scale: float) -> str:
    style = f"--a:{alignment_colour(token.get('alignment'), a_scale)};--m:{magnitude_colour(token.get('grad_norm'), m_scale)}"
    data = " ".join(f'data-{k}="{html.escape(json.dumps(token.get(f)))}"' for k, f in
                    (("alignment", "alignment"), ("magnitude", "grad_norm"), ("type", "token_type"), ("loss", "loss")))
    masked = " masked" if token.get("chunk_masked") else ""
    return (f'<span class="tok{masked}" style="{style}" {data} title="{html.escape(_tooltip(token))}">'
            f"{_visible(token['token'])}</span>")


def _sample_html(sample: dict, tokens: dict[int, dict], a_scale: float, m_scale: float) -> str:
    parts, chunk = [], None
    for position, text in sample["response"]:
        token = tokens.get(position)
        if token and chunk is not None and token["chunk"] != chunk:
            parts.append('<span class="sep">|</span>')  # chunk boundary
        chunk = token["chunk"] if token else chunk
        parts.append(_token_span(token, a_scale, m_scale) if token else f'<span class="ctx">{_visible(text)}</span>')
    return (f'<div class="sample"><div class="head">step {sample["step"]}, sample {sample["sample_id"]}, '
            f'{len(tokens)} traced tokens</div><details><summary class="prompt">prompt</summary>'
            f'<div class="prompt">{html.escape(sample["prompt"])}</div></details>'
            f'<div class="text">{"".join(parts)}</div></div>')


def _summary_table(result: dict) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in ["group"] + [h for _, h, _ in HEADLINE])
    rows = "".join("<tr><td>" + html.escape(label) + "</td>" + "".join(
        f"<td>{html.escape(_cell(group.get(k), f))}</td>" for k, _, f in HEADLINE) + "</tr>"
        for label, group in summary_rows(result))
    return f"<table><tr>{head}</tr>{rows}</table>"


def _legend(a_scale: float, m_scale: float) -> str:
    def strip(colour, values):
        return "".join(f'<span style="background:{colour(v, 1.0)}"></span>' for v in values)

    a = strip(alignment_colour, [-1, -0.5, 0, 0.5, 1])
    m = strip(magnitude_colour, [0, 0.25, 0.5, 0.75, 1])
    return (f'<div class="legend" id="legend-a">alignment: {-a_scale:.3g} {a} {a_scale:.3g} '
            f'(red: against the micro-batch gradient, blue: along it); dotted underline: masked chunk, '
            f'| between chunks</div>'
            f'<div class="legend" id="legend-m" hidden>magnitude: 0 {m} {m_scale:.3g} and above</div>')


def render_page(run_dir: str | Path) -> str:
    records, result = load_trace(run_dir), analyze(run_dir)
    tokens = records["token"]
    alignments = [abs(t["alignment"]) for t in tokens if t.get("alignment") is not None]
    magnitudes = [t["grad_norm"] for t in tokens if t.get("grad_norm") is not None]
    a_scale, m_scale = _quantile(alignments, 0.98) or 1.0, _quantile(magnitudes, 0.98) or 1.0
    by_sample: dict[tuple, dict[int, dict]] = {}
    for t in tokens:
        by_sample.setdefault((t["step"], t["sample_id"]), {})[t["position"]] = t
    samples = "".join(_sample_html(s, by_sample.get((s["step"], s["sample_id"]), {}), a_scale, m_scale)
                      for s in records["sample"])
    meta = (f"objective {result['objective']}, weighting {result['loss_weighting']}, {result['traces']} traces, "
            f"{result['traced_tokens']} traced tokens; parameters: {', '.join(result['params'] or [])}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Per-token gradient trace</title>"
            f"<style>{STYLE}</style></head><body><h1>Per-token gradient trace: {html.escape(str(run_dir))}</h1>"
            f"<div class='meta'>{html.escape(meta)}</div>{_summary_table(result)}"
            f"<h2>Traced samples</h2><button id='toggle'>colour by magnitude</button>{_legend(a_scale, m_scale)}"
            f"{samples}<div id='info'>hover a token</div><script>{SCRIPT}</script></body></html>")


def write_page(run_dir: str | Path, output: str | Path | None = None) -> Path:
    path = Path(output) if output else Path(run_dir) / PAGE_FILE
    path.write_text(render_page(run_dir))
    return path
