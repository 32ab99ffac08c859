"""Service implementations that `mdp-worker` hosts (os, shell, echo)."""
