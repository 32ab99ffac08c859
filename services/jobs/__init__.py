"""The job service: durable jobs on top of the command services (`spec/jobs.md`).

`store/` keeps jobs (an async interface, SQLite by default); `core.py` is the sans-IO job state
machine; `manager.py` is `mdp-jobs`, the MDP worker for `jobs.*`/`titanic.*` that is also a
client of the target services; `titanic.py` is the RFC 9 facade; `cli.py` the program.
"""
