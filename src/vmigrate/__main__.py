"""``python -m vmigrate``: the CLI. The transfer ends, which the controller starts on
hosts for every disk copy, load only what they need (a warm cutover waits for them)."""

import sys

if sys.argv[1:2] == ["transfer"]:
    from vmigrate.cli.transfer_ends import main
else:
    from vmigrate.cli.main import main

main()
