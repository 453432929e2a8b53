"""What every benchmark shares: its comma-separated number options, and what it does last: write its JSON result
under benchmarks/results/ and say where."""

import argparse
import json
from pathlib import Path


def int_list(text: str) -> list[int]:
    """An argparse `type` for comma-separated whole numbers ("0,1,2"; "" is none): seeds, step counts."""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated whole numbers, e.g. 0,1,2") from None


def write_result(path, result: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


def write_report(out: str, result: dict, md: str) -> None:
    """Print the Markdown table, then write `<out>.json` and `<out>.md`."""
    print("\n" + md)
    write_result(out + ".json", result)
    Path(out + ".md").write_text(md)
    print(f"wrote {out}.md")
