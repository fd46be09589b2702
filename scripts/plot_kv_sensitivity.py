#!/usr/bin/env python3
"""Plots a KV sensitivity file from `quantkv sensitivity` (format in
runtime/kv/kv_sensitivity_file.h): per layer, the KL against the base run when only that
layer's K (top) or V (middle) uses each candidate codec, log scale; and, when the file has
per-head data, the head proxy of the cheapest codec as a heads x layers map (bottom).

usage: python3 scripts/plot_kv_sensitivity.py SENS.json OUT.png
Needs matplotlib; `quantkv sensitivity --plot` calls this script and only warns without it.
"""
import json
import sys


def main(argv):
    if len(argv) != 3:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        print("plot_kv_sensitivity.py: matplotlib is not installed", file=sys.stderr)
        return 3
    with open(argv[1]) as f:
        s = json.load(f)
    layers = s["layers"]
    xs = [l["layer"] for l in layers]
    heads = all(l.get("heads") for l in layers) and s.get("head_proxy")
    rows = 3 if heads else 2
    fig, axes = plt.subplots(rows, 1, figsize=(10, 3.2 * rows), constrained_layout=True)
    floor = 1e-7  # log axis: KL of an exact codec is 0
    for ax, kind, name in ((axes[0], "k", "K"), (axes[1], "v", "V")):
        for i, entry in enumerate(layers[0][kind]):
            ys = [max(l[kind][i]["kl"], floor) for l in layers]
            label = "%s (%.2f b/el)" % (entry["codec"], entry.get("bits_per_element", 0))
            ax.plot(xs, ys, marker="o", ms=3, label=label)
        ax.set_yscale("log")
        ax.set_ylabel("KL vs base")
        ax.set_title("only this layer's %s quantized" % name)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[1].set_xlabel("layer")
    if heads:
        proxy = s["head_proxy"]
        n_heads = len(layers[0]["heads"])
        grid = []
        labels = []
        for kind in ("k", "v"):
            entries = layers[0][kind]
            last = min(range(len(entries)), key=lambda i: entries[i].get("bits_per_element", 0))
            for h in range(n_heads):
                grid.append([l["heads"][h][kind][last][proxy] for l in layers])
                labels.append("%s h%d" % (kind.upper(), h))
        from matplotlib.colors import LogNorm

        positive = [v for row in grid for v in row if v > 0]
        lo = min(positive) if positive else 1e-9
        grid = [[max(v, lo) for v in row] for row in grid]
        im = axes[2].imshow(grid, aspect="auto", cmap="viridis", norm=LogNorm(),
                            extent=(xs[0] - 0.5, xs[-1] + 0.5, len(grid) - 0.5, -0.5))
        axes[2].set_yticks(range(len(labels)))
        axes[2].set_yticklabels(labels)
        axes[2].set_xlabel("layer")
        axes[2].xaxis.set_major_locator(MaxNLocator(integer=True))
        axes[2].set_title("per-head proxy (%s, log scale) at the cheapest codec" % proxy)
        fig.colorbar(im, ax=axes[2])
    fig.suptitle("KV sensitivity: %s on %s, ctx %s x %s (base %s)" % (
        s.get("model", "?"), s.get("text", "?").split("/")[-1], s.get("ctx"), s.get("chunks"),
        s.get("base")), fontsize=10)
    fig.savefig(argv[2], dpi=110)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
