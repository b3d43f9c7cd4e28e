"""Two saved benchmark runs side by side: each comparison's ratio in both, and how it moved.

Usage: ``python benchmarks/compare.py OLD.json NEW.json``. Each file is either a ratio file this
suite writes (``<module>_<device>.json``, under ``.benchmarks/ratios/<time>/`` or
``benchmarks/results/``) or a pytest-benchmark run (``--benchmark-autosave`` under
``.benchmarks/<machine>/``, or ``--benchmark-json``), whose ``extra_info`` carries the ratios.
Ratios are candidate / baseline from the same run, so two runs on different machines or loads
compare better than their absolute times do.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

Key = tuple[str, str, str]  # case, candidate, baseline


def load_ratios(path: Path) -> dict[Key, dict]:
    """(case, candidate, baseline) -> {"ratio", "target"} from either kind of saved run."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise SystemExit(f"compare.py: cannot read {path}: {error}") from None
    if "comparisons" in data:  # a ratio file
        return {
            (row["case"], row["candidate"], row["baseline"]): row
            for row in data["comparisons"]
            if row["ratio"] is not None
        }
    if "benchmarks" in data:  # pytest-benchmark's JSON
        ratios = {}
        for entry in data["benchmarks"]:
            extra = entry.get("extra_info", {})
            for ratio in extra.get("ratios", {}).values():
                if ratio["ratio"] is not None:
                    key = (entry["group"] or "", extra["implementation"], ratio["baseline"])
                    ratios[key] = ratio
        return ratios
    raise SystemExit(
        f"compare.py: {path} is neither a ratio file (no 'comparisons') nor a pytest-benchmark "
        "run (no 'benchmarks')"
    )


def side_by_side(old: dict[Key, dict], new: dict[Key, dict]) -> str:
    """A Markdown table of every comparison in either run, in the order they were run."""
    lines = [
        "| Case | Candidate vs baseline | Target | Old | New | New / old |",
        "|---|---|---|---|---|---|",
    ]
    for key in dict.fromkeys([*old, *new]):
        case, candidate, baseline = key
        before, after = old.get(key), new.get(key)
        target = (after or before)["target"]
        change = (
            "-" if before is None or after is None else f"{after['ratio'] / before['ratio']:.2f}"
        )
        lines.append(
            f"| {case} | {candidate} vs {baseline} | "
            + ("-" if target is None else f"<= {target:.2f}x")
            + f" | {_ratio(before)} | {_ratio(after)} | {change} |"
        )
    return "\n".join(lines)


def _ratio(row: dict | None) -> str:
    return "-" if row is None else f"{row['ratio']:.2f}x"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("old", type=Path, help="the earlier run's JSON file")
    parser.add_argument("new", type=Path, help="the later run's JSON file")
    args = parser.parse_args(argv)
    print(side_by_side(load_ratios(args.old), load_ratios(args.new)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
