"""Build hook: compile `mdp/_fastzmq.c` into the optional module `_mdp_fastzmq`.

The module makes the broker's socket I/O cheaper (see `mdp.fastzmq`); everything works without
it. So a machine without a C compiler or Python's headers still installs: the hook says why on
stderr and the wheel stays pure Python. `MDP_NO_COMPILE=1` skips the compiler on purpose; `CC`
names another compiler (default: the one Python was built with).

The module is installed at the top level of site-packages (not inside `mdp/`), so an editable
install gets it too without a build product in the source tree. It carries the hash of the
source it was built from; `mdp.fastzmq` ignores a module whose hash differs from the
`mdp/_fastzmq.c` beside it (an edited source, not yet reinstalled), instead of running stale
code.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

SOURCE = Path("mdp") / "_fastzmq.c"
MODULE = "_mdp_fastzmq"


def source_hash(source: bytes) -> str:
    """The hash `mdp.fastzmq` compares with the built module's SOURCE_HASH."""
    return hashlib.sha256(source).hexdigest()[:16]


class FastZmqBuildHook(BuildHookInterface):  # type: ignore[type-arg]
    """Compile the extension for wheel and editable builds; fall back to pure Python."""

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name != "wheel":
            return
        if os.environ.get("MDP_NO_COMPILE"):
            self._skip("MDP_NO_COMPILE is set")
            return
        source = Path(self.root) / SOURCE
        suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
        self._tmp = tempfile.TemporaryDirectory(prefix="mdp-build-")
        output = Path(self._tmp.name) / (MODULE + suffix)
        cc = shlex.split(os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc")
        command = [
            *cc,
            "-O2",
            "-shared",
            "-fPIC",
            "-fvisibility=hidden",
            f"-I{sysconfig.get_paths()['include']}",
            f'-DMDP_SOURCE_HASH="{source_hash(source.read_bytes())}"',
            "-o",
            str(output),
            str(source),
        ]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as exc:
            self._skip(f"could not run the C compiler: {exc}")
            return
        if result.returncode != 0:
            self._skip(f"the C compiler failed:\n{result.stderr.strip()}")
            return
        build_data["force_include"][str(output)] = MODULE + suffix
        build_data["pure_python"] = False
        build_data["infer_tag"] = True

    def finalize(self, version: str, build_data: dict[str, Any], artifact_path: str) -> None:
        tmp = getattr(self, "_tmp", None)
        if tmp is not None:
            tmp.cleanup()

    def _skip(self, why: str) -> None:
        print(
            f"mdp: building without the compiled socket I/O ({MODULE}): {why}. Everything "
            "works; the broker uses more CPU per message.",
            file=sys.stderr,
        )
