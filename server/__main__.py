"""`python -m server` is the `token-vault-mcp` command."""

import sys

from server.cli import main

sys.exit(main())
