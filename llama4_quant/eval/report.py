"""Verification reports: report.json (everything), report.md (a table for a PR), report.html with PNG plots."""

from __future__ import annotations

import html
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from ..fsutil import write_text_atomic  # noqa: E402


def _short(path: str) -> str:
    return Path(path).name or str(path)


def _markdown(result: dict) -> str:
    r = result["reference"]
    lines = [
        "# llama4-quant verification report",
        "",
        f"Data: `{result['data']}`, ctx {r['ctx']}, {r['chunks']} chunks, {r['tokens']} scored tokens "
        "(llama-perplexity protocol).",
        "",
        f"Reference `{r['path']}`: perplexity **{r['perplexity']:.4f}**",
        "",
        "| candidate | PPL | ΔPPL % | KLD mean | KLD p99 | top-1 % | max layer err | verdict |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for c in result["candidates"]:
        verdict = "✅ pass" if c["passed"] else "❌ " + "; ".join(c["failures"])
        lines.append(
            f"| `{_short(c['path'])}` | {c['perplexity']:.4f} | {c['ppl_increase_pct']:+.3f} | {c['kld_mean']:.6f} | "
            f"{c['kld_p99']:.6f} | {100 * c['top1_agreement']:.2f} | {max(c['layer_error'] or [0]):.4f} | {verdict} |"
        )
    t = result["thresholds"]
    ppl_t = "none" if t["max_ppl_increase_pct"] is None else f"{t['max_ppl_increase_pct']}%"
    kld_t = "none" if t["max_kld"] is None else f"{t['max_kld']}"
    lines += ["", f"Thresholds: max ppl increase {ppl_t}, max mean KLD {kld_t}.",
              f"Overall: **{'PASS' if result['passed'] else 'FAIL'}**", ""]
    return "\n".join(lines)


def _save(fig, ax, out: Path, name: str, title: str, xlabel: str, ylabel: str) -> str:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"{name}.png", dpi=110)
    plt.close(fig)
    return f"{name}.png"


def _plots(result: dict, out: Path) -> dict[str, str]:
    files = {}
    cands = result["candidates"]
    if cands:
        fig, ax = plt.subplots(figsize=(7, 3.6))
        for k, c in enumerate(cands):
            color = f"C{k}"
            ax.plot(range(len(c["layer_error"])), c["layer_error"], marker="o", color=color,
                    label=f"{_short(c['path'])}: layer alone (reference input)")
            ax.plot(range(len(c["stream_error"])), c["stream_error"], linestyle="--", color=color,
                    label=f"{_short(c['path'])}: accumulated (own hidden states)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        files["layer_error"] = _save(fig, ax, out, "layer_error", "Per-layer error vs reference", "decoder layer",
                                     "relative output error")

        fig, ax = plt.subplots(figsize=(7, 3.6))
        positive = [v for c in cands for v in c.get("kld_values", []) if v > 0]
        lo, hi = (max(min(positive), 1e-9), max(positive)) if positive else (1e-9, 1e-8)
        bins = np.logspace(np.log10(lo), np.log10(hi * 1.01), 40)
        for c in cands:
            vals = [max(v, lo) for v in c.get("kld_values", [])]
            zero = sum(1 for v in c.get("kld_values", []) if v <= 0)
            label = _short(c["path"]) + (f" ({zero} tokens with KLD 0)" if zero else "")
            ax.hist(vals, bins=bins, alpha=0.5, label=label)
        ax.set_xscale("log")
        files["kld_hist"] = _save(fig, ax, out, "kld_hist", "KL divergence from reference",
                                  "KL divergence per token (nats, log scale)", "tokens")

    fig, ax = plt.subplots(figsize=(7, 3.6))
    ref = result["reference"]
    ax.plot(ref["per_chunk_ppl"], marker="o", color="black", label=f"reference {_short(ref['path'])}")
    for c in cands:
        ax.plot(c["per_chunk_ppl"], marker=".", label=_short(c["path"]))
    files["ppl_chunks"] = _save(fig, ax, out, "ppl_chunks", "Perplexity per chunk", "chunk", "perplexity")
    return files


def _html(result: dict, plots: dict[str, str]) -> str:
    r = result["reference"]
    rows = "".join(
        f"<tr class='{'ok' if c['passed'] else 'bad'}'><td>{html.escape(_short(c['path']))}</td><td>{c['perplexity']:.4f}</td>"
        f"<td>{c['ppl_increase_pct']:+.3f}%</td><td>{c['kld_mean']:.6f}</td><td>{c['kld_p99']:.6f}</td>"
        f"<td>{100 * c['top1_agreement']:.2f}%</td><td>{'pass' if c['passed'] else html.escape('; '.join(c['failures']))}</td></tr>"
        for c in result["candidates"]
    )
    imgs = "".join(f"<figure><img src='{f}' alt='{k}'><figcaption>{k.replace('_', ' ')}</figcaption></figure>" for k, f in plots.items())
    verdict = "PASS" if result["passed"] else "FAIL"
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>llama4-quant report</title>
<style>body{{font-family:system-ui,sans-serif;max-width:960px;margin:2em auto;color:#222}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}
td:first-child{{text-align:left}}tr.bad{{background:#fdd}}tr.ok{{background:#efe}}
figure{{display:inline-block;margin:1em 0}}img{{max-width:100%}}.v{{font-weight:bold}}</style></head><body>
<h1>llama4-quant verification report</h1>
<p>Data <code>{html.escape(result['data'])}</code>, ctx {r['ctx']}, {r['chunks']} chunks, {r['tokens']} scored tokens
(llama-perplexity protocol). Reference <code>{html.escape(str(r['path']))}</code>: perplexity <b>{r['perplexity']:.4f}</b>.</p>
<table><tr><th>candidate</th><th>PPL</th><th>ΔPPL</th><th>KLD mean</th><th>KLD p99</th><th>top-1</th><th>verdict</th></tr>{rows}</table>
<p class="v">Overall: {verdict}</p>{imgs}</body></html>"""


def write_report(result: dict, out: Path) -> dict[str, Path]:
    """Write the report files into `out` (created; files written to temp names then renamed)."""
    out.mkdir(parents=True, exist_ok=True)
    plots = _plots(result, out)
    md = _markdown(result)
    written = {}
    for name, text in (("report.json", json.dumps(result, indent=2, default=str)), ("report.md", md),
                       ("report.html", _html(result, plots))):
        write_text_atomic(out / name, text)
        written[name.split(".")[1]] = out / name
    for k, f in plots.items():
        written[k] = out / f
    return written
