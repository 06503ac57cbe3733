"""``python -m streamsync``: the same command line as the ``streamsync`` script."""

from streamsync.cli import main

if __name__ == "__main__":
    main()
