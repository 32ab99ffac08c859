"""Broker rules: the suite plays clients and workers on raw sockets against the broker under
test. Importing this package registers every rule, in the order the suite runs them."""

import importlib

# Frame layouts first, then heartbeating, routing, error handling, MMI, and the non-RFC rules.
MODULES = ("client", "worker", "routing", "unexpected", "malformed", "mmi", "bridging", "dialects")

for _module in MODULES:
    importlib.import_module(f"{__name__}.{_module}")
