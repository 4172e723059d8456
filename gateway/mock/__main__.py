"""`python -m gateway.mock [flags]`: the standalone mock, the same as `realtime-gateway mock`."""
import sys

from gateway.cli import main

if __name__ == "__main__":
    sys.exit(main(["mock", *sys.argv[1:]]))
