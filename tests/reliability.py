"""The fault table of docs/reliability.md, written from the tests' own output.

A test that injects a fault or bad input calls `record(...)` after its assertions passed, with what it
injected and what it counted: faults injected, runs that completed after them, rows lost, duplicates.
Each call leaves one JSON file under `runs/reliability/` (`PADISTILL_RELIABILITY_DIR`), so a test that
fails records nothing. `python tests/reliability.py` (`make reliability-table`) rewrites the table
between the markers of docs/reliability.md from those files: run `make test` first."""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RECORDS = Path(os.environ.get("PADISTILL_RELIABILITY_DIR", REPO / "runs" / "reliability"))
DOC = REPO / "docs" / "reliability.md"
BEGIN, END = "<!-- fault-table: written by `make reliability-table` -->", "<!-- /fault-table -->"


def record(request, fault: str, behaviour: str, *, injected: int, completed: int,
           rows_lost: int | None = None, duplicates: int | None = None) -> None:
    """One row of the table, from the test `request` belongs to. `injected`: faults or bad inputs put
    in; `completed`: runs (or steps) that then finished; rows lost / duplicates where the test counts
    rows (None: not a row-producing fault)."""
    RECORDS.mkdir(parents=True, exist_ok=True)
    test = request.node.nodeid
    entry = {"test": test, "fault": fault, "behaviour": behaviour, "injected": int(injected),
             "completed": int(completed), "rows_lost": rows_lost, "duplicates": duplicates,
             "recorded": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "at": time.time(), "pid": os.getpid()}
    name = re.sub(r"[^\w.-]+", "_", f"{test}--{fault}")[:180]
    (RECORDS / f"{name}.json").write_text(json.dumps(entry, indent=1))


def _exists(nodeid: str) -> bool:
    path, _, name = nodeid.partition("::")
    f = REPO / path
    return f.exists() and f"def {name.split('[')[0]}(" in f.read_text()


def merged(entries: list[dict]) -> list[dict]:
    """One row per (test function, fault): a parametrised test's cases add up."""
    rows: dict[tuple, dict] = {}
    for e in entries:
        fn = e["test"].split("[")[0]
        key = (fn, e["fault"])
        if key not in rows:
            rows[key] = {**e, "test": fn, "cases": 0}
        else:
            r = rows[key]
            for k in ("injected", "completed", "rows_lost", "duplicates"):
                if e[k] is not None:
                    r[k] = (r[k] or 0) + e[k]
            r["recorded"] = max(r["recorded"], e["recorded"])
        rows[key]["cases"] += 1
    return list(rows.values())


def render(entries: list[dict]) -> str:
    def cell(v):
        return "-" if v is None else str(v)

    rows = ["| fault or bad input | what padistill does | injected | runs completed | rows lost | duplicates | test |",
            "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for e in entries:
        test = e["test"].replace("tests/", "", 1) + (f" ({e['cases']} cases)" if e["cases"] > 1 else "")
        rows.append(f"| {e['fault']} | {e['behaviour']} | {e['injected']} | {e['completed']} | "
                    f"{cell(e['rows_lost'])} | {cell(e['duplicates'])} | `{test}` |")
    return "\n".join(rows)


def main() -> int:
    entries = [json.loads(p.read_text()) for p in sorted(RECORDS.glob("*.json"))] if RECORDS.exists() else []
    entries = [e for e in entries if _exists(e["test"])]
    latest = {}  # a test's rows from its latest run only (a row whose wording changed since goes)
    for e in entries:
        if e["test"] not in latest or e.get("at", 0) > latest[e["test"]].get("at", 0):
            latest[e["test"]] = e
    entries = [e for e in entries if e.get("pid") == latest[e["test"]].get("pid")]
    if not entries:
        print(f"no records under {RECORDS}: run `make test` first", file=sys.stderr)
        return 1
    entries = sorted(merged(entries), key=lambda e: (e["test"].split("::")[0], e["test"], e["fault"]))
    doc = DOC.read_text()
    if BEGIN not in doc or END not in doc:
        print(f"{DOC} has no fault-table markers", file=sys.stderr)
        return 1
    head, rest = doc.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    when = max(e["recorded"] for e in entries)
    totals = (f"\n\n{len(entries)} rows from {len({e['test'] for e in entries})} test functions (latest record {when} UTC): "
              f"{sum(e['injected'] for e in entries)} faults and bad inputs injected, "
              f"{sum(e['completed'] for e in entries)} runs completed after them, "
              f"{sum(e['rows_lost'] or 0 for e in entries)} rows lost, {sum(e['duplicates'] or 0 for e in entries)} "
              "duplicates.\n")
    DOC.write_text(head + BEGIN + "\n" + render(entries) + totals + END + tail)
    print(f"wrote {len(entries)} rows to {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
