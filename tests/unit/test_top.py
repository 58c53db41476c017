"""`corral top`'s frames: what it draws from a gateway's /api/status, and how it redraws in place."""

from __future__ import annotations

import datetime

import msgspec
import pytest
from corral import top
from corral.protocol.messages import AgentState, Gpu, PsModel
from corral.views import Rates, status_body

GIB = 2**30
NOW = datetime.datetime(2026, 1, 2, 3, 4, 5)


def agent(id: str, vendor: str, gpus: list[tuple[str, int, int]], **kw: object) -> AgentState:
    return msgspec.convert(
        {
            "id": id,
            "vendor": vendor,
            "host": "box",
            "ollama_url": "http://box:11434",
            "gpus": [
                msgspec.to_builtins(
                    Gpu(index=i, name=n, vendor=vendor, vram_total=t * GIB, vram_free=f * GIB)
                )
                for i, (n, t, f) in enumerate(gpus)
            ],
            "parallel": 4,
            **kw,
        },
        AgentState,
    )


def fleet_status(**kw: object) -> top.Status:
    loaded = PsModel(
        name="llama3.2:latest",
        model="llama3.2:latest",
        size=3 * GIB,
        digest="d",
        expires_at="2026-01-02T03:09:05Z",
        size_vram=3 * GIB,
        context_length=32768,
    )
    agents = [
        agent(
            "nvidia-0", "nvidia", [("RTX 4090", 24, 12)], in_flight=3, loaded=[msgspec.to_builtins(loaded)]
        ),
        agent("amd-1", "amd", [("W7800", 32, 32), ("W7800", 32, 16)], status="draining", queued=2),
    ]
    body = status_body(
        agents,
        kw.get("rates"),  # type: ignore[arg-type]
        {"llama3.2:latest": 5},
        nats_away_s=kw.get("nats_away_s"),  # type: ignore[arg-type]
    )
    return msgspec.json.decode(body, type=top.Status)


def test_a_frame_shows_each_agent_its_gpus_vram_slots_and_the_rates() -> None:
    rates = Rates(
        window_s=60,
        requests=30,
        errors=0,
        tokens=600,
        requests_per_s=0.5,
        tokens_per_s=10.0,
        ttft_ms_p50=212.4,
    )
    lines = top.render(fleet_status(rates=rates), "http://gw:11434", NOW)
    text = "\n".join(lines)
    assert lines[0] == "corral top  http://gw:11434  03:04:05"
    assert "2 agents (1 active)  3 GPUs  VRAM 28.0/88.0 GiB  1 loaded  3 running  7 queued" in text
    assert "last 60 s: 0.50 req/s  10.0 tokens/s  TTFT p50 212 ms  p95 -" in text
    assert "fleet queue: llama3.2:latest 5" in text
    table = lines[lines.index("") + 1 :]
    assert table[0].split() == [
        "AGENT",
        "VENDOR",
        "STATUS",
        "GPU",
        "VRAM",
        "GiB",
        "SLOTS",
        "QUEUED",
        "LOADED",
    ]
    amd, amd_second_gpu, nvidia = table[1:]  # sorted by agent id; a second GPU on a line of its own
    assert amd.split()[:3] == ["amd-1", "amd", "draining"] and "[............] 0.0/32.0" in amd
    assert "[######......] 16.0/32.0" in amd_second_gpu and not amd_second_gpu.startswith("amd")
    assert nvidia.split()[:3] == ["nvidia-0", "nvidia", "active"]
    assert "[######......] 12.0/24.0" in nvidia and "3/4" in nvidia and "llama3.2:latest (32k)" in nvidia


def test_without_an_aggregator_it_says_so_and_lines_fit_the_terminal() -> None:
    lines = top.render(fleet_status(), "http://gw:11434", NOW, width=40)
    assert "rates: no aggregator is running" in lines
    assert max(len(line) for line in lines) <= 40


def test_a_gateway_cut_off_from_nats_is_said_first() -> None:
    """Its view is the fleet as it last saw it, and model requests fail: the frame says so at the
    top, and does not blame a missing aggregator for the rates it cannot read."""
    lines = top.render(fleet_status(nats_away_s=12.34), "http://gw:11434", NOW)
    assert lines[1].startswith("NATS LOST: the gateway has been cut off from NATS for 12 s")
    assert "rates: none while cut off from NATS" in lines
    assert not any(line.startswith("NATS LOST") for line in top.render(fleet_status(), "u", NOW))


def test_a_user_keys_view_without_addresses_still_decodes() -> None:
    status = msgspec.json.decode(
        b'{"agents": [{"id": "a", "status": "active"}], "extra": 1}', type=top.Status
    )
    assert status.agents[0].id == "a" and status.rates is None
    assert "a" in top.render(status, "u", NOW)[-1]


def test_a_frame_is_drawn_over_the_last_one() -> None:
    drawn = top.frame(["one", "two"])
    assert drawn == "\x1b[H" + "one\x1b[K\n" + "two\x1b[K\n" + "\x1b[J"


def test_an_unreachable_gateway_is_said_so(capsys: pytest.CaptureFixture[str]) -> None:
    assert top.main(["--once", "--url", "http://127.0.0.1:9"]) == 1  # discard port: nothing listens
    err = capsys.readouterr().err
    assert err.startswith("corral top: gateway unreachable at http://127.0.0.1:9")


def test_a_zero_interval_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert top.main(["--interval", "0"]) == 2
    assert "--interval must be above 0" in capsys.readouterr().err
