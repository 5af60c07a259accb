"""Progress a person can see: training as it runs, and where the time of a run went.

- :class:`TrainProgress` renders the trainer's events (``step``, ``total_steps``, ``epoch``, ``loss``,
  ``windows_per_s``, ``lr``; :func:`pipeline.models.train.train` calls it every ``log_every`` steps, in this
  process or, from the workers' events, on the client of a Dask cluster). On a terminal it is a live tqdm bar;
  in a log file (a batch job, CI) it is one line every 10 % of the steps or 30 s, with the ETA in it.
- :func:`stage_timings` / :func:`timings_table`: the stages a run built and their seconds, from ``stages.json``
  before and after the run (the ``built`` token of a stage changes only when it runs).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable

from pipeline import storage
from pipeline.stages import MANIFEST

__all__ = ["TrainProgress", "format_eta", "read_manifest_at", "stage_timings", "timings_table"]


def format_eta(seconds: float) -> str:
    """``1:02:03``, ``4:05`` or ``12 s``."""
    if seconds != seconds or seconds == float("inf"):
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else (f"{m}:{s:02d}" if m else f"{s} s")


class TrainProgress:
    """A ``progress(event)`` callback for training that a person can read (see the module docstring).

    ``live``: a tqdm bar (default: when ``stream`` is a terminal). ``log``: where the plain lines go.
    Each new run of steps (an ensemble member, a resumed run) starts a new bar. Call :meth:`close` at the end.
    """

    def __init__(
        self,
        log: Callable[[str], None] = print,
        *,
        live: bool | None = None,
        stream=None,
        every_s: float = 30.0,
        every_frac: float = 0.1,
        name: str = "train",
    ):
        self.log, self.stream, self.name = log, stream or sys.stderr, name
        self.live = bool(getattr(self.stream, "isatty", lambda: False)()) if live is None else live
        self.every_s, self.every_frac = every_s, every_frac
        self.bar = None
        self.total = None
        self.first = None  # (time, step) of the first event of this run of steps
        self.last_line = (0.0, -1)  # (time, step) of the last plain line
        self.lines = 0

    def eta(self, step: int, now: float) -> float:
        """Seconds left at the mean step rate since the first event (the first steps include warm-up)."""
        t0, s0 = self.first
        if step <= s0 or now <= t0:
            return float("nan")
        return (self.total - step) * (now - t0) / (step - s0)

    def __call__(self, event: dict) -> None:
        step, total = int(event.get("step", 0)), int(event.get("total_steps", 0) or 0)
        now = time.perf_counter()
        if total != self.total or self.first is None or step < self.first[1]:
            self.close()
            self.total, self.first, self.last_line = total, (now, step), (now, -1)
        loss, wps, epoch = event.get("loss", float("nan")), event.get("windows_per_s", 0.0), event.get("epoch", 0)
        if self.live:
            self._bar(step, loss, wps, epoch)
            return
        t_last, s_last = self.last_line
        due = step >= total or now - t_last >= self.every_s or step - s_last >= max(1, self.every_frac * total)
        if s_last < 0 or due:
            self.last_line = (now, step)
            self.lines += 1
            pct = 100.0 * step / total if total else 0.0
            self.log(
                f"[{self.name}] step {step}/{total} ({pct:.0f}%) epoch {epoch + 1} loss {loss:.4f} "
                f"{wps:,.0f} windows/s ETA {format_eta(self.eta(step, now))}"
            )

    def _bar(self, step: int, loss: float, wps: float, epoch: int) -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(
                total=self.total,
                initial=self.first[1],
                desc=f"[{self.name}]",
                unit="step",
                file=self.stream,
                dynamic_ncols=True,
                leave=True,
            )
        self.bar.set_postfix_str(f"epoch {epoch + 1} loss {loss:.4f} {wps:,.0f} windows/s", refresh=False)
        self.bar.update(max(0, step - self.bar.n))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def read_manifest_at(out) -> dict:
    """``stages.json`` of an output folder or URL ({} when there is none or it cannot be read)."""
    try:
        data = json.loads(storage.read_text(storage.join(out, MANIFEST)))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def stage_timings(before: dict, after: dict) -> list[tuple[str, float | None]]:
    """``(stage, seconds)`` for every stage recorded after a run, in run order; seconds is None for a stage
    this run did not build (skipped: up to date)."""
    rows = []
    for name, rec in after.items():
        if not isinstance(rec, dict):
            continue
        ran = rec.get("built") is not None and rec.get("built") != (before.get(name) or {}).get("built")
        rows.append((name, float(rec.get("seconds", 0.0)) if ran else None))
    return rows


def timings_table(rows: list[tuple[str, float | None]], total_s: float) -> str:
    """The stage timings as lines for the end of a run."""
    lines = ["stage timings:"]
    for name, s in rows:
        lines.append(f"  {name:<12} {'skipped (up to date)' if s is None else f'{s:8.1f} s'}")
    lines.append(f"  {'total':<12} {total_s:8.1f} s (wall clock, this command)")
    return "\n".join(lines)
