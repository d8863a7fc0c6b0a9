"""`python -m dnsdisco` runs the command line."""

from dnsdisco.cli import main

raise SystemExit(main())
