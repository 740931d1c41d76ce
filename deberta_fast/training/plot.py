"""Loss and accuracy curves of a run as a PNG (matplotlib is installed with deberta_fast; None without it)."""

from __future__ import annotations

import os


def plot_run(result: dict, path: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    losses = result["losses"]
    window = max(1, len(losses) // 50)
    smoothed = [sum(losses[max(0, i - window + 1): i + 1]) / len(losses[max(0, i - window + 1): i + 1])
                for i in range(len(losses))]
    left.plot(range(1, len(losses) + 1), losses, alpha=0.3, label="loss")
    left.plot(range(1, len(losses) + 1), smoothed, label=f"mean of {window}")
    left.set_xlabel("step")
    left.set_ylabel("training loss")
    left.legend()
    steps = [e["step"] for e in result["evaluations"]]
    right.plot(steps, [e["accuracy"] for e in result["evaluations"]], marker="o", label="accuracy")
    right.plot(steps, [e["macro_f1"] for e in result["evaluations"]], marker="s", label="macro-F1")
    right.set_xlabel("step")
    right.set_ylabel("evaluation")
    right.legend()
    figure.tight_layout()
    temporary = f"{path}.{os.getpid()}.tmp.png"
    try:
        figure.savefig(temporary, dpi=100)
        os.replace(temporary, path)
    finally:
        plt.close(figure)
        if os.path.exists(temporary):
            os.unlink(temporary)
    return path
