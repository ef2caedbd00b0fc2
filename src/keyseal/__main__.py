"""`python -m keyseal` runs the CLI."""

from keyseal._internal.cli.quick import main

main()
