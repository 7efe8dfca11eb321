"""Run the side-by-side benchmark: python bench/run.py [--no-1b] [--reps N] (same as `autolm bench`)."""

import sys

from autolm.bench import main

if __name__ == "__main__":
    sys.exit(main())
