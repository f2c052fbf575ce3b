"""`python -m sdserver`: the same as the `sdserver` command."""

from sdserver.cli import main

if __name__ == "__main__":
    main()
