"""mdp: the ZeroMQ Majordomo Protocol (MDP/0.1, MDP/0.2, MMI) in Python."""

__version__ = "0.1.0"
