"""`srgan` imports, and the `crappify` core never imports `srgan` (the dependency points one way only)."""

from __future__ import annotations

import subprocess
import sys


def test_import_srgan():
    import srgan

    assert srgan.__doc__ and "crappify" in srgan.__doc__


def test_crappify_core_does_not_import_srgan():
    code = ("import sys\n"
            "import crappify, crappify.builder, crappify.cli, crappify.preview, crappify.sources, crappify.imageio\n"
            "assert 'crappify.builder' in sys.modules\n"
            "bad = sorted(m for m in sys.modules if m == 'srgan' or m.startswith('srgan.'))\n"
            "print(','.join(bad))\n"
            "sys.exit(1 if bad else 0)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"crappify imported: {proc.stdout.strip()} {proc.stderr}"
