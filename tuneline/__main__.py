"""`python -m tuneline ...` is the `tuneline` command."""

import sys

from tuneline.flows.cli import main

if __name__ == "__main__":
    sys.exit(main())
