"""`mdp-web`: the web console and REST API over the broker (spec/api.md). Needs `mdp[web]`."""
