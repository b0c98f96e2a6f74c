"""The `fraudscore` command line: serve, warm, health and rules check (main.py), the offline
commands (offline.py, options.py). Offline imports stay inside the commands, so `serve` loads none.
"""

from service.cli.main import main

__all__ = ["main"]
