"""Adapts the extracted TRL test helpers to the installed TRL 1.16 (the mirror's tests are a later checkout):
names its testing_utils imports that this TRL lacks get a find_spec-based stand-in."""

import importlib
import re
import sys
from pathlib import Path

IMPORT_UTILS = importlib.import_module("trl.import_utils")

path = Path(sys.argv[1]) / "tests" / "testing_utils.py"
text = path.read_text()
block = re.search(r"from trl\.import_utils import \((.*?)\)", text, re.S)
names = [n.strip() for n in block.group(1).split(",") if n.strip()]
missing = [n for n in names if not hasattr(IMPORT_UTILS, n)]
if missing:
    kept = ",\n    ".join(n for n in names if n not in missing)
    stand_ins = "\n".join(
        f"def {n}():\n    import importlib.util\n\n    return importlib.util.find_spec({n[3:-10]!r}) is not None\n"
        for n in missing
    )
    text = text.replace(block.group(0), f"from trl.import_utils import (\n    {kept},\n)\n\n\n{stand_ins}")
    path.write_text(text)
print("stand-ins for", missing)
