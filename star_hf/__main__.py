import sys

from star_hf.cli import main

sys.exit(main())
