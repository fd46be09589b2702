#!/usr/bin/env python3
"""Mixed-precision KV caches from measured sensitivity, against uniform codecs at similar bits.

1. `quantkv sensitivity` on calibration text (GPL-3, not WikiText) for two codec families:
   g64   K and V int{8,4,2}:g64:asym (per-token groups, block 32); per-head KL proxy
   chan  K int{8,4,2}:chan (KIVI per-channel keys), V int{8,4,2}:g64:asym, block 128;
         per-head MSE proxy
   chan3 the chan family with int3 candidates too (only the 3-bit runs measured, merged)
2. `quantkv kv-allocate` at 3.5, 3.0 and 2.5 bits/element, per KV head and per layer.
3. `quantkv perplexity --json` of every allocated policy and of the uniform codecs on
   WikiText-2 test (ctx 512, the same windows as bench/results/kv_table_ctx512.md), KL and
   top-1 against the fp16 cache.

Writes bench/results/kv_mixed_precision.{md,json} and bench/results/kv_mixed_precision/
(sensitivity files, plots, policies, per-run JSON).

    python3 bench/kv_mixed_precision.py [--quantkv build/launcher/quantkv] [--threads 2]
                                        [--chunks 16] [--reuse]

--reuse keeps sensitivity files, policies and runs already in the output folder (same
command lines), so an interrupted run continues where it stopped.
"""
import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "bench", "results", "kv_mixed_precision")
CALIB_TEXT = "/usr/share/common-licenses/GPL-3"
EVAL_TEXT = os.path.join(ROOT, "..", "shared", "data", "wikitext-2", "test.txt")

# name -> sensitivity flags
# (the per-head KL proxy costs a run per head, K|V and width: measured on one sweep only)
SWEEPS = {
    "g64": ["--codec-template", "int{b}:g64:asym", "--head-proxy", "kl"],
    "chan": ["--kv", "fp16,block=128", "--k-codec-template", "int{b}:chan",
             "--v-codec-template", "int{b}:g64:asym", "--head-proxy", "mse"],
}
# (budget bits/element, granularity); 3.5 compares with uniform int3 (3.5 bits with g64)
ALLOCATIONS = [(3.5, "head"), (3.0, "head"), (3.0, "layer"), (2.5, "head"), (2.5, "layer")]
# A family with more candidates: only the extra widths are measured, then merged into a copy
# of the family's file (same base, text and windows). name -> (family, bits, allocations)
EXTRA = {"chan3": ("chan", "3", [(3.5, "head"), (3.375, "head"), (3.0, "head"), (2.5, "head")])}


def spell(budget):
    """3.0 -> "3.0", 3.375 -> "3.375": one decimal unless the budget needs more."""
    return "%.1f" % budget if round(budget, 1) == budget else "%g" % budget


def merge_sensitivity(into, extra, out):
    """Adds extra's candidate codecs to every layer (and head) of into, richest first."""
    with open(into) as f:
        a = json.load(f)
    with open(extra) as f:
        b = json.load(f)
    for key in ("base", "n_layers", "n_kv_heads", "head_dim", "block", "ctx", "chunks", "text"):
        if a[key] != b[key]:
            raise SystemExit("cannot merge %s into %s: %s differs" % (extra, into, key))
    by_layer = {l["layer"]: l for l in b["layers"]}
    for la in a["layers"]:
        lb = by_layer[la["layer"]]
        for kind in ("k", "v"):
            la[kind] += lb[kind]
            order = sorted(range(len(la[kind])), key=lambda i: -la[kind][i]["bits_per_element"])
            la[kind] = [la[kind][i] for i in order]
            for ha, hb in zip(la.get("heads", []), lb.get("heads", [])):
                ha[kind] = [(ha[kind] + hb[kind])[i] for i in order]
    a["report"]["merged_from"] = [rel(into), rel(extra)]
    with open(out, "w") as f:
        json.dump(a, f, indent=1)

# Uniform references: (label, --kv)
UNIFORM = [
    ("uniform int4 g64", "int4:g64:asym"),
    ("uniform int3 g64", "int3:g64:asym"),
    ("uniform int2 g64", "int2:g64:asym"),
    ("uniform int4 chan-K", "k=int4:chan,v=int4:g64:asym,block=128"),
    ("uniform int3 chan-K", "k=int3:chan,v=int3:g64:asym,block=128"),
    ("uniform int2 chan-K", "k=int2:chan,v=int2:g64:asym,block=128"),
]


def rel(path):
    return os.path.relpath(path, ROOT)


SHOW_QUANTKV = None  # how the commands list spells the binary (--show-quantkv)


def cmdline(cmd):
    return " ".join(shlex.quote(SHOW_QUANTKV if i == 0 and SHOW_QUANTKV else c)
                    for i, c in enumerate(cmd))


def run(cmd, log, reuse_path=None):
    """Runs cmd (a list) from the repo root, records its command line; returns seconds."""
    line = cmdline(cmd)
    log.append(line)
    if reuse_path and os.path.exists(reuse_path):
        print("reuse", rel(reuse_path), flush=True)
        return 0.0
    print("+", line, flush=True)
    start = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True)
    return time.time() - start


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quantkv", default=os.path.join("build", "launcher", "quantkv"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--sens-ctx", type=int, default=512)
    ap.add_argument("--sens-chunks", type=int, default=1)
    ap.add_argument("--proxy-ctx", type=int, default=128)
    ap.add_argument("--reuse", action="store_true")
    ap.add_argument("--show-quantkv", default=None,
                    help="spelling of the binary in the recorded commands (default: --quantkv)")
    a = ap.parse_args()
    global SHOW_QUANTKV
    SHOW_QUANTKV = a.show_quantkv
    q = a.quantkv
    os.makedirs(OUT, exist_ok=True)
    log = []
    reuse = (lambda p: p) if a.reuse else (lambda p: None)

    # 1. Sensitivity sweeps.
    def sensitivity(flags, bits, sens, plot):
        cmd = [q, "sensitivity", "--threads", str(a.threads), "--text", CALIB_TEXT,
               "--ctx", str(a.sens_ctx), "--chunks", str(a.sens_chunks), "--bits", bits,
               "--proxy-ctx", str(a.proxy_ctx)] + flags + ["--out", rel(sens)]
        run(cmd + (["--plot", rel(sens[:-5] + ".png")] if plot else []), log, reuse(sens))

    for name, flags in SWEEPS.items():
        sensitivity(flags, "8,4,2", os.path.join(OUT, "sens_%s.json" % name), True)
    for name, (family, bits, _) in EXTRA.items():
        part = os.path.join(OUT, "sens_%s_int%s_only.json" % (family, bits))
        sensitivity(SWEEPS[family], bits, part, False)
        merged = os.path.join(OUT, "sens_%s.json" % name)
        merge_sensitivity(os.path.join(OUT, "sens_%s.json" % family), part, merged)
        log.append("# %s = %s + %s (merge_sensitivity in bench/kv_mixed_precision.py)" % (
            rel(merged), rel(os.path.join(OUT, "sens_%s.json" % family)), rel(part)))

    # 2. Allocations.
    policies = []  # (label, sweep, budget, granularity, path)
    families = [(n, ALLOCATIONS) for n in SWEEPS] + [(n, e[2]) for n, e in EXTRA.items()]
    for name, allocations in families:
        sens = os.path.join(OUT, "sens_%s.json" % name)
        for budget, gran in allocations:
            pol = os.path.join(OUT, "policy_%s_%s_%s.json" % (name, spell(budget), gran))
            cmd = [q, "kv-allocate", "--sensitivity", rel(sens), "--kv-budget", str(budget),
                   "--granularity", gran, "--out", rel(pol)]
            run(cmd, log, reuse(pol))
            policies.append(("allocated %s %s per %s" % (name, spell(budget), gran), name, budget,
                             gran, pol))

    # 3. Perplexity of everything on WikiText.
    def perplexity(tag, kv, extra, reusable=True):
        out = os.path.join(OUT, "ppl_%s.json" % tag)
        cmd = [q, "perplexity", "--threads", str(a.threads), "--text", rel(EVAL_TEXT),
               "--ctx", str(a.ctx), "--chunks", str(a.chunks), "--kv", kv, "--json"] + extra
        line = cmdline(cmd) + " > " + rel(out)
        log.append(line)
        if a.reuse and reusable and os.path.exists(out):
            print("reuse", rel(out), flush=True)
        else:
            print("+", line, flush=True)
            with open(out + ".tmp", "w") as f:
                subprocess.run(cmd, cwd=ROOT, check=True, stdout=f)
            os.replace(out + ".tmp", out)
        with open(out) as f:
            return json.loads(f.read().strip().splitlines()[-1])

    def uniform_tag(kv):
        return "uniform_" + kv.replace(":", "_").replace(",", "_").replace("=", "")

    def allocation(pol):
        with open(pol) as f:
            return json.load(f)["allocation"]

    def no_choice(alloc):  # every K and V at its cheapest codec: a uniform row already
        return alloc["bits_per_element"] <= alloc["min_bits_per_element"] + 1e-9

    tags = [uniform_tag(kv) for _, kv in UNIFORM] + [
        os.path.basename(p)[len("policy_"):-5] for *_, p in policies
        if not no_choice(allocation(p))]
    pending = any(not os.path.exists(os.path.join(OUT, "ppl_%s.json" % t)) for t in tags)
    logits = os.path.join(OUT, "fp16_ctx%d.logits" % a.ctx)
    # The baseline's distributions are not kept (removed below): remade when rows are run.
    base = perplexity("fp16", "fp16", ["--save-logits", rel(logits)],
                      reusable=os.path.exists(logits) or not pending)
    rows = [("fp16 (baseline)", "fp16", base, None)]
    kl = ["--kl-base", rel(logits)]
    for label, kv in UNIFORM:
        rows.append((label, kv, perplexity(uniform_tag(kv), kv, kl), None))
    notes = []
    for label, name, budget, gran, pol in policies:
        alloc = allocation(pol)
        if no_choice(alloc):
            # No choice left: every K and V at its cheapest codec, a uniform row above.
            notes.append("%s: the budget only fits every K and V at its cheapest codec (%.3f "
                         "bits/element), i.e. the uniform row; not run again." % (
                             label, alloc["min_bits_per_element"]))
            continue
        tag = os.path.basename(pol)[len("policy_"):-5]
        rows.append((label, "@" + rel(pol), perplexity(tag, "@" + rel(pol), kl), alloc))
    if os.path.exists(logits):
        os.remove(logits)  # 2 MB of binary; remade by the fp16 run

    # 4. Table.
    def spearman(name):
        with open(os.path.join(OUT, "sens_%s.json" % name)) as f:
            s = json.load(f)
        return s["report"], s["seconds"]

    lines = [
        "# Mixed-precision KV cache from measured sensitivity",
        "",
        "%s, %s. SmolLM2-135M-Instruct Q4_1. Sensitivity measured on %s (%d-token window%s, "
        "second half scored), evaluated on WikiText-2 test, ctx %d, %d windows (%d scored "
        "tokens, the windows of kv_table_ctx512.md); KL and top-1 against the fp16 cache. "
        "bits/element: the cache's own count (codes, scales, zero points; no fp16-protected "
        "tokens at this length). Made by `python3 bench/kv_mixed_precision.py` (commands below)."
        % (datetime.datetime.utcnow().strftime("%Y-%m-%dT%H:%MZ"), platform.machine(),
           CALIB_TEXT, a.sens_ctx, "s" if a.sens_chunks > 1 else "", a.ctx, base["chunks"],
           base["tokens_scored"]),
        "",
        "| policy | bits/elem | PPL | ΔPPL % | KL mean | top-1 agree | predicted KL sum |",
        "|---|---|---|---|---|---|---|",
    ]
    table = []
    for label, kv, r, alloc in rows:
        dppl = 100.0 * (r["ppl"] / base["ppl"] - 1)
        pred = "%.4f" % alloc["predicted_cost"] if alloc else ""
        lines.append("| %s | %.3f | %.4f | %+.2f | %.5f | %.2f%% | %s |" % (
            label, r["kv_bits_per_element"], r["ppl"], dppl, r.get("kl_mean", 0.0),
            100.0 * r.get("top1_agreement", 1.0), pred))
        table.append({"label": label, "kv": kv, "bits_per_element": r["kv_bits_per_element"],
                      "ppl": r["ppl"], "dppl_pct": dppl, "kl_mean": r.get("kl_mean", 0.0),
                      "top1_agreement": r.get("top1_agreement", 1.0),
                      "allocation": alloc and {k: alloc[k] for k in alloc if k != "choices"}})
    lines += [""] + notes
    lines += ["", "## How well the cheap proxies rank layers", "",
              "Spearman rank correlation over the 30 layers between a proxy (summed over a "
              "layer's KV heads) and the full per-layer measurement (only that layer's K or V "
              "quantized), per codec; `full KL` is the full runs' own KL against their ΔPPL "
              "(how much of any disagreement is ΔPPL's noise on a short text). From "
              "`report.spearman` of the sensitivity files.", ""]
    for name in SWEEPS:
        rep, secs = spearman(name)
        sp = rep["spearman"]
        codecs = [(kind, c) for kind in ("k", "v") for c in sp["full_kl"][kind]]
        lines += ["**%s** (%.0f s: %d layer runs in %.0f s, %d head runs in %.0f s)" % (
            name, secs, rep["runs"]["layers"], rep["seconds"]["layers"], rep["runs"]["heads"],
            rep["seconds"]["heads"]), "",
            "| proxy | vs | " + " | ".join("%s %s" % (k.upper(), c) for k, c in codecs) +
            " | mean |", "|---|---|" + "---|" * (len(codecs) + 1)]
        for proxy in ("mse", "kl", "full_kl"):
            if proxy not in sp:
                continue
            what = {"mse": "per-head codec MSE (free)",
                    "kl": "per-head KL, %d-token window" % rep["proxy_ctx"],
                    "full_kl": "full KL"}[proxy]
            for vs in ("dppl", "kl"):
                if proxy == "full_kl" and vs == "kl":
                    continue
                vals = [sp[proxy][k][c]["vs_" + vs] for k, c in codecs]
                lines.append("| %s | full %s | %s | %.3f |" % (
                    what, "ΔPPL" if vs == "dppl" else "KL",
                    " | ".join("%.3f" % v for v in vals), sp[proxy]["mean_vs_" + vs]))
        lines.append("")
    lines += ["", "## Commands", "", "```sh"] + log + ["```", ""]
    with open(os.path.join(ROOT, "bench", "results", "kv_mixed_precision.md"), "w") as f:
        f.write("\n".join(lines))
    with open(os.path.join(ROOT, "bench", "results", "kv_mixed_precision.json"), "w") as f:
        json.dump({"rows": table, "commands": log}, f, indent=1)
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
