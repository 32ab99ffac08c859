"""`mdp-worker`: host one or more services on an MDP broker."""

import click


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Host a service (os, shell, echo) on an MDP broker. Not yet implemented."""
    raise click.ClickException("not yet implemented")
