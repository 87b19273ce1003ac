"""Fixtures for the recipe tests: where RePIC's real data is (skip cleanly when absent)."""
import os
from pathlib import Path

import pytest

_DEFAULT = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "repic"


def repic_dir() -> Path | None:
    p = Path(os.environ.get("RLPT_REPIC_DATA", _DEFAULT))
    return p if (p / "databases").is_dir() else None


@pytest.fixture(scope="session")
def repic() -> Path:
    p = repic_dir()
    if p is None:
        pytest.skip("RePIC data not found (../shared/data/repic or $RLPT_REPIC_DATA); "
                    "runs on the dev machine and in CI, which have it")
    return p
