"""`python -m mailward` is the `mailward` command."""

from mailward.cli import main

raise SystemExit(main())
