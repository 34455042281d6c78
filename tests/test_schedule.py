"""gpt.schedule: the warmup-stable-decay learning rate, and a time budget that holds when the machine
slows down mid-run (simulated clocks: no test sleeps)."""

import pytest
import torch
from helpers import tiny_args

from gpt import config, train
from gpt.distributed import World
from gpt.runfiles import StopRequest
from gpt.schedule import FINAL_LR_FRACTION, Schedule, TimeBudget

pytestmark = pytest.mark.usefixtures("one_thread")


def test_fixed_schedule_warms_up_holds_then_decays_linearly_to_a_tenth():
    schedule = Schedule.fixed(1.0, warmup=10, total_steps=110, decay=0.2)
    lr = [schedule.lr(n) for n in range(111)]
    assert lr[0] == pytest.approx(0.1) and lr[4] == pytest.approx(0.5) and lr[9] == pytest.approx(1.0)
    assert lr[10:89] == [1.0] * 79  # stable until the last 20% (22 steps) of the run
    assert schedule.decay_start == 88
    assert lr[99] == pytest.approx(1.0 - (1.0 - FINAL_LR_FRACTION) * 11 / 22)  # halfway down the line
    assert lr[110] == pytest.approx(FINAL_LR_FRACTION) and schedule.lr(500) == pytest.approx(FINAL_LR_FRACTION)
    assert all(a >= b for a, b in zip(lr[9:], lr[10:]))


def test_retargeting_the_decay_moves_the_end_without_a_jump():
    schedule = Schedule.fixed(2.0, warmup=0, total_steps=100, decay=0.5)
    before = schedule.lr(70)
    schedule.retarget(70, 200)  # the run will last longer than planned: a flatter line from here
    assert schedule.lr(70) == pytest.approx(before)
    assert schedule.lr(71) < before and schedule.lr(200) == pytest.approx(2.0 * FINAL_LR_FRACTION)
    stable = Schedule(1.0, warmup=5, total_steps=None)
    stable.retarget(40, 90)  # in the stable phase only the length changes
    assert stable.decay_start is None and stable.total_steps == 90 and stable.lr(89) == 1.0
    stable.start_decay(2, 10)  # a decay that starts during warmup starts from warmup's value
    assert stable.lr(2) == pytest.approx(0.6) and stable.lr(10) == pytest.approx(FINAL_LR_FRACTION)


def simulate(budget_s: float, step_s, log_interval: int = 50, eval_interval: int = 250, eval_s: float = 0.75):
    """Run the budget's loop as gpt.train does, on a simulated clock: step_s(elapsed) seconds per step,
    an evaluation every eval_interval steps. Returns (seconds used, learning rates, steps)."""
    budget = TimeBudget(budget_s, decay=0.3)
    schedule = Schedule(1.0, warmup=100, total_steps=None)
    clock, step, since, lrs = 0.0, 0, (0.0, 0), []
    while schedule.total_steps is None or step < schedule.total_steps:
        lrs.append(schedule.lr(step))
        clock += step_s(clock)
        step += 1
        if step % log_interval == 0 or step == schedule.total_steps:
            budget.observe(step - since[1], clock - since[0])
            budget.update(schedule, step, clock)
            since = (clock, step)
            if step % eval_interval == 0:
                clock += eval_s
    return clock, lrs, step


def slows_down_halfway(budget_s: float):
    return lambda clock: 0.2 if clock < budget_s / 2 else 0.26  # 30% slower steps from halfway on


def test_time_budget_holds_when_steps_get_30_percent_slower_halfway():
    budget_s = 600.0
    used, lrs, steps = simulate(budget_s, slows_down_halfway(budget_s))
    assert abs(used - budget_s) <= 0.1 * budget_s
    assert abs(used - budget_s) <= 0.01 * budget_s  # in fact within a log window or two
    assert lrs[-1] == pytest.approx(FINAL_LR_FRACTION, abs=0.02)  # the decay was completed
    slope = (1 - FINAL_LR_FRACTION) / (0.3 * steps)
    assert max(abs(a - b) for a, b in zip(lrs[100:], lrs[101:])) < 2 * slope  # never a jump
    # The control: a step count fixed from the first minute's speed overruns by more than 10%.
    fixed_steps = int(budget_s / (0.2 + 0.75 / 250))
    fixed_used = sum(slows_down_halfway(budget_s)(n * 0.2) for n in range(fixed_steps))
    assert fixed_used > 1.1 * budget_s


def test_trainer_ends_on_budget_with_a_simulated_slowdown(corpus, tmp_path):
    """The real training loop on a simulated clock: each step costs 0.2 s, 0.26 s after 30 s."""
    cfg, _ = config.configure(tiny_args(corpus, tmp_path / "out", "--minutes", "1", "--log-interval", "5"))
    trainer = train.Trainer.start(cfg, World(), torch.device("cpu"))
    now = [0.0]
    trainer.clock = lambda: now[0]
    trainer.started = 0.0
    real_train_one = trainer.train_one

    def slow_train_one(step: int) -> torch.Tensor:
        now[0] += 0.2 if now[0] < 30 else 0.26
        return real_train_one(step)

    trainer.train_one = slow_train_one
    (tmp_path / "out").mkdir()
    with StopRequest() as stop:
        assert trainer.fit(stop, tmp_path / "out") == 0
    assert abs(now[0] - 60) <= 6
    assert trainer.step == trainer.schedule.total_steps
    assert trainer.lr == pytest.approx(cfg.lr * FINAL_LR_FRACTION, rel=0.2)  # the last step's
