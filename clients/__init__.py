"""The command client: load a commands file, run it through MDP, render the results."""
