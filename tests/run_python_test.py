"""The test helper that turns a hung subprocess into a failure with stacks."""

import sys

import pytest

import conftest


def test_a_hung_subprocess_fails_the_test_showing_where_it_hung():
  script = ("import threading, time\n"
            "def stuck_in_a_thread(): time.sleep(600)\n"
            "threading.Thread(target=stuck_in_a_thread).start()\n"
            "print('started', flush=True)\n"
            "time.sleep(600)\n")
  with pytest.raises(pytest.fail.Exception) as failure:
    conftest.run_python([sys.executable, "-c", script], timeout=5,
                        env=conftest.subprocess_env(1))
  message = str(failure.value)
  assert "Still running after 5 s" in message
  assert "started" in message  # What it printed before.
  assert "stuck_in_a_thread" in message  # Every thread's stack.
  assert "<module>" in message


def test_a_finished_subprocess_returns_its_output_and_status():
  result = conftest.run_python(
      [sys.executable, "-c", "import sys; print('out'); sys.exit(3)"],
      timeout=60, env=conftest.subprocess_env(1))
  assert (result.returncode, result.stdout) == (3, "out\n")
