"""A PNG of a run: training loss (and its moving average) and dev metrics."""
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_run(metrics_path, state, out_png, window=20):
    rows = [json.loads(line) for line in open(metrics_path) if line.strip()]
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
    ax_dev.set(xlabel="step", ylabel=metric.replace("_", " "), title="dev")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
