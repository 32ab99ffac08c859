"""An MDP conformance suite: checks any Majordomo broker, worker or client on the wire.

RFC 7 (MDP/0.1), RFC 18 (MDP/0.2) and RFC 8 (MMI), read independently of the `mdp` package
this distribution also ships: the suite imports nothing from it, so it judges our code rather
than mirroring it. Run it with `mdp-conformance broker|worker|client --help`; the rules live
in `broker_rules/`, `worker_rules.py` and `client_rules.py`, one function per rule with its
RFC clause.
"""

__version__ = "0.1.0"
