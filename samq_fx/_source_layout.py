"""Map the top-level `passes/` folder as `samq_fx.passes` when running from a checkout."""

import importlib.util
import sys
from pathlib import Path


def _map_source_passes() -> None:
    """Make `samq_fx.passes` importable from a source checkout too.

    The repo keeps graph passes in a top-level `passes/` folder, installed as `samq_fx.passes`
    by the package mapping in pyproject.toml. When Python imports `samq_fx` straight from a
    checkout (`python -m samq_fx.cli` or `torchrun -m samq_fx.cli` in the repo root, or
    PYTHONPATH=.), there is no `samq_fx/passes/`; map the sibling folder under the same name.
    """
    here = Path(__file__).resolve().parent
    source = here.parent / "passes" / "__init__.py"
    if (here / "passes").is_dir() or "samq_fx.passes" in sys.modules or not source.is_file():
        return
    spec = importlib.util.spec_from_file_location(
        "samq_fx.passes", source, submodule_search_locations=[str(source.parent)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["samq_fx.passes"] = module
    spec.loader.exec_module(module)


_map_source_passes()
