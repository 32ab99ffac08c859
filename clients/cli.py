"""`mdp-client`: run the commands of a file through an MDP broker."""

import click


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Send commands to an MDP broker. Not yet implemented."""
    raise click.ClickException("not yet implemented")
