"""What every benchmark does last: write its JSON result under benchmarks/results/ and say where."""

import json
from pathlib import Path


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
