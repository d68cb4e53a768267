"""`python -m crappify.cli` (as `torchrun -m crappify.cli` needs) runs the command-line app."""

from crappify.cli import main

main()
