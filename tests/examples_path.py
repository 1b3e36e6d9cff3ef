"""Puts examples/ on sys.path so tests load the same real assets (examples/assets.py) the demo does."""

import sys
from pathlib import Path

EXAMPLES = str(Path(__file__).resolve().parents[1] / "examples")
if EXAMPLES not in sys.path:
    sys.path.insert(0, EXAMPLES)
