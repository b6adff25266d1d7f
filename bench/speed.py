"""Speed of SAM's image encoder and mask decoder: float baselines against lowered settings.

The benchmark lives in the package (`samq_fx/speed.py`, also `samq-fx bench`); this file runs it
from a checkout:

    PYTHONPATH=. python3 bench/speed.py --model vit_b --device cuda --batch 1 8 --json speed.json
"""

import sys
from pathlib import Path

if __package__ is None and "samq_fx" not in sys.modules:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from samq_fx.speed import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
