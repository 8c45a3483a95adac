"""`python -m bench`: the whole suite (see bench/suite.py)."""

from bench.suite import main

raise SystemExit(main())
