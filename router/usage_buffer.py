"""Usage summed in memory per (tenant, model, hour) and written to the catalog every second or so.

One upsert and commit per request costs the request path a worker-thread hop and about half a
millisecond of GIL-holding SQLAlchemy, which the engine thread pays for in step time; summed, a busy
server writes one row per active (tenant, model) per interval instead. A background thread flushes;
shutdown flushes what is left, and readers of usage call `flush` first so they see every finished
request. What a crash of the process loses is at most one interval's usage.
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime

from router.usage import UsageRecorder, UsageRow, hour_of

log = logging.getLogger(__name__)

_Key = tuple[int, int, datetime]


class UsageBuffer:
    """Collects finished requests' usage and writes it through a `UsageRecorder` periodically."""

    def __init__(self, recorder: UsageRecorder, interval_s: float) -> None:
        self.recorder = recorder
        self.interval_s = interval_s
        self._pending: dict[_Key, list[int]] = {}
        self._lock = threading.Lock()
        # Serializes flushes, so that a reader's flush returns only after every earlier row is written.
        self._flush_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add(
        self, tenant_id: int, model_id: int, prompt_tokens: int, completion_tokens: int, at: datetime
    ) -> None:
        """Count one finished request (cheap: no I/O)."""
        if prompt_tokens < 0 or completion_tokens < 0:
            raise ValueError(f"token counts must be >= 0, got {prompt_tokens} and {completion_tokens}")
        key = (tenant_id, model_id, hour_of(at))
        with self._lock:
            sums = self._pending.setdefault(key, [0, 0, 0])
            sums[0] += prompt_tokens
            sums[1] += completion_tokens
            sums[2] += 1

    def pending_requests(self) -> int:
        with self._lock:
            return sum(s[2] for s in self._pending.values())

    def flush(self) -> int:
        """Write everything counted so far; returns the number of rows written."""
        with self._flush_lock:
            with self._lock:
                pending, self._pending = self._pending, {}
            if not pending:
                return 0
            rows = [UsageRow(t, m, h, p, c, n) for (t, m, h), (p, c, n) in pending.items()]
            try:
                return self.recorder.record_many(rows)
            except Exception:
                # The catalog is unreachable: put the sums back to try again next time.
                with self._lock:
                    for key, (p, c, n) in pending.items():
                        sums = self._pending.setdefault(key, [0, 0, 0])
                        sums[0] += p
                        sums[1] += c
                        sums[2] += n
                raise

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="blockzoo-usage", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Stop the background thread and write what is left."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        try:
            self.flush()
        except Exception as exc:
            # Shutting down with the catalog unreachable: say what is lost, without failing the shutdown.
            log.error(
                "usage of %d requests could not be written: %s", self.pending_requests(), type(exc).__name__
            )

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.flush()
            except Exception as exc:
                # Kept for the next try; an unreachable catalog is not worth a traceback every interval.
                log.warning("writing usage failed; will retry: %s", type(exc).__name__)
