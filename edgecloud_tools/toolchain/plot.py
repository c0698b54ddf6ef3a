"""``edgecloud calibrate --plot``: the held-out trade-off a threshold moves along, cascade accuracy
against the share of rows escalated, with the calibrated threshold marked (matplotlib, the ``bench``
extra)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgecloud.calibration import cascade_outcome, confidence
from edgecloud.errors import ConfigError
from edgecloud_tools.toolchain.evaluate import CascadeFit

#: thresholds swept for the curve
POINTS = 101


def tradeoff_png(path: Path, edge_scores: np.ndarray, cloud_scores: np.ndarray, labels: np.ndarray,
                 fit: CascadeFit, title: str) -> Path:
    """Write the curve of ``fit``'s policy and temperature over thresholds 0..1 on this labelled set."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("--plot needs matplotlib: pip install 'edgecloud[bench]'") from None
    conf = confidence(edge_scores, fit.policy, fit.temperature, fit.scores)
    edge_ok, cloud_ok = edge_scores.argmax(1) == labels, cloud_scores.argmax(1) == labels
    curve = [cascade_outcome(conf, edge_ok, cloud_ok, t) for t in np.linspace(0.0, 1.0, POINTS)]
    chosen = cascade_outcome(conf, edge_ok, cloud_ok, fit.threshold)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.plot([o.escalation * 100 for o in curve], [o.accuracy * 100 for o in curve], label=fit.policy)
    ax.scatter([chosen.escalation * 100], [chosen.accuracy * 100], color="#d62728", zorder=3,
               label=f"threshold {fit.threshold:.4f}: {chosen.accuracy:.2%}, "
                     f"{chosen.escalation:.1%} escalated")
    ax.set_title(title)
    ax.set_xlabel("rows escalated to the cloud (%)")
    ax.set_ylabel("cascade accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
