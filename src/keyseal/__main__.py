"""`python -m keyseal` runs the CLI."""

from keyseal.cli.main import main

main()
