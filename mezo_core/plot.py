"""A PNG of a run: training loss (and its moving average) and dev metrics."""
import io
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_run(metrics_path, state, out_png, window=20) -> list[str]:
    """Write the PNG; returns the dev panel's legend labels (which adapters it marks)."""
    from .runfiles import read_bytes, replace_file, utf8_lines
    rows = [json.loads(line) for line in utf8_lines(read_bytes(metrics_path)) if line.strip()]
    fig, (ax_loss, ax_dev) = plt.subplots(1, 2, figsize=(10, 4))
    if rows:
        steps = [r["step"] for r in rows]
        loss = [r["loss"] for r in rows]
        avg = [sum(loss[max(0, i - window + 1):i + 1]) / len(loss[max(0, i - window + 1):i + 1])
               for i in range(len(loss))]
        ax_loss.plot(steps, loss, alpha=0.3, label="batch loss")
        ax_loss.plot(steps, avg, label=f"moving average ({window})")
    ax_loss.set(xlabel="step", ylabel="loss", title="training loss")
    ax_loss.legend()
    metric = "dev_accuracy" if "dev_accuracy" in (state.get("final") or state.get("zero_shot") or {}) else "dev_loss"
    points = []
    if state.get("zero_shot"):
        points.append((0, state["zero_shot"][metric]))
    points += [(e["step"], e[metric]) for e in state.get("evals", [])]
    if state.get("final"):
        points.append((state["step"], state["final"][metric]))
    if points:
        ax_dev.plot(*zip(*points), marker="o")
    if state.get("final"):   # the trained adapter and best/, each named with its step
        ax_dev.plot(state["step"], state["final"][metric], "s", color="C2", label=f"last/ (step {state['step']})")
    best = state.get("best")
    if best and metric in best:
        ax_dev.plot(best["step"], best[metric], "*", color="C3", markersize=12, label=f"best/ (step {best['step']})")
    if state.get("final") or best:
        ax_dev.legend()
    ax_dev.set(xlabel="step", ylabel=metric.replace("_", " "), title="dev")
    labels = ax_dev.get_legend_handles_labels()[1]
    fig.tight_layout()
    png = io.BytesIO()   # the run folder is a boundary: renamed over training.png, never through a link
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    replace_file(out_png, png.getvalue())
    return labels
