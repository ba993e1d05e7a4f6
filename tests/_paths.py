"""Paths the tests share: the repository root and the real datasets ($METAIF_DATA, else
../shared/data next to the repository), for tests that read them and skip without them."""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("METAIF_DATA") or ROOT.parent / "shared" / "data")
