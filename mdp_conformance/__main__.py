"""`python -m mdp_conformance` is `mdp-conformance`."""

from mdp_conformance.cli import main

main()
