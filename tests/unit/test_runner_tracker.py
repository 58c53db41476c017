"""The agent's runner tracker on constructed /api/ps readings and request facts."""

from __future__ import annotations

import logging

import pytest
from corral.agent.runners import (
    EXPIRED_AGAIN_S,
    EXPIRY_MARGIN_S,
    RunnerChange,
    RunnerTracker,
    evicted_by,
    until_expiry,
)
from corral.protocol.messages import PsModel
from corral.protocol.names import parse_name
from corral.routing import TYPICAL_REQUEST_S

NAME = "llama3.2:latest"
KEY = parse_name(NAME).key
TOKEN = parse_name(NAME).token


def ps(ctx: int, name: str = NAME) -> PsModel:
    return PsModel(name=name, model=name, size=1, digest="d1", expires_at="", size_vram=1, context_length=ctx)


def warm_tracker(ctx: int = 4096) -> RunnerTracker:
    t = RunnerTracker(4096)
    change = t.observe([ps(ctx)], {NAME: 0}, busy=(), default_num_ctx=4096)
    assert change.claims and TOKEN in t.warm
    return t


def test_a_listed_idle_model_at_the_default_context_is_ready_and_warm() -> None:
    t = warm_tracker()
    assert t.ready == {TOKEN} and t.trained == {KEY: 0}
    assert t.observe([ps(4096)], {NAME: 0}, busy=(), default_num_ctx=4096) == RunnerChange()


def test_a_runner_at_another_context_is_ready_but_not_warm() -> None:
    t = RunnerTracker(4096)
    t.observe([ps(8192)], {NAME: 0}, busy=(), default_num_ctx=4096)
    assert TOKEN in t.ready and TOKEN not in t.warm


def test_a_runner_partly_in_system_ram_is_warm_but_offered_on_no_shared_subject() -> None:
    """A GPU agent's runner that spilled into system RAM decodes several times slower: requests it
    can serve at once still go to it (warm), but it holds no claim on the shared subjects, where
    NATS would hand it requests while a card with the model wholly in VRAM has free slots."""
    spilled = PsModel(
        name=NAME, model=NAME, size=32, digest="d1", expires_at="", size_vram=8, context_length=4096
    )
    t = RunnerTracker(4096)
    change = t.observe([spilled], {NAME: 0}, busy=(), default_num_ctx=4096)
    assert change.claims and TOKEN in t.warm and t.offloaded == {TOKEN} and t.claimable == frozenset()
    whole = PsModel(
        name=NAME, model=NAME, size=32, digest="d1", expires_at="", size_vram=32, context_length=4096
    )
    assert t.observe(
        [whole], {NAME: 0}, busy=(), default_num_ctx=4096
    ).claims  # reloaded whole: offered again
    assert t.claimable == {TOKEN}
    cpu = RunnerTracker(4096, on_gpu=False)  # a CPU backend: every runner is in system RAM, none slower
    cpu.observe([spilled], {NAME: 0}, busy=(), default_num_ctx=4096)
    assert cpu.claimable == {TOKEN}
    in_ram = PsModel(
        name=NAME, model=NAME, size=32, digest="d1", expires_at="", size_vram=0, context_length=4096
    )
    t.observe([in_ram], {NAME: 0}, busy=(), default_num_ctx=4096)  # none in VRAM: an Ollama on its CPU
    assert t.claimable == {TOKEN}


def test_a_model_listed_while_our_request_loads_it_stays_loading_until_ollama_answers() -> None:
    t = RunnerTracker(4096)
    assert t.will_run(TOKEN, "r1", 0) == RunnerChange(state=True)
    t.observe([ps(4096)], {NAME: 0}, busy={TOKEN}, default_num_ctx=4096)
    assert TOKEN not in t.ready and TOKEN not in t.warm
    assert t.loading({TOKEN}) == (KEY,) and t.loading_ctx() == {KEY: 0}
    change = t.responded(TOKEN, "r1", 200)
    assert change.state and change.refresh and TOKEN in t.ready
    assert t.observe([ps(4096)], {NAME: 0}, busy={TOKEN}, default_num_ctx=4096).claims
    assert TOKEN in t.warm and t.loading({TOKEN}) == ()


def test_a_default_request_on_a_warm_runner_changes_nothing() -> None:
    t = warm_tracker()
    assert t.will_run(TOKEN, "r1", 0) == RunnerChange()
    assert not t.waits_on_load(TOKEN)


def test_a_request_at_another_context_reloads_and_withdraws_the_claims() -> None:
    t = warm_tracker()
    change = t.will_run(TOKEN, "r1", 16384)
    assert change == RunnerChange(state=True, claims=True)
    assert TOKEN not in t.warm and TOKEN not in t.ready
    assert t.loading_ctx() == {KEY: 16384}


def test_an_answer_frees_the_waiters_of_its_context_only() -> None:
    t = RunnerTracker(4096)
    t.will_run(TOKEN, "a", 8192)
    t.will_run(TOKEN, "b", 8192)
    t.will_run(TOKEN, "c", 16384)
    assert t.responded(TOKEN, "a", 200) == RunnerChange(state=True)
    assert t.waits_on_load(TOKEN) and t.loading_ctx() == {KEY: 16384}  # c waits on the reload
    assert t.responded(TOKEN, "zzz", 200) == RunnerChange()  # answered before the load it waits on


def test_an_error_answer_says_nothing_about_the_load() -> None:
    t = RunnerTracker(4096)
    t.will_run(TOKEN, "a", 0)
    assert t.responded(TOKEN, "a", 500) == RunnerChange()
    assert t.waits_on_load(TOKEN)


def test_a_request_ending_unanswered_waits_no_more() -> None:
    t = RunnerTracker(4096)
    t.will_run(TOKEN, "a", 0)
    assert t.ended(TOKEN, "a") == RunnerChange(state=True)
    assert not t.waits_on_load(TOKEN)
    assert t.ended(TOKEN, "a") == RunnerChange()


def test_the_default_context_ollama_really_gives_is_learned(caplog: pytest.LogCaptureFixture) -> None:
    t = RunnerTracker(4096)
    t.observe([ps(32768)], {NAME: 0}, busy=(), default_num_ctx=4096)
    assert TOKEN not in t.warm  # assumed 4096: a 32768 runner would reload for it
    assert t.served(TOKEN, 0, 200) == RunnerChange(refresh=True)
    assert t.served(TOKEN, 2048, 200) == RunnerChange()  # asked its own context: shows nothing
    caplog.set_level(logging.WARNING, logger="corral.agent.runners")
    change = t.observe([ps(32768)], {NAME: 0}, busy=(), default_num_ctx=4096)
    assert change.state and change.claims and TOKEN in t.warm
    assert t.learned_ctx == {KEY: 32768} and t.wanted_ctx(KEY, 0) == 32768
    assert "not the 4096 assumed" in caplog.text


def test_the_wanted_context_is_capped_at_the_trained_one() -> None:
    t = RunnerTracker(262144)
    t.observe([ps(131072)], {NAME: 131072}, busy=(), default_num_ctx=262144)
    assert t.trained == {KEY: 131072}
    assert t.wanted_ctx(KEY, 0) == 131072 and t.wanted_ctx(KEY, 8192) == 8192
    assert TOKEN in t.warm  # the default, capped, is what the runner has


def test_an_unlisted_idle_model_is_gone_but_a_busy_one_stays_ready() -> None:
    t = warm_tracker()
    change = t.observe([], {}, busy={TOKEN}, default_num_ctx=4096)
    assert TOKEN in t.ready and TOKEN not in t.warm and change.claims
    t.observe([], {}, busy=(), default_num_ctx=4096)
    assert t.ready == set()


def test_names_that_are_not_ollama_names_are_ignored() -> None:
    t = RunnerTracker(4096)
    t.observe([ps(4096, name="bad name!")], {}, busy=(), default_num_ctx=4096)
    assert t.ready == set() and t.warm == frozenset()


def expiring(at: str, name: str = NAME) -> PsModel:
    return PsModel(
        name=name, model=name, size=1, digest="d1", expires_at=at, size_vram=1, context_length=4096
    )


NOW = 1_800_000_000.0  # 2027-01-15T08:00:00Z


def test_ollama_is_read_again_just_after_the_soonest_runner_expiry() -> None:
    soon, later = "2027-01-15T08:00:02Z", "2027-01-15T09:00:03+01:00"  # in 2 s; in 3 s, at +01:00
    assert until_expiry([expiring(later), expiring(soon)], NOW, 5.0) == pytest.approx(2 + EXPIRY_MARGIN_S)
    assert until_expiry([expiring("2027-01-15T08:00:30Z")], NOW, 5.0) == 5.0  # past the period: the period
    assert until_expiry([], NOW, 5.0) == 5.0
    assert until_expiry([expiring("")], NOW, 5.0) == 5.0  # unreadable: as none


def test_a_runner_past_its_expiry_still_listed_is_read_again_soon_for_one_period_only() -> None:
    assert (
        until_expiry([expiring("2027-01-15T07:59:59Z")], NOW, 5.0) == EXPIRED_AGAIN_S
    )  # its unload under way
    # long past (a clock apart from Ollama's, a runner that will not go): the regular period
    assert until_expiry([expiring("2027-01-15T07:59:00Z")], NOW, 5.0) == 5.0


def test_a_load_a_request_started_shows_late_until_a_reading_lists_it() -> None:
    t = RunnerTracker(4096)
    t.will_run(TOKEN, "r1", 0)
    assert not t.shows_late(TOKEN, "r1")  # not answered yet: the load may still fail
    t.responded(TOKEN, "r1", 200)
    assert t.shows_late(TOKEN, "r1")  # answered: loaded, and no reading says so yet
    assert not t.shows_late(TOKEN, "r2") and not t.shows_late(None, "r1")
    t.observe([ps(4096)], {NAME: 0}, busy=(TOKEN,), default_num_ctx=4096)
    assert not t.shows_late(TOKEN, "r1")


def test_a_reload_at_another_context_shows_late_until_a_reading_lists_the_new_runner() -> None:
    """A runner reloaded at a request's num_ctx keeps the model's name in /api/ps: only the context
    tells the old reading from the new one."""
    t = warm_tracker()
    t.will_run(TOKEN, "r1", 8192)  # a reload of the warm default runner
    t.responded(TOKEN, "r1", 200)
    assert t.shows_late(TOKEN, "r1")  # the last reading lists the 4096 runner Ollama replaced
    t.observe([ps(8192)], {NAME: 0}, busy=(TOKEN,), default_num_ctx=4096)
    assert not t.shows_late(TOKEN, "r1")


def test_a_load_that_failed_does_not_show_late() -> None:
    """Ollama refused the load (out of memory, say): nothing to publish before the answer ends."""
    t = RunnerTracker(4096)
    t.will_run(TOKEN, "r1", 0)
    t.responded(TOKEN, "r1", 500)
    assert not t.shows_late(TOKEN, "r1")


def test_a_model_lingers_busy_for_one_of_its_request_times_after_its_last_request_ended() -> None:
    """A steady stream between two requests is not idle: routers must not evict it on that reading."""
    t = warm_tracker()
    t.will_run(TOKEN, "a", 0)
    t.served(TOKEN, 0, 200, "a", ran_s=2.0)  # its requests hold a slot 2 s
    t.ended(TOKEN, "a", at=100.0)
    assert t.busy_models(set(), 100.0) == (KEY,)
    assert t.busy_models(set(), 101.9) == (KEY,)
    assert t.busy_models(set(), 102.0) == ()  # one request time later: idle
    assert t.busy_models(set(), 101.0) == ()  # and forgotten, not revived by an earlier clock
    assert t.busy_models({TOKEN}, 103.0) == (KEY,)  # a request holding a slot is busy whatever


def test_a_model_with_no_request_time_yet_lingers_the_typical_one_and_an_unloaded_one_not_at_all() -> None:
    t = warm_tracker()
    t.ended(TOKEN, "a", at=10.0)
    assert t.lingering(10.0 + TYPICAL_REQUEST_S - 0.01) == {TOKEN}
    t.ended(TOKEN, "b", at=20.0)
    t.observe([], {}, busy=(), default_num_ctx=4096)  # unloaded (keep_alive ran out, evicted)
    assert t.lingering(20.0) == set()  # nothing left to protect
    loaded = warm_tracker()
    assert loaded.ended(TOKEN, "c") == RunnerChange()
    assert loaded.lingering(20.0) == set()  # loaded, but an end with no time given: no linger


OTHER = "qwen3:8b"
OTHER_TOKEN = parse_name(OTHER).token


def test_the_models_a_load_unloads_yield_until_it_is_answered() -> None:
    """Requests for a model a load under way unloads must go elsewhere: sent to Ollama they would wait
    behind the load, then unload the newcomer to load their own model back."""
    t = warm_tracker()
    asked: list[bool] = []

    def evicts() -> set[str]:
        asked.append(True)
        return {TOKEN, OTHER_TOKEN}  # its own token never yields

    change = t.will_run(OTHER_TOKEN, "load", 0, evicts)
    assert asked == [True] and change == RunnerChange(state=True, claims=True)  # no longer claimed
    assert t.yields(TOKEN) and not t.yields(OTHER_TOKEN) and TOKEN not in t.warm
    # a reading during the load still lists it: it stays out of the warm set
    assert t.observe([ps(4096)], {NAME: 0}, busy=(), default_num_ctx=4096).claims is False
    assert TOKEN not in t.warm
    t.will_run(OTHER_TOKEN, "second", 0, evicts)  # waits on the same load: asks nothing
    assert asked == [True]
    assert t.responded(OTHER_TOKEN, "load", 200) == RunnerChange(state=True, claims=True, refresh=True)
    assert not t.yields(TOKEN)
    t.observe([ps(4096)], {NAME: 0}, busy=(), default_num_ctx=4096)  # not unloaded after all: warm again
    assert TOKEN in t.warm


def test_a_load_that_failed_or_was_dropped_releases_what_it_would_have_unloaded() -> None:
    t = warm_tracker()
    t.will_run(OTHER_TOKEN, "load", 0, lambda: {TOKEN})
    assert t.responded(OTHER_TOKEN, "load", 500) == RunnerChange()  # refused: its end says so
    assert t.yields(TOKEN)
    assert t.ended(OTHER_TOKEN, "load") == RunnerChange(state=True, claims=True, refresh=True)
    assert not t.yields(TOKEN)


def test_a_request_on_a_warm_runner_asks_nothing_of_evictions() -> None:
    t = warm_tracker()

    def evicts() -> set[str]:
        raise AssertionError("asked for a request that loads nothing")

    assert t.will_run(TOKEN, "a", 0, evicts) == RunnerChange()


def test_evicted_by_follows_ollamas_fit_rule_on_the_agents_own_state() -> None:
    from tests.unit.qwen_fleet import GB, GIB, MODEL, agent
    from tests.unit.qwen_fleet import ps as running

    qwen = parse_name(MODEL).token
    small = running("llama3.2:latest", 3 * GB)
    big = running("gemma3:27b", 10 * GB)
    # 24 GiB with a 3 GB runner: the 15.7 GB qwen runner fits within 80 % of the rest
    assert evicted_by(qwen, 0, agent("a", loaded=(small,))) == set()
    # with 13 GB taken it does not: Ollama unloads the biggest idle runner first, and that suffices
    gone = evicted_by(qwen, 0, agent("a", vram=24 * GIB, loaded=(small, big)))
    assert gone == {parse_name("gemma3:27b").token}
    # at a 2048 context the runner is small enough to stay beside both
    assert evicted_by(qwen, 2048, agent("a", vram=24 * GIB, loaded=(small, big))) == set()
