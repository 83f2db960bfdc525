"""``python -m data.phantom``: see :mod:`data.phantom.cli`."""
import sys

from data.phantom.cli import main

if __name__ == "__main__":
    sys.exit(main())
