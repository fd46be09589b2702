#!/usr/bin/env python3
"""The KV-cache quality/memory table: one `quantkv perplexity` run per configuration on
WikiText-2 test, all on the same windows, against the FP16-cache baseline of the same run.

Writes bench/results/kv_table_ctx{CTX}.json and .md, and (with matplotlib installed)
bench/results/kv_table_ctx{CTX}.png: ΔPPL% against bits/element.

    python3 bench/kv_table.py [--ctx 2048] [--chunks 16] [--threads 2] [--configs a,b,...]
                              [--merge]

Rows whose spec starts with "cal:" use a calibrated policy file that this script makes
first with `quantkv calibrate` on CALIB_TEXT (the GPL-3 text shipped with Debian, not
WikiText), kept in bench/results/kv_calibration/. --merge keeps the rows of an earlier
results file that this run does not redo (refused unless its fp16 baseline is identical).
"""
import argparse
import datetime
import json
import os
import platform
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUANTKV = os.path.join(ROOT, "build", "launcher", "quantkv")
TEXT = os.path.join(ROOT, "..", "shared", "data", "wikitext-2", "test.txt")
CALIB_TEXT = "/usr/share/common-licenses/GPL-3"
CALIB_DIR = os.path.join(ROOT, "bench", "results", "kv_calibration")

# Calibrated policies: name -> (target --kv, calibrate flags).
CALIBRATIONS = {
    "int4-tensor": ("int4:static,block=32", ["--granularity", "tensor"]),
    "int2-tensor": ("int2:static,block=32", ["--granularity", "tensor"]),
    "int4-static": ("int4:static,block=32", []),
    "int4-static-p999": ("int4:static,block=32", ["--method", "percentile", "--alpha", "0.999"]),
    "int4-static-mse": ("int4:static,block=32", ["--method", "mse"]),
    "k-int4-static": ("k=int4:static,v=int4,block=32", []),
    "k-int4-static-prerope": ("k=int4:static,v=int4,block=32,rope=pre", []),
    "int4-comp-mse": ("int4-comp", ["--method", "mse"]),
    "int2-comp-mse": ("k=int2:chan,v=int2,sink=4,window=8,block=128", ["--method", "mse"]),
    "int2-comp-mse-prerope": ("k=int2:chan,v=int2,sink=4,window=8,block=128,rope=pre",
                              ["--method", "mse"]),
    # Lloyd-Max codebooks and product-quantization centroids, fitted on the same text.
    "nl3-lloyd-comp": ("k=nl3:chan:asym:lloyd,v=nl3:g64:sym:lloyd,rotate=v,sink=4,window=8,"
                       "block=128", []),
    "nl2-lloyd-comp": ("k=nl2:chan:asym:lloyd,v=nl2:g64:sym:lloyd,rotate=v,sink=4,window=8,"
                       "block=128", []),
    "pq2x6-rot-comp": ("k=pq2x6,v=pq2x6,rotate=kv,sink=4,window=8,block=128", []),
    "int2-comp-learnclip": ("k=int2:chan:clip0.7,v=int2:g64:asym:learnclip,sink=4,window=8,"
                            "block=128", []),
    "pq4x8-rot": ("k=pq4x8,v=pq4x8,rotate=kv", []),
}

# (label, --kv spec): naive baselines first, then one technique added per row.
CONFIGS = [
    ("fp32", "fp32"),
    ("bf16", "bf16"),
    ("fp8 e4m3, g64 scales", "fp8"),
    ("int8 per-token min-max", "int8"),
    ("int4 per-tensor static min-max (naive)", "cal:int4-tensor"),
    ("int4 per-channel static min-max", "cal:int4-static"),
    ("int4 per-channel static percentile 0.999", "cal:int4-static-p999"),
    ("int4 per-channel static MSE-optimal clip", "cal:int4-static-mse"),
    ("int4 block-wise (one scale per 32-token block)", "int4:block,block=32"),
    ("int4 per-token min-max (naive)", "int4"),
    ("int4 static per-channel keys, per-token values", "cal:k-int4-static"),
    ("int4 static per-channel pre-RoPE keys, per-token values", "cal:k-int4-static-prerope"),
    ("int4 g32", "int4:g32"),
    ("int4 + per-channel keys", "k=int4:chan,v=int4,block=128"),
    ("int4 + per-channel pre-RoPE keys", "k=int4:chan,v=int4,block=128,rope=pre"),
    ("int4 + per-channel keys + sink4 + window8 (int4-comp)", "int4-comp"),
    ("int4-comp + MSE-calibrated clips", "cal:int4-comp-mse"),
    ("int3 per-token min-max", "int3"),
    ("int3 + per-channel keys + sink4 + window8", "k=int3:chan,v=int3,sink=4,window=8,block=128"),
    ("int2 per-tensor static min-max (naive)", "cal:int2-tensor"),
    ("int2 per-token min-max (naive)", "int2"),
    ("int2 per-token + Hadamard rotation of K and V", "int2:g64,rotate=kv"),
    ("int2 per-token + 1% fp16 outliers (dense-and-sparse)", "int2:g64:out1"),
    ("int2 + per-channel keys", "k=int2:chan,v=int2,block=128"),
    ("int2 + per-channel keys + sink4 + window8", "k=int2:chan,v=int2:g64:asym,sink=4,window=8,block=128"),
    ("int2 + per-channel keys + sink4 + window8 + clipped scales (int2-comp)", "int2-comp"),
    ("int2-comp with pre-RoPE keys", "int2-comp,rope=pre"),
    ("int2-comp with Hadamard-rotated values", "int2-comp,rotate=v"),
    ("int2-comp + 0.5% fp16 outliers in K and V",
     "int2-comp,k=int2:chan:clip0.7:out0.5,v=int2:g64:asym:clip0.9:out0.5"),
    ("int2 + per-channel keys + sink4 + window8 + MSE-calibrated clips", "cal:int2-comp-mse"),
    ("... + pre-RoPE keys", "cal:int2-comp-mse-prerope"),
    # llama.cpp's cache types, the exact block formats, for comparison at equal bits.
    ("llama.cpp q8_0", "q8_0"),
    ("llama.cpp q4_0", "q4_0"),
    ("llama.cpp iq4_nl + Hadamard rotation of K and V", "iq4_nl,rotate=kv"),
    # Non-linear codebooks (per-token g64 absmax scales).
    ("nl4 normal-float + Hadamard rotation", "nl4:g64:sym:nf,rotate=kv"),
    ("nl3 normal-float + Hadamard rotation", "nl3:g64:sym:nf,rotate=kv"),
    ("nl3 power-transform levels (p=0.5) + rotation", "nl3:g64:sym:pow0.5,rotate=kv"),
    ("nl3 log levels + rotation", "nl3:g64:sym:log,rotate=kv"),
    ("int3 g64 sym + rotation (uniform, same bits as nl3)", "int3:g64:sym,rotate=kv"),
    ("int3 per-channel keys, nl3 rotated values, sink4 + window8",
     "k=int3:chan,v=nl3:g64:sym:nf,rotate=v,sink=4,window=8,block=128"),
    ("nl3 per-channel keys (NF), nl3 rotated values, sink4 + window8",
     "k=nl3:chan:asym:nf,v=nl3:g64:sym:nf,rotate=v,sink=4,window=8,block=128"),
    ("... with Lloyd-Max levels fitted per layer", "cal:nl3-lloyd-comp"),
    ("... with Lloyd-Max levels fitted per layer", "cal:nl2-lloyd-comp"),
    # Product quantization (shared k-means centroids per layer, keys scored by lookup).
    ("PQ 2 channels x 6 bits + rotation + sink4 + window8", "cal:pq2x6-rot-comp"),
    ("PQ 4 channels x 8 bits + rotation", "cal:pq4x8-rot"),
    # Learned per-group clipping, score correction and low-rank residual on top of int2-comp.
    ("int2-comp with learned per-group clips for V", "cal:int2-comp-learnclip"),
    ("int2-comp + mean-residual score correction for V",
     "k=int2:chan:clip0.7,v=int2:g64:asym:clip0.9:meanres,sink=4,window=8,block=128"),
    ("int2-comp + rank-1 residual (GEAR)",
     "k=int2:chan:clip0.7:rank1,v=int2:g64:asym:clip0.9:rank1,sink=4,window=8,block=128"),
]


def calibrated(name, threads):
    """The policy file of CALIBRATIONS[name], made once."""
    path = os.path.join(CALIB_DIR, name + ".json")
    if not os.path.exists(path):
        os.makedirs(CALIB_DIR, exist_ok=True)
        target, flags = CALIBRATIONS[name]
        print(f"calibrating {name} ...", file=sys.stderr)
        subprocess.run([QUANTKV, "calibrate", "--text", CALIB_TEXT, "--kv", target, "--out", path,
                        "--threads", str(threads)] + flags, check=True, capture_output=True)
    return "@" + os.path.relpath(path, ROOT)


def run(kv, ctx, chunks, threads, extra):
    if kv.startswith("cal:"):
        kv = calibrated(kv[4:], threads)
    cmd = [QUANTKV, "perplexity", "--text", TEXT, "--ctx", str(ctx), "--chunks", str(chunks),
           "--threads", str(threads), "--kv", kv, "--json"] + extra
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout
    return json.loads(out.strip().splitlines()[-1])


ATTENTION_BENCH = os.path.join(ROOT, "build", "bench", "attention_bench")
ATTN_CTX = 4096


def decode_attention(kv, threads):
    """Decode attention us/token at ATTN_CTX tokens for one layer, and the fp16 time of the
    same run (the ratio is what to read: absolute times on a shared machine are noisy)."""
    if kv.startswith("cal:"):
        kv = calibrated(kv[4:], threads)
    tmp = os.path.join(ROOT, "bench", "results", ".attn_tmp")
    subprocess.run([ATTENTION_BENCH, "--threads", str(threads), "--contexts", str(ATTN_CTX),
                    "--presets", "fp16;" + kv, "--reps", "40", "--out", tmp, "--name", "row"],
                   check=True, capture_output=True, cwd=ROOT)
    rows = json.load(open(os.path.join(tmp, "row.json")))["rows"]
    return rows[1]["us_per_token"], rows[0]["us_per_token"]


def partial_path(out, ctx, chunks):
    """Rows finished so far, so an interrupted run resumes instead of starting over."""
    return os.path.join(out, f".kv_table_partial_ctx{ctx}_{chunks}.json")


def plot(rows, ctx, chunks, path):
    """ΔPPL% against bits/element, one point per configuration."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in rows:
        ax.scatter(r["kv_bits_per_element"], r["delta_ppl_pct"])
        ax.annotate(r["spec"], (r["kv_bits_per_element"], r["delta_ppl_pct"]), fontsize=6,
                    xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("KV bits per element (incl. metadata and protected tokens)")
    ax.set_ylabel("ΔPPL vs FP16 cache (%)")
    ax.set_yscale("symlog", linthresh=0.1)
    ax.set_title(f"SmolLM2-135M, WikiText-2, ctx {ctx}, {chunks} windows")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--configs", default="", help="semicolon-separated specs to run (default all)")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    ap.add_argument("--plot-only", default="", help="redraw the plot of a results JSON and exit")
    ap.add_argument("--merge", action="store_true",
                    help="keep rows of the existing results file that this run does not redo")
    a = ap.parse_args()
    if a.plot_only:
        d = json.load(open(a.plot_only))
        plot(d["rows"], d["ctx"], d["chunks"], a.plot_only[:-len(".json")] + ".png")
        return
    os.makedirs(a.out, exist_ok=True)
    base_file = os.path.join(a.out, f".fp16_ctx{a.ctx}_{a.chunks}.logits")
    print(f"fp16 baseline (ctx {a.ctx}, {a.chunks} windows) ...", file=sys.stderr)
    base = run("fp16", a.ctx, a.chunks, a.threads, ["--save-logits", base_file])
    configs = CONFIGS
    if a.configs:
        wanted = set(a.configs.split(";"))
        configs = [c for c in CONFIGS if c[1] in wanted]
    name = f"kv_table_ctx{a.ctx}"
    kept = None
    if a.merge and os.path.exists(os.path.join(a.out, name + ".json")):
        # Rows of another run are comparable only over the same windows and baseline.
        old = json.load(open(os.path.join(a.out, name + ".json")))
        old_base = next(r for r in old["rows"] if r["spec"] == "fp16")
        if old["chunks"] != a.chunks or abs(old_base["ppl"] / base["ppl"] - 1) > 1e-9:
            sys.exit(f"--merge: {name}.json has another baseline (ppl {old_base['ppl']} vs "
                     f"{base['ppl']}); rerun every row")
        redo = {spec for _, spec in configs} | {"fp16"}
        kept = {r["spec"]: r for r in old["rows"] if r["spec"] not in redo}
    rows = [dict(label="fp16 (baseline)", spec="fp16", **base, kl_mean=0.0, top1_agreement=1.0)]
    rows[0]["attn_us"], rows[0]["attn_fp16_us"] = decode_attention("fp16", a.threads)
    part = partial_path(a.out, a.ctx, a.chunks)
    done = {}
    if os.path.exists(part):
        p = json.load(open(part))
        if abs(p["base_ppl"] / base["ppl"] - 1) < 1e-12:
            done = {r["spec"]: r for r in p["rows"]}
    for label, spec in configs:
        if spec in done:
            print(f"{label} (from {part})", file=sys.stderr)
            rows.append(done[spec])
            continue
        print(f"{label} ...", file=sys.stderr)
        r = run(spec, a.ctx, a.chunks, a.threads, ["--kl-base", base_file])
        try:
            r["attn_us"], r["attn_fp16_us"] = decode_attention(spec, a.threads)
        except subprocess.CalledProcessError as e:
            print(f"  decode attention bench failed: {e.stderr}", file=sys.stderr)
        rows.append(dict(label=label, spec=spec, **r))
        json.dump({"base_ppl": base["ppl"], "rows": rows[1:]}, open(part, "w"))
    os.remove(base_file)
    if os.path.exists(part):
        os.remove(part)
    if kept is not None:
        order = ["fp16"] + [spec for _, spec in CONFIGS]
        rows = sorted(rows + list(kept.values()),
                      key=lambda r: order.index(r["spec"]) if r["spec"] in order else len(order))
    for r in rows:
        r["delta_ppl_pct"] = 100.0 * (r["ppl"] / base["ppl"] - 1.0)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    md = [f"# {name}", "", f"{stamp}, {platform.processor() or platform.machine()}, "
          f"SmolLM2-135M-Instruct Q4_1, WikiText-2 test, ctx {a.ctx}, {a.chunks} windows, "
          f"{base['tokens_scored']} scored tokens (second half of each window), same windows "
          "for every row. KL and top-1 agreement against the FP16-cache run; bits/element "
          "include all metadata and fp16-protected tokens at the window length. "
          f"Calibrated rows (`cal:`) use scales from `quantkv calibrate` on {CALIB_TEXT} "
          "(4096 tokens), files in bench/results/kv_calibration/. "
          f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', 'unset')}.", "",
          f"Decode attention: one layer of SmolLM2's shape at {ATTN_CTX} tokens "
          "(bench/attention_bench), as a ratio to fp16 measured in the same call (rows "
          "without it predate the column).", "",
          "| configuration | --kv | bits/elem | vs fp16 | PPL | ΔPPL % | KL mean | top-1 agree "
          "| decode attn vs fp16 |",
          "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        attn = (f"{r['attn_us'] / r['attn_fp16_us']:.2f}x time" if r.get("attn_us") else "")
        md.append(f"| {r['label']} | `{r['spec']}` | {r['kv_bits_per_element']:.3f} | "
                  f"{r['kv_compression_vs_fp16']:.2f}x | {r['ppl']:.4f} | {r['delta_ppl_pct']:+.2f} | "
                  f"{r['kl_mean']:.5f} | {100 * r['top1_agreement']:.2f}% | {attn} |")
    with open(os.path.join(a.out, name + ".md"), "w") as f:
        f.write("\n".join(md) + "\n")
    with open(os.path.join(a.out, name + ".json"), "w") as f:
        json.dump({"date": stamp, "ctx": a.ctx, "chunks": a.chunks, "rows": rows}, f, indent=2)
    print("\n".join(md))
    plot(rows, a.ctx, a.chunks, os.path.join(a.out, name + ".png"))


if __name__ == "__main__":
    main()
