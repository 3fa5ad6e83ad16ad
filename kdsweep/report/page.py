"""The report as one self-contained page, report.html (issue 13).

Everything is inside the file: the CSS inline, the plots as base64 PNG data
URIs, no script, no font, no link to fetch. So it reads the same offline, sent
by mail, and in MLflow's artifact viewer (which shows it in a sandboxed frame).
Wide tables scroll sideways in their own box; a click on a plot shows it at full
size over the page and a second click puts it back (a checkbox and CSS, no script:
browsers refuse to open a data: URI as a page of its own).
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

import pandas as pd

from kdsweep.common.uris import redact

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1f2328; margin: 2em auto;
       max-width: 1800px; padding: 0 1.5em; }
h1 { font-size: 1.5em; margin-bottom: .2em; }
h2 { font-size: 1.15em; margin: 1.8em 0 .5em; border-bottom: 1px solid #d0d7de; padding-bottom: .2em; }
.meta { color: #57606a; margin-top: 0; }
.warning { background: #fff8c5; border: 1px solid #d4a72c; border-radius: 6px; padding: .5em .8em; margin: .6em 0; }
.scroll { overflow-x: auto; max-width: 100%; padding-bottom: 2px; }  /* a table wider than the window scrolls in its box */
.scroll::-webkit-scrollbar { height: 10px; }
.scroll::-webkit-scrollbar-thumb { background: #b6bec7; border-radius: 5px; }
table { border-collapse: collapse; font-size: 13px; font-variant-numeric: tabular-nums; }
th, td { padding: 4px 8px; border-bottom: 1px solid #d8dee4; text-align: left; white-space: nowrap; vertical-align: top; }
td.params { white-space: normal; min-width: 16em; }
th { background: #f6f8fa; border-bottom: 2px solid #d0d7de; }
th.num, td.num { text-align: right; }
tbody tr:nth-child(even) { background: #fafbfc; }
tbody tr:hover { background: #eef4ff; }
tr.teacher td { color: #57606a; font-style: italic; }
ul { padding-left: 1.3em; }
li { margin: .25em 0; }
.plots { display: flex; flex-wrap: wrap; gap: 1.2em; }
figure { margin: 0; border: 1px solid #d8dee4; border-radius: 6px; padding: .5em; background: #fff; flex: 0 1 600px; }
figure img { display: block; width: 100%; height: auto; cursor: zoom-in; }  /* side by side, one width */
figcaption { color: #57606a; font-size: 12px; margin-top: .3em; }
.caption { color: #57606a; margin: -.2em 0 .5em; }
input.zoom { display: none; }
input.zoom:checked + label { position: fixed; inset: 0; z-index: 10; background: rgba(255, 255, 255, .97);
                             display: flex; align-items: center; justify-content: center; cursor: zoom-out; }
input.zoom:checked + label img { width: auto; height: auto; max-width: 98vw; max-height: 98vh; cursor: zoom-out; }
"""

_NUMERIC = re.compile(r"^[-+–]?[\d.,]+( ± [\d.]+)?$|^–$|^\[[\d., -]+\]$")


def _esc(text) -> str:
    return html.escape(str(text), quote=True)


def table(df: pd.DataFrame) -> str:
    """A display table as HTML: numeric columns right-aligned, the teacher row set apart."""
    cells = df.astype(str).values.tolist()
    numeric = [bool(cells) and all(_NUMERIC.match(r[i]) for r in cells) for i in range(len(df.columns))]
    cls = ['num' if n else ('params' if c == 'params' else '') for c, n in zip(df.columns, numeric)]
    attr = lambda c: f' class="{c}"' if c else ""  # noqa: E731
    head = "".join(f"<th{attr(c)}>{_esc(h)}</th>" for h, c in zip(df.columns, cls))
    rows = []
    for r in cells:
        teacher = ' class="teacher"' if "teacher" in r[:2] else ""
        rows.append(f"<tr{teacher}>" + "".join(f"<td{attr(c)}>{_esc(v)}</td>" for v, c in zip(r, cls)) + "</tr>")
    return f'<div class="scroll"><table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n' + "\n".join(rows) + "\n</tbody></table></div>"


def _caption(path: Path) -> str:
    stem = path.stem
    for prefix, words in (("history_", "optimisation history"), ("importance_", "hyperparameter importances")):
        if stem.startswith(prefix):
            return f"{stem[len(prefix):]}: {words}"
    return {"test_acc": "test accuracy per method", "val_curves": "validation accuracy per epoch of each best trial",
            "cd_diagram": "mean rank over blocks; a bar joins methods not significantly different (Nemenyi)"}.get(stem, stem)


def figure(path: Path, number: int) -> str:
    """A plot, embedded; its hidden checkbox toggles it between its box and the whole window (CSS above)."""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    cap = _esc(_caption(path))
    return (f'<figure><input type="checkbox" class="zoom" id="zoom{number}"><label for="zoom{number}" title="click: full '
            f'size; click again: back"><img src="data:image/png;base64,{data}" alt="{cap}"></label>'
            f'<figcaption>{cap} (click to enlarge)</figcaption></figure>')


def render(rep, plots: list[Path], titles: dict[str, str], methods: list[str], directions: str) -> str:
    """The page: header, warnings, the tables, which method forms ran, notes, plots."""
    s = rep.sel
    title = f"kdsweep report: {s.dataset}, {s.teacher} → {s.student}, seed {s.seed}"
    parts = [f"<h1>{_esc(title)}</h1>",
             f'<p class="meta">MLflow experiment <code>{_esc(s.experiment)}</code> at {_esc(redact(s.tracker.uri))}</p>']
    parts += [f'<div class="warning"><strong>Warning:</strong> {_esc(w)}</div>' for w in rep.warnings]
    for name, heading in titles.items():
        parts.append(f"<h2>{_esc(heading)}</h2>")
        if rep.captions.get(name):
            parts.append(f'<p class="caption">{_esc(rep.captions[name])}</p>')
        parts.append(table(rep.display[name]))
    parts += ["<h2>Methods</h2>", "<ul>" + "".join(f"<li>{_esc(m)}</li>" for m in methods) + "</ul>"]
    parts += ["<h2>Notes</h2>", f"<p>{_esc(directions)}</p>",
              "<ul>" + "".join(f"<li>{_esc(n)}</li>" for n in rep.notes) + "</ul>"]
    if plots:
        parts += ["<h2>Plots</h2>", '<div class="plots">' + "\n".join(figure(p, i) for i, p in enumerate(plots)) + "</div>"]
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{_esc(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n" + "\n".join(parts) + "\n</body>\n</html>\n")


def render_across(title: str, meta: str, tables: dict[str, pd.DataFrame], notes: list[str], plots: list[Path]) -> str:
    """The --across page: the ranking over blocks, its notes, the critical-difference diagram, the blocks."""
    parts = [f"<h1>{_esc(title)}</h1>", f'<p class="meta">{_esc(meta)}</p>']
    parts += ["<ul>" + "".join(f"<li>{_esc(n)}</li>" for n in notes) + "</ul>"]
    if plots:
        parts += ['<div class="plots">' + "\n".join(figure(p, i) for i, p in enumerate(plots)) + "</div>"]
    for heading, df in tables.items():
        parts += [f"<h2>{_esc(heading)}</h2>", table(df)]
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{_esc(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n" + "\n".join(parts) + "\n</body>\n</html>\n")
