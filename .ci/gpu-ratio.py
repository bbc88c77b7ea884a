"""Prints the hlac/fla table from the JSON files .ci/gpu-bench wrote into one folder.

hlac's ops are sums of its kernels' median times: forward = the inference forward kernel (or the
two-pass forward's pair); forward+backward = the training kernels (the forward that keeps the
chunk states, or the two-pass pair, then the backward, and for a backward split over value blocks the two
`sum_blocks` of its dq and dk; attention: forward, then dq and dk/dv). TFLOP/s counts the chunked form's matrix products at
chunk 64 (per token and head 4·C·D + 4·D² for the forward, 2.5× that with the backward;
attention 2·T·D per token and head causal, ×3.5 with the backward): a yardstick, the same for
both sides, not the work either side really does.
"""
import json, os, sys

d = sys.argv[1]
def load(name):
    p = os.path.join(d, name)
    return json.load(open(p)) if os.path.exists(p) else None

fla = (load("fla.json") or {}).get("rows", {})
if not fla and os.path.exists(os.path.join(d, "fla.log")):
    # The peer was stopped before it wrote its JSON: take the rows it printed ("op k=v k=v").
    for line in open(os.path.join(d, "fla.log")):
        parts = line.split()
        if len(parts) > 1 and all("=" in p for p in parts[1:]):
            row = {}
            for p in parts[1:]:
                k, v = p.split("=", 1)
                try:
                    row[k] = float(v)
                except ValueError:
                    row[k] = v
            fla[parts[0]] = row
B, T, H, D, C = 4, 4096, 16, 128, 64
chunk_flops = B * T * H * (4 * C * D + 4 * D * D)
attn_flops = B * T * H * 2 * T * D
# (label, hlac artifact, fwd roles, fwd+bwd roles, peer op, flops fwd); each role list is a list of
# alternatives, the first the artifact has all of counting: the fused forward (`chunk_fwd`, and
# `chunk_fwd_states` for training) or the two-pass one (`chunk_states` + `chunk_out`, both).
FUSED, TWO_PASS = ["chunk_fwd"], ["chunk_states", "chunk_out"]
TRAIN = [["chunk_fwd_states", "chunk_bwd"], TWO_PASS + ["chunk_bwd"]]
ATTN = [["attn_fwd"]], [["attn_fwd", "attn_bwd_dq", "attn_bwd_dkv"]]
OPS = [
    ("causal attention, no RoPE (fla: SDPA)", "attn", *ATTN, "sdpa", attn_flops),
    ("causal attention + fused RoPE (fla: SDPA, no RoPE)", "gdn", *ATTN, "sdpa", attn_flops),
    ("GLA", "gla", [FUSED, TWO_PASS], TRAIN, "gla", chunk_flops),
    ("HGRN-2 (fla: chunk_gla)", "hgrn2", [FUSED, TWO_PASS], TRAIN, "gla", chunk_flops),
    ("RetNet", "retnet", [FUSED, TWO_PASS], TRAIN, "retnet", chunk_flops),
    ("DeltaNet", "deltanet", [FUSED, TWO_PASS], TRAIN, "delta", chunk_flops),
    ("Gated DeltaNet", "gdn", [FUSED, TWO_PASS], TRAIN, "gdn", chunk_flops),
    ("HGRN (d = 2048)", "hgrn", [["scan_fwd"]], [["scan_fwd", "scan_bwd"]], "hgrn", 0),
]

def times(doc, alternatives):
    if doc is None:
        return None
    by_role = {}
    for k in doc["kernels"]:
        if k.get("median_ms") is not None and k["role"] not in by_role:
            by_role[k["role"]] = k["median_ms"]
    for roles in alternatives:
        if all(r in by_role for r in roles):
            return sum(by_role[r] for r in roles)
    return None

def f(x, nd=3):
    return "—" if x is None else f"{x:.{nd}f}"

def ratio(a, b):
    return "—" if a is None or b is None else f"{a / b:.2f}×"

meta = load("hlac-gdn.json") or {}
print(f"device: {meta.get('device')}; peer: {'fla' if fla else 'not run'}")
print()
print("| op | hlac fwd ms | fla fwd ms | ratio | hlac fwd+bwd ms | fla fwd+bwd ms | ratio | hlac fwd TFLOP/s |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
for label, art, fr, br, peer, flops in OPS:
    doc = load(f"hlac-{art}.json")
    hf, hb = times(doc, fr), times(doc, br)
    # A split backward's partial dq and dk are added by `sum_blocks` (timed at dk's size, the
    # first `reduce_blocks` of the artifact: the token inputs' type).
    if hb is not None and br is TRAIN:
        reduce = times(doc, [["reduce_blocks"]])
        if reduce is not None:
            hb += 2 * reduce
    p = fla.get(peer, {})
    pf, pb = p.get("fwd_ms"), p.get("fwdbwd_ms")
    tf = f(flops / hf / 1e9, 1) if hf and flops else "—"
    print(f"| {label} | {f(hf)} | {f(pf)} | {ratio(hf, pf)} | {f(hb)} | {f(pb)} | {ratio(hb, pb)} | {tf} |")
dec = load("hlac-decode64.json")
if dec:
    k = next((k for k in dec["kernels"] if k["role"] == "decode"), None)
    p = fla.get("gdn_decode", {})
    if k and k.get("median_ms"):
        state = 64 * H * D * D * 4 * 2
        print(f"| GDN decode step, B = 64 | {f(k['median_ms'], 4)} | {f(p.get('step_ms'), 4)} | {ratio(k['median_ms'], p.get('step_ms'))} "
              f"| state traffic {state / k['median_ms'] / 1e6:.0f} GB/s (fla {f(p.get('state_GBps'), 0)}) | | | |")
cold = load("hlac-cold.json")
if cold:
    print()
    print(f"hlac cold start (24-layer GDN 3:1 hybrid, process start to every module loaded): {cold['cold_start_ms']:.0f} ms")
    # With the parallel warm-up (.ci/gpu-bench), fla's first calls are those of the warm-up
    # processes (each compiling while the others do: an upper bound); the timed run's find a warm
    # cache.
    warm = {}
    for name in sorted(os.listdir(d)):
        if name.startswith("fla-warm-") and name.endswith(".json"):
            warm.update((load(name) or {}).get("rows", {}))
    source, label = (warm, "in the parallel warm-up, compiles running at once") if warm else (fla, "compile + autotune")
    colds = {n: (r.get("cold_fwd_ms"), r.get("cold_bwd_ms")) for n, r in source.items() if "cold_fwd_ms" in r}
    if colds:
        print(f"fla first calls ({label}), ms: " + ", ".join(f"{n} {f(a, 0)} + {f(b, 0)}" for n, (a, b) in colds.items()))
print()
print("per kernel (hlac, median ms, GB/s; variant-<name>-<mixer> rows are A/B builds):")
for name in sorted(os.listdir(d)):
    if (name.startswith("hlac-") or name.startswith("variant-")) and name.endswith(".json"):
        for k in load(name)["kernels"]:
            gb = k.get("gb_per_s")
            label = name[5:-5] if name.startswith("hlac-") else name[:-5]
            print(f"  {label:10s} {k['kernel']:32s} {f(k.get('median_ms'), 4):>10s} ms  {f(gb, 0):>6s} GB/s  {k.get('error') or ''}")
