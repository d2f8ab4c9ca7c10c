"""``python -m lazytensor``: the same command line as the ``lazytensor`` script."""

from .cli import main

if __name__ == "__main__":
    main()
