"""PNG plots of the benchmarks: per-position conditional acceptance (paper Fig. 2), and for the
serving benchmark throughput vs per-user speed (Fig. 7) and verification budget per request vs
concurrency (Fig. 8)."""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_acceptance(report: dict, path: Path) -> Path:
    """Acceptance at draft position k given that positions 1..k-1 were accepted, one line per method."""
    plt = _pyplot()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    for row in report["results"]:
        curve = row["per_position_acceptance"]
        if curve:
            ax.plot(range(1, len(curve) + 1), curve, marker="o", label=f"{row['method']} (tau {row['tau']:.2f})")
    ax.set_ylim(0, 1)
    ax.set_xlabel("draft position k")
    ax.set_ylabel("P(accept k | accepted 1..k-1)")
    name = Path(report.get("prompts", "")).stem
    ax.set_title(f"{report['model']}: {name}, T={report['temperature']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_serving(report: dict, folder: Path) -> list[Path]:
    plt = _pyplot()
    folder.mkdir(parents=True, exist_ok=True)
    methods = list(dict.fromkeys(r["method"] for r in report["rows"]))
    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for m in methods:
        rows = [r for r in report["rows"] if r["method"] == m]
        ax.plot([r["per_user_tokens_per_s"] for r in rows], [r["tokens_per_s"] for r in rows], marker="o", label=m)
        for r in rows:
            ax.annotate(str(r["concurrency"]), (r["per_user_tokens_per_s"], r["tokens_per_s"]), fontsize=7)
    ax.set_xlabel("per-user tokens/s")
    ax.set_ylabel("aggregate tokens/s")
    ax.set_title(f"{report['model']} ({report['dtype']}): throughput vs per-user speed", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(folder / "serving-throughput.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    for m in methods:
        rows = [r for r in report["rows"] if r["method"] == m]
        ax.plot([r["concurrency"] for r in rows], [r["mean_budget"] for r in rows], marker="o", label=m)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrency")
    ax.set_ylabel("draft tokens verified per request")
    ax.set_title("verification budget vs concurrency")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(folder / "serving-budget.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths
