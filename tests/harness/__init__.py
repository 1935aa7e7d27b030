"""The test harness: every test that needs a run of the tiny experiment, a command line or
forked ranks gets it here (docs/testing.md, "The harness").

The tiny experiment at test sizes (runs.py): `TINY` is its override list (fp32 CPU,
deterministic, 3 steps of 4 micro-batches of 2, no evaluation, checkpoints or resume); a test
that needs other values passes them as overrides after it, never a copy of the list. `SMALL`,
after it, makes the model and the batch smaller (for tests of faults, not of the model).

    cfg = tiny_config(["parallel.tp=2"], world_size=2)       # composed, validated, layout-checked
    model_cfg = tiny_model_config("model.n_layers=8")        # its model section
    trainer = build_trainer(tmp_path, ["train.max_steps=2"])  # tiny_config -> Trainer, here
    trainer = trainer_for(cfg, run_dir)                      # a config made earlier (in a rank)

The command line (runs.py), in a child process with one intra-op thread (CHILD_ENV):

    proc = run_train(["train.max_steps=2", f"run.dir={d}"], check=True)  # python -m moetrain.train
    proc = run_train([...], launcher=torchrun(2))             # under torchrun --standalone
    proc = run_train([...], launcher=torchrun(2, relay=True)) # under python -m moetrain.torchrun
    proc = start_train([...])                                 # the same in the background (Popen)
    proc = start_train([...], launcher=local_sh(2))           # through launch/local.sh, 2 ranks
    proc = run_python("-m", "moetrain.hf", "export", ...)     # any other python command
    run_train(..., base=())                                   # without TINY: the config tree alone

Forked gloo ranks (launcher.py):

    results = run_distributed(fn, 4, *args)       # fn(rank, world_size, *args) -> results[rank]
    four_ranks = ranks_fixture(fn, 4, *args)      # that launch as a module-scoped fixture

The equivalence harness (the real Trainer on a layout against one process) is
tests/distributed/equivalence.py, built on these.
"""

from tests.harness.launcher import DistributedTestError, ranks_fixture, run_distributed
from tests.harness.runs import (
    CHILD_ENV, ROOT, SMALL, TINY, build_trainer, child_env, local_sh, run_python, run_train,
    start_train, tiny_config, tiny_model_config, torchrun, train_command, trainer_for,
)

__all__ = ["CHILD_ENV", "DistributedTestError", "ROOT", "SMALL", "TINY", "build_trainer",
           "child_env", "local_sh", "ranks_fixture", "run_distributed", "run_python", "run_train",
           "start_train", "tiny_config", "tiny_model_config", "torchrun", "train_command",
           "trainer_for"]
