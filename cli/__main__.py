"""`python -m cli` runs the same command line as the `aiproxy` script."""

from cli.main import main

main()
