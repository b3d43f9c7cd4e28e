import sys

from avkernels.cli import main

sys.exit(main())
