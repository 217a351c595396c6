import sys

from hivlp.cli import main

sys.exit(main())
