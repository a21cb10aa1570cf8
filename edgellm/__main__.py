"""`python -m edgellm …`: the CLI without the installed console script (e.g. on a machine with only PYTHONPATH)."""

from edgellm.cli import main

raise SystemExit(main())
