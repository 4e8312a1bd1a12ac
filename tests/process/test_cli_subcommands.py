"""The `cluster` command line shows every subcommand, and one whose module does not import fails
loudly (a traceback naming the module, a nonzero exit) instead of disappearing from --help."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_cli(prelude: str, *args: str) -> subprocess.CompletedProcess[str]:
    code = f"import sys\n{prelude}\nfrom cluster.cli import main\nmain(sys.argv[1:])"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=60)


def test_help_lists_every_subcommand() -> None:
    proc = run_cli("", "--help")
    assert proc.returncode == 0, proc.stderr
    for name in ("up", "status", "derpmap", "probe", "bench", "keygen"):
        assert name in proc.stdout


def test_a_subcommand_that_does_not_import_is_an_error_with_its_traceback() -> None:
    # None in sys.modules makes `import derptools.probe` raise ImportError, as a broken module would.
    proc = run_cli("sys.modules['derptools.probe'] = None", "status", "--help")
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "derptools.probe" in proc.stderr.splitlines()[-1]
    assert "usage:" not in proc.stdout
