import sys

from dflash_hf.cli import main

sys.exit(main())
