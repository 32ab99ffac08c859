"""The command client `mdp-client`: load a commands file, run it through MDP, render results.

commands   the file format: validation and located error messages (exit 65/66)
runner     running commands concurrently through `mdp.client`, the retry rule, MMI check
results    one command's outcome, the exit code of a run, the JSON form
render     human (rich), --json and --jsonl output
embedded   --embedded: a broker and workers inside the client process
cli        the click entry point
"""
