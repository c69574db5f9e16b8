"""Who else is using the engine: its load (running + waiting) minus the batch runners' requests in flight is everyone
else's, interactive users; the engine's count of finished requests minus the runners' answers says the same for users
whose requests are too short to be caught running (llama.cpp counts no finished requests, only their output tokens,
against ours), over a window that spans a few of their requests (3 s for busy users, up to 30 s for sparse ones). A
pure object fed by the controller at each reading."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence

from batch_gateway.runner.engine_reading import EngineReading
from batch_gateway.runner.share import RunnerLoad

PRESENCE_MIN = 1.5  # beside other runners: others' requests in the engine that mean someone is there...
PRESENCE_SHARE = 0.02  # ...plus this share of the batch's (what runners publish lags a little)
# A lone runner knows its own requests exactly (against its most in flight from the start of the scrape, the engine's
# count never exceeded it in 213 readings of a full batch on the simulator): one request of someone else's is a sign.
PRESENCE_ALONE = 1.0
PRESENCE_COMPLETIONS = 3  # or others' finished requests in the completion window
PEER_SLACK = 0.25  # share of the other runners' published limits that may be their growth since they published...
PEER_GROWTH_MAX = 1.0  # ...or, for one whose last publications grew by more, that growth, up to doubling (slow start)
COMPLETION_WINDOW = 3.0  # at least: long enough to hold a few of their requests, short enough to notice they left
COMPLETION_HISTORY = 30.0  # at most: sparse users' finished requests are counted over up to this long...
# ...a span that holds this many of them at their rate over it. Fewer than PRESENCE_COMPLETIONS of a Poisson count
# of 12 is 1 in 2,000 (of 8: 1 in 70): with 8, users at 1.1 a second went unseen 1-7 times in ten minutes, and the
# batch refilled under their next request each time (tests/runner/test_presence.py).
EXPECTED_COMPLETIONS = 12.0
RATE_SPAN = 15.0  # their rate is learnt from a history at least this long (a shorter one is too noisy to keep)
INTERACTIVE_HOLD = 5.0  # the engine counts as shared this long after the last sign of others; busy users less...
BUSY_RATE = EXPECTED_COMPLETIONS / INTERACTIVE_HOLD  # ...those finishing more requests a second than this
# A lone runner, after someone's first request, before their gaps or rate are known: a person chatting beside a batch
# sends the next within a minute (of one request every 10 s, one gap in 400 is longer; every 5 s, one in 160,000).
# (Beside other runners, a sign may be a peer's growth: INTERACTIVE_HOLD.)
FIRST_HOLD = 60.0
# Sparse users (a request every few seconds, each caught running, with a gap before the next) are held, from their
# second request on, for as long as their next gap exceeds with chance LAPSE_CHANCE, judged from the sum of their last
# GAPS_KEPT gaps of at most HOLD_MAX (a longer one is a departure), up to HOLD_MAX. The gaps of a Poisson stream, of
# whatever rate, exceed c times the sum of the n before with chance (1 + c)^-n, so c = LAPSE_CHANCE^(-1/n) - 1: few
# gaps known mean a long hold (after one, the longest), sixteen of them 0.54 of their sum (8.6 times their mean).
# Three times the longest of them let users go after their next gap 1 time in 4 with one gap known, 1 in 10 with two.
LAPSE_CHANCE = 0.001
GAPS_KEPT = 16
HOLD_MAX = 120.0
INTERACTIVE_SMOOTHING = 0.3  # weight of a new reading in the interactive-load estimate


class Presence:
    """Others' load on the engine, and whether anyone else is there: to a lone runner, on one reading that shows a
    request not its own running; beside other runners, or from finished requests alone, on two readings (once they
    are seen, each sign counts). The engine is the batch's again `INTERACTIVE_HOLD` seconds
    after the last sign of anyone else, sooner for busy users (the time twelve of their requests take), later for
    sparse ones (the gap their next exceeds with chance `LAPSE_CHANCE`, up to `HOLD_MAX`), and `FIRST_HOLD` after a
    lone runner's first sign of someone, before either is known."""

    def __init__(self) -> None:
        self._completions: deque[tuple[float, float, float]] = deque()  # (time, engine's count, runners' count)
        self._readings = 0  # readings in a row with a sign of others
        self._seen_at = -math.inf
        self._alone = True  # no other runner on the engine at the last reading
        self._caught = False  # the last reading caught someone else's request running (a confirmed sign)
        self._caught_at = -math.inf
        self._gaps: deque[float] = deque(maxlen=GAPS_KEPT)  # seconds between their requests caught running
        self._rate = 0.0  # others' finished requests per second over the history, while last seen (0: never)
        self._counting = "requests"  # what the history counts: finished requests, or their output tokens
        self.completion_rate: float | None = None  # the engine's finished requests per second, all clients
        self.load = 0.0  # others' requests on the engine, smoothed
        self.now = 0.0  # ...and at the last reading
        self.unconfirmed = False  # the last reading showed a sign of others that the next must confirm
        self._published: dict[str, tuple[float, float, float]] = {}  # runner → (published at, limit before, limit)

    @staticmethod
    def _finished(
        reading: EngineReading, peers: Sequence[RunnerLoad], answered: int, answered_tokens: float
    ) -> tuple[float | None, float, float]:
        """The engine's count of finished work, the batch runners' count of the same, and the unit of one request:
        finished requests (vLLM), or, alone on an engine that counts only the output tokens of finished requests
        (llama.cpp), those tokens, a request being as many as the runner's answers had on average."""
        if reading.completed is not None:
            return reading.completed, float(answered + sum(p.completed for p in peers)), 1.0
        if reading.finished_tokens is not None and not peers and answered and answered_tokens > 0:
            return reading.finished_tokens, answered_tokens, answered_tokens / answered
        return None, 0.0, 1.0

    def _since(self, start: float) -> tuple[float, float, float]:
        """The oldest entry of the history at or after `start` (the newest if none is)."""
        return next((entry for entry in self._completions if entry[0] >= start), self._completions[-1])

    def shared(self, now: float) -> bool:
        # Users who send nothing for as long as twelve of their requests take (the window's span) are gone: busy
        # ones are let go sooner than the hold (3.5-4 s after they leave at 13 a second, against 8-8.5 s), and the
        # batch takes the engine back by slow start, so that a mistake costs little. Sparse ones are held for the gap
        # their next request exceeds once in 1,000, up to two minutes: a person chatting beside a batch sends a request
        # every few seconds, and with a fixed hold each that came after a gap met the batch refilled. (Six times their
        # mean gap, or three times their longest, let users at 0.1 a second go: a mean or maximum of few gaps is
        # often short.)
        return now - self._seen_at <= self._hold()

    @property
    def sparse(self) -> bool:
        """Whether the others are sparse users, held by their gaps (a request every few seconds, each caught running,
        with the engine theirs alone in between) rather than by their rate."""
        return self._rate <= BUSY_RATE and bool(self._gaps)

    def _hold(self) -> float:
        if self._rate > BUSY_RATE:
            return EXPECTED_COMPLETIONS / self._rate
        if self.sparse:
            multiple = LAPSE_CHANCE ** (-1.0 / len(self._gaps)) - 1.0
            return min(HOLD_MAX, max(INTERACTIVE_HOLD, multiple * sum(self._gaps)))
        return FIRST_HOLD if self._alone else INTERACTIVE_HOLD

    def observe(
        self,
        now: float,
        reading: EngineReading,
        peers: Sequence[RunnerLoad],
        batch_inflight: float,
        answered: int,
        answered_tokens: float = 0.0,
    ) -> None:
        """One reading, beside what all batch runners hold (`batch_inflight`) and what this one has answered (requests,
        and their output tokens)."""
        excess = reading.running + reading.waiting - batch_inflight
        finished, rate = False, 0.0
        count, runners, unit = self._finished(reading, peers, answered, answered_tokens)
        if count is not None:
            history = self._completions
            counting = "requests" if reading.completed is not None else "tokens"
            if history and (count < history[-1][1] or counting != self._counting):
                history.clear()  # the engine restarted, or the count is of something else now
            self._counting = counting
            history.append((now, count, runners))
            while now - history[0][0] > COMPLETION_HISTORY:
                history.popleft()
            recent = self._since(now - COMPLETION_WINDOW)
            span = now - recent[0]
            self.completion_rate = (count - recent[1]) / unit / span if span > 0 else None
            # Users who send a request a second or so leave gaps of several seconds, where a window of 3 s shows
            # nobody (at 1.1 requests a second, a fifth of the time): the window spans a few of their requests at
            # their rate when last seen (all the history, before they ever were, or while the history is too short to
            # tell: the first seconds' estimates spread widely, and the highest of them, kept, would keep the window
            # short). The lag that the threshold allows for is at the window's two ends, so it is allowed as over the
            # shortest window, however long this one.
            first = history[0]
            if now - first[0] >= RATE_SPAN:
                rate = (count - first[1] - (runners - first[2])) / unit / (now - first[0])
            span = EXPECTED_COMPLETIONS / self._rate if self._rate else COMPLETION_HISTORY
            start = self._since(now - min(COMPLETION_HISTORY, max(COMPLETION_WINDOW, span)))
            engine_finished = (count - start[1]) / unit
            others_finished = engine_finished - (runners - start[2]) / unit
            lag = PRESENCE_SHARE * engine_finished * COMPLETION_WINDOW / max(COMPLETION_WINDOW, now - start[0])
            # Others' finished requests show users whose requests are too short to be caught running. Only without
            # other runners: their published counts lag the engine's by up to a reading, which reads as others'.
            finished = not peers and others_finished >= PRESENCE_COMPLETIONS + lag
        else:
            self._completions.clear()  # nothing comparable now (other runners' tokens are not on the board)
        self._alone = not peers
        # Others' requests that are a sign of someone: beside other runners, past what their publications may lag.
        slack = self._peer_slack(peers)
        threshold = PRESENCE_MIN + PRESENCE_SHARE * batch_inflight + slack if peers else PRESENCE_ALONE
        # To a lone runner, which knows its own requests exactly, one request running that is not its own is someone
        # there beyond doubt: the batch yields at this reading (asking for a second, a person's first request that
        # spanned one reading went unconfirmed, and their next met the full batch too). Other signs must show twice:
        # beside other runners, whose publications lag, and from finished requests; alone, unless others are known
        # to be there already.
        shared = self.shared(now)
        running = excess >= threshold
        certain = running and not peers
        present = running or finished
        self._readings = self._readings + 1 if present else 0
        confirmed = certain or self._readings >= 2 or (present and shared and not peers)
        self.unconfirmed = present and not confirmed
        # Sparse users' gaps, between their requests caught running (their finished requests, counted over a window,
        # come and go with its ends). A sign after they looked gone starts the gaps afresh: the gap back to the last
        # sign is kept only within HOLD_MAX, where it may be a lapse of ours rather than someone's departure.
        caught = confirmed and running
        if caught and not self._caught:
            if not shared:
                self._gaps.clear()
            if now - self._caught_at <= HOLD_MAX:
                self._gaps.append(now - self._caught_at)
        self._caught = caught
        if caught:
            self._caught_at = now
        if confirmed:
            # Their rate is learnt as they stay, never unlearnt while they do: as they leave, a falling rate would
            # widen the window over their last requests and keep them seen for as long again.
            if rate > 0:
                self._rate = max(self._rate, rate) if self.shared(now) else rate
            self._seen_at = now
        self.now = max(0.0, excess)
        self.load += INTERACTIVE_SMOOTHING * (self.now - self.load)

    def _peer_slack(self, peers: Sequence[RunnerLoad]) -> float:
        """What the other runners may hold beyond the limits they published, not to be taken for someone else's. Each
        publishes a reading or two late, and one that grows meanwhile holds more than it said: a share of its limit,
        or, for one whose last two publications grew by more (slow start doubles per service time, and two runners
        that started together grow a reading or two apart), that growth over two readings, up to doubling. Counted
        as a fixed share, a peer's slow start (11 to 17 in one reading) was taken for users, and two runners started
        together gave each other the engine for 20 s, at 88% of its capacity."""
        slack = 0.0
        published = {}
        for peer in peers:
            at, before, limit = self._published.get(peer.owner, (peer.at, peer.limit, peer.limit))
            if peer.at != at:  # a new publication since the last reading
                before, limit = limit, peer.limit
            published[peer.owner] = (peer.at, before, limit)
            # Up to two readings late: its growth between its last two publications, twice over. A step of one request
            # is a fractional share kept on average (`dithered`), not growth: from 1 to 2 it read as doubling, and
            # took two of users' requests for the peer's.
            if before <= 0:
                growth = PEER_GROWTH_MAX if limit > 0 else 0.0
            elif limit - before <= 1.0:
                growth = 0.0
            else:
                growth = (limit / before) ** 2 - 1.0
            slack += min(PEER_GROWTH_MAX, max(PEER_SLACK, growth)) * peer.limit
        self._published = published
        return slack
