"""``python -m robustprune`` = the ``robustprune`` command."""
from robustprune.cli import main

raise SystemExit(main())
