"""The comparison table from run.sh's raw rows (engine, shape, dtype, test, round, tokens/s).

Usage: python table.py RAW.tsv THREADS
Per (shape, dtype, test): each engine's median tokens/s over its rounds; expanse ÷ llama.cpp as the
median of the per-round ratios (rounds alternate the engines, so each ratio pairs neighbours in
time); expanse ÷ transformers from the medians.
"""
import collections
import statistics
import sys

rows = collections.defaultdict(dict)  # (shape, dtype, test) -> engine -> {round: tps}
order = []
for line in open(sys.argv[1]):
    engine, shape, dtype, test, rnd, tps = line.rstrip("\n").split("\t")
    key = (shape, dtype, test)
    if key not in rows:
        order.append(key)
    rows[key].setdefault(engine, {})[rnd] = float(tps)

shapes = {
    "v32k": "random weights, SmolLM2-135M-shaped, vocab 32002",
    "v49k": "random weights, SmolLM2-135M-shaped, vocab 49152, tied",
    "oc4": "random weights, OpenChat's shapes, 4 layers",
    "smollm2": "the real SmolLM2-135M-Instruct",
}
# expanse, expanse-before, then expanse@<tier> rows (run.sh's EXPANSE_TIERS), as they first appear.
mine = []
for r in rows.values():
    mine += [e for e in r if e.startswith("expanse") and e not in mine]
mine.sort(key=lambda e: (e != "expanse", e != "expanse-before", e))
head = ["shape", "dtype", "test"] + [f"{e} t/s" for e in mine] + ["llama.cpp t/s", "transformers t/s"]
head += [f"{e} ÷ llama.cpp" for e in mine] + ["expanse ÷ transformers"]
named = "; ".join(f"{s}: {shapes.get(s, s)}" for s in dict.fromkeys(k[0] for k in order))
print(f"{named}. {sys.argv[2]} threads; tokens/s medians")
print("| " + " | ".join(head) + " |")
print("|" + "---|" * 3 + "---:|" * (len(head) - 3))


def med(engine, r):
    return statistics.median(r[engine].values()) if engine in r else None


def fmt(v, p=1):
    return "—" if v is None else f"{v:.{p}f}"


for key in order:
    r = rows[key]
    cells = [key[0], key[1], key[2]]
    cells += [fmt(med(e, r)) for e in mine] + [fmt(med("llama.cpp", r)), fmt(med("transformers", r))]
    for e in mine:
        pairs = [r[e][k] / r["llama.cpp"][k] for k in r.get(e, {}) if k in r.get("llama.cpp", {})]
        cells.append(f"**{statistics.median(pairs):.2f}**" if pairs else "—")
    hf, ex = med("transformers", r), med("expanse", r)
    cells.append(fmt(ex / hf if hf and ex else None, 2))
    print("| " + " | ".join(cells) + " |")
