"""How fast this machine runs the engine now, against the day the ``local`` preset was calibrated.

The ``local`` preset prices every compiled call shape as ``bench.calibrate`` timed it. This
machine's speed drifts by 10-20% between days and within an hour (``bench/RESULTS.md``, §3:
the step model on `vllm`'s real plans ran 2% over the measured steps in one repeat and 8-9%
under them in the next, with the same prices). A simulation priced on a slower or faster day
than the real run it is compared with is off by that drift, whatever the policy.

:class:`SpeedCheck` runs ``bench.calibrate``'s fixed mix of requests again (single and batched
decodes, cold prefills, prefix-hit continuations; ~110 steps, ~16 s) on the same kind of
engine (a scrambled 400-page pool, synchronous steps) and compares the measured step time
with the preset's model for the same steps. The calibration recorded that comparison on its
own day (``calibration.total_time_pred_vs_meas``), so::

    factor = (measured / model now) / (measured / model at calibration)

is how much slower (> 1) or faster (< 1) the same steps run now. ``Preset.at_speed`` scales
every step price by it. The check runs no workload and sees no policy: it measures the
machine, so the simulation it rescales is not fitted to the run it is compared with.

Timing the preset's call shapes alone on padding input (``diagnostics.time_shapes``) was
tried first and is not used: those calls sped up by 0.75-0.87 between the calibration day
and the twenty-first round while the real engine's steps sped up by ~0.88, so the factor
overcorrected (``bench/RESULTS.md``, twenty-first round).
"""

from __future__ import annotations

import random
from typing import Any

from bench.calibrate import calibration_engine, run_pass, scramble_pool
from bench.presets import Preset


class SpeedCheck:
    """The calibration mix on its own engine, ready to be timed again and again.

    Building it compiles the mix's shapes (one untimed pass: about a minute with the default
    model on this machine); each :meth:`measure` then takes one timed pass."""

    def __init__(self, preset: Preset, eng_kw: dict[str, Any], model: Any = None) -> None:
        cal = preset.notes.get("calibration") or {}
        ratio = cal.get("total_time_pred_vs_meas")
        if not ratio or not preset.step.shape_s:
            raise ValueError(
                "the preset records no calibration of its step model to compare with "
                "(run python -m bench.calibrate, or bench.run with --no-speed-check)"
            )
        self.preset = preset
        self.calibrated_pred_vs_meas = float(ratio)
        self.engine = calibration_engine(eng_kw, model)
        self.rng = random.Random(0)
        run_pass(self.engine, self.rng)  # compiles every bucket the mix reaches

    def measure(self) -> float:
        """One timed pass of the mix: the speed factor now (> 1: slower than calibrated)."""
        scramble_pool(self.engine, self.rng)
        samples = run_pass(self.engine, self.rng)
        measured = sum(t for _, _, t in samples)
        model = sum(self.preset.step.spans_time(spans) for _, spans, _ in samples)
        return measured / model * self.calibrated_pred_vs_meas

    def close(self) -> None:
        """Release the check's engine."""
        self.engine.close()
