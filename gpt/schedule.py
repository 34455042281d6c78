"""The learning-rate schedule, and the time budget that sizes it while the run goes on.

    schedule = Schedule.fixed(peak=2e-3, warmup=100, total_steps=4000, decay=0.3)   # --steps
    lr = schedule.lr(step)

Warmup-stable-decay (WSD): a linear warmup to the peak, the peak for as long as the run lasts, then
a linear decay to FINAL_LR_FRACTION of the peak over the last `decay` fraction of the run. Unlike a
cosine, the stable phase does not depend on the run's length, which is what a time budget needs:
with --minutes, TimeBudget re-estimates at every log step how many steps still fit, from the speed
measured so far. The decay starts once the time left reaches the decay fraction of the budget; during
the decay each new estimate re-aims the line from the current step and learning rate to the new end,
so a machine that slows down (or speeds up) mid-run moves the end, never the learning rate at once.
"""

from dataclasses import dataclass

FINAL_LR_FRACTION = 0.1  # the decay ends at 10% of the peak learning rate
SPEED_SMOOTHING = 0.5  # weight of the newest log window in the seconds-per-step estimate


@dataclass
class Schedule:
    """The learning rate of every step: lr(step) = peak x multiplier.

    The decay is the straight line from (decay_start, decay_from x peak) to (total_steps,
    FINAL_LR_FRACTION x peak); decay_start is None while the stable phase lasts. These three
    numbers are the schedule's state: a checkpoint stores them (state_dict) so a resumed run
    continues the same line, and a time budget moves them (start_decay, retarget).
    """

    peak: float
    warmup: int
    total_steps: int | None  # None: not known yet (a time budget has not measured the speed)
    decay_start: int | None = None
    decay_from: float = 1.0  # the multiplier of the peak where the decay started

    @classmethod
    def fixed(cls, peak: float, warmup: int, total_steps: int, decay: float) -> "Schedule":
        """A run of a known length: the decay covers its last `decay` fraction."""
        return cls(peak, warmup, total_steps, decay_start=round(total_steps * (1 - decay)))

    def multiplier(self, step: int) -> float:
        if self.decay_start is not None and step >= self.decay_start:
            progress = min(1.0, (step - self.decay_start) / max(1, self.total_steps - self.decay_start))
            return self.decay_from + (FINAL_LR_FRACTION - self.decay_from) * progress
        if step < self.warmup:
            return (step + 1) / self.warmup
        return 1.0

    def lr(self, step: int) -> float:
        return self.peak * self.multiplier(step)

    def start_decay(self, step: int, total_steps: int) -> None:
        """Begin the decay at `step` (from wherever warmup has got to), ending at total_steps."""
        self.decay_from, self.decay_start, self.total_steps = self.multiplier(step), step, total_steps

    def retarget(self, step: int, total_steps: int) -> None:
        """A new end: in the stable phase just the length; in the decay, a new line from `step`'s
        learning rate, so the learning rate is continuous."""
        if self.decay_start is None:
            self.total_steps = total_steps
        else:
            self.start_decay(step, total_steps)

    def state_dict(self) -> dict:
        return {"total_steps": self.total_steps, "decay_start": self.decay_start, "decay_from": self.decay_from}

    def load_state_dict(self, state: dict) -> None:
        self.total_steps, self.decay_start, self.decay_from = (
            state["total_steps"],
            state["decay_start"],
            state["decay_from"],
        )


@dataclass
class TimeBudget:
    """--minutes: how many more steps fit, from the seconds per step measured so far.

    seconds: the budget of the training loop (evaluations and checkpoints included), less what the
    final evaluation will take (reserve_s, measured on the intermediate evaluations).
    step_s: smoothed seconds per step, over log windows; the newest window weighs SPEED_SMOOTHING,
    so a slowdown shows within a few log steps while an evaluation's pause is averaged out.
    """

    seconds: float
    decay: float
    step_s: float | None = None
    reserve_s: float = 0.0

    def observe(self, steps: int, seconds: float) -> None:
        """`steps` steps took `seconds` (wall time since the last observation)."""
        window_s = seconds / steps
        if self.step_s is None:
            self.step_s = window_s
        else:
            self.step_s += SPEED_SMOOTHING * (window_s - self.step_s)

    def steps_left(self, elapsed_s: float) -> int:
        return max(0, int((self.seconds - self.reserve_s - elapsed_s) / self.step_s))

    def should_decay(self, elapsed_s: float) -> bool:
        return self.seconds - self.reserve_s - elapsed_s <= self.decay * (self.seconds - self.reserve_s)

    def update(self, schedule: Schedule, step: int, elapsed_s: float) -> None:
        """Re-aim `schedule` at the step where the budget runs out (no later than now + what fits)."""
        total = step + self.steps_left(elapsed_s)
        if schedule.decay_start is None and self.should_decay(elapsed_s):
            schedule.start_decay(step, total)
        else:
            schedule.retarget(step, total)

    def state_dict(self) -> dict:
        return {"step_s": self.step_s, "reserve_s": self.reserve_s}

    def load_state_dict(self, state: dict) -> None:
        self.step_s, self.reserve_s = state["step_s"], state["reserve_s"]
