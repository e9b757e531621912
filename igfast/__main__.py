"""`python -m igfast`: the same as the `igfast` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
