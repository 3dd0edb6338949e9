"""`python -m passuntil` is the same as the `passuntil` command."""

from passuntil.cli import main

main()
