"""`python -m recsvc ...` runs the same CLI as the `recsvc` command."""

from recsvc.cli import main

raise SystemExit(main())
