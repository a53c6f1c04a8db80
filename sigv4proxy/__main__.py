import sys

from sigv4proxy.cli import main

sys.exit(main())
