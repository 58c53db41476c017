"""What other processes wrote reaches an operator's terminal with its control characters escaped:
an agent started with ``--advertise-host "$(printf 'h\\033]0;PWNED\\007')"``, or reporting such a GPU
name, cannot retitle the window or rewrite the screen through `corral status` or `corral top`."""

from __future__ import annotations

import datetime

from corral import fleetctl, top
from corral.views import printable

from tests.unit.test_top import fleet_status

HOSTILE = "h\x1b]0;PWNED\x07\x1b[31mRED\x9b2J"


def test_control_characters_are_written_as_escapes_and_the_rest_left_alone() -> None:
    assert printable(HOSTILE) == "h\\x1b]0;PWNED\\x07\\x1b[31mRED\\x9b2J"
    assert printable("gpu-0 RTX 4090 ünïcode") == "gpu-0 RTX 4090 ünïcode"


def test_corral_status_tables_escape_them() -> None:
    out = fleetctl.table([("a1", HOSTILE)], ("AGENT", "HOST"))
    assert "\x1b" not in out and "\x07" not in out and "\x9b" not in out
    assert "h\\x1b]0;PWNED" in out


def test_corral_top_frames_escape_them() -> None:
    status = fleet_status()
    status.agents.append(
        top.Agent(
            id="a9", vendor="amd", status="active", gpus=[top.Gpu(name=HOSTILE, vram_total=1, vram_free=1)]
        )
    )
    lines = top.render(status, "http://gw:11434", datetime.datetime(2026, 1, 2, 3, 4, 5), width=400)
    assert not any(c in line for line in lines for c in ("\x1b", "\x07", "\x9b"))
    assert any("PWNED" in line for line in lines)
