"""`python -m crappify` runs the command-line app."""

from crappify.cli import main

main()
