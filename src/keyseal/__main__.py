"""`python -m keyseal` runs the CLI."""

from keyseal.cli.quick import main

main()
