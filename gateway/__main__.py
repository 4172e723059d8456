"""`python -m gateway` is the same as the `realtime-gateway` console script."""
import sys

from gateway.cli import main

sys.exit(main())
