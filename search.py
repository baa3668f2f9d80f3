"""Entry point: ``python search.py --budget-mflops 300`` (see ``--help``)."""

from search.cli import main

if __name__ == "__main__":
    main()
