#!/usr/bin/env python3
"""Softmax temperature for a quantized KV cache, chosen by calibration: for each candidate
temperature, `quantkv perplexity --kv "SPEC,temp=T"` on the calibration text (GPL-3, not
the evaluation text) against the FP16-cache logits of the same windows; the temperature
with the least mean KL wins. Then both SPEC and SPEC,temp=BEST are measured on WikiText-2
(ΔPPL and KL against FP16 there), so the gain is reported on text the choice never saw.

    python3 bench/fit_temperature.py --kv int2-comp [--temps 0.9,0.95,1,1.05,1.1]
        [--ctx 512] [--calib-chunks 4] [--eval-chunks 16] [--threads 2]

Writes bench/results/kv_temperature.{json,md} (rows of earlier runs for other specs kept).
"""
import argparse
import datetime
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUANTKV = os.path.join(ROOT, "build", "launcher", "quantkv")
EVAL_TEXT = os.path.join(ROOT, "..", "shared", "data", "wikitext-2", "test.txt")
CALIB_TEXT = "/usr/share/common-licenses/GPL-3"


def perplexity(text, kv, ctx, chunks, threads, extra):
    cmd = [QUANTKV, "perplexity", "--text", text, "--ctx", str(ctx), "--chunks", str(chunks),
           "--threads", str(threads), "--kv", kv, "--json"] + extra
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout
    return json.loads(out.strip().splitlines()[-1])


def with_temp(kv, t):
    return kv if t == 1.0 else f"{kv},temp={t:g}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kv", required=True)
    ap.add_argument("--temps", default="0.9,0.95,1,1.05,1.1")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--calib-chunks", type=int, default=4)
    ap.add_argument("--eval-chunks", type=int, default=16)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    a = ap.parse_args()
    temps = [float(t) for t in a.temps.split(",")]
    if any(not 0.5 <= t <= 2 for t in temps):
        sys.exit("--temps: every temperature must be in [0.5, 2]")
    os.makedirs(a.out, exist_ok=True)
    base = {}
    for name, text, chunks in (("calib", CALIB_TEXT, a.calib_chunks),
                               ("eval", EVAL_TEXT, a.eval_chunks)):
        path = os.path.join(a.out, f".temp_{name}.logits")
        base[name] = (path, perplexity(text, "fp16", a.ctx, chunks, a.threads,
                                       ["--save-logits", path]))
    calib = []
    for t in temps:
        r = perplexity(CALIB_TEXT, with_temp(a.kv, t), a.ctx, a.calib_chunks, a.threads,
                       ["--kl-base", base["calib"][0]])
        calib.append({"temp": t, "kl_mean": r["kl_mean"], "ppl": r["ppl"]})
        print(f"calibration T={t:g}: KL {r['kl_mean']:.5f}", file=sys.stderr)
    best = min(calib, key=lambda r: r["kl_mean"])["temp"]
    evals = []
    for t in sorted({1.0, best}):
        r = perplexity(EVAL_TEXT, with_temp(a.kv, t), a.ctx, a.eval_chunks, a.threads,
                       ["--kl-base", base["eval"][0]])
        evals.append({"temp": t, "ppl": r["ppl"], "kl_mean": r["kl_mean"],
                      "top1_agreement": r["top1_agreement"],
                      "delta_ppl_pct": 100 * (r["ppl"] / base["eval"][1]["ppl"] - 1)})
    for path, _ in base.values():
        os.remove(path)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    row = {"kv": a.kv, "date": stamp, "ctx": a.ctx, "calib_chunks": a.calib_chunks,
           "eval_chunks": a.eval_chunks, "calibration": calib, "best_temp": best, "eval": evals}
    jpath = os.path.join(a.out, "kv_temperature.json")
    rows = json.load(open(jpath))["rows"] if os.path.exists(jpath) else []
    rows = [r for r in rows if r["kv"] != a.kv] + [row]
    json.dump({"rows": rows}, open(jpath, "w"), indent=2)
    md = ["# kv_temperature", "",
          "Softmax temperature chosen by calibration (`bench/fit_temperature.py`): least mean KL "
          f"against the FP16 cache on {CALIB_TEXT}, then measured on WikiText-2 test (ctx, "
          "windows per row). SmolLM2-135M-Instruct Q4_1.", "",
          "| --kv | calibration KL by temperature | chosen | WikiText ΔPPL (T=1 → chosen) | "
          "KL (T=1 → chosen) |", "|---|---|---|---|---|"]
    for r in rows:
        grid = ", ".join(f"{c['temp']:g}: {c['kl_mean']:.4f}" for c in r["calibration"])
        e = {x["temp"]: x for x in r["eval"]}
        one, ch = e[1.0], e[r["best_temp"]]
        md.append(f"| `{r['kv']}` | {grid} | {r['best_temp']:g} | {one['delta_ppl_pct']:+.2f}% → "
                  f"{ch['delta_ppl_pct']:+.2f}% | {one['kl_mean']:.4f} → {ch['kl_mean']:.4f} |")
    open(os.path.join(a.out, "kv_temperature.md"), "w").write("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
