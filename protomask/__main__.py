import sys

from protomask.cli import main

sys.exit(main())
