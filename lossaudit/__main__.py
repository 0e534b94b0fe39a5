import sys

from .cli.app import main

if __name__ == "__main__":  # spawned sweep workers import this module again: they must not run the CLI
    sys.exit(main())
