"""What python -m moetrain.torchrun returns when its ranks fail (moetrain/launcher_exit.py)."""

from types import SimpleNamespace as Failure

from moetrain.launcher_exit import one_line_outcome

LINE = "error: model.moe.top_k=9 is invalid: must be in [1, model.moe.num_experts=8]"


def test_a_refused_start_is_its_one_line_and_exit_2_whatever_the_killed_ranks():
    failures = {0: Failure(exitcode=2, message=LINE), 1: Failure(exitcode=2, message=LINE),
                2: Failure(exitcode=-15, message="Signal 15 (SIGTERM) received by PID 7")}
    assert one_line_outcome(failures) == (2, [LINE])
    other = "error: data.sources[0].path='/x' matches no file"
    assert one_line_outcome({1: Failure(exitcode=2, message=other),
                             0: Failure(exitcode=2, message=LINE)}) == (2, [LINE, other])


def test_an_interrupt_is_exit_130_and_a_crash_keeps_torchruns_report():
    stop = "error: interrupted (Ctrl-C); stopped without saving a checkpoint"
    assert one_line_outcome({0: Failure(exitcode=130, message=stop)}) == (130, [stop])
    assert one_line_outcome({0: Failure(exitcode=2, message=LINE),
                             1: Failure(exitcode=1, message="RuntimeError: boom")}) is None
    assert one_line_outcome({0: Failure(exitcode=-9, message="Signal 9")}) is None
    # a rank that exited 2 without an error file still gives one line
    assert one_line_outcome({3: Failure(exitcode=2, message="")}) == (
        2, ["error: rank 3 exited with code 2 (see its log)"])
