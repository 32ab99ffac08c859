"""Repository-root conftest: loads the conformance suite's options and markers.

pytest reads `pytest_addoption` only from initial conftests and plugins; a root conftest is
initial for every invocation (`python -m pytest`, `pytest tests/conformance ...`), so the
options (`--broker-cmd`, `--broker-endpoint`, `--mdp-version`, ...) always exist.
"""

pytest_plugins = ["tests.conformance.plugin"]
