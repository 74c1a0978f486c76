"""`python -m htcl.sample_world`: the same as `htcl sample-data`."""

from htcl.sample_world.cli import main

raise SystemExit(main())
