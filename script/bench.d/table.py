"""Prints script/bench's summary: one row per figure, with the reference it is compared
with (measured in the same run), their ratio, the goal and whether this run met it, and
the machine's one-minute load average when the figure was taken.

    python3 table.py SUMMARY_TSV
Each line of SUMMARY_TSV: figure, value, unit, reference label ("" for none), reference
value, goal ("value<=30", "ratio>=0.4", several joined by ","; "" for none), load."""

import re
import sys

rows = []
for line in open(sys.argv[1]):
    name, value, unit, ref_label, ref_value, goal, load = line.rstrip("\n").split("\t")
    value = float(value)
    ratio = value / float(ref_value) if ref_label and float(ref_value) else None
    checks = []
    for cond in filter(None, goal.split(",")):
        m = re.fullmatch(r"(value|ratio)(<=|>=)([0-9.]+)", cond.strip())
        if not m:
            raise SystemExit(f"table.py: bad goal {cond!r} for {name!r}")
        subject = value if m.group(1) == "value" else ratio
        bound = float(m.group(3))
        checks.append(subject is not None and (subject <= bound if m.group(2) == "<=" else subject >= bound))
    met = "" if not checks else ("yes" if all(checks) else "no")
    ref = f"{ref_label} {float(ref_value):g}" if ref_label else ""
    rows.append(
        (
            name,
            f"{value:g} {unit}",
            ref,
            f"{ratio:.2f}" if ratio is not None else "",
            goal.replace("value", "v").replace("ratio", "r").replace(",", ", "),
            met,
            load,
        )
    )

head = ("figure", "measured", "reference (same run)", "ratio", "goal", "met", "load")
widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
for r in [head] + rows:
    print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
