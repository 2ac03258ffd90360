"""python -m vmigrate"""

from vmigrate.cli.main import main

main()
