import sys

from sigv4proxy.tools.cli import main

sys.exit(main())
