"""How long a batch holds the device, learnt from the batches run: about floor + tokens / rate.

A GPU batch is hundreds of kernels, each taking some microseconds however few tokens it computes, so a
small batch costs a floor of device time and a large one that floor plus its tokens at the device's rate.
One average rate (tokens over seconds, all batches alike) mixes the two: a 3-document search's batch is
nearly all floor, and beside such searches the average falls far below the rate bulk batches run at. Bulk
batches bounded by time at that average then ran shorter than their bound (bench.fast_device with a 3 ms
floor: 7.1-7.2 ms against 10). Fitted as a line (least squares, recent batches weighted most), the rate is
the marginal one and the floor is what a batch costs before its first token.
"""

from __future__ import annotations

# Each new batch's weight against the ones before: about the last 50 batches count.
DECAY = 0.98
# Below this spread of batch sizes (coefficient of variation of the tokens), a line through them is not
# determined: the floor is taken as 0 and the rate as the average.
MIN_SPREAD = 0.1


class BatchTimes:
    """Device seconds of a batch of n tokens ~ floor_s + n / tokens_per_s. Not thread-safe: the Scheduler
    holds its lock around every call."""

    def __init__(self, tokens_per_s: float) -> None:
        self._s0 = self._sn = self._st = self._snn = self._snt = 0.0
        self.tokens_per_s = tokens_per_s
        self.floor_s = 0.0
        self.batches = 0  # observed so far

    def observe(self, tokens: int, seconds: float) -> None:
        """One batch: the tokens it computed (as the budget counts them) and its device seconds."""
        if tokens <= 0 or seconds <= 0:
            return
        n, t = float(tokens), float(seconds)
        self.batches += 1
        self._s0 = DECAY * self._s0 + 1.0
        self._sn = DECAY * self._sn + n
        self._st = DECAY * self._st + t
        self._snn = DECAY * self._snn + n * n
        self._snt = DECAY * self._snt + n * t
        mean_n, mean_t = self._sn / self._s0, self._st / self._s0
        var_n = self._snn / self._s0 - mean_n * mean_n
        slope = (self._snt / self._s0 - mean_n * mean_t) / var_n if var_n > (MIN_SPREAD * mean_n) ** 2 else 0.0
        floor = mean_t - slope * mean_n
        if slope <= 0 or not 0 <= floor <= mean_t:  # no line through them: the average rate, no floor
            self.tokens_per_s, self.floor_s = mean_n / mean_t, 0.0
        else:
            self.tokens_per_s, self.floor_s = 1.0 / slope, floor

    def describe(self) -> dict[str, float | int]:
        return {"floor_ms": round(self.floor_s * 1000, 3), "tokens_per_s": round(self.tokens_per_s), "batches": self.batches}

    def tokens_within(self, seconds: float) -> int:
        """The tokens a batch can hold for its device time to stay within `seconds`."""
        return int(max(0.0, seconds - self.floor_s) * self.tokens_per_s)
