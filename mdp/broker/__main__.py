"""`python -m mdp.broker` is `mdp-broker`."""

from mdp.broker.cli import main

main()
