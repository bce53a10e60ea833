"""Paired comparison of two `tessera eval` reports over the same items.

Usage: python3 compare.py A/report.json B/report.json SYSTEM_A SYSTEM_B [--exclude C/report.json]
Prints per-task accuracies of both systems and a paired, task-stratified
bootstrap 95% interval of (A - B) per task and on the macro average
(domains weighted equally, tasks equally within a domain), as the harness
computes it for its own pairs. Only items both reports hold count; with
--exclude, items that report C holds (for any system) are left out, which
gives a comparison on items held out from an earlier run.
"""
import gzip, json, random, sys
from collections import defaultdict

def load(path):
    op = gzip.open if path.endswith(".gz") else open
    with op(path, "rt") as f:
        return json.load(f)

def items(rep, system):
    out = {}
    for r in rep["results"]:
        if r["system"] == system:
            out[r["task"]] = {i["item"]: i["score"] for i in r["items"]}
    return out

def main():
    a_path, b_path, sa, sb = sys.argv[1:5]
    ra, rb = load(a_path), load(b_path)
    excluded = set()
    if len(sys.argv) > 6 and sys.argv[5] == "--exclude":
        for r in load(sys.argv[6])["results"]:
            excluded.update((r["task"], i["item"]) for i in r["items"])
    domain = {t["name"]: t["domain"] for t in ra["tasks"]}
    ia, ib = items(ra, sa), items(rb, sb)
    tasks = [t for t in domain if t in ia and t in ib]
    paired = {
        t: [(ia[t][k], ib[t][k]) for k in ia[t] if k in ib[t] and (t, k) not in excluded]
        for t in tasks
    }
    tasks = [t for t in tasks if paired[t]]
    if not tasks:
        sys.exit("no item is in both reports (and not excluded)")
    paired = {t: paired[t] for t in tasks}
    def macro(per_task):
        by_dom = defaultdict(list)
        for t, v in per_task.items():
            by_dom[domain[t]].append(v)
        return sum(sum(v) / len(v) for v in by_dom.values()) / len(by_dom)
    rng = random.Random(0)
    boots = defaultdict(list)
    for _ in range(2000):
        diffs = {}
        for t, p in paired.items():
            s = [p[rng.randrange(len(p))] for _ in p]
            diffs[t] = sum(x - y for x, y in s) / len(s)
        for t, d in diffs.items():
            boots[t].append(d)
        boots["macro"].append(macro(diffs))
    def ci(v):
        v = sorted(v)
        return v[int(0.025 * len(v))], v[int(0.975 * len(v)) - 1]
    print(f"| task | n | {sa} | {sb} | diff [95% CI] |")
    print("|---|---|---|---|---|")
    acc_a, acc_b = {}, {}
    for t in tasks:
        p = paired[t]
        acc_a[t] = sum(x for x, _ in p) / len(p)
        acc_b[t] = sum(y for _, y in p) / len(p)
        lo, hi = ci(boots[t])
        print(f"| {t} | {len(p)} | {100*acc_a[t]:.1f} | {100*acc_b[t]:.1f} | {100*(acc_a[t]-acc_b[t]):+.1f} [{100*lo:+.1f}, {100*hi:+.1f}] |")
    lo, hi = ci(boots["macro"])
    ma, mb = macro(acc_a), macro(acc_b)
    print(f"| macro | | {100*ma:.1f} | {100*mb:.1f} | {100*(ma-mb):+.1f} [{100*lo:+.1f}, {100*hi:+.1f}] |")

main()
