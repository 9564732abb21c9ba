"""bench/step_profile.py, short: a tiny convnet, one round."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_step_profile_accounts_for_every_convolution(tmp_path: Path) -> None:
    out = tmp_path / "profile.json"
    subprocess.run([sys.executable, str(REPO / "bench" / "step_profile.py"), "--width", "4", "--input-size", "16",
                    "--crops", "4", "--rounds", "1", "--json", str(out)], check=True, capture_output=True)
    result = json.loads(out.read_text())
    assert [row["layers"] for row in result["convolutions"]] == ["0", "3", "7", "10", "14", "17", "21", "24"]
    assert result["convolutions"][1]["weight"] == "4×4×3×3" and result["convolutions"][-1]["weight"] == "32×32×3×3"
    for row in result["convolutions"]:
        assert row["forward GFLOP/s"] > 0 and row["backward GFLOP/s"] > 0
    assert sum(result["shares"].values()) == pytest.approx(1.0)
    assert result["shares"]["convolution"] > 0 and result["seconds"] > 0
