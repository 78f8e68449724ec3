"""The event loop's busy streak, the signal admission control refuses on under CPU overload."""

import time

from recsvc.api.admission import LoopBusy


def spin(seconds):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def test_work_without_a_pause_extends_the_streak_and_a_pause_ends_it():
    busy = LoopBusy()
    busy.busy_for_ms()
    spin(0.01)
    first = busy.busy_for_ms()
    spin(0.02)
    second = busy.busy_for_ms()
    assert 8 <= first < second and second >= 28
    time.sleep(0.01)  # the loop would sleep in its poller: nothing to do
    assert busy.busy_for_ms() == 0
    spin(0.005)
    assert 4 <= busy.busy_for_ms() < 25
