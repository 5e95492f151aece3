"""``python -m ecgfm ...`` is the ``ecgfm`` command (Lightning's DDP launcher re-runs a module launched this way
with ``python -m ecgfm.__main__``)."""

import sys

from ecgfm.commands import main

if __name__ == "__main__":
    sys.exit(main())
