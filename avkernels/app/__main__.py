import sys

from avkernels.app.cli import main

sys.exit(main())
