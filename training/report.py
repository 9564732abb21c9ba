"""``protomask report``: one self-contained HTML page per run (or runs side by side) plus its PNGs.

The page holds the test metrics table, training curves (inline SVG: no plotting library), the
prototype gallery and local explanations of each run, and the shard manifest summary. Everything it
links is written beside it, so the folder can be copied or served as is.
"""

from __future__ import annotations

import csv
import html
import json
from pathlib import Path

from pipeline.manifest import format_inspect, inspect

CURVES = ("train_loss", "train_accuracy", "val_accuracy", "val_balanced_accuracy")
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd")


def _svg_curves(rows: list[dict], width: int = 720, height: int = 180) -> str:
    """Per-epoch curves of ``CURVES`` (each scaled to its own range), phases shaded by label."""
    epochs = [int(r["epoch"]) for r in rows]
    if not epochs:
        return "<p>no epochs recorded</p>"
    x_of = {e: 40 + (width - 60) * (i / max(len(epochs) - 1, 1)) for i, e in enumerate(epochs)}
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + 40}" role="img">',
             f'<rect x="40" y="10" width="{width - 60}" height="{height - 20}" fill="none" stroke="#999"/>']
    for name, colour in zip(CURVES, COLOURS):
        values = [(x_of[int(r["epoch"])], float(r[name])) for r in rows if r.get(name) not in (None, "")]
        if not values:
            continue
        lo, hi = min(v for _, v in values), max(v for _, v in values)
        span = hi - lo or 1.0
        points = " ".join(f"{x:.1f},{10 + (height - 20) * (1 - (v - lo) / span):.1f}" for x, v in values)
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{points}">'
                     f"<title>{name}: {lo:.3g} … {hi:.3g}</title></polyline>")
    legend = " · ".join(f'<tspan fill="{c}">{n}</tspan>' for n, c in zip(CURVES, COLOURS))
    parts.append(f'<text x="40" y="{height + 10}" font-size="12">{legend} (each scaled to its range), '
                 f"epochs {epochs[0]}–{epochs[-1]}</text></svg>")
    return "".join(parts)


def _metrics_table(results: dict[str, dict]) -> str:
    names = list(results)
    keys = [k for k, v in results[names[0]].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    body = "".join(
        f"<tr><td>{k}</td>" + "".join(f"<td>{results[n].get(k, float('nan')):.4g}</td>" for n in names) + "</tr>"
        for k in keys
    )
    return f"<table><tr><th>metric</th>{head}</tr>{body}</table>"


def write_report(runs: dict[str, Path], out: Path) -> Path:
    """Evaluate (if needed) and explain every run, then write ``out/index.html``; returns its path."""
    from training.evaluate import metrics_file
    from training.explain import run_explain
    from training.export import require_run
    from training.train import run_evaluate

    for run_dir in runs.values():  # before anything is written
        require_run(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    results, sections, shards = {}, [], None
    for i, (name, run_dir) in enumerate(runs.items()):
        meta = json.loads((run_dir / "model_config.json").read_text())
        shards = Path(meta["shards"])
        saved = metrics_file(run_dir, "test")
        results[name] = json.loads(saved.read_text())["test"] if saved.is_file() else run_evaluate(run_dir, shards)
        folder = f"run{i}"
        summary = run_explain(run_dir, shards, out / folder, limit=4)
        rows = list(csv.DictReader((run_dir / "metrics.csv").open())) if (run_dir / "metrics.csv").is_file() else []
        gallery = "".join(f'<figure><img src="{folder}/{g}" alt="{html.escape(g)}"><figcaption>{html.escape(g)}'
                          "</figcaption></figure>" for g in summary["gallery"])
        explanations = "".join(
            f'<figure><img src="{folder}/{e["png"]}" alt="explanation {e["key"]}"><figcaption>{e["key"]}: '
            f'{html.escape(e["label"])} → {html.escape(e["predicted"])}</figcaption></figure>'
            for e in summary["explanations"]
        )
        sections.append(
            f'<section id="{folder}"><h2>{html.escape(name)} <small>({html.escape(str(run_dir))}, regions='
            f'{html.escape(meta["model"]["regions"])})</small></h2><h3>Training curves</h3>{_svg_curves(rows)}'
            f'<h3>Prototype gallery</h3><p>Each prototype beside the training image region it was pushed onto.</p>'
            f'<div class="grid">{gallery}</div><h3>Explanations</h3><p>Top prototypes of test images: the '
            f'matched region outlined (saliency is zero outside it), the prototype\'s source beside it.</p>'
            f'<div class="grid">{explanations}</div></section>'
        )
    manifest = html.escape(format_inspect(inspect(shards))) if shards else ""
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>protomask report</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 8px;text-align:right}}td:first-child{{text-align:left}}
.grid{{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start}}figure{{margin:0}}
img{{max-width:360px;border:1px solid #ddd}}pre{{background:#f6f6f6;padding:1em;overflow:auto}}</style>
</head><body><h1>protomask report</h1>
<nav>{" · ".join(f'<a href="#run{i}">{html.escape(n)}</a>' for i, n in enumerate(runs))} · <a href="#shards">shards</a></nav>
<h2>Test metrics</h2>{_metrics_table(results)}
<p>part_hit_rate: share of correctly classified test images whose top prototype's region overlaps the
ground-truth discriminative part (synthetic data only).</p>
{"".join(sections)}
<section id="shards"><h2>Shards</h2><pre>{manifest}</pre></section>
</body></html>
"""
    path = out / "index.html"
    path.write_text(page)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return path
