"""search: run GKPD searches with Optuna (or Ray Tune): data, models, training, trials, reports, export."""

from search.config import SearchConfig
from search.pareto import pareto_front

__all__ = ["SearchConfig", "pareto_front", "main"]


def main(argv=None) -> None:
    """The command line (``python search.py``); imported lazily so ``import search`` stays light."""
    from search.cli import main as cli_main

    cli_main(argv)
