import sys

from sdjax.cli import main

sys.exit(main())
