"""Tests for Pool.explain(): every strategy names its next pick without changing it, every skip
reason, the figures shown, the admin route and the status page section."""

from __future__ import annotations

import inspect
import json
import random
from collections.abc import Iterator
from typing import Any

import pytest
from werkzeug.test import Client

from softlb import Backend, HealthChecker, Pool, ProbeResult
from softlb.admin import STATUS_CANDIDATES, AdminApi
from softlb.balancers import BALANCERS, Balancer, balancer_by_name
from softlb.balancers.base import Candidate
from softlb.balancers.rotation import SMOOTH_EXACT_LIMIT
from softlb.pool import Explanation, Skipped

SEED = 20240601
ALL = sorted(BALANCERS)
A, B, C, D, E = (f"http://{name}:1" for name in "abcde")
TOKEN = "s3cret-token"


class FakeClock:
    """A clock that moves only when a test says so."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make(name: str, seed: int = SEED) -> Balancer:
    """A new balancer of strategy ``name``, seeded when the strategy takes a seed."""
    if "seed" in inspect.signature(BALANCERS[name]).parameters:
        return balancer_by_name(name, seed=seed)
    return balancer_by_name(name)


def weighted_pool(name: str, n: int = 5, clock: FakeClock | None = None) -> Pool:
    """A pool of ``n`` backends with weights 1 to 3, for strategy ``name``."""
    servers = [Backend(f"http://10.0.0.{i}:80", 1 + i % 3) for i in range(n)]
    return Pool(servers, balancer=make(name), clock=clock or FakeClock())


def churn(pool: Pool, rng: random.Random, clock: FakeClock, held: list[Any], step: int) -> str:
    """One step of varied traffic: a lease kept or released, latencies, a key; the key used."""
    clock.now += rng.random() * 0.05
    if held and rng.random() < 0.5:
        held.pop(rng.randrange(len(held))).release()
    return f"client-{step % 7}"


# -- the choice is the next pick, and explaining changes nothing ------------------------------


@pytest.mark.parametrize("name", ALL)
def test_choice_is_what_the_next_pick_returns(name: str) -> None:
    """For every strategy, explain().choice is the backend the next lease with that key gets."""
    clock = FakeClock()
    pool = weighted_pool(name, clock=clock)
    rng = random.Random(1)
    held: list[Any] = []
    for step in range(200):
        key = churn(pool, rng, clock, held, step)
        explanation = pool.explain(key)
        lease = pool.lease(key)
        assert lease.backend.url == explanation.choice, (name, step)
        held.append(lease)
    for lease in held:
        lease.release()


@pytest.mark.parametrize("name", ALL)
def test_explain_leaves_later_picks_unchanged(name: str) -> None:
    """A pool explained before every pick makes the same picks as an identical one never
    explained."""
    picks: dict[bool, list[str]] = {}
    for explained in (False, True):
        clock = FakeClock()
        pool = weighted_pool(name, clock=clock)
        rng = random.Random(2)
        held: list[Any] = []
        seen = []
        for step in range(200):
            key = churn(pool, rng, clock, held, step)
            if explained:
                for _ in range(3):
                    pool.explain(key)
                pool.explain(None)
            lease = pool.lease(key)
            seen.append(lease.backend.url)
            held.append(lease)
        picks[explained] = seen
    assert picks[True] == picks[False]


@pytest.mark.parametrize("name", ["weighted_round_robin", "consistent_hash", "least_connections"])
def test_choice_with_many_backends(name: str) -> None:
    """Beyond SMOOTH_EXACT_LIMIT backends (EDF, a big ring), the choice is still the next pick."""
    pool = weighted_pool(name, n=SMOOTH_EXACT_LIMIT + 8)
    for step in range(300):
        key = f"user-{step}"
        explanation = pool.explain(key)
        with pool.lease(key) as backend:
            assert backend.url == explanation.choice


@pytest.mark.parametrize("name", ALL)
def test_candidates_are_every_eligible_backend_choice_first(name: str) -> None:
    """Each backend in rotation is a candidate exactly once, the one chosen first."""
    pool = weighted_pool(name)
    pool.drain("http://10.0.0.1:80")
    explanation = pool.explain("some-key")
    urls = [c.url for c in explanation.candidates]
    assert sorted(urls) == sorted(b.url for b in pool.eligible)
    assert [c.chosen for c in explanation.candidates] == [True] + [False] * (len(urls) - 1)
    assert explanation.choice == urls[0]
    assert explanation.strategy == name
    assert explanation.summary.startswith(f"{name}: ")
    assert all(c.why for c in explanation.candidates)
    assert explanation.omitted == 0


@pytest.mark.parametrize("name", ALL)
def test_one_backend_is_the_only_choice(name: str) -> None:
    """With one backend in rotation, it is chosen and said to be the only one."""
    pool = Pool([A, B], balancer=make(name))
    pool.drain(B)
    explanation = pool.explain("k")
    assert explanation.choice == A
    assert len(explanation.candidates) == 1
    assert explanation.candidates[0].why.endswith("the only backend in rotation")


@pytest.mark.parametrize("name", ALL)
def test_limit_caps_candidates_and_counts_the_rest(name: str) -> None:
    """limit=2 lists two candidates, the choice first, and says how many were left out."""
    pool = weighted_pool(name, n=6)
    full = pool.explain("k")
    short = pool.explain("k", limit=2)
    assert len(short.candidates) == 2
    assert short.omitted == 4
    assert short.choice == full.choice
    assert short.candidates[0] == full.candidates[0]


def test_limit_must_be_positive() -> None:
    """limit=0 is refused."""
    with pytest.raises(ValueError, match="limit"):
        Pool([A]).explain(limit=0)


# -- scores per strategy ------------------------------------------------------------------------


def test_round_robin_scores_are_turns() -> None:
    """Round robin: the score is how many picks come first, and the order is the next picks."""
    pool = Pool([A, B, C, D], balancer="round_robin")
    pool.lease().release()
    explanation = pool.explain()
    assert [(c.url, c.score) for c in explanation.candidates] == [
        (B, 0),
        (C, 1),
        (D, 2),
        (A, 3),
    ]
    nexts = []
    for _ in range(4):
        with pool.lease() as backend:
            nexts.append(backend.url)
    assert nexts == [c.url for c in explanation.candidates]


def test_smooth_weighted_round_robin_scores() -> None:
    """Smooth WRR: the score is running score + effective weight; the highest is chosen."""
    pool = Pool([Backend(A, 5), Backend(B, 1), Backend(C, 1)], balancer="weighted_round_robin")
    first = pool.explain()
    assert {c.url: c.score for c in first.candidates} == {A: 5, B: 1, C: 1}
    assert first.choice == A
    pool.lease().release()  # currents: a -2, b 1, c 1
    second = pool.explain()
    assert {c.url: c.score for c in second.candidates} == {A: 3, B: 2, C: 2}
    assert "highest" in second.candidates[0].why


def test_least_connections_scores_are_loads() -> None:
    """Least connections: the score is in flight / effective weight, lowest first."""
    pool = Pool([Backend(A, 1), Backend(B, 2), Backend(C, 1)])
    leases = [pool.lease() for _ in range(3)]
    explanation = pool.explain()
    loads = {c.url: c.in_flight / c.effective_weight for c in explanation.candidates}
    assert {c.url: c.score for c in explanation.candidates} == loads
    scores = [c.score for c in explanation.candidates]
    assert scores == sorted(scores)  # type: ignore[type-var]
    assert "in flight" in explanation.candidates[0].why
    for lease in leases:
        lease.release()


def test_random_scores_are_probabilities() -> None:
    """Random: the score is the chance of being drawn, in proportion to effective weight."""
    pool = Pool([Backend(A, 1), Backend(B, 3)], balancer=balancer_by_name("random", seed=1))
    explanation = pool.explain()
    assert {c.url: c.score for c in explanation.candidates} == {A: 0.25, B: 0.75}
    assert "the next draw" in explanation.candidates[0].why
    assert "random" in explanation.summary


@pytest.mark.parametrize("name", ["power_of_two_choices", "peak_ewma"])
def test_two_choices_show_both_draws(name: str) -> None:
    """P2C and peak EWMA: the winner of the next two draws first, the loser second."""
    pool = Pool([A, B, C, D], balancer=make(name))
    leases = [pool.lease() for _ in range(3)]
    explanation = pool.explain()
    winner, loser = explanation.candidates[:2]
    assert winner.chosen
    assert loser.url in winner.why
    assert winner.url in loser.why
    assert "loses" in loser.why
    assert winner.score is not None and loser.score is not None
    assert winner.score <= loser.score
    for lease in leases:
        lease.release()


def test_peak_ewma_scores_are_costs() -> None:
    """Peak EWMA: a measured backend's score is latency × (in flight + 1) / weight."""
    clock = FakeClock()
    pool = Pool([A, B], balancer=balancer_by_name("peak_ewma", seed=1), clock=clock)
    lease = pool.lease()
    clock.now += 0.2
    lease.release()
    scores = {c.url: c for c in pool.explain().candidates}
    measured = scores[lease.backend.url]
    assert measured.latency == pytest.approx(0.2)
    assert measured.score == pytest.approx(0.2)
    other = scores[B if lease.backend.url == A else A]
    assert other.score == 0
    assert "not measured yet" in other.why


def test_consistent_hash_lists_the_failover_order() -> None:
    """Consistent hash: the key's owner is chosen; the runner-up takes the key if it leaves."""
    pool = Pool([A, B, C, D], balancer="consistent_hash")
    first = pool.explain("user-42")
    assert "owns the key" in first.candidates[0].why
    distances = [c.score for c in first.candidates]
    assert distances == sorted(distances)  # type: ignore[type-var]
    pool.drain(first.candidates[0].url)
    second = pool.explain("user-42")
    assert second.choice == first.candidates[1].url
    assert [c.url for c in second.candidates] == [c.url for c in first.candidates[1:]]
    with pool.lease("user-42") as backend:
        assert backend.url == second.choice


def test_consistent_hash_without_a_key_draws_at_random() -> None:
    """Consistent hash with no key: every backend has the same chance."""
    pool = Pool([A, B, C, D], balancer=balancer_by_name("consistent_hash", seed=3))
    explanation = pool.explain()
    assert {c.score for c in explanation.candidates} == {0.25}
    assert "no request key" in explanation.candidates[0].why
    assert explanation.key is None


def test_key_is_ignored_by_strategies_that_do_not_hash() -> None:
    """The key is recorded but does not change a strategy that does not read it."""
    pool = Pool([A, B], balancer="round_robin")
    assert pool.explain("x").candidates == pool.explain("y").candidates
    assert pool.explain("x").key == "x"


def test_strategy_without_explain_lists_candidates_unscored() -> None:
    """A third-party strategy without explain() still gets candidates and skips, unscored."""

    class FirstOne(Balancer):
        name = "first_one_test"

        def __init__(self) -> None:
            self._eligible: tuple[Backend, ...] = ()

        def rebuild(self, eligible: tuple[Backend, ...], now: float) -> None:
            self._eligible = eligible

        def pick(self, key: str | None, now: float) -> Backend | None:
            return self._eligible[0] if self._eligible else None

    pool = Pool([A, B, C], balancer=FirstOne())
    pool.drain(C)
    explanation = pool.explain()
    assert explanation.choice is None
    assert [c.url for c in explanation.candidates] == [A, B]
    assert all(c.score is None for c in explanation.candidates)
    assert "does not explain" in explanation.summary
    assert explanation.skipped == (Skipped(C, "draining"),)


# -- figures shown ------------------------------------------------------------------------------


def test_slow_start_factor_is_shown() -> None:
    """A ramping backend shows its slow-start factor and reduced effective weight."""
    clock = FakeClock()
    pool = Pool([A], clock=clock, slow_start=10.0)
    pool.add(Backend(B, 4))
    clock.now += 5.0
    by_url = {c.url: c for c in pool.explain().candidates}
    ramping = by_url[B]
    assert ramping.weight == 4
    assert ramping.slow_start == pytest.approx(0.55)
    assert ramping.effective_weight == pytest.approx(4 * 0.55)
    assert by_url[A].slow_start is None
    clock.now += 10.0
    done = {c.url: c for c in pool.explain().candidates}[B]
    assert (done.slow_start, done.effective_weight) == (None, 4.0)


def test_in_flight_counts_other_processes() -> None:
    """in_flight adds the other processes' requests (shared_active) to this one's."""
    pool = Pool([A, B])
    lease = pool.lease()
    lease.backend.shared_active = 3
    pool.refresh()
    by_url = {c.url: c for c in pool.explain().candidates}
    assert by_url[lease.backend.url].in_flight == 4
    assert by_url[lease.backend.url].score == 4.0  # 4 / 1
    lease.release()


def test_latency_is_the_backends_ewma() -> None:
    """A candidate's latency is its backend's peak-EWMA (None before the first answer)."""
    clock = FakeClock()
    pool = Pool([A, B], balancer="round_robin", clock=clock)
    lease = pool.lease()
    clock.now += 0.05
    lease.release()
    by_url = {c.url: c for c in pool.explain().candidates}
    assert by_url[A].latency == pytest.approx(0.05)
    assert by_url[B].latency is None


# -- skip reasons -------------------------------------------------------------------------------


def test_every_skip_reason() -> None:
    """Draining, unhealthy (with the reason), ejected (passive) and removed are each named."""
    probe_results = {C: ProbeResult(False, "HTTP 503")}
    pool = Pool([A, B, C, D, E], balancer="round_robin")
    checker = HealthChecker(
        pool,
        probe=lambda backend: probe_results.get(backend.url, ProbeResult(True, "HTTP 200")),
        fall=2,
        rise=1,
        jitter=0,
        clock=FakeClock(),
    )
    checker.run_pending()  # c fails its first probe: out
    pool.drain(B)
    for _ in range(2):  # two failed requests in a row on d: ejected
        pool.lease(exclude={pool.get(x) for x in (A, E)}).release("connect")
    lease = pool.lease(exclude={pool.get(D), pool.get(A)})
    assert lease.backend.url == E
    pool.remove(E)
    explanation = pool.explain()
    assert explanation.choice == A
    assert [c.url for c in explanation.candidates] == [A]
    assert explanation.skipped == (
        Skipped(B, "draining", 0),
        Skipped(C, "unhealthy: HTTP 503", 0),
        Skipped(D, "ejected (passive): 2 requests in a row failed, the last: could not connect", 0),
        Skipped(E, "removed", 1),
    )
    lease.release()
    assert [s.url for s in pool.explain().skipped] == [B, C, D]  # e finished: forgotten
    checker.stop()


def test_draining_wins_over_unhealthy() -> None:
    """A backend both draining and down is reported as draining, the operator's state."""
    pool = Pool([A, B])
    pool.set_healthy(B, False, "timeout")
    pool.drain(B)
    assert pool.explain().skipped == (Skipped(B, "draining"),)
    pool.drain(B, draining=False)
    assert pool.explain().skipped == (Skipped(B, "unhealthy: timeout"),)


def test_initial_state_down_is_the_reason() -> None:
    """A backend kept out by initial_state "down" says so."""
    pool = Pool([A])
    checker = HealthChecker(pool, initial_state="down", probe=lambda b: ProbeResult(True, "ok"))
    pool.add(B)
    assert pool.explain().skipped == (
        Skipped(A, "unhealthy: initial state down"),
        Skipped(B, "unhealthy: initial state down"),
    )
    checker.stop()


def test_unhealthy_without_a_reason() -> None:
    """A backend admitted down with no checker yet says no health check has passed."""
    pool = Pool([A])
    pool.admit_healthy = False
    pool.add(B)
    assert pool.explain().skipped == (Skipped(B, "unhealthy: no successful health check yet"),)


def test_recovered_backend_is_a_candidate_again() -> None:
    """Coming back up removes the skip and its reason."""
    pool = Pool([A, B])
    pool.set_healthy(B, False, "HTTP 500")
    pool.set_healthy(B, True, "HTTP 200")
    assert pool.explain().skipped == ()
    pool.set_healthy(B, False)
    assert pool.explain().skipped == (Skipped(B, "unhealthy: down"),)


def test_removed_backends_are_kept_only_while_busy_and_bounded() -> None:
    """Removed backends with requests in flight are listed, the oldest forgotten past 64."""
    pool = Pool([f"http://10.1.0.{i}:80" for i in range(70)], balancer="round_robin")
    leases = [pool.lease() for _ in range(70)]
    for lease in leases:
        pool.remove(lease.backend)
    removed = [s for s in pool.explain().skipped if s.reason == "removed"]
    assert [s.url for s in removed] == [lease.backend.url for lease in leases[6:]]
    readded = pool.add(leases[-1].backend)
    assert readded.url not in {s.url for s in pool.explain().skipped}
    for lease in leases:
        lease.release()
    assert pool.explain().skipped == ()


def test_nothing_in_rotation() -> None:
    """With nothing in rotation there is no choice, and the summary says why."""
    empty = Pool()
    assert empty.explain() == Explanation(
        None, "least_connections", (), (), "nothing in rotation: the pool is empty"
    )
    pool = Pool([A])
    pool.drain(A)
    explanation = pool.explain()
    assert explanation.choice is None
    assert explanation.summary == "nothing in rotation: every backend is skipped"


def test_explain_catches_up_with_a_due_slow_start_step() -> None:
    """A slow-start step that is due is applied first, as the next lease would."""
    clock = FakeClock()
    pool = Pool([A], clock=clock, slow_start=10.0, balancer="weighted_round_robin")
    pool.add(B)
    clock.now += 5.0
    by_url = {c.url: c for c in pool.explain().candidates}
    assert by_url[B].effective_weight == pytest.approx(0.55)


# -- values -------------------------------------------------------------------------------------


def test_as_dict_is_json_ready() -> None:
    """as_dict() survives a JSON round trip with every field."""
    pool = Pool([A, B, C])
    pool.drain(C)
    document = json.loads(json.dumps(pool.explain().as_dict()))
    assert set(document) == {
        "choice",
        "strategy",
        "summary",
        "key",
        "candidates",
        "omitted",
        "skipped",
    }
    assert set(document["candidates"][0]) == {
        "url",
        "chosen",
        "score",
        "why",
        "weight",
        "effective_weight",
        "slow_start",
        "in_flight",
        "latency",
    }
    assert document["skipped"] == [{"url": C, "reason": "draining", "in_flight": 0}]


def test_explanations_are_frozen() -> None:
    """Explanation, Candidate and Skipped are immutable values."""
    explanation = Pool([A]).explain()
    with pytest.raises(AttributeError):
        explanation.choice = B  # type: ignore[misc]
    with pytest.raises(AttributeError):
        explanation.candidates[0].score = 1.0  # type: ignore[misc]
    with pytest.raises(AttributeError):
        Skipped(A, "draining").reason = "x"  # type: ignore[misc]
    assert isinstance(explanation.candidates[0], Candidate)


# -- admin API ----------------------------------------------------------------------------------


@pytest.fixture
def pool() -> Iterator[Pool]:
    """Three backends under least connections, one draining and one down."""
    pool = Pool([A, B, C])
    pool.drain(B)
    pool.set_healthy(C, False, "HTTP 500")
    yield pool
    pool.close()


def test_admin_explain_answers_the_explanation(pool: Pool) -> None:
    """GET /_softlb/explain is pool.explain().as_dict() as JSON."""
    resp = Client(AdminApi(pool)).get("/_softlb/explain")
    assert resp.status_code == 200
    assert resp.headers["Content-Type"] == "application/json"
    assert resp.get_json() == pool.explain().as_dict()
    assert resp.get_json()["choice"] == A


def test_admin_explain_takes_a_key_and_a_limit() -> None:
    """?key= is explained for hashing strategies; ?limit= caps the candidates."""
    pool = Pool([A, B, C, D], balancer="consistent_hash")
    client = Client(AdminApi(pool))
    document = client.get("/_softlb/explain?key=user%2042&limit=2").get_json()
    assert document["key"] == "user 42"
    assert document["choice"] == pool.explain("user 42").choice
    assert len(document["candidates"]) == 2
    assert document["omitted"] == 2
    assert client.get("/_softlb/explain?key=").get_json()["key"] is None


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("other=1", 'unknown query parameter "other"'),
        ("key=a&key=b", 'query parameter "key" is given twice'),
        ("limit=0", "limit must be a whole number"),
        ("limit=ten", "limit must be a whole number"),
        ("limit=" + "9" * 5000, "limit must be a whole number"),
    ],
)
def test_admin_explain_refuses_bad_queries(pool: Pool, query: str, message: str) -> None:
    """A bad query string gets a 400 saying what is wrong."""
    resp = Client(AdminApi(pool)).get(f"/_softlb/explain?{query}")
    assert resp.status_code == 400
    assert message in resp.get_json()["error"]


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
def test_admin_explain_is_get_only(pool: Pool, method: str) -> None:
    """Other methods get 405 with Allow."""
    resp = Client(AdminApi(pool)).open("/_softlb/explain", method=method)
    assert resp.status_code == 405
    assert resp.headers["Allow"] == "GET, HEAD, OPTIONS"


def test_admin_explain_needs_the_token(pool: Pool) -> None:
    """With a token, explain answers 401 without it and 200 with it."""
    client = Client(AdminApi(pool, token=TOKEN))
    assert client.get("/_softlb/explain").status_code == 401
    resp = client.get("/_softlb/explain", headers={"Authorization": f"Bearer {TOKEN}"})
    assert resp.status_code == 200


# -- status page --------------------------------------------------------------------------------


def test_status_json_carries_the_explanation(pool: Pool) -> None:
    """GET /status includes the explanation, capped to STATUS_CANDIDATES candidates."""
    document = Client(AdminApi(pool)).get("/_softlb/status").get_json()
    assert document["explain"] == pool.explain(limit=STATUS_CANDIDATES).as_dict()


def test_status_page_shows_the_next_pick(pool: Pool) -> None:
    """The page has a "Next pick" section: the choice marked next, its why, and the skips."""
    page = Client(AdminApi(pool)).get("/_softlb/").get_data(as_text=True)
    assert "<h2>Next pick</h2>" in page
    start = page.index('<section id="explain">')
    section = page[start : page.index("</section>", start)]
    assert '<span class="pill next">next</span></td><td class="url">http://a:1</td>' in section
    assert "0 in flight / effective weight 1 = 0; the only backend in rotation" in section
    assert f"{B} (draining)" in section
    assert f"{C} (unhealthy: HTTP 500)" in section
    assert "least_connections: the lowest" in section


def test_status_page_explain_section_when_nothing_is_in_rotation() -> None:
    """With nothing in rotation the section says requests get 503."""
    pool = Pool([A])
    pool.drain(A)
    page = Client(AdminApi(pool)).get("/_softlb/").get_data(as_text=True)
    assert "Nothing in rotation" in page


def test_status_page_explain_section_is_escaped() -> None:
    """A backend URL with HTML-special characters is escaped in the section too."""
    pool = Pool(["http://10.0.0.9/a&b'c"])
    page = Client(AdminApi(pool)).get("/_softlb/").get_data(as_text=True)
    section = page[page.index('<section id="explain">') :]
    assert "http://10.0.0.9/a&amp;b&#x27;c" in section
    assert "a&b'c" not in page


def test_status_page_says_how_many_candidates_are_not_shown() -> None:
    """Beyond STATUS_CANDIDATES candidates, the section counts the others."""
    pool = Pool([f"http://10.2.0.{i}:80" for i in range(STATUS_CANDIDATES + 3)])
    page = Client(AdminApi(pool)).get("/_softlb/").get_data(as_text=True)
    assert "and 3 more" in page
