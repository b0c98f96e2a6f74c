"""`python -m service.cli`: the `fraudscore` command."""

from service.cli.main import main

raise SystemExit(main())
