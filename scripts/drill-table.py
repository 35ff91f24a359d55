#!/usr/bin/env python3
"""Turns `fedmesh drill -o json` reports into the Markdown table BENCHMARKS.md
keeps: one row per drill, its figures at each rate side by side.

    scripts/drill-table.py 200=three-clouds-200.json 1000=three-clouds-1000.json
"""
import json
import sys


def ms(v):
    """humantime ("1s 250ms", "834ms", "0s") to a short reading."""
    if v is None:
        return "–"
    total = 0.0
    for part in v.split():
        for unit, scale in (("ms", 1e-3), ("us", 1e-6), ("µs", 1e-6), ("ns", 1e-9), ("s", 1.0), ("m", 60.0)):
            if part.endswith(unit):
                total += float(part[: -len(unit)]) * scale
                break
    return f"{total * 1000:.0f} ms" if total < 1 else f"{total:.2f} s"


def row(r):
    verdict = "pass" if r["verdict"]["passed"] else "FAIL"
    shift = "–" if r.get("share_shift") is None else f'{r["share_shift"] * 100:.0f}'
    p99 = " / ".join(ms(r[k]["p99"]) for k in ("before", "during", "after"))
    failback = ms(r["failback"]) if r["left_home"] else "–"
    return f'{verdict}, {r["failed"]}/{r["requests"]}, {ms(r["detect"])}, {ms(r["rto"])}, {failback}, {shift}, {p99}'


def main(args):
    runs = []
    for a in args:
        rate, path = a.split("=", 1)
        with open(path) as f:
            runs.append((rate, {r["drill"]: r for r in json.load(f)}))
    names = list(dict.fromkeys(n for _, rs in runs for n in rs))
    head = " | ".join(f"at {rate}/s: verdict, failed/requests, detect, RTO, failback, share shift (points), p99 before / during / after" for rate, _ in runs)
    print(f"| drill | {head} |")
    print("|---|" + "---|" * len(runs))
    for n in names:
        cells = [row(rs[n]) if n in rs else "not run" for _, rs in runs]
        print(f"| {n} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
