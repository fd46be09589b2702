#!/usr/bin/env python3
"""Per-expert precision over time from bench/results/moe_elastic.json (moe_elastic_bench's
traffic-shift part): one row per (layer, expert), one column per engine step, dark where the
expert is held at the high-precision level; phase boundaries (WikiText, GPL-3, WikiText)
marked.

  python3 scripts/plot_moe_elastic.py bench/results/moe_elastic.json bench/results/moe_elastic.png
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    with open(sys.argv[1]) as f:
        data = json.load(f)
    timeline = data["shift"]["timeline"]
    levels = np.array([t["levels"] for t in timeline]).T  # [experts, steps]
    phases = [t["phase"] for t in timeline]
    fig, ax = plt.subplots(figsize=(10, 6))
    ax.imshow(levels, aspect="auto", cmap="Greys", interpolation="nearest")
    for i in range(1, len(phases)):
        if phases[i] != phases[i - 1]:
            ax.axvline(i - 0.5, color="red", linewidth=1)
    starts = [0] + [i for i in range(1, len(phases)) if phases[i] != phases[i - 1]]
    for s in starts:
        ax.text(s + 0.5, -2, phases[s], color="red", fontsize=9, va="bottom")
    ax.set_xlabel("engine step (64 tokens each)")
    ax.set_ylabel("layer x experts + expert")
    ax.set_title("expert precision over time (dark: Q8_0, light: Q4_0), top-%d of %d"
                 % (data["top_k"], data["experts"]))
    fig.tight_layout()
    fig.savefig(sys.argv[2], dpi=110)


if __name__ == "__main__":
    main()
