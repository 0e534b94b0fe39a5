"""Print the detection table (bug x dtype -> found / missed) as Markdown, for docs/detection.md:

    python tests/quality/table.py
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: planted, quality

from quality.bugs import DTYPES, PLANTS, found  # noqa: E402


def main() -> None:
    print("| planted bug | what it does | " + " | ".join(DTYPES) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in DTYPES) + " |")
    for plant in PLANTS:
        cells = []
        for dtype in DTYPES:
            if dtype not in plant.dtypes:
                cells.append("n/a")
                continue
            bug, twin, why = found(plant, dtype)
            cells.append(("found" if bug else "MISSED") + ("" if twin else " (twin FLAGGED)"))
            print(f"{plant.name} {dtype}: {why}", file=sys.stderr)
        print(f"| {plant.name} | {plant.shape} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
