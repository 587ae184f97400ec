"""``python -m kcompress``: the same command as the ``kcompress`` entry point."""

from kcompress.cli.main import main

if __name__ == "__main__":  # spawned sweep workers import this module without running the command
    main()
