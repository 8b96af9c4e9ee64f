"""``python -m kbfgs``: the same command line as the ``kbfgs`` console script."""

import sys

from kbfgs.experiments.cli import main

if __name__ == "__main__":
    sys.exit(main())
