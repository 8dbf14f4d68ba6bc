import sys

from fastiaa.cli import main

sys.exit(main())
