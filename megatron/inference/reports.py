"""Long-context evaluation results as JSON, PNG plots (matplotlib) and TensorBoard scalars."""

from __future__ import annotations

import json
import os


def write_json(result: dict, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    return path


def _pyplot():
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError as e:
        raise RuntimeError("PNG plots need matplotlib (pip install matplotlib, it is in requirements-dev.txt); "
                           "or pass --no-plots") from e
    return plt


def plot_loss_by_position(curves: list, path: str, title: str = "loss by position") -> str:
    """`curves`: (label, loss_by_position result) pairs, drawn on one axis (bucket centres vs mean loss);
    a dotted line marks each curve's trained context when the result records one."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=100)
    for label, r in curves:
        edges = r["bucket_edges"]
        centres = [(a + b - 1) / 2 for a, b in zip(edges[:-1], edges[1:])]
        ax.plot(centres, r["mean_loss"], marker="o", markersize=3, label=label)
        if r.get("trained_context"):
            ax.axvline(r["trained_context"], linestyle=":", color=ax.lines[-1].get_color(), linewidth=1)
    if any(r.get("scale") == "log" for _, r in curves):
        ax.set_xscale("symlog")
    ax.set_xlabel("token position")
    ax.set_ylabel("mean loss (nats)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(curves) > 1 or curves[0][0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_passkey(result: dict, path: str, title: str | None = None) -> str:
    """Heatmap of retrieval accuracy: context length (x) by needle depth (y)."""
    plt = _pyplot()
    acc = result["accuracy"]  # [lengths][depths]
    lengths, depths = result["lengths"], result["depths"]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 + 0.8 * len(lengths)), 1.4 + 0.45 * len(depths)), dpi=100)
    grid = [[acc[i][j] for i in range(len(lengths))] for j in range(len(depths))]  # rows: depths
    im = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto", origin="upper")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    for j in range(len(depths)):
        for i in range(len(lengths)):
            ax.text(i, j, f"{grid[j][i]:.2f}", ha="center", va="center", fontsize=7)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(title or f"{result['task']}: accuracy (chance {result['chance']:.2g})", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.05)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def scalars(result: dict) -> dict:
    """Flat {tag: value} for TensorBoard / W&B (the same tags from the tool and the training hook)."""
    out = {}
    lp = result.get("loss_by_position")
    if lp:
        n = lp["seq_length"]
        out[f"long-context/loss@{n}"] = lp["overall_loss"]
        edges = lp["bucket_edges"]
        for a, b, v in zip(edges[:-1], edges[1:], lp["mean_loss"]):
            out[f"long-context/loss@{n} positions {a}-{b - 1}"] = v
    pk = result.get("passkey")
    if pk:
        out["long-context/passkey accuracy"] = pk["mean_accuracy"]
        for i, n in enumerate(pk["lengths"]):
            row = pk["accuracy"][i]
            out[f"long-context/passkey accuracy@{n}"] = sum(row) / len(row)
    return out


def write_tensorboard(result: dict, log_dir: str, step: int) -> None:
    from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415 (slow import)

    writer = SummaryWriter(log_dir=log_dir)
    try:
        for tag, value in scalars(result).items():
            writer.add_scalar(tag, value, step)
    finally:
        writer.close()


def write_report(result: dict, out_dir: str, *, plots: bool = True, tensorboard_dir: str | None = None,
                 step: int = 0, compare: list | None = None, label: str = "") -> list:
    """results.json, loss_by_position.png, passkey.png under `out_dir`; TensorBoard scalars at `step`.
    `compare`: (label, earlier result) pairs whose loss curves are drawn next to this one's."""
    os.makedirs(out_dir, exist_ok=True)
    written = [write_json(result, os.path.join(out_dir, "results.json"))]
    if plots:
        if result.get("loss_by_position"):
            curves = [(lbl, r["loss_by_position"]) for lbl, r in (compare or []) if r.get("loss_by_position")]
            curves.append((label, result["loss_by_position"]))
            written.append(plot_loss_by_position(curves, os.path.join(out_dir, "loss_by_position.png")))
        if result.get("passkey"):
            written.append(plot_passkey(result["passkey"], os.path.join(out_dir, "passkey.png")))
    if tensorboard_dir:
        write_tensorboard(result, tensorboard_dir, step)
        written.append(tensorboard_dir)
    return written
