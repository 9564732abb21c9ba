"""``protomask report``: one self-contained HTML page per run (or runs side by side) plus its PNGs.

Per run the page holds: training curves (inline SVG, no plotting library: axes with ticks, a legend and
a shaded band per training phase; accuracy and every loss term of ``metrics.csv``), the test confusion
matrix and per-class accuracy (``metrics_test.json``'s confusion matrix), the config and data lineage
(train and model config, shard manifest, sha256 of ``model.pt``, code version, run time), the
prototype gallery with suspect prototypes flagged, and local explanations; then the test metrics of all
runs in the paper's table layout (runs that share a name, e.g. seeds, as mean ± std) and the shard manifest
summary. Everything it links is written beside it, so the folder can be
copied or served as is.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
from collections import defaultdict
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

import numpy as np

from pipeline.manifest import format_inspect, inspect, load_card
from pipeline.masks import WHOLE_IMAGE
from schemas.config import LOSS_TERMS, TrainConfig, load_config
from schemas.storage import Location, modified, read_text, read_text_if_present, sha256
from schemas.version import CODE_VERSION
from training.metrics import OUR_COLUMNS, PAPER_METRICS

TABLE = {**PAPER_METRICS, **OUR_COLUMNS}  # the columns of the paper's table, ours last

ACCURACY = ("train_accuracy", "val_accuracy", "val_balanced_accuracy")
LOSSES = ("train_loss", *(f"train_{term}" for term in LOSS_TERMS))
COLOURS, DASHES = ("#1f77b4", "#d62728", "#2ca02c"), ("none", "none", "5 3")  # per series of a chart
PHASES = {"pretrain": "#e8e8e8", "warmup": "#fdf0c8", "joint": "#dde9f7", "last_layer": "#dcefd9"}
FULL_MATRIX = 30  # classes up to which the whole confusion matrix is drawn; above: the most confused pairs
CONFUSED_PAIRS = 10


def _ticks(lo: float, hi: float, *, count: int = 5, integer: bool = False) -> list[float]:
    """Round tick values covering [lo, hi]: steps of 1, 2, 2.5 or 5 × 10^k (whole numbers if ``integer``)."""
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    raw = (hi - lo) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    if integer:
        step = max(1, round(step))
    first = math.floor(lo / step + 1e-9) * step
    return [first + i * step for i in range(math.ceil((hi - first) / step - 1e-9) + 1)]


def _label(value: float, step: float) -> str:
    """A tick value with as many decimals as the step needs."""
    decimals = next(d for d in range(8) if abs(step * 10 ** d - round(step * 10 ** d)) < 1e-6)
    return "0" if abs(value) < step * 1e-6 else f"{value:.{decimals}f}"


def _phase_spans(rows: list[dict]) -> list[tuple[str, int, int]]:
    """(phase, first epoch, last epoch) of each run of consecutive epochs in one phase."""
    spans: list[tuple[str, int, int]] = []
    for row in rows:
        epoch = int(row["epoch"])
        if spans and spans[-1][0] == row["phase"]:
            spans[-1] = (row["phase"], spans[-1][1], epoch)
        else:
            spans.append((row["phase"], epoch, epoch))
    return spans


def _series(rows: list[dict], name: str) -> list[list[tuple[int, float]]]:
    """The (epoch, value) runs of one column, split where it is empty (a phase without that term)."""
    runs: list[list[tuple[int, float]]] = [[]]
    for row in rows:
        if row.get(name) in (None, ""):
            runs.append([])
        else:
            runs[-1].append((int(row["epoch"]), float(row[name])))
    return [r for r in runs if r]


def _svg_chart(title: str, rows: list[dict], names: list[str], *, percent: bool = False, width: int = 380) -> str:
    """One chart: ``names``' columns over epochs, x and y axes with ticks, phase bands (labelled above the plot
    where they are wide enough, and in the legend), a legend."""
    left, right, top, plot_h = 52, 10, 38, 150
    plot_w = width - left - right
    series = {n: _series(rows, n) for n in names}
    values = [v * (100 if percent else 1) for runs in series.values() for run in runs for _, v in run]
    epochs = [int(r["epoch"]) for r in rows]
    y_ticks = _ticks(0, 100) if percent else _ticks(min(0.0, *values), max(values))
    y_lo, y_hi = y_ticks[0], y_ticks[-1]
    x_lo, x_hi = epochs[0] - 0.5, epochs[-1] + 0.5

    def x(e: float) -> float:
        return left + plot_w * (e - x_lo) / (x_hi - x_lo)

    def y(v: float) -> float:
        return top + plot_h * (1 - (v - y_lo) / (y_hi - y_lo))

    out = [f'<text x="{left}" y="14" font-size="13" font-weight="bold">{html.escape(title)}</text>']
    for phase, first, last in _phase_spans(rows):
        x0, x1 = x(first - 0.5), x(last + 0.5)
        out.append(f'<rect class="phase" data-phase="{html.escape(phase)}" x="{x0:.1f}" y="{top}" '
                   f'width="{x1 - x0:.1f}" height="{plot_h}" fill="{PHASES.get(phase, "#f2f2f2")}">'
                   f"<title>{html.escape(phase)}: epochs {first}–{last}</title></rect>")
        if x1 - x0 >= 6 * len(phase):
            out.append(f'<text class="phase-label" x="{(x0 + x1) / 2:.1f}" y="{top - 5}" text-anchor="middle" '
                       f'fill="#555">{html.escape(phase)}</text>')
    y_step = y_ticks[1] - y_ticks[0]
    for v in y_ticks:
        out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#fff"/>'
                   f'<line x1="{left - 4}" x2="{left}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#333"/>'
                   f'<text class="ytick" x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end">'
                   f'{_label(v, y_step)}{" %" if percent else ""}</text>')
    for e in _ticks(epochs[0], epochs[-1], count=6, integer=True):
        if x_lo <= e <= x_hi:
            out.append(f'<line x1="{x(e):.1f}" x2="{x(e):.1f}" y1="{top + plot_h}" y2="{top + plot_h + 4}" '
                       f'stroke="#333"/><text class="xtick" x="{x(e):.1f}" y="{top + plot_h + 16}" '
                       f'text-anchor="middle">{int(e)}</text>')
    out.append(f'<path d="M{left},{top}V{top + plot_h}H{left + plot_w}" fill="none" stroke="#333"/>'
               f'<text x="{left + plot_w / 2:.1f}" y="{top + plot_h + 30}" text-anchor="middle">epoch</text>')
    for (name, runs), colour, dash in zip(series.items(), COLOURS, DASHES):
        for run in runs:
            xy = [(x(e), y(v * (100 if percent else 1))) for e, v in run]
            points = " ".join(f"{a:.1f},{b:.1f}" for a, b in xy)
            out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" stroke-dasharray="{dash}" '
                       f'points="{points}"><title>{name}</title></polyline>' if len(run) > 1 else
                       f'<circle cx="{xy[0][0]:.1f}" cy="{xy[0][1]:.1f}" r="2.5" fill="{colour}"/>')
    entries = [(f'<line x1="0" x2="16" y1="-4" y2="-4" stroke="{c}" stroke-width="2" stroke-dasharray="{d}"/>', n, c)
               for n, c, d in zip(names, COLOURS, DASHES) if series[n]]
    entries += [(f'<rect x="0" y="-10" width="16" height="10" fill="{PHASES.get(p, "#f2f2f2")}" stroke="#bbb"/>', p,
                 "#555") for p in dict.fromkeys(r["phase"] for r in rows)]
    lx, ly = left, top + plot_h + 48
    out.append('<g class="legend">')
    for mark, name, colour in entries:
        span = 22 + 6 * len(name) + 14
        if lx + span > width and lx > left:
            lx, ly = left, ly + 16
        out.append(f'<g transform="translate({lx:.0f},{ly})">{mark}<text x="21" fill="{colour}">'
                   f"{html.escape(name)}</text></g>")
        lx += span
    return (f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{width}" height="{ly + 8}" role="img" '
            f'aria-label="{html.escape(title)}" font-family="sans-serif" font-size="11">{"".join(out)}</g></svg>')


def _curves(rows: list[dict]) -> str:
    """An accuracy chart (0–100 %) and one chart per loss term that ``metrics.csv`` holds."""
    if not rows:
        return "<p>no epochs recorded (no metrics.csv)</p>"
    present = [n for n in (*ACCURACY, *LOSSES) if _series(rows, n)]
    charts = []
    if accuracy := [n for n in ACCURACY if n in present]:
        charts.append(_svg_chart("accuracy", rows, accuracy, percent=True))
    charts += [_svg_chart(n, rows, [n]) for n in LOSSES if n in present]
    return f'<div class="charts">{"".join(charts)}</div>'


def _share_colour(share: float, correct: bool) -> str:
    return f"rgba({'31,119,180' if correct else '214,39,40'},{share:.2f})"


def _confusion_html(matrix: np.ndarray, classes: list[str]) -> str:
    """The confusion matrix (rows true, columns predicted, coloured by row share) up to ``FULL_MATRIX``
    classes, else the ``CONFUSED_PAIRS`` most confused pairs; then per-class accuracy, worst first."""
    n = matrix.sum(1)
    share = matrix / np.maximum(n, 1)[:, None]
    accuracy = np.trace(matrix) / max(matrix.sum(), 1)
    parts = [f"<p>{matrix.sum()} test images, accuracy {accuracy:.1%} (metrics_test.json).</p>"]
    if len(classes) <= FULL_MATRIX:
        head = "".join(f'<th title="{html.escape(c)}">{j}</th>' for j, c in enumerate(classes))
        body = "".join(
            f'<tr><th>{i} {html.escape(c)}</th>' + "".join(
                f'<td data-count="{matrix[i, j]}" style="background:{_share_colour(share[i, j], i == j)};'
                f'color:{"#fff" if share[i, j] > 0.55 else "#000"}" title="true {html.escape(c)}, predicted '
                f'{html.escape(classes[j])}: {matrix[i, j]} ({share[i, j]:.0%})">{matrix[i, j] or ""}</td>'
                for j in range(len(classes))) + f"<td>{n[i]}</td></tr>"
            for i, c in enumerate(classes))
        parts.append('<p>Rows: true class, columns: predicted class (by index); colour: share of the row (blue '
                     'correct, red confused).</p><div class="wide"><table class="confusion">'
                     f"<tr><th>true \\ predicted</th>{head}<th>n</th></tr>{body}</table></div>")
    else:
        off = matrix.copy()
        np.fill_diagonal(off, 0)
        order = np.argsort(-off, axis=None, kind="stable")[:CONFUSED_PAIRS]
        pairs = [divmod(int(k), len(classes)) for k in order if off.flat[k] > 0]
        rows = "".join(f"<tr><td>{html.escape(classes[i])}</td><td>{html.escape(classes[j])}</td>"
                       f"<td>{matrix[i, j]}</td><td>{share[i, j]:.0%}</td></tr>" for i, j in pairs)
        parts.append(f'<p>{len(classes)} classes: the {CONFUSED_PAIRS} most confused pairs instead of the full '
                     f'matrix.</p><table class="pairs"><tr><th>true</th><th>predicted</th><th>images</th>'
                     f"<th>share of true class</th></tr>{rows}</table>")
    recall = np.where(n > 0, np.diag(matrix) / np.maximum(n, 1), np.nan)
    worst_first = sorted(range(len(classes)), key=lambda i: (n[i] == 0, recall[i], i))
    off = matrix - np.diag(np.diag(matrix))
    rows = "".join(
        f"<tr><td>{i} {html.escape(classes[i])}</td><td>{n[i]}</td><td>{matrix[i, i]}</td>"
        f"<td>{'–' if n[i] == 0 else f'{recall[i]:.1%}'}</td><td>"
        + (f"{html.escape(classes[int(off[i].argmax())])} ({off[i].max()})" if off[i].max() else "–") + "</td></tr>"
        for i in worst_first)
    parts.append('<div class="scroll"><table class="per-class"><caption>per-class accuracy (recall), worst first'
                 "</caption><tr><th>class</th><th>test images</th><th>correct</th><th>accuracy</th>"
                 f"<th>most often predicted instead</th></tr>{rows}</table></div>")
    return "".join(parts)


def _run_time(run_dir: Location) -> str:
    """Wall time from file times: train_config.yaml (written at each start) to model.pt (written at the end)."""
    seconds = modified(run_dir / "model.pt") - modified(run_dir / "train_config.yaml")
    events = run_dir / "events.jsonl"
    resumes = sum('"resume"' in line for line in (read_text_if_present(events) or "").splitlines())
    since = f", since the last of {resumes + 1} starts" if resumes else ""
    if seconds < 0:
        return "unknown (model.pt is older than train_config.yaml: files copied or rewritten)"
    return (f"{timedelta(seconds=round(seconds))} (file times: train_config.yaml written → model.pt written"
            f"{since})")


def lineage(run_dir: Location, rows: list[dict]) -> list[tuple[str, str]]:
    """(field, value) rows: what was trained on what, with which config and code, and how long it took."""
    meta = json.loads(read_text(run_dir / "model_config.json"))
    config = load_config(TrainConfig, run_dir / "train_config.yaml", {})
    shards = Location.parse(meta["shards"])
    card = load_card(shards)
    m, s, d = config.model, config.schedule, config.data
    lrs = ", ".join(f"{k.removeprefix('lr_')} {getattr(s, k):g}" for k in
                    ("lr_warmup", "lr_backbone", "lr_addon", "lr_prototypes", "lr_last_layer"))
    epochs = " · ".join(f"{p} {getattr(s, f'{p}_epochs')}" for p in PHASES)
    speed = [float(r["images_per_s"]) for r in rows if r.get("images_per_s")]
    return [
        ("run directory", str(run_dir)),
        ("model.pt sha256", sha256(run_dir / "model.pt")),
        ("run time", _run_time(run_dir)),
        ("epochs recorded (metrics.csv)", f"{len(rows)}" + (f", mean {np.mean(speed):.1f} images/s" if speed else "")),
        ("code version (this report)", CODE_VERSION),
        ("model format version", str(meta["format_version"])),
        ("backbone", f"{m.backbone} (weights: {m.weights or 'none'})"),
        ("head · regions", f"{m.head} · {m.regions}" + (f" ({m.patch_grid}² grid)" if m.regions == "patches"
                                                         else "")),
        ("input size", f"{m.input_size} px"),
        ("prototypes", f"{m.prototypes_per_class} per class × {len(meta['classes'])} classes, "
                       f"{meta['num_prototypes']} kept, dimension {m.prototype_dim}"),
        ("epochs per phase", epochs),
        ("batch size", f"{d.batch_size} images per step (micro-batch {d.micro_batch or 'from the memory budget'})"),
        ("learning rates", lrs),
        ("loss weights", ", ".join(f"{k} {v:g}" for k, v in config.loss.model_dump().items()
                                   if not isinstance(v, bool))),
        ("seed · workers", f"{config.seed} · {config.num_workers} {'GPU' if config.use_gpu else 'CPU'} workers"),
        ("validation share · augmentation", f"{d.val_fraction:g} · {d.augment}"),
        ("shards", str(shards)),
        ("shards config_hash", card.config_hash),
        ("shards format · code version", f"{card.format_version} · {card.code_version}"),
        ("shards created · source", f"{card.created} · {card.source} (shuffle seed {card.shuffle_seed})"),
        ("segmenter", f"{card.segmenter.name} {json.dumps(card.segmenter.params, sort_keys=True)}"),
        ("segmenter checkpoint sha256", card.segmenter.checkpoint_sha256 or "none (weight-free)"),
        ("masks per image", str(card.masks_per_image) + ("" if card.max_box_fraction == 1 else
                                                          f" (boxes up to {card.max_box_fraction:.0%} of the image)")),
        ("samples", f"{card.counts['ok']} ok, {card.counts['failed']} failed of {card.counts['inputs']} inputs; "
                    + ", ".join(f"{k} {v['ok']}" for k, v in card.per_split.items())),
    ]


def _lineage_html(rows: list[tuple[str, str]]) -> str:
    body = "".join(f"<tr><th>{html.escape(k)}</th><td><code>{html.escape(v)}</code></td></tr>" for k, v in rows)
    return f'<table class="lineage">{body}</table>'


def _flagged_html(prototypes: list[dict]) -> str:
    """The gallery's flagged prototypes as a list."""
    flagged = [p for p in prototypes if p["flags"]]
    checked = any(p["on_part"] is not None for p in prototypes)
    note = "" if checked else " The shards carry no ground-truth parts, so no prototype is checked for off-part."
    if not flagged:
        return f"<p>No prototype flagged ({len(prototypes)} checked).{note}</p>"
    items = "".join(
        f'<li><span class="flag">● {html.escape(", ".join(p["flags"]))}</span>: p{p["prototype"]} '
        f'({html.escape(p["class"])}) pushed onto {p["key"]}, mask {p["mask_index"]} of class '
        f'{html.escape(p["source_class"])}, distance {p["distance"]:.4g}</li>' for p in flagged)
    return (f"<p>{len(flagged)} of {len(prototypes)} prototypes flagged: pushed onto an image of another class "
            f"(other class), onto a region that misses its class's ground-truth part 1 (off-part), or onto a region "
            f"whose box covers {WHOLE_IMAGE:.0%} of the image or more, so that it points at no part (whole image)."
            f"{note}</p>"
            f'<ul class="flagged">{items}</ul>')


def aggregate(results: dict[str, list[dict]]) -> dict[str, dict]:
    """Per model (its runs: seeds), the mean and, over two or more runs, the sample standard deviation (pandas'
    ``describe``, as the reference's tables) of every numeric metric the runs share."""
    out = {}
    for name, runs in results.items():
        keys = [k for k, v in runs[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                and all(k in r for r in runs)]
        values = {k: np.array([float(r[k]) for r in runs]) for k in keys}
        out[name] = {"runs": len(runs), "mean": {k: float(v.mean()) for k, v in values.items()}}
        if len(runs) > 1:
            out[name]["std"] = {k: float(v.std(ddof=1)) for k, v in values.items()}
    return out


def format_value(summary: dict, key: str, factor: int) -> str:
    """``mean ± std`` of one metric of one model in the paper's units (×``factor``), or "–" when it has none."""
    if key not in summary["mean"]:
        return "–"
    digits = (lambda v: f"{v:.1f}") if factor == 100 else (lambda v: f"{v:.3g}")
    spread = f" ± {digits(factor * summary['std'][key])}" if "std" in summary else ""
    return f"{digits(factor * summary['mean'][key])}{spread}"


def _cell(summary: dict, key: str, factor: int) -> str:
    return f"<td>{format_value(summary, key, factor)}</td>"


def paper_markdown(summaries: dict[str, dict]) -> str:
    """The paper's table as Markdown: a row per model, its metrics in its units (``aggregate``'s summaries)."""
    keys = [k for k in TABLE if any(k in s["mean"] for s in summaries.values())]
    head = [f"{TABLE[k][0]}{' ×100' if TABLE[k][2] != 1 else ''}" for k in keys]
    lines = ["| model | runs | " + " | ".join(head) + " |", "|---|---|" + "---|" * len(keys)]
    lines += [f"| {name} | {s['runs']} | " + " | ".join(format_value(s, k, TABLE[k][2]) for k in keys) + " |"
              for name, s in summaries.items()]
    return "\n".join(lines)


def _metrics_tables(summaries: dict[str, dict]) -> str:
    """The paper's table (a row per model, its metrics grouped by family, in its units) and ours below it (a row
    per metric, a column per model)."""
    present = {k for s in summaries.values() for k in s["mean"]}
    paper = [k for k in TABLE if k in present]
    families = list(dict.fromkeys(TABLE[k][1] for k in paper))
    spans = "".join(f'<th colspan="{sum(TABLE[k][1] == f for k in paper)}">{f}</th>' for f in families)
    names = "".join(f"<th>{TABLE[k][0]}{' (×100)' if TABLE[k][2] != 1 else ''}</th>" for k in paper)
    rows = "".join(f"<tr><td>{html.escape(n)} ({s['runs']} run{'s' if s['runs'] > 1 else ''})</td>"
                   + "".join(_cell(s, k, TABLE[k][2]) for k in paper) + "</tr>" for n, s in summaries.items())
    ours = [k for s in summaries.values() for k in s["mean"] if k not in TABLE]
    head = "".join(f"<th>{html.escape(n)}</th>" for n in summaries)
    body = "".join(f"<tr><td>{k}</td>" + "".join(_cell(s, k, 1) for s in summaries.values()) + "</tr>"
                   for k in dict.fromkeys(ours))
    return (f'<div class="wide"><table class="paper"><tr><th rowspan="2">model</th>{spans}</tr><tr>{names}</tr>'
            f'{rows}</table></div>'
            f"<p>Mean ± sample standard deviation over each model's runs (seeds), in the paper's units; Accuracy, "
            f"top-3 and F1 are class-balanced (spec §7.1). The saliency metrics (VLC, IOR, overlaps, consistency) use "
            f"each image's top-5 prototypes by similarity and PRP relevance where the backbone supports it.</p>"
            f"<h3>All metrics</h3><table><tr><th>metric</th>{head}</tr>{body}</table>")


STYLE = """body{font-family:sans-serif;margin:2em;max-width:1220px}table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}td:first-child,th{text-align:left}
.lineage td{text-align:left}.lineage code{word-break:break-all}
.wide{overflow-x:auto}.confusion{font-size:12px}.confusion td{text-align:center;min-width:1.5em;padding:1px 2px}
.confusion th{white-space:nowrap;padding:1px 4px}.paper td{white-space:nowrap}.per-class caption{text-align:left;color:#555}
.scroll{max-height:32em;overflow:auto;display:inline-block}.charts{display:flex;flex-wrap:wrap;gap:8px}
.grid{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start}figure{margin:0}
.explanations figure{max-width:590px}.explanations img{width:100%}img{max-width:100%;border:1px solid #ddd}
.flagged{list-style:none;padding-left:1em}.flag{color:#d7191c;font-weight:bold}
pre{background:#f6f6f6;padding:1em;overflow:auto}"""


def write_report(runs: Sequence[tuple[str, Location | Path]], out: Path) -> Path:
    """Evaluate (if needed) and explain every run (name, run directory: a path or an S3 prefix), then write
    ``out/index.html`` (a local folder); runs that share a name (seeds of one model) are one row of the tables,
    as mean ± std. Returns the page's path."""
    from training.evaluate import metrics_file
    from training.explain import run_explain
    from training.export import require_run
    from training.train import run_evaluate

    runs = [(name, Location.parse(run_dir)) for name, run_dir in runs]
    for _, run_dir in runs:  # before anything is written
        require_run(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict]] = defaultdict(list)
    sections, shards = [], None
    for i, (name, run_dir) in enumerate(runs):
        meta = json.loads(read_text(run_dir / "model_config.json"))
        shards = Location.parse(meta["shards"])
        saved = metrics_file(run_dir, "test")
        found = read_text_if_present(saved)
        test = {} if found is None else json.loads(found)["test"]
        if "confusion" not in test:  # an older run: evaluate it once, into metrics_test.json
            test = run_evaluate(run_dir, shards)
        results[name].append({k: v for k, v in test.items() if k != "confusion"})
        matrix, classes = np.array(test["confusion"]), meta["classes"]
        folder = f"run{i}"
        history = run_dir / "metrics.csv"
        rows = list(csv.DictReader(io.StringIO(read_text_if_present(history) or "", newline="")))
        prototypes = ""
        if meta["model"]["head"] != "linear":  # a black-box has no prototypes to show
            summary = run_explain(run_dir, shards, out / folder, limit=4, relevance="gradient")
            gallery = "".join(f'<figure><a href="{folder}/{g}"><img src="{folder}/{g}" alt="{html.escape(g)}"></a>'
                              "</figure>" for g in summary["gallery"])
            explanations = "".join(
                f'<figure><a href="{folder}/{e["png"]}"><img src="{folder}/{e["png"]}" alt="explanation {e["key"]}">'
                f'</a><figcaption>{e["key"]}: {html.escape(e["label"])} → {html.escape(e["predicted"])}</figcaption>'
                "</figure>" for e in summary["explanations"]
            )
            prototypes = (
                f'<h3>Prototype gallery</h3><p>Each prototype beside the training image region it was pushed onto, '
                f'with that image\'s class and the push distance.</p>{_flagged_html(summary["prototypes"])}'
                f'<div class="grid">{gallery}</div><h3>Explanations</h3><p>Top prototypes of test images: the '
                f'matched mask outlined with its saliency (gradient × input of the prototype\'s similarity, zero '
                f'outside the mask) as a heatmap, beside the training image region the prototype was pushed onto.</p>'
                f'<div class="grid explanations">{explanations}</div>'
            )
        sections.append(
            f'<section id="{folder}"><h2>{html.escape(name)} <small>({html.escape(str(run_dir))}, regions='
            f'{html.escape(meta["model"]["regions"])})</small></h2>'
            f'<h3>Training curves</h3><p>Per epoch, from metrics.csv; the background shows the training phase.</p>'
            f'{_curves(rows)}<h3>Test confusion and per-class accuracy</h3>'
            f'{_confusion_html(matrix, classes)}'
            f'<h3>Config and data lineage</h3>{_lineage_html(lineage(run_dir, rows))}{prototypes}</section>'
        )
    manifest = html.escape(format_inspect(inspect(shards))) if shards else ""
    summaries = aggregate(results)
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>protomask report</title>
<style>{STYLE}</style>
</head><body><h1>protomask report</h1>
<nav>{" · ".join(f'<a href="#run{i}">{html.escape(n)}</a>' for i, (n, _) in enumerate(runs))} · <a href="#shards">shards</a></nav>
<h2>Test metrics</h2>{_metrics_tables(summaries)}
<p>part_hit_rate: share of correctly classified test images whose top prototype's region overlaps the
ground-truth discriminative part (synthetic data only).</p>
{"".join(sections)}
<section id="shards"><h2>Shards</h2><pre>{manifest}</pre></section>
</body></html>
"""
    path = out / "index.html"
    path.write_text(page)
    (out / "results.json").write_text(json.dumps({n: {**summaries[n], "metrics": results[n]} for n in results},
                                                 indent=1))
    return path
