"""The benchmark report as markdown: the times table, the targets table and the scaling fits."""

from __future__ import annotations

__all__ = ["fmt_ratio", "fmt_time", "markdown", "scaling_lines", "tables"]


def fmt_time(s: dict | None) -> str:
    if not s:
        return "n/a"
    m = s["median"]
    if m < 1e-3:
        return f"{m * 1e6:.0f} us"
    return f"{m * 1e3:.1f} ms" if m < 1 else f"{m:.2f} s"


def fmt_ratio(r: dict | None) -> str:
    return "n/a" if not r else f"{r['median']:.2f}x ({r['min']:.2f}-{r['max']:.2f})"


def tables(report: dict) -> tuple[list[str], list[str]]:
    """The main table and the targets, as markdown lines."""
    main = [
        "| benchmark | workload | vqref | peer | peer time | peer / vqref | floor (matmul) | vqref / floor |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        if row["name"] == "scaling":
            continue
        times, ratios = row["times"], row["ratios"]
        peers = [p for p in ("vqp", "sklearn", "faiss", "vqref-ste") if p in times]
        if row["name"] == "kmeans":
            peers = [p for p in ("sklearn", "faiss") if p in times] or ["sklearn"]
        if not peers:
            peers = ["-"]
        for i, p in enumerate(peers):
            if p == "-":
                peer_t, pr = "-", "-"
            elif p in ("sklearn", "faiss"):
                peer_t = fmt_time(times.get(p))
                r = ratios.get(f"vqref/{p}")
                pr = "n/a" if r is None else f"{1 / r['median']:.2f}x ({1 / r['max']:.2f}-{1 / r['min']:.2f})"
            elif p == "vqref-ste":
                peer_t = fmt_time(times.get(p))
                pr = fmt_ratio(
                    {
                        k: 1 / v
                        for k, v in zip(
                            ("median", "min", "max"),
                            (
                                ratios["vqref/vqref-ste"]["median"],
                                ratios["vqref/vqref-ste"]["max"],
                                ratios["vqref/vqref-ste"]["min"],
                            ),
                        )
                    }
                )
            else:
                peer_t = fmt_time(times.get(p))
                pr = fmt_ratio(ratios.get(f"{p}/vqref"))
            first = i == 0
            main.append(
                f"| {row['name'] if first else ''} | {row['workload'] if first else ''} | {fmt_time(times.get('vqref')) if first else ''} "
                f"| {p} | {peer_t} | {pr} | {fmt_time(times.get('floor')) if first else ''} | {fmt_ratio(ratios.get('vqref/floor')) if first else ''} |"
            )
    tgt = ["| benchmark | target | measured | met |", "|---|---|---|---|"]
    for row in report["rows"]:
        for t in row["targets"]:
            met = "n/a" if t["met"] is None else ("yes" if t["met"] else "**no**")
            tgt.append(f"| {row['name']} | {t['target']} | {t['shown']} | {met} |")
    return main, tgt


def scaling_lines(report: dict) -> list[str]:
    rows = [r for r in report["rows"] if r["name"] == "scaling"]
    if not rows:
        return []
    out = [
        "| axis | N | K | D | vqref | floor (matmul) | vqref / floor | vqref ns per N*K |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in rows[0]["points"]:
        out.append(
            f"| {p['axis']} | {p['N']} | {p['K']} | {p['D']} | {fmt_time(dict(median=p['vqref']))} | {fmt_time(dict(median=p['floor']))} "
            f"| {p['ratio']:.2f}x | {p['vqref'] / (p['N'] * p['K']) * 1e9:.2f} |"
        )
    for axis, f in rows[0]["fits"].items():
        out.append("")
        out.append(
            f"Over {axis}: log-log slope {f['loglog_slope']:.2f}; affine fit t = {f['affine_intercept'] * 1e3:.1f} ms + "
            f"{f['affine_slope'] * 1e6:.3f} ms per 1000 {axis}, R^2 = {f['r2']:.4f}."
        )
    return out


def markdown(report: dict) -> str:
    m = report["machine"]
    main, tgt = tables(report)
    blas = "; ".join(
        f"{b.get('impl')} {b.get('version')} ({b.get('library')}, {b.get('threads')} threads, {b.get('arch')})"
        for b in m["blas"]
        if b.get("api") == "blas"
    )
    lines = [
        f"# vqref benchmarks{' (quick: tiny sizes, not the targets)' if report['quick'] else ''}",
        "",
        f"{report['date']}, float32, {m['threads']} threads (numpy BLAS and torch); {report['reps']} rounds per benchmark "
        "(half for rvq, eval and scaling); in each round every contestant runs twice and the second run is timed. "
        "Times are medians; ratios are medians of per-round ratios (range in brackets).",
        f"Load average (1 min) {report['load'][0]:.1f} at the start, {report['load'][1]:.1f} at the end.",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable); {m['platform']}; Python {m['python']}.  ",
        f"BLAS: {blas or 'unknown'}.  ",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + ".",
        "",
        "## Times",
        "",
        *main,
        "",
        "## Targets",
        "",
        *tgt,
    ]
    sc = scaling_lines(report)
    if sc:
        lines += ["", "## Scaling (train step, STE)", "", *sc]
    lines += ["", f"Command: `{report['command']}`", ""]
    return "\n".join(lines)
